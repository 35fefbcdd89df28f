"""The request side, without a server: one table of field ranges drives both the checks and the OpenAPI schema
(each bound the schema states is accepted, one step past it refused with the rule the schema states), and a
body's fields become one typed RequestOptions."""

from __future__ import annotations

import pytest

from loramix.config import GateOptions
from loramix.engine.params import SamplingParams
from loramix.serving.protocol import (
    ApiError,
    Choices,
    RequestOptions,
    field_ranges,
    options_from,
    request_schemas,
)

CAP, EXPERTS, ROWS = 64, 3, 12
RANGES = field_ranges(CAP, EXPERTS, ROWS)
COMPLETION, CHAT = request_schemas("m", RANGES, ROWS)

# (API, where the field sits in a body, the param an error names); every numeric field of the two schemas
FIELDS = [
    ("completions", ("max_tokens",), "max_tokens"),
    ("chat", ("max_tokens",), "max_tokens"),
    ("chat", ("max_completion_tokens",), "max_completion_tokens"),
    ("completions", ("n",), "n"),
    ("completions", ("temperature",), "temperature"),
    ("completions", ("top_p",), "top_p"),
    ("completions", ("seed",), "seed"),
    ("completions", ("logprobs",), "logprobs"),
    ("chat", ("top_logprobs",), "top_logprobs"),
    ("completions", ("xlora", "top_k"), "xlora.top_k"),
    ("completions", ("xlora", "softmax_temperature"), "xlora.softmax_temperature"),
    ("completions", ("xlora", "freeze_scalings_after"), "xlora.freeze_scalings_after"),
]


def _declared(api: str, path: tuple[str, ...]) -> dict:
    """The field's non-null schema in the OpenAPI document."""
    schema = COMPLETION if api == "completions" else CHAT
    for key in path:
        schema = schema["properties"][key]
    return schema["anyOf"][0]


def _options(api: str, path: tuple[str, ...], value) -> RequestOptions:
    body = {"xlora": {path[1]: value}} if path[0] == "xlora" else {path[0]: value}
    if api == "chat" and path == ("top_logprobs",):
        body["logprobs"] = True
    if api == "completions" and path == ("max_tokens",):
        body["echo"] = True  # the schema allows 0: with echo
    return options_from(body, chat=api == "chat", ranges=RANGES)


def _beyond(declared: dict, bound: str) -> int | float:
    """One step past a bound: 1 for integers, a millionth of the bound (or of 1) for numbers."""
    value = declared[bound]
    step = 1 if declared["type"] == "integer" else max(abs(value), 1) * 1e-6
    return value - step if bound in ("minimum", "exclusiveMinimum") else value + step


@pytest.mark.parametrize("api, path, param", FIELDS)
def test_each_bound_the_schema_states_is_the_checks(api, path, param):
    declared = _declared(api, path)
    assert declared["description"]  # the rule in words, stated once for clients
    for bound in ("minimum", "maximum"):
        if bound in declared:
            _options(api, path, declared[bound])  # at the bound: accepted
    if "exclusiveMinimum" in declared:
        _options(api, path, declared["exclusiveMinimum"] + (1 if declared["type"] == "integer" else 1e-9))
    bounds = [b for b in ("minimum", "exclusiveMinimum", "maximum") if b in declared]
    assert bounds
    for bound in bounds:
        value = declared[bound] if bound == "exclusiveMinimum" else _beyond(declared, bound)
        with pytest.raises(ApiError) as refused:
            _options(api, path, value)
        err = refused.value
        assert (err.status, err.param) == (400, param)
        assert err.message == f"{param} must be {declared['description']}, got {value!r}"


def test_the_table_bounds_what_the_server_serves():
    assert _declared("completions", ("max_tokens",))["maximum"] == CAP
    assert _declared("completions", ("xlora", "top_k"))["maximum"] == EXPERTS
    assert _declared("completions", ("n",))["maximum"] == 12  # the server's rows, below 16 choices
    assert field_ranges(CAP, EXPERTS, 100)["n"].high == 16


def test_max_tokens_0_only_with_echo():
    assert _declared("completions", ("max_tokens",))["minimum"] == 0  # the completions schema allows it...
    echo = options_from({"max_tokens": 0, "echo": True}, chat=False, ranges=RANGES)
    assert echo.params.max_new_tokens == 0 and echo.choices.echo
    with pytest.raises(ApiError) as refused:  # ...with echo only, as the check says
        options_from({"max_tokens": 0}, chat=False, ranges=RANGES)
    assert refused.value.message == f"max_tokens must be {RANGES['max_tokens'].rule()}, got 0"


def test_a_body_becomes_one_typed_value():
    body = {"n": 2, "max_tokens": 7, "temperature": 0.5, "top_p": 0.9, "seed": 3, "stop": "x", "logprobs": 1,
            "echo": True, "stream": True, "stream_options": {"include_usage": True},
            "xlora": {"top_k": 1, "softmax_temperature": 2, "freeze_scalings_after": 4, "return_scalings": True}}
    assert options_from(body, chat=False, ranges=RANGES) == RequestOptions(
        params=SamplingParams(max_new_tokens=7, do_sample=True, temperature=0.5, top_p=0.9, seed=3, stop=["x"]),
        gate=GateOptions(top_k_lora=1, softmax_temperature=2.0, freeze_scalings_after=4),
        choices=Choices(n=2, logprobs=1, echo=True, scalings=True), stream=True, include_usage=True)
    plain = options_from({}, chat=True, ranges=RANGES)
    assert plain == RequestOptions(params=SamplingParams(max_new_tokens=16, do_sample=True, temperature=1.0,
                                                         top_p=1.0), gate=GateOptions(), choices=Choices())
