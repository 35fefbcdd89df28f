"""The OpenAI request side of `loramix serve`: a body's JSON, every field checked (400 naming the field, in the
OpenAI error shape), turned into SamplingParams, GateOptions and Choices, and the request schemas of the OpenAPI
document. Pure functions: no app, no engine.

The X-LoRA extension: an optional request field
    "xlora": {"return_scalings": true, "top_k": 2, "softmax_temperature": 0.5, "freeze_scalings_after": 16}
sets the gate for that request only (see `gate_from`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from fastapi.responses import Response

from ..config import GateOptions
from ..engine.params import SamplingParams

DEFAULT_MAX_TOKENS = 16
SEED_RANGE = (-(1 << 63), (1 << 64) - 1)  # what torch.Generator.manual_seed accepts
MAX_CHOICES = 16  # n: choices per prompt
MAX_LOGPROBS = 20  # alternatives per token (OpenAI's limit)
MAX_STOP = 16  # stop strings (OpenAI allows 4; lm-eval adds the EOS text to a task's own)


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


def _number(body: dict, name: str, default: float, low: float, high: float, prefix: str = "") -> float:
    """body[name] as a finite float in [low, high]; `prefix` names the enclosing object in errors ("xlora.")."""
    value = body.get(name, default)
    if value is None:
        return default
    name = prefix + name
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (
            isinstance(value, float) and not math.isfinite(value)):
        raise ApiError(400, f"{name} must be a finite number, got {value!r}", param=name)
    if not low <= value <= high:  # exact for ints of any size (no float conversion)
        raise ApiError(400, f"{name} must be between {low} and {high}, got {short_value(value)}", param=name)
    return float(value)


def _integer(value: Any, name: str, low: int | None = None, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ApiError(400, f"{name} must be an integer, got {short_value(value)}", param=name)
    if low is not None and value < low:
        raise ApiError(400, f"{name} must be at least {low}, got {short_value(value)}", param=name)
    if high is not None and value > high:
        raise ApiError(400, f"{name} must be at most {high}, got {short_value(value)}", param=name)
    return value


def short_value(value: Any) -> str:
    """A value for an error message: huge numbers and strings cut to a readable length."""
    text = repr(value) if not isinstance(value, int) or abs(value) < 10 ** 30 else f"an integer of {len(str(value))} digits"
    return text if len(text) <= 80 else text[:77] + "..."


@dataclass(frozen=True)
class Choices:
    """What a request asks back besides text: `n` choices per prompt, log-probabilities (k alternatives per
    token, or None), for completions the prompt echoed before the completion, and the X-LoRA scalings of each
    new token (`xlora.return_scalings`)."""

    n: int = 1
    logprobs: int | None = None
    echo: bool = False
    scalings: bool = False


def choices_from(body: dict, chat: bool) -> Choices:
    """`n`, `logprobs` (completions: an integer 0-20; chat: true, with `top_logprobs` 0-20), `echo` and
    `xlora.return_scalings`; 400 naming the field otherwise."""
    n = body.get("n")
    n = 1 if n is None else _integer(n, "n", 1, MAX_CHOICES)
    spec = body.get("xlora")
    scalings = spec.get("return_scalings", False) if isinstance(spec, dict) else False
    if not isinstance(scalings, bool):
        raise ApiError(400, "xlora.return_scalings must be true or false", param="xlora.return_scalings")
    if chat:
        if body.get("echo"):
            raise ApiError(400, "echo is not supported for chat completions", param="echo")
        flag = body.get("logprobs")
        if flag is not None and not isinstance(flag, bool):
            raise ApiError(400, f"logprobs must be true or false for chat completions, got {short_value(flag)}",
                           param="logprobs")
        top = body.get("top_logprobs")
        top = 0 if top is None else _integer(top, "top_logprobs", 0, MAX_LOGPROBS)
        if top and not flag:
            raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        return Choices(n=n, logprobs=top if flag else None, scalings=scalings)
    logprobs = body.get("logprobs")
    if logprobs is not None:
        logprobs = _integer(logprobs, "logprobs", 0, MAX_LOGPROBS)
    echo = body.get("echo")
    if echo is not None and not isinstance(echo, bool):
        raise ApiError(400, "echo must be true or false", param="echo")
    return Choices(n=n, logprobs=logprobs, echo=bool(echo), scalings=scalings)


def sampling_from(body: dict, max_tokens_cap: int, echo: bool = False) -> SamplingParams:
    """OpenAI fields -> SamplingParams; 400 naming the field for anything out of range. `max_tokens` may be 0
    only with `echo` (the prompt's log-probabilities alone)."""
    for unsupported in ("suffix", "tools", "functions", "logit_bias"):
        if body.get(unsupported) not in (None, False, 0, {}, []):
            raise ApiError(400, f"{unsupported} is not supported by this server", param=unsupported)
    if body.get("best_of") not in (None, 1):
        raise ApiError(400, "best_of must be 1", param="best_of")
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = body.get(name)
    # the default obeys the cap too: a server capped below it answers that many tokens at most
    max_tokens = (min(DEFAULT_MAX_TOKENS, max_tokens_cap) if max_tokens is None
                  else _integer(max_tokens, name, 0 if echo else 1, max_tokens_cap))
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    if top_p == 0:
        raise ApiError(400, "top_p must be greater than 0", param="top_p")
    for name in ("presence_penalty", "frequency_penalty"):
        if _number(body, name, 0.0, -2.0, 2.0) != 0:
            raise ApiError(400, f"{name} is not supported (only 0)", param=name)
    seed = body.get("seed")
    if seed is not None:
        seed = _integer(seed, "seed", *SEED_RANGE)
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or len(stop) > MAX_STOP or not all(isinstance(s, str) and s for s in stop):
        raise ApiError(400, f"stop must be a non-empty string or a list of up to {MAX_STOP} non-empty strings",
                       param="stop")
    return SamplingParams(max_new_tokens=max_tokens, do_sample=temperature > 0, temperature=temperature,
                          top_p=top_p, seed=seed, stop=stop)


def gate_from(body: dict, n_experts: int) -> GateOptions:
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
    top_k = spec.get("top_k")
    if top_k is not None:
        top_k = _integer(top_k, "xlora.top_k", 1, n_experts)
    temperature = spec.get("softmax_temperature")
    if temperature is not None:
        temperature = _number(spec, "softmax_temperature", 1.0, 1e-3, 100.0, prefix="xlora.")
    freeze = spec.get("freeze_scalings_after")
    if freeze is not None:
        freeze = _integer(freeze, "xlora.freeze_scalings_after", 0)
    return GateOptions(top_k_lora=top_k, softmax_temperature=temperature, freeze_scalings_after=freeze)


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


def request_schemas(model_name: str, max_tokens_cap: int, n_experts: int, max_rows: int) -> tuple[dict, dict]:
    """JSON schemas of the /v1/completions and /v1/chat/completions bodies, for the OpenAPI document (the routes
    read raw bodies and validate them themselves, with OpenAI-style errors)."""
    def nullable(kind: str, **rules) -> dict:
        return {"anyOf": [{"type": kind, **rules}, {"type": "null"}]}

    common = {
        "model": {"type": "string", "enum": [model_name]},
        "max_tokens": nullable("integer", minimum=1, maximum=max_tokens_cap),
        "temperature": nullable("number", minimum=0, maximum=2),
        "top_p": nullable("number", exclusiveMinimum=0, maximum=1),
        "seed": nullable("integer", minimum=SEED_RANGE[0], maximum=SEED_RANGE[1]),
        "stop": {"anyOf": [{"type": "string", "minLength": 1}, {"type": "null"},
                           {"type": "array", "items": {"type": "string", "minLength": 1}, "maxItems": MAX_STOP}]},
        "stream": {"type": "boolean"},
        "stream_options": nullable("object", properties={"include_usage": {"type": "boolean"}}),
        "n": nullable("integer", minimum=1, maximum=min(MAX_CHOICES, max_rows)),
        "xlora": {"type": "object", "additionalProperties": False, "properties": {
            "return_scalings": {"type": "boolean"},
            "top_k": nullable("integer", minimum=1, maximum=n_experts),
            "softmax_temperature": nullable("number", minimum=1e-3, maximum=100),
            "freeze_scalings_after": nullable("integer", minimum=0)}},
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
        "max_tokens": {**nullable("integer", minimum=0, maximum=max_tokens_cap),
                       "description": "0 only with echo: the prompt's log-probabilities alone"},
        "logprobs": nullable("integer", minimum=0, maximum=MAX_LOGPROBS),
        "echo": nullable("boolean")}}
    chat = {"type": "object", "required": ["model", "messages"],
            "properties": {"messages": {"type": "array", "items": message, "minItems": 1},
                           "max_completion_tokens": common["max_tokens"], **common,
                           "logprobs": nullable("boolean"),
                           "top_logprobs": nullable("integer", minimum=0, maximum=MAX_LOGPROBS)}}
    return completion, chat


def openapi_body(schema: dict) -> dict:
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}
