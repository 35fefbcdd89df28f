"""`loramix serve`: an OpenAI-compatible HTTP server for X-LoRA models (FastAPI + uvicorn).

Routes: GET /health, GET /v1/models, POST /v1/completions, POST /v1/chat/completions (streaming as server-sent
events, or one JSON answer). Requests are decoded together by the continuous-batching engine (serving.py); their
fields are checked in openai_requests.py and their answers built in openai_responses.py.

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
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any

import uvicorn
from fastapi import FastAPI
from fastapi import Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..config import GateOptions
from ..engine.params import SamplingParams
from .protocol import (
    ApiError,
    Choices,
    choices_from,
    gate_from,
    openapi_body,
    parse_body,
    prompt_list,
    request_schemas,
    sampling_from,
    short_value,
)
from .responses import Reply, usage
from .scheduler import Engine, Event, QueueFull, Request

DEFAULT_MAX_REQUEST_BYTES = 1 << 20  # 1 MiB of JSON: far more than any context of today's models holds
SHUTDOWN_GRACE_S = 5  # uvicorn's backstop: tasks still running this long after shutdown starts are cancelled
DISCONNECT_POLL_S = 0.1
SHUTTING_DOWN = "the server is shutting down"


def shutting_down() -> ApiError:
    return ApiError(503, SHUTTING_DOWN, kind="server_error", code="service_unavailable")


# ---- the app ------------------------------------------------------------------------------------------------------
class ServerState:
    """The model, its tokenizer and engine, the limits, and the requests in flight (so shutdown can end them)."""

    def __init__(self, model, tokenizer, model_name: str, max_batch: int = 8, max_queue: int = 64,
                 max_tokens_cap: int = 1024, chat_template: str | None = None,
                 max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES) -> None:
        from ..engine.generate import context_length, special_tokens

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
            raise ApiError(404, f"The model {short_value(name)} does not exist", param="model", code="model_not_found")
        return _model_card(state)

    @app.post("/v1/completions", openapi_extra=openapi_body(completion_schema))
    async def completions(request: HttpRequest):
        body = await _read_json(request)
        options = _options(body, chat=False)
        prompts = prompt_list(body.get("prompt"))
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

    @app.post("/v1/chat/completions", openapi_extra=openapi_body(chat_schema))
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
                                    emit=_deliverer(loop, events, len(jobs)), scalings=choices.scalings,
                                    logprobs=choices.logprobs,
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
        reply = Reply(state.tokenizer, chat, choices, prompts, texts)
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
                    "choices": [reply.choice(i) for i in range(len(jobs))], "usage": usage(prompts, jobs)}
        if choices.scalings:
            response["xlora"] = {"experts": list(state.model.expert_names), "scalings": reply.scalings[0]}
        return response

    async def _stream(jobs, events, ident, reply: Reply, body):
        created = int(time.time())
        kind = "chat.completion.chunk" if reply.chat else "text_completion"
        options = body.get("stream_options")
        include_usage = isinstance(options, dict) and bool(options.get("include_usage"))

        def chunk(choice: dict, scalings=None) -> str:
            data = {"id": ident, "object": kind, "created": created, "model": state.model_name, "choices": [choice]}
            if reply.choices.scalings and scalings is not None:
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
                            "choices": [], "usage": usage(reply.prompts, jobs)}
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
        raise ApiError(404, f"The model {short_value(name)} does not exist; this server serves '{state.model_name}'",
                       param="model", code="model_not_found")


def _version() -> str:
    from .._version import __version__

    return __version__


def load_state(model_dir: str, base: str | None = None, name: str | None = None, trust_remote_code: bool = False,
               chat_template_file: str | None = None, placement: dict | None = None, **engine) -> ServerState:
    """Load the checkpoint (`placement`: dtype, quantization, device, device_map, ... as `from_pretrained` takes
    them) and its tokenizer, and start the engine."""
    from ..loading import load_tokenizer
    from ..model import XLoraModel

    model = XLoraModel.from_pretrained(model_dir, base=base, trust_remote_code=trust_remote_code, **(placement or {}))
    tokenizer = load_tokenizer(model_dir, base or model.base_model_id, chat_template_file=chat_template_file)
    return ServerState(model, tokenizer, name or os.path.basename(os.path.normpath(model_dir)), **engine)
