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
from typing import Any

import uvicorn
from fastapi import FastAPI
from fastapi import Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .generation import SamplingParams
from .serving import Engine, Event, GateOptions, QueueFull, Request

DEFAULT_MAX_TOKENS = 16
DEFAULT_MAX_REQUEST_BYTES = 1 << 20  # 1 MiB of JSON: far more than any context of today's models holds
SHUTDOWN_GRACE_S = 5  # uvicorn's backstop: tasks still running this long after shutdown starts are cancelled
DISCONNECT_POLL_S = 0.1
SHUTTING_DOWN = "the server is shutting down"
SEED_RANGE = (-(1 << 63), (1 << 64) - 1)  # what torch.Generator.manual_seed accepts


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


def sampling_from(body: dict, max_tokens_cap: int) -> SamplingParams:
    """OpenAI fields -> SamplingParams; 400 naming the field for anything out of range."""
    for unsupported in ("logprobs", "top_logprobs", "suffix", "tools", "functions", "logit_bias"):
        if body.get(unsupported) not in (None, False, 0, {}, []):
            raise ApiError(400, f"{unsupported} is not supported by this server", param=unsupported)
    if body.get("best_of") not in (None, 1):
        raise ApiError(400, "best_of must be 1", param="best_of")
    if body.get("echo"):
        raise ApiError(400, "echo is not supported by this server", param="echo")
    n = body.get("n", 1)
    if n is not None and n != 1:
        raise ApiError(400, f"n must be 1, got {_short(n)}", param="n")
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = body.get(name)
    # the default obeys the cap too: a server capped below it answers that many tokens at most
    max_tokens = (min(DEFAULT_MAX_TOKENS, max_tokens_cap) if max_tokens is None
                  else _integer(max_tokens, name, 1, max_tokens_cap))
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
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise ApiError(400, "stop must be a non-empty string or a list of up to 4 non-empty strings", param="stop")
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


def request_schemas(model_name: str, max_tokens_cap: int, n_experts: int) -> tuple[dict, dict]:
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
                           {"type": "array", "items": {"type": "string", "minLength": 1}, "maxItems": 4}]},
        "stream": {"type": "boolean"},
        "stream_options": nullable("object", properties={"include_usage": {"type": "boolean"}}),
        "n": nullable("integer", minimum=1, maximum=1),
        "xlora": {"type": "object", "additionalProperties": False, "properties": {
            "return_scalings": {"type": "boolean"},
            "top_k": nullable("integer", minimum=1, maximum=n_experts),
            "softmax_temperature": nullable("number", minimum=1e-3, maximum=100),
            "freeze_scalings_after": nullable("integer", minimum=0)}},
    }
    prompt = {"anyOf": [{"type": "string", "minLength": 1},
                        {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1, "maxItems": 1},
                        {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1}]}
    message = {"type": "object", "required": ["role", "content"],
               "properties": {"role": {"type": "string", "enum": ["system", "user", "assistant"]},
                              "content": {"type": "string"}}}
    completion = {"type": "object", "required": ["model", "prompt"], "properties": {"prompt": prompt, **common}}
    chat = {"type": "object", "required": ["model", "messages"],
            "properties": {"messages": {"type": "array", "items": message, "minItems": 1},
                           "max_completion_tokens": common["max_tokens"], **common}}
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
    completion_schema, chat_schema = request_schemas(state.model_name, state.max_tokens_cap, state.model.n_experts)
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
        options = _options(body)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool)
                                                       for t in prompt):
            _check_length(len(prompt), chat=False)
            if any(not 0 <= t < len(state.tokenizer) for t in prompt):
                raise ApiError(400, "prompt: a token id is outside the vocabulary", param="prompt")
            ids = list(prompt)
        elif isinstance(prompt, str):
            if not prompt:
                raise ApiError(400, "prompt must not be empty", param="prompt")
            _check_characters(prompt, "prompt")
            ids = await _tokenize(prompt, "prompt")
        else:
            raise ApiError(400, "prompt must be a string (or one string in a list, or a list of token ids)",
                           param="prompt")
        return await _run(request, body, options, ids, chat=False)

    @app.post("/v1/chat/completions", openapi_extra=_openapi_body(chat_schema))
    async def chat_completions(request: HttpRequest):
        body = await _read_json(request)
        options = _options(body)
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
        return await _run(request, body, options, ids, chat=True)

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

    def _options(body: dict) -> tuple[SamplingParams, GateOptions, bool]:
        """Every field but the prompt, checked before any tokenizing."""
        params = sampling_from(body, state.max_tokens_cap)
        gate = gate_from(body, state.model.n_experts)
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise ApiError(400, "stream must be true or false", param="stream")
        return params, gate, stream

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

    async def _run(http: HttpRequest, body: dict, options, ids: list[int], chat: bool):
        params, gate, stream = options
        if state.closing:
            raise shutting_down()
        events: asyncio.Queue[Event | None] = asyncio.Queue()  # None: the client has gone
        deliver = _deliverer(asyncio.get_running_loop(), events)
        job = Request(prompt_ids=ids, params=params, gate=gate, emit=deliver)
        try:
            state.engine.submit(job)
        except QueueFull as e:
            raise ApiError(429, f"the server is busy: {e}; retry later", code="rate_limit_exceeded",
                           kind="rate_limit_error") from None
        except RuntimeError:  # the engine has stopped
            raise shutting_down() from None
        state.running[id(job)] = (job, deliver)
        ident = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        experts = list(state.model.expert_names)
        if stream:
            return StreamingResponse(_stream(job, events, ident, chat, len(ids), gate, experts, body),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        text, scalings, reason, error = [], [], None, None
        watcher = asyncio.create_task(_watch_disconnect(http, events))
        try:
            while reason is None:
                event = await events.get()
                if event is None:
                    break
                text.append(event.text)
                scalings += event.scalings or []
                reason, error = event.finish_reason, event.error
        finally:
            watcher.cancel()
            state.running.pop(id(job), None)
            if reason is None:  # the client went away while waiting
                state.engine.cancel(job)
        if reason is None:
            return Response(status_code=499)  # nobody reads it; uvicorn drops it
        if reason == "error":
            if error == SHUTTING_DOWN:
                raise shutting_down()
            raise ApiError(500, f"generation failed: {error}", kind="server_error")
        answer = "".join(text)
        choice = {"index": 0, "finish_reason": reason, "logprobs": None}
        choice.update({"message": {"role": "assistant", "content": answer}} if chat else {"text": answer})
        response = {"id": ident, "object": "chat.completion" if chat else "text_completion",
                    "created": int(time.time()), "model": state.model_name, "choices": [choice],
                    "usage": {"prompt_tokens": len(ids), "completion_tokens": job.n_generated,
                              "total_tokens": len(ids) + job.n_generated}}
        if gate.return_scalings:
            response["xlora"] = {"experts": experts, "scalings": scalings}
        return response

    async def _stream(job, events, ident, chat, n_prompt, gate, experts, body):
        created = int(time.time())
        kind = "chat.completion.chunk" if chat else "text_completion"
        include_usage = bool((body.get("stream_options") or {}).get("include_usage")) if isinstance(
            body.get("stream_options"), dict) else False

        def chunk(text: str | None, reason: str | None, first: bool = False, scalings=None) -> str:
            if chat:
                delta = {"role": "assistant", "content": ""} if first else ({} if text is None else {"content": text})
                choice = {"index": 0, "delta": delta, "finish_reason": reason, "logprobs": None}
            else:
                choice = {"index": 0, "text": text or "", "finish_reason": reason, "logprobs": None}
            data = {"id": ident, "object": kind, "created": created, "model": state.model_name, "choices": [choice]}
            if gate.return_scalings and scalings is not None:
                data["xlora"] = {"experts": experts, "scalings": scalings}
            return f"data: {json.dumps(data)}\n\n"

        finished = False
        try:
            if chat:
                yield chunk(None, None, first=True)
            while True:
                event = await events.get()
                if event.finish_reason == "error":
                    err = shutting_down() if event.error == SHUTTING_DOWN else ApiError(
                        500, f"generation failed: {event.error}", kind="server_error")
                    yield f"data: {json.dumps(err.body())}\n\n"
                    finished = True
                    break
                if event.text or event.scalings:
                    yield chunk(event.text, None, scalings=event.scalings)
                if event.finish_reason is not None:
                    finished = True
                    yield chunk(None if chat else "", event.finish_reason)
                    break
            if include_usage:
                usage = {"prompt_tokens": n_prompt, "completion_tokens": job.n_generated,
                         "total_tokens": n_prompt + job.n_generated}
                last = {"id": ident, "object": kind, "created": created, "model": state.model_name, "choices": [],
                        "usage": usage}
                yield f"data: {json.dumps(last)}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            state.running.pop(id(job), None)
            if not finished:  # the client disconnected mid-stream: free the slot
                state.engine.cancel(job)

    return app


def _deliverer(loop: asyncio.AbstractEventLoop, events: asyncio.Queue):
    """The engine's emit: hand an event to the handler's loop (from any thread); dropped once the loop is closed."""
    def deliver(event: Event) -> None:
        try:
            loop.call_soon_threadsafe(events.put_nowait, event)
        except RuntimeError:  # the event loop has closed: nobody is waiting
            pass
    return deliver


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
               chat_template_file: str | None = None, **engine) -> ServerState:
    from . import XLoraModel
    from .loading import load_tokenizer

    model = XLoraModel.from_pretrained(model_dir, base=base, trust_remote_code=trust_remote_code)
    tokenizer = load_tokenizer(model_dir, base or model.base_model_id, chat_template_file=chat_template_file)
    return ServerState(model, tokenizer, name or os.path.basename(os.path.normpath(model_dir)), **engine)
