"""The OpenAI request side of `loramix serve`: a body's fields checked (400 naming the field, in OpenAI's error
shape) into typed `RequestOptions`, against one table of field ranges that the OpenAPI request schemas also read.
Pure functions: no app, no engine.

The X-LoRA extension: an optional request field
    "xlora": {"return_scalings": true, "top_k": 2, "softmax_temperature": 0.5, "freeze_scalings_after": 16}
sets the gate for that request only (see `gate_from`); `"return_scalings": "layers"` asks for each token's
scalings per LoRA layer instead of summed over the layers (`choices_from`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from typing import Any

from fastapi.responses import Response

from ..config import GateOptions
from ..engine.params import SamplingParams

DEFAULT_MAX_TOKENS = 16
SEED_RANGE = (-(1 << 63), (1 << 64) - 1)  # what torch.Generator.manual_seed accepts
MAX_CHOICES = 16  # n: choices per prompt
MAX_LOGPROBS = 20  # alternatives per token (OpenAI's limit)
MAX_STOP = 16  # stop strings (OpenAI allows 4; lm-eval adds the EOS text to a task's own)
SCALINGS_PER_LAYER = "layers"  # xlora.return_scalings: each token's scalings per LoRA layer, not summed
MAX_STOP_CHARS = 4096  # characters of a request's stop strings together (every row's text is matched against them)


class ApiError(Exception):
    """An error answered in OpenAI's shape: HTTP `status` and {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    def response(self, headers: dict | None = None) -> Response:
        # json.dumps escapes everything outside ASCII, so even a message quoting a lone surrogate renders
        return Response(json.dumps(self.body()), status_code=self.status, media_type="application/json",
                        headers=headers)


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def parse_body(raw: bytes) -> dict:
    """The JSON object of a request body; 400 for anything else (bad JSON, nesting too deep, lone surrogates)."""
    try:
        body = json.loads(raw, parse_constant=_reject_constant)
    except RecursionError:
        raise ApiError(400, "the request body is nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    where = _lone_surrogate(body)
    if where is not None:
        raise ApiError(400, f"{where} holds a lone UTF-16 surrogate (such as \\ud800), which is not text",
                       param=where)
    return body


def _lone_surrogate(body: dict) -> str | None:
    """The path ("messages[0].content") of the first string holding an unpaired surrogate, which no tokenizer can
    encode; walked without recursion, as the body may be nested as deeply as json allows."""
    stack: list[tuple[str, Any]] = [("", body)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, str):
            if not _is_text(value):
                return path or "body"
        elif isinstance(value, dict):
            for key, item in value.items():
                if not _is_text(key):
                    return path or "body"
                stack.append((f"{path}.{key}" if path else key, item))
        elif isinstance(value, list):
            stack.extend((f"{path}[{i}]", item) for i, item in enumerate(value) if isinstance(item, (str, list, dict)))
    return None


def _is_text(s: str) -> bool:
    if s.isascii():
        return True
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


@dataclass(frozen=True)
class Range:
    """The values a numeric request field takes: `kind` "integer" (an int, not a bool) or "number" (a finite int
    or float), from `low` to `high` (None: unbounded), `low` itself excluded when `above_low`. The check and the
    field's JSON schema both come from here, and both state the same rule (`rule`)."""

    kind: str
    low: int | float | None = None
    high: int | float | None = None
    above_low: bool = False

    def rule(self) -> str:
        """The rule in words: "an integer from 1 to 16", "a number above 0 and at most 1"."""
        what = "an integer" if self.kind == "integer" else "a number"
        if self.above_low:
            return f"{what} above {self.low}" + ("" if self.high is None else f" and at most {self.high}")
        if self.low is not None and self.high is not None:
            return f"{what} from {self.low} to {self.high}"
        if self.low is not None:
            return f"{what} of at least {self.low}"
        return what if self.high is None else f"{what} of at most {self.high}"

    def check(self, value: Any, name: str) -> int | float:
        """`value` as an int ("integer") or a float ("number"); 400 naming `name` and stating `rule` otherwise.
        Bounds are compared exactly, for ints of any size (no float conversion first)."""
        if self.kind == "integer":
            fits = isinstance(value, int) and not isinstance(value, bool)
        else:
            fits = isinstance(value, (int, float)) and not isinstance(value, bool) and (
                not isinstance(value, float) or math.isfinite(value))
        if fits and self.low is not None:
            fits = value > self.low if self.above_low else value >= self.low
        if fits and self.high is not None:
            fits = value <= self.high
        if not fits:
            raise ApiError(400, f"{name} must be {self.rule()}, got {short_value(value)}", param=name)
        return value if self.kind == "integer" else float(value)

    def schema(self) -> dict:
        """The JSON schema of the field's non-null values."""
        schema: dict[str, Any] = {"type": self.kind}
        if self.low is not None:
            schema["exclusiveMinimum" if self.above_low else "minimum"] = self.low
        if self.high is not None:
            schema["maximum"] = self.high
        return {**schema, "description": self.rule()}


def field_ranges(max_tokens_cap: int, n_experts: int, max_rows: int) -> dict[str, Range]:
    """The range of every numeric request field on a server with these limits (`max_rows`: the engine's rows,
    --max-batch + --max-queue): the one table that `options_from` checks against and `request_schemas` states."""
    return {
        "max_tokens": Range("integer", 1, max_tokens_cap),  # also max_completion_tokens; 0 too with echo
        "n": Range("integer", 1, min(MAX_CHOICES, max_rows)),
        "temperature": Range("number", 0, 2),
        "top_p": Range("number", 0, 1, above_low=True),
        "presence_penalty": Range("number", -2, 2),  # then refused unless 0
        "frequency_penalty": Range("number", -2, 2),
        "seed": Range("integer", *SEED_RANGE),
        "logprobs": Range("integer", 0, MAX_LOGPROBS),  # completions; chat's is a flag
        "top_logprobs": Range("integer", 0, MAX_LOGPROBS),
        "xlora.top_k": Range("integer", 1, n_experts),
        "xlora.softmax_temperature": Range("number", 1e-3, 100),
        "xlora.freeze_scalings_after": Range("integer", 0),
    }


def max_tokens_range(ranges: dict[str, Range], echo: bool) -> Range:
    """`max_tokens`' range: from 0 with `echo` (the prompt's log-probabilities alone), else from 1."""
    return replace(ranges["max_tokens"], low=0) if echo else ranges["max_tokens"]


def _field(body: dict, key: str, ranges: dict[str, Range], default=None, name: str | None = None):
    """body[key] checked against the range of `name` (default: `key`; "xlora.top_k" for the xlora object's
    "top_k"), or `default` when absent or null."""
    value = body.get(key)
    return default if value is None else ranges[name or key].check(value, name or key)


def short_value(value: Any) -> str:
    """A value for an error message: huge numbers and strings cut to a readable length."""
    huge = isinstance(value, int) and abs(value) >= 10 ** 30
    text = f"an integer of {len(str(value))} digits" if huge else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


@dataclass(frozen=True)
class Choices:
    """What a request asks back besides text: `n` choices per prompt, log-probabilities (k alternatives per
    token, or None), for completions the prompt echoed before the completion, and the X-LoRA scalings of each
    new token (`xlora.return_scalings`): summed over the LoRA layers, or per layer with `scalings_per_layer`
    (`"return_scalings": "layers"`)."""

    n: int = 1
    logprobs: int | None = None
    echo: bool = False
    scalings: bool = False
    scalings_per_layer: bool = False


def choices_from(body: dict, chat: bool, ranges: dict[str, Range]) -> Choices:
    """`n`, `logprobs` (completions: an integer 0-20; chat: true, with `top_logprobs` 0-20), `echo` and
    `xlora.return_scalings` (true, false or "layers"); 400 naming the field otherwise."""
    n = _field(body, "n", ranges, default=1)
    spec = body.get("xlora")
    scalings = spec.get("return_scalings", False) if isinstance(spec, dict) else False
    if not isinstance(scalings, bool) and scalings != SCALINGS_PER_LAYER:
        raise ApiError(400, f'xlora.return_scalings must be true, false or "{SCALINGS_PER_LAYER}", got '
                            f"{short_value(scalings)}", param="xlora.return_scalings")
    per_layer = scalings == SCALINGS_PER_LAYER
    scalings = per_layer or scalings
    if chat:
        if body.get("echo"):
            raise ApiError(400, "echo is not supported for chat completions", param="echo")
        flag = body.get("logprobs")
        if flag is not None and not isinstance(flag, bool):
            raise ApiError(400, f"logprobs must be true or false for chat completions, got {short_value(flag)}",
                           param="logprobs")
        top = _field(body, "top_logprobs", ranges, default=0)
        if top and not flag:
            raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        return Choices(n=n, logprobs=top if flag else None, scalings=scalings, scalings_per_layer=per_layer)
    logprobs = _field(body, "logprobs", ranges)
    echo = body.get("echo")
    if echo is not None and not isinstance(echo, bool):
        raise ApiError(400, "echo must be true or false", param="echo")
    return Choices(n=n, logprobs=logprobs, echo=bool(echo), scalings=scalings, scalings_per_layer=per_layer)


def sampling_from(body: dict, ranges: dict[str, Range], echo: bool = False) -> SamplingParams:
    """OpenAI fields -> SamplingParams; 400 naming the field for anything out of range. `max_tokens` may be 0
    only with `echo` (the prompt's log-probabilities alone)."""
    for unsupported in ("suffix", "tools", "functions", "logit_bias"):
        if body.get(unsupported) not in (None, False, 0, {}, []):
            raise ApiError(400, f"{unsupported} is not supported by this server", param=unsupported)
    if body.get("best_of") not in (None, 1):
        raise ApiError(400, "best_of must be 1", param="best_of")
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    allowed = max_tokens_range(ranges, echo)
    # the default obeys the cap too: a server capped below it answers that many tokens at most
    max_tokens = body.get(name)
    max_tokens = min(DEFAULT_MAX_TOKENS, allowed.high) if max_tokens is None else allowed.check(max_tokens, name)
    temperature = _field(body, "temperature", ranges, default=1.0)
    top_p = _field(body, "top_p", ranges, default=1.0)
    for name in ("presence_penalty", "frequency_penalty"):
        if _field(body, name, ranges, default=0.0) != 0:
            raise ApiError(400, f"{name} is not supported (only 0)", param=name)
    seed = _field(body, "seed", ranges)
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or len(stop) > MAX_STOP or not all(isinstance(s, str) and s for s in stop):
        raise ApiError(400, f"stop must be a non-empty string or a list of up to {MAX_STOP} non-empty strings",
                       param="stop")
    if sum(len(s) for s in stop) > MAX_STOP_CHARS:
        raise ApiError(400, f"stop: the stop strings hold {sum(len(s) for s in stop)} characters together; this "
                            f"server takes at most {MAX_STOP_CHARS}", param="stop")
    return SamplingParams(max_new_tokens=max_tokens, do_sample=temperature > 0, temperature=temperature,
                          top_p=top_p, seed=seed, stop=stop)


def gate_from(body: dict, ranges: dict[str, Range]) -> GateOptions:
    """The request's `xlora` object as the gate options of its rows (`return_scalings` is read by `choices_from`);
    400 naming the field otherwise."""
    spec = body.get("xlora")
    if spec is None:
        return GateOptions()
    if not isinstance(spec, dict):
        raise ApiError(400, "xlora must be an object", param="xlora")
    known = {"return_scalings", "top_k", "softmax_temperature", "freeze_scalings_after"}
    unknown = sorted(set(spec) - known)
    if unknown:
        raise ApiError(400, f"xlora: unknown option(s) {short_value(unknown)}; known: {sorted(known)}", param="xlora")
    top_k = _field(spec, "top_k", ranges, name="xlora.top_k")
    temperature = _field(spec, "softmax_temperature", ranges, name="xlora.softmax_temperature")
    freeze = _field(spec, "freeze_scalings_after", ranges, name="xlora.freeze_scalings_after")
    return GateOptions(top_k_lora=top_k, softmax_temperature=temperature, freeze_scalings_after=freeze)


@dataclass(frozen=True)
class RequestOptions:
    """Every field of a request but its prompt, checked: how its rows sample, their gate, what the answer carries
    besides text, and whether it streams."""

    params: SamplingParams
    gate: GateOptions
    choices: Choices
    stream: bool = False
    include_usage: bool = False  # stream_options.include_usage: a last chunk with the token counts


def check_response_format(body: dict) -> None:
    """`response_format`: absent, null or {"type": "text"} (plain text, what every answer is). A JSON mode
    ({"type": "json_object"} or "json_schema") needs decoding constrained to the grammar, which this server does
    not do: refused with a 400 naming the field rather than answered with text that may not parse."""
    value = body.get("response_format")
    if value is None:
        return
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "text" and set(value) == {"type"}:
        return
    if kind in ("json_object", "json_schema"):
        raise ApiError(400, f'response_format: {{"type": "{kind}"}} is not supported by this server (it does not '
                            'constrain decoding to JSON); leave response_format out or send {"type": "text"}',
                       param="response_format")
    raise ApiError(400, f'response_format must be {{"type": "text"}}, got {short_value(value)}',
                   param="response_format")


def options_from(body: dict, chat: bool, ranges: dict[str, Range]) -> RequestOptions:
    """Every field but the prompt (or the messages), checked before any tokenizing; 400 naming the first bad one.
    `ranges`: the server's `field_ranges`."""
    check_response_format(body)
    choices = choices_from(body, chat, ranges)
    params = sampling_from(body, ranges, echo=choices.echo)
    gate = gate_from(body, ranges)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, "stream must be true or false", param="stream")
    stream_options = body.get("stream_options")
    include_usage = isinstance(stream_options, dict) and bool(stream_options.get("include_usage"))
    return RequestOptions(params=params, gate=gate, choices=choices, stream=stream, include_usage=include_usage)


def prompt_list(prompt: Any) -> list[str | list[int]]:
    """A completions `prompt` as a list of prompts: a string, a list of strings, a list of token ids, or a list
    of token-id lists (what lm-eval sends); 400 for anything else."""
    def is_ids(value) -> bool:
        return isinstance(value, list) and bool(value) and all(
            isinstance(t, int) and not isinstance(t, bool) for t in value)

    if isinstance(prompt, str) or is_ids(prompt):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and (all(isinstance(p, str) for p in prompt) or
                                                  all(is_ids(p) for p in prompt)):
        prompts = prompt
    else:
        raise ApiError(400, "prompt must be a string, a list of strings, a list of token ids or a list of "
                            "token-id lists", param="prompt")
    for i, p in enumerate(prompts):
        if p == "":
            raise ApiError(400, "prompt must not be empty" if len(prompts) == 1 else f"prompt[{i}] is empty",
                           param="prompt")
    return prompts


def request_schemas(model_name: str, ranges: dict[str, Range], max_rows: int) -> tuple[dict, dict]:
    """JSON schemas of the /v1/completions and /v1/chat/completions bodies, for the OpenAPI document (the routes
    read raw bodies and check them themselves, with OpenAI-style errors). Every numeric field's bounds are read
    from `ranges`, the table the checks use; `max_rows` bounds the prompts of one request."""
    def nullable(schema: dict) -> dict:
        return {"anyOf": [schema, {"type": "null"}]}

    def field(name: str) -> dict:
        return nullable(ranges[name].schema())

    common = {
        "model": {"type": "string", "enum": [model_name]},
        "max_tokens": field("max_tokens"),
        "temperature": field("temperature"),
        "top_p": field("top_p"),
        "seed": field("seed"),
        "stop": {"anyOf": [{"type": "string", "minLength": 1, "maxLength": MAX_STOP_CHARS}, {"type": "null"},
                           {"type": "array", "items": {"type": "string", "minLength": 1, "maxLength": MAX_STOP_CHARS},
                            "maxItems": MAX_STOP, "description": f"at most {MAX_STOP_CHARS} characters together"}]},
        "stream": {"type": "boolean"},
        "response_format": nullable({"type": "object", "required": ["type"], "additionalProperties": False,
                                     "properties": {"type": {"type": "string", "enum": ["text"]}},
                                     "description": "only plain text: JSON modes are refused (400)"}),
        "stream_options": nullable({"type": "object", "properties": {"include_usage": {"type": "boolean"}}}),
        "n": field("n"),
        "xlora": {"type": "object", "additionalProperties": False, "properties": {
            "return_scalings": {"anyOf": [{"type": "boolean"}, {"type": "string", "enum": [SCALINGS_PER_LAYER]}],
                                "description": "each new token's expert weights: true, summed over the LoRA layers; "
                                               f'"{SCALINGS_PER_LAYER}", one row per LoRA layer'},
            "top_k": field("xlora.top_k"),
            "softmax_temperature": field("xlora.softmax_temperature"),
            "freeze_scalings_after": field("xlora.freeze_scalings_after")}},
    }
    token_ids = {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1}
    # several prompts: one choice each (n each), at most max_rows in all
    prompt = {"anyOf": [{"type": "string", "minLength": 1}, token_ids,
                        {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1,
                         "maxItems": max_rows},
                        {"type": "array", "items": token_ids, "minItems": 1, "maxItems": max_rows}]}
    message = {"type": "object", "required": ["role", "content"],
               "properties": {"role": {"type": "string", "enum": ["system", "user", "assistant"]},
                              "content": {"type": "string"}}}
    completion = {"type": "object", "required": ["model", "prompt"], "properties": {
        "prompt": prompt, **common,
        "max_tokens": {**nullable(max_tokens_range(ranges, echo=True).schema()),
                       "description": "0 only with echo: the prompt's log-probabilities alone"},
        "logprobs": field("logprobs"),
        "echo": nullable({"type": "boolean"})}}
    chat = {"type": "object", "required": ["model", "messages"],
            "properties": {"messages": {"type": "array", "items": message, "minItems": 1},
                           "max_completion_tokens": common["max_tokens"], **common,
                           "logprobs": nullable({"type": "boolean"}),
                           "top_logprobs": field("top_logprobs")}}
    return completion, chat


def openapi_body(schema: dict) -> dict:
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}
