"""`loramix serve`: an OpenAI-compatible HTTP server for X-LoRA models (FastAPI + uvicorn).

Routes: GET /health, GET /v1/models, POST /v1/completions, POST /v1/chat/completions (streaming as server-sent
events, or one JSON answer). Requests are decoded together by the continuous-batching engine (serving.py).

The X-LoRA extension: an optional request field
    "xlora": {"return_scalings": true, "top_k": 2, "softmax_temperature": 0.5, "freeze_scalings_after": 16}
sets the gate for that request only; with return_scalings the answer (or each stream chunk) carries
"xlora": {"experts": [...names], "scalings": [[per-expert weight summed over LoRA layers] per new token]}.

Every error, bad request or not, gets an OpenAI-style JSON body {"error": {"message", "type", "param", "code"}}.
A request is checked cheapest first: its declared size, its JSON, its fields, its length in characters, and only
then tokenized, off the event loop. A client that hangs up frees its slot; on shutdown (SIGTERM) new requests get
503 and running ones end at once with an error, so the process exits within seconds.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import math
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from typing import Any

import uvicorn
from fastapi import FastAPI
from fastapi import Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .generation import SamplingParams, TokenLogprob
from .serving import Engine, Event, GateOptions, QueueFull, Request

DEFAULT_MAX_TOKENS = 16
DEFAULT_MAX_REQUEST_BYTES = 1 << 20  # 1 MiB of JSON: far more than any context of today's models holds
SHUTDOWN_GRACE_S = 5  # uvicorn's backstop: tasks still running this long after shutdown starts are cancelled
DISCONNECT_POLL_S = 0.1
SHUTTING_DOWN = "the server is shutting down"
SEED_RANGE = (-(1 << 63), (1 << 64) - 1)  # what torch.Generator.manual_seed accepts
MAX_CHOICES = 16  # n: choices per prompt
MAX_LOGPROBS = 20  # alternatives per token (OpenAI's limit)
MAX_STOP = 16  # stop strings (OpenAI allows 4; lm-eval adds the EOS text to a task's own)
LOGPROB_FLOOR = -9999.0  # what -inf is reported as: JSON has no infinities


class ApiError(Exception):
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


def shutting_down() -> ApiError:
    return ApiError(503, SHUTTING_DOWN, kind="server_error", code="service_unavailable")


# ---- request validation -----------------------------------------------------------------------------------------
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
        raise ApiError(400, f"{name} must be between {low} and {high}, got {_short(value)}", param=name)
    return float(value)


def _integer(value: Any, name: str, low: int | None = None, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ApiError(400, f"{name} must be an integer, got {_short(value)}", param=name)
    if low is not None and value < low:
        raise ApiError(400, f"{name} must be at least {low}, got {_short(value)}", param=name)
    if high is not None and value > high:
        raise ApiError(400, f"{name} must be at most {high}, got {_short(value)}", param=name)
    return value


def _short(value: Any) -> str:
    """A value for an error message: huge numbers and strings cut to a readable length."""
    text = repr(value) if not isinstance(value, int) or abs(value) < 10 ** 30 else f"an integer of {len(str(value))} digits"
    return text if len(text) <= 80 else text[:77] + "..."


@dataclass(frozen=True)
class Choices:
    """What a request asks back besides text: `n` choices per prompt, log-probabilities (k alternatives per
    token, or None) and, for completions, the prompt echoed before the completion."""

    n: int = 1
    logprobs: int | None = None
    echo: bool = False


def choices_from(body: dict, chat: bool) -> Choices:
    """`n`, `logprobs` (completions: an integer 0-20; chat: true, with `top_logprobs` 0-20) and `echo`; 400
    naming the field otherwise."""
    n = body.get("n")
    n = 1 if n is None else _integer(n, "n", 1, MAX_CHOICES)
    if chat:
        if body.get("echo"):
            raise ApiError(400, "echo is not supported for chat completions", param="echo")
        flag = body.get("logprobs")
        if flag is not None and not isinstance(flag, bool):
            raise ApiError(400, f"logprobs must be true or false for chat completions, got {_short(flag)}",
                           param="logprobs")
        top = body.get("top_logprobs")
        top = 0 if top is None else _integer(top, "top_logprobs", 0, MAX_LOGPROBS)
        if top and not flag:
            raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        return Choices(n=n, logprobs=top if flag else None)
    logprobs = body.get("logprobs")
    if logprobs is not None:
        logprobs = _integer(logprobs, "logprobs", 0, MAX_LOGPROBS)
    echo = body.get("echo")
    if echo is not None and not isinstance(echo, bool):
        raise ApiError(400, "echo must be true or false", param="echo")
    return Choices(n=n, logprobs=logprobs, echo=bool(echo))


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
    spec = body.get("xlora")
    if spec is None:
        return GateOptions()
    if not isinstance(spec, dict):
        raise ApiError(400, "xlora must be an object", param="xlora")
    known = {"return_scalings", "top_k", "softmax_temperature", "freeze_scalings_after"}
    unknown = sorted(set(spec) - known)
    if unknown:
        raise ApiError(400, f"xlora: unknown option(s) {_short(unknown)}; known: {sorted(known)}", param="xlora")
    top_k = spec.get("top_k")
    if top_k is not None:
        top_k = _integer(top_k, "xlora.top_k", 1, n_experts)
    temperature = spec.get("softmax_temperature")
    if temperature is not None:
        temperature = _number(spec, "softmax_temperature", 1.0, 1e-3, 100.0, prefix="xlora.")
    freeze = spec.get("freeze_scalings_after")
    if freeze is not None:
        freeze = _integer(freeze, "xlora.freeze_scalings_after", 0)
    flag = spec.get("return_scalings", False)
    if not isinstance(flag, bool):
        raise ApiError(400, "xlora.return_scalings must be true or false", param="xlora.return_scalings")
    return GateOptions(top_k=top_k, softmax_temperature=temperature, freeze_scalings_after=freeze,
                       return_scalings=flag)


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


def _openapi_body(schema: dict) -> dict:
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


# ---- the app ------------------------------------------------------------------------------------------------------
class ServerState:
    """The model, its tokenizer and engine, the limits, and the requests in flight (so shutdown can end them)."""

    def __init__(self, model, tokenizer, model_name: str, max_batch: int = 8, max_queue: int = 64,
                 max_tokens_cap: int = 1024, chat_template: str | None = None,
                 max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES) -> None:
        from .generation import context_length, special_tokens

        for name, value in (("max_tokens_cap", max_tokens_cap), ("max_request_bytes", max_request_bytes)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self.model, self.tokenizer, self.model_name = model, tokenizer, model_name
        self.max_tokens_cap, self.max_request_bytes = max_tokens_cap, max_request_bytes
        self.context = context_length(model)
        # no token covers more characters than the longest vocabulary entry (special tokens included), so a prompt
        # with more non-blank characters than context x that cannot fit and is refused before tokenizing
        longest = max((len(t) for t in tokenizer.get_vocab()), default=1)
        self.max_prompt_chars = None if self.context is None else self.context * max(longest, 1)
        eos, _ = special_tokens(model, tokenizer.eos_token_id, tokenizer.pad_token_id)
        self.engine = Engine(model, tokenizer, eos, max_batch=max_batch, max_queue=max_queue,
                             context_length=self.context)
        self.max_rows = max_batch + max_queue  # rows (prompts x n) one request may ask for
        if chat_template is not None:
            tokenizer.chat_template = chat_template
        self.created = int(time.time())
        self.closing = False
        self.running: dict[int, tuple[Request, Any]] = {}  # request id -> (request, deliver an event to its handler)
        # tokenizing a long prompt takes long: one worker thread keeps it off the event loop (and serial, as a
        # fast tokenizer is not meant to be called from several threads at once)
        self.tokenizer_pool = ThreadPoolExecutor(1, thread_name_prefix="loramix-tokenize")

    async def tokenize(self, fn, *args, **kwargs):
        return await asyncio.get_running_loop().run_in_executor(self.tokenizer_pool, lambda: fn(*args, **kwargs))

    def drain(self) -> None:
        """Stop admitting requests (503) and end every running one now with an error; the engine drops them at
        its next step. Called first thing on shutdown, so no open response holds the process up."""
        self.closing = True
        for request, deliver in self.running.copy().values():  # a copy: handlers remove themselves
            self.engine.cancel(request)
            deliver(Event(finish_reason="error", error=SHUTTING_DOWN))

    def close(self) -> None:
        """Stop the engine thread and the tokenizer thread (blocking until the engine's current step ends)."""
        self.drain()
        self.engine.shutdown()
        self.tokenizer_pool.shutdown(wait=False, cancel_futures=True)


class Server(uvicorn.Server):
    """uvicorn's server, draining the app's requests the moment shutdown begins (SIGTERM, SIGINT, should_exit):
    uvicorn would otherwise wait for every open response, i.e. for generations whose clients may have left."""

    def __init__(self, state: ServerState, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.state = state

    async def shutdown(self, sockets=None) -> None:
        self.state.drain()
        await super().shutdown(sockets=sockets)


def make_server(state: ServerState, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
                log_level: str = "info") -> Server:
    """A uvicorn server for `create_app(state)`; `.run()` serves until SIGTERM/SIGINT or `should_exit`."""
    config = uvicorn.Config(create_app(state, api_key=api_key), host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=SHUTDOWN_GRACE_S)
    return Server(state, config)


class RequireKey:
    """ASGI middleware: every route but /health needs `Authorization: Bearer KEY`; the scheme is case-insensitive
    (RFC 7235) and the key is compared in constant time."""

    def __init__(self, app, api_key: str) -> None:
        self.app, self.key = app, api_key.encode("utf-8")

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"] != "/health" and not self.authorized(scope["headers"]):
            err = ApiError(401, "missing or wrong API key (Authorization: Bearer KEY)", code="invalid_api_key",
                           kind="authentication_error")
            await err.response()(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def authorized(self, headers: list[tuple[bytes, bytes]]) -> bool:
        value = next((v for k, v in headers if k == b"authorization"), b"")
        scheme, _, key = value.strip().partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(key.strip(), self.key)


def create_app(state: ServerState, api_key: str | None = None):
    @asynccontextmanager
    async def lifespan(_):
        yield
        await asyncio.to_thread(state.close)

    app = FastAPI(title="loramix", version=_version(), lifespan=lifespan)
    completion_schema, chat_schema = request_schemas(state.model_name, state.max_tokens_cap, state.model.n_experts,
                                                     state.max_rows)
    if api_key is not None:
        app.add_middleware(RequireKey, api_key=api_key)

    @app.exception_handler(ApiError)
    async def api_error(_, err: ApiError):
        return err.response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(_, err):
        return ApiError(400, str(err)).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_, err):
        kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        return ApiError(err.status_code, str(err.detail), kind=kind).response(headers=getattr(err, "headers", None))

    @app.exception_handler(Exception)
    async def server_error(_, err):  # a bug: still an OpenAI-style body, never plain text
        return ApiError(500, f"internal error: {type(err).__name__}", kind="server_error").response()

    @app.get("/health")
    async def health():
        if state.closing:  # a load balancer stops sending requests here
            raise shutting_down()
        engine = state.engine
        return {"status": "ok", "model": state.model_name, "running": engine.active_rows(),
                "waiting": len(engine.waiting)}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [_model_card(state)]}

    @app.get("/v1/models/{name}")
    async def model(name: str):
        if name != state.model_name:
            raise ApiError(404, f"The model {_short(name)} does not exist", param="model", code="model_not_found")
        return _model_card(state)

    @app.post("/v1/completions", openapi_extra=_openapi_body(completion_schema))
    async def completions(request: HttpRequest):
        body = await _read_json(request)
        options = _options(body, chat=False)
        prompts = _prompt_list(body.get("prompt"))
        _check_rows(len(prompts), options[3].n)
        ids, texts = [], []
        for i, prompt in enumerate(prompts):
            if isinstance(prompt, str):
                _check_characters(prompt, "prompt")
                ids.append(await _tokenize(prompt, "prompt"))
                texts.append(prompt)
            else:
                _check_length(len(prompt), chat=False)
                if any(not 0 <= t < len(state.tokenizer) for t in prompt):
                    raise ApiError(400, "prompt: a token id is outside the vocabulary", param="prompt")
                ids.append(list(prompt))
                texts.append(None)  # decoded only when echoed
        return await _run(request, body, options, ids, texts, chat=False)

    @app.post("/v1/chat/completions", openapi_extra=_openapi_body(chat_schema))
    async def chat_completions(request: HttpRequest):
        body = await _read_json(request)
        options = _options(body, chat=True)
        _check_rows(1, options[3].n)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages):
            raise ApiError(400, "messages must be a non-empty list of {role, content} objects with string content",
                           param="messages")
        if getattr(state.tokenizer, "chat_template", None) is None:
            raise ApiError(400, "this model's tokenizer has no chat template; use /v1/completions or start the "
                                "server with --chat-template FILE", param="messages")
        _check_characters("".join(m["content"] for m in messages), "messages")  # the template only adds text
        try:
            text = await state.tokenize(state.tokenizer.apply_chat_template,
                                        [{"role": m["role"], "content": m["content"]} for m in messages],
                                        tokenize=False, add_generation_prompt=True)
        except Exception as e:  # noqa: BLE001 - jinja errors from the template (e.g. unsupported roles)
            raise ApiError(400, f"messages: the chat template failed: {e}", param="messages") from None
        _check_characters(text, "messages")
        ids = await _tokenize(text, "messages", add_special_tokens=False)
        return await _run(request, body, options, [ids], [text], chat=True)

    async def _read_json(http: HttpRequest) -> dict:
        """The body as a JSON object, refused (413) past max_request_bytes before it is all read."""
        if state.closing:
            raise shutting_down()
        limit = state.max_request_bytes
        too_big = ApiError(413, f"the request body is larger than this server's limit of {limit} bytes "
                                "(--max-request-bytes)", code="request_too_large")
        declared = http.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise too_big
        chunks, size = [], 0
        async for chunk in http.stream():
            size += len(chunk)
            if size > limit:
                raise too_big
            chunks.append(chunk)
        body = parse_body(b"".join(chunks))
        _check_model(body, state)
        return body

    def _options(body: dict, chat: bool) -> tuple[SamplingParams, GateOptions, bool, Choices]:
        """Every field but the prompt, checked before any tokenizing."""
        choices = choices_from(body, chat)
        params = sampling_from(body, state.max_tokens_cap, echo=choices.echo)
        gate = gate_from(body, state.model.n_experts)
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise ApiError(400, "stream must be true or false", param="stream")
        return params, gate, stream, choices

    def _check_rows(n_prompts: int, n: int) -> None:
        """Each prompt x choice is a row of the engine: a request may not ask for more than it could ever hold."""
        limit = state.max_rows
        if n > limit:
            raise ApiError(400, f"n must be at most {limit} on this server (--max-batch + --max-queue), got {n}",
                           param="n")
        if n_prompts * n > limit:
            raise ApiError(400, f"{n_prompts} prompts x n = {n} ask for {n_prompts * n} sequences; this server "
                                f"takes at most {limit} (--max-batch + --max-queue) in one request", param="prompt")

    def _check_characters(text: str, param: str) -> None:
        limit = state.max_prompt_chars
        if limit is not None and len(text) > limit and len("".join(text.split())) > limit:
            raise ApiError(400, f"the {param} has over {limit} non-blank characters, more than this model's context "
                                f"of {state.context} tokens can hold", param=param, code="context_length_exceeded")

    def _check_length(n_tokens: int, chat: bool) -> None:
        if n_tokens == 0:
            raise ApiError(400, "the prompt has no tokens", param="messages" if chat else "prompt")
        if state.context is not None and n_tokens >= state.context:
            raise ApiError(400, f"the prompt has {n_tokens} tokens; this model's context is {state.context}",
                           param="messages" if chat else "prompt", code="context_length_exceeded")

    async def _tokenize(text: str, param: str, **kwargs) -> list[int]:
        try:
            ids = (await state.tokenize(state.tokenizer, text, **kwargs))["input_ids"]
        except Exception as e:  # noqa: BLE001 - text the tokenizer refuses
            raise ApiError(400, f"{param}: the tokenizer failed: {type(e).__name__}: {e}", param=param) from None
        _check_length(len(ids), chat=param == "messages")
        return ids

    def _submit(prompts: list[list[int]], params: SamplingParams, gate: GateOptions, choices: Choices,
                events: asyncio.Queue) -> list[Request]:
        """One engine row per prompt and choice (choice index = prompt x n + j), queued all or none. Choice j of a
        seeded request samples with a seed derived from j, so its choices differ and each is reproducible."""
        loop = asyncio.get_running_loop()
        jobs = []
        for ids in prompts:
            for j in range(choices.n):
                seed = params.seed if params.seed is None or j == 0 else (params.seed + j) % (1 << 64)
                jobs.append(Request(prompt_ids=ids, params=replace(params, seed=seed), gate=gate,
                                    emit=_deliverer(loop, events, len(jobs)), logprobs=choices.logprobs,
                                    prompt_logprobs=choices.logprobs if choices.echo else None))
        try:
            state.engine.submit_all(jobs)
        except QueueFull as e:
            raise ApiError(429, f"the server is busy: {e}; retry later", code="rate_limit_exceeded",
                           kind="rate_limit_error") from None
        except RuntimeError:  # the engine has stopped
            raise shutting_down() from None
        for job in jobs:
            state.running[id(job)] = (job, job.emit)
        return jobs

    def _forget(jobs: list[Request], finished: set[int]) -> None:
        """The handler is done with its rows: unfinished ones (a client gone, a sibling failed) are cancelled."""
        for index, job in enumerate(jobs):
            state.running.pop(id(job), None)
            if index not in finished:
                state.engine.cancel(job)

    async def _run(http: HttpRequest, body: dict, options, prompts: list[list[int]], texts: list[str | None],
                   chat: bool):
        params, gate, stream, choices = options
        if state.closing:
            raise shutting_down()
        events: asyncio.Queue[tuple[int, Event] | None] = asyncio.Queue()  # None: the client has gone
        jobs = _submit(prompts, params, gate, choices, events)
        ident = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        reply = Reply(state, chat, choices, gate, prompts, texts)
        if stream:
            return StreamingResponse(_stream(jobs, events, ident, reply, body),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        finished: set[int] = set()
        error = None
        watcher = asyncio.create_task(_watch_disconnect(http, events))
        try:
            while len(finished) < len(jobs) and error is None:
                item = await events.get()
                if item is None:
                    break
                index, event = item
                reply.add(index, event)
                if event.finish_reason is not None:
                    finished.add(index)
                    error = event.error if event.finish_reason == "error" else None
        finally:
            watcher.cancel()
            _forget(jobs, finished)
        if error is not None:
            if error == SHUTTING_DOWN:
                raise shutting_down()
            raise ApiError(500, f"generation failed: {error}", kind="server_error")
        if len(finished) < len(jobs):
            return Response(status_code=499)  # the client went away; nobody reads it, uvicorn drops it
        response = {"id": ident, "object": "chat.completion" if chat else "text_completion",
                    "created": int(time.time()), "model": state.model_name,
                    "choices": [reply.choice(i) for i in range(len(jobs))], "usage": _usage(prompts, jobs)}
        if gate.return_scalings:
            response["xlora"] = {"experts": list(state.model.expert_names), "scalings": reply.scalings[0]}
        return response

    async def _stream(jobs, events, ident, reply: Reply, body):
        created = int(time.time())
        kind = "chat.completion.chunk" if reply.chat else "text_completion"
        options = body.get("stream_options")
        include_usage = isinstance(options, dict) and bool(options.get("include_usage"))

        def chunk(choice: dict, scalings=None) -> str:
            data = {"id": ident, "object": kind, "created": created, "model": state.model_name, "choices": [choice]}
            if reply.gate.return_scalings and scalings is not None:
                data["xlora"] = {"experts": list(state.model.expert_names), "scalings": scalings}
            return f"data: {json.dumps(data)}\n\n"

        finished: set[int] = set()
        try:
            for index in range(len(jobs)):
                first = reply.first_delta(index)
                if first is not None:
                    yield chunk(first)
            while len(finished) < len(jobs):
                index, event = await events.get()
                if event.finish_reason == "error":
                    finished.add(index)
                    err = shutting_down() if event.error == SHUTTING_DOWN else ApiError(
                        500, f"generation failed: {event.error}", kind="server_error")
                    yield f"data: {json.dumps(err.body())}\n\n"
                    break
                delta = reply.delta(index, event)
                if delta is not None:
                    yield chunk(delta, scalings=event.scalings)
                if event.finish_reason is not None:
                    finished.add(index)
                    yield chunk(reply.end(index, event.finish_reason))
            else:
                if include_usage:
                    last = {"id": ident, "object": kind, "created": created, "model": state.model_name,
                            "choices": [], "usage": _usage(reply.prompts, jobs)}
                    yield f"data: {json.dumps(last)}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            _forget(jobs, finished)  # a client that disconnected mid-stream frees its rows here

    return app


def _deliverer(loop: asyncio.AbstractEventLoop, events: asyncio.Queue, index: int):
    """The engine's emit for choice `index`: hand (index, event) to the handler's loop (from any thread); dropped
    once the loop is closed."""
    def deliver(event: Event) -> None:
        try:
            loop.call_soon_threadsafe(events.put_nowait, (index, event))
        except RuntimeError:  # the event loop has closed: nobody is waiting
            pass
    return deliver


def _prompt_list(prompt: Any) -> list[str | list[int]]:
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


def _usage(prompts: list[list[int]], jobs: list[Request]) -> dict:
    """Token counts: each prompt once (whatever n), every choice's new tokens."""
    n_prompt = sum(len(p) for p in prompts)
    n_new = sum(job.n_generated for job in jobs)
    return {"prompt_tokens": n_prompt, "completion_tokens": n_new, "total_tokens": n_prompt + n_new}


def _floor(logprob: float) -> float:
    return max(logprob, LOGPROB_FLOOR)


class Reply:
    """The choices of one answer, built from the engine's events: text (the echoed prompt first), log-probabilities
    in the completions or the chat format, scalings; whole (`add`, then `choice`) or as stream deltas."""

    def __init__(self, state: ServerState, chat: bool, choices: Choices, gate: GateOptions,
                 prompts: list[list[int]], texts: list[str | None]) -> None:
        self.tokenizer, self.chat, self.choices, self.gate = state.tokenizer, chat, choices, gate
        self.prompts, self.texts = prompts, texts
        rows = len(prompts) * choices.n
        self.parts: list[list[str]] = [[] for _ in range(rows)]
        self.scalings: list[list] = [[] for _ in range(rows)]
        self.logprobs: list[list[TokenLogprob]] = [[] for _ in range(rows)]  # echoed prompt's, then new tokens'
        self.reasons: list[str | None] = [None] * rows
        self.offsets = [0] * rows  # text_offset of the next streamed token
        self._token_texts: dict[int, str] = {}

    def token_text(self, token: int) -> str:
        if token not in self._token_texts:
            self._token_texts[token] = self.tokenizer.decode([token])
        return self._token_texts[token]

    def echo_text(self, index: int) -> str:
        """The prompt of choice `index` as text (token-id prompts decoded)."""
        p = index // self.choices.n
        if self.texts[p] is None:
            self.texts[p] = self.tokenizer.decode(self.prompts[p])
        return self.texts[p]

    def add(self, index: int, event: Event) -> None:
        self.parts[index].append(event.text)
        self.scalings[index] += event.scalings or []
        self.logprobs[index] += (event.prompt_logprobs or []) + (event.logprobs or [])
        self.reasons[index] = event.finish_reason or self.reasons[index]

    def choice(self, index: int) -> dict:
        """Choice `index` of the whole answer."""
        text = "".join(self.parts[index])
        if self.choices.echo:
            text = self.echo_text(index) + text
        choice = {"index": index, "finish_reason": self.reasons[index],
                  "logprobs": self._logprobs(index, self.logprobs[index])}
        choice.update({"message": {"role": "assistant", "content": text}} if self.chat else {"text": text})
        if self.gate.return_scalings:
            choice["xlora"] = {"scalings": self.scalings[index]}
        return choice

    def first_delta(self, index: int) -> dict | None:
        """What a stream sends for a choice before any event: the chat role, or the echoed prompt when no
        log-probabilities come with it (else it comes with the prompt's, in the first event)."""
        if self.chat:
            return {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                    "finish_reason": None}
        if self.choices.echo and self.choices.logprobs is None:
            return {"index": index, "text": self.echo_text(index), "logprobs": None, "finish_reason": None}
        return None

    def delta(self, index: int, event: Event) -> dict | None:
        """The stream chunk's choice for one event, or None when it carries nothing."""
        text = event.text
        if event.prompt_logprobs is not None:
            text = self.echo_text(index) + text
        entries = (event.prompt_logprobs or []) + (event.logprobs or [])
        if not (text or entries or event.scalings):
            return None
        logprobs = self._logprobs(index, entries) if entries else None
        if self.chat:
            return {"index": index, "delta": {"content": text} if text else {}, "logprobs": logprobs,
                    "finish_reason": None}
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": None}

    def end(self, index: int, reason: str) -> dict:
        if self.chat:
            return {"index": index, "delta": {}, "logprobs": None, "finish_reason": reason}
        return {"index": index, "text": "", "logprobs": None, "finish_reason": reason}

    def _logprobs(self, index: int, entries: list[TokenLogprob]) -> dict | None:
        """Log-probabilities of these tokens of choice `index`: the chat format (`content`: token, logprob,
        bytes, top_logprobs) or the completions format (`tokens`, `token_logprobs`, `top_logprobs` a dict per
        position with the chosen token in it, `text_offset` into the choice's text, counted across chunks)."""
        if self.choices.logprobs is None:
            return None
        if self.chat:
            def item(token: int, logprob: float) -> dict:
                text = self.token_text(token)
                return {"token": text, "logprob": _floor(logprob), "bytes": list(text.encode("utf-8"))}
            return {"content": [{**item(e.token, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top]}
                                for e in entries]}
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for e in entries:
            text = self.token_text(e.token)
            out["tokens"].append(text)
            out["text_offset"].append(self.offsets[index])
            self.offsets[index] += len(text)
            if e.logprob is None:  # the prompt's first token: nothing predicts it
                out["token_logprobs"].append(None)
                out["top_logprobs"].append(None)
                continue
            out["token_logprobs"].append(_floor(e.logprob))
            top = {self.token_text(t): _floor(lp) for t, lp in e.top}
            top.setdefault(text, _floor(e.logprob))
            out["top_logprobs"].append(top)
        return out


async def _watch_disconnect(http: HttpRequest, events: asyncio.Queue) -> None:
    """Put None into the handler's queue once its client has hung up (the body is read, so the next ASGI message
    is the disconnect)."""
    while not await http.is_disconnected():
        await asyncio.sleep(DISCONNECT_POLL_S)
    events.put_nowait(None)


def _model_card(state: ServerState) -> dict:
    return {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "loramix",
            "xlora": {"experts": list(state.model.expert_names), "n_lora_layers": state.model.n_lora_layers}}


def _check_model(body: dict, state: ServerState) -> None:
    name = body.get("model")
    if name is None:
        raise ApiError(400, "model is required", param="model")
    if name != state.model_name:
        raise ApiError(404, f"The model {_short(name)} does not exist; this server serves '{state.model_name}'",
                       param="model", code="model_not_found")


def _version() -> str:
    from . import __version__

    return __version__


def load_state(model_dir: str, base: str | None = None, name: str | None = None, trust_remote_code: bool = False,
               chat_template_file: str | None = None, placement: dict | None = None, **engine) -> ServerState:
    """Load the checkpoint (`placement`: dtype, quantization, device, device_map, ... as `from_pretrained` takes
    them) and its tokenizer, and start the engine."""
    from . import XLoraModel
    from .loading import load_tokenizer

    model = XLoraModel.from_pretrained(model_dir, base=base, trust_remote_code=trust_remote_code, **(placement or {}))
    tokenizer = load_tokenizer(model_dir, base or model.base_model_id, chat_template_file=chat_template_file)
    return ServerState(model, tokenizer, name or os.path.basename(os.path.normpath(model_dir)), **engine)
