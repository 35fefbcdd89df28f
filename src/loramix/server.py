"""`loramix serve`: an OpenAI-compatible HTTP server for X-LoRA models (FastAPI + uvicorn).

Routes: GET /health, GET /v1/models, POST /v1/completions, POST /v1/chat/completions (streaming as server-sent
events, or one JSON answer). Requests are decoded together by the continuous-batching engine (serving.py).

The X-LoRA extension: an optional request field
    "xlora": {"return_scalings": true, "top_k": 2, "softmax_temperature": 0.5, "freeze_scalings_after": 16}
sets the gate for that request only; with return_scalings the answer (or each stream chunk) carries
"xlora": {"experts": [...names], "scalings": [[per-expert weight summed over LoRA layers] per new token]}.

Every bad request gets a 4xx with an OpenAI-style body {"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import time
import uuid
from typing import Any

from fastapi import FastAPI
from fastapi import Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .generation import SamplingParams
from .serving import Engine, Event, GateOptions, QueueFull, Request

DEFAULT_MAX_TOKENS = 16


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


# ---- request validation -----------------------------------------------------------------------------------------
def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def parse_body(raw: bytes) -> dict:
    try:
        body = json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return body


def _number(body: dict, name: str, default: float, low: float, high: float, prefix: str = "") -> float:
    """body[name] as a finite float in [low, high]; `prefix` names the enclosing object in errors ("xlora.")."""
    value = body.get(name, default)
    if value is None:
        return default
    name = prefix + name
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ApiError(400, f"{name} must be a finite number, got {value!r}", param=name)
    if not low <= value <= high:
        raise ApiError(400, f"{name} must be between {low} and {high}, got {value}", param=name)
    return float(value)


def _integer(value: Any, name: str, low: int | None = None, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ApiError(400, f"{name} must be an integer, got {value!r}", param=name)
    if low is not None and value < low:
        raise ApiError(400, f"{name} must be at least {low}, got {value}", param=name)
    if high is not None and value > high:
        raise ApiError(400, f"{name} must be at most {high}, got {value}", param=name)
    return value


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
        raise ApiError(400, f"n must be 1, got {n!r}", param="n")
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = body.get(name)
    max_tokens = DEFAULT_MAX_TOKENS if max_tokens is None else _integer(max_tokens, name, 1, max_tokens_cap)
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    if top_p == 0:
        raise ApiError(400, "top_p must be greater than 0", param="top_p")
    for name in ("presence_penalty", "frequency_penalty"):
        if _number(body, name, 0.0, -2.0, 2.0) != 0:
            raise ApiError(400, f"{name} is not supported (only 0)", param=name)
    seed = body.get("seed")
    if seed is not None:
        seed = _integer(seed, "seed")
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
        raise ApiError(400, f"xlora: unknown option(s) {unknown}; known: {sorted(known)}", param="xlora")
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


# ---- the app ------------------------------------------------------------------------------------------------------
class ServerState:
    def __init__(self, model, tokenizer, model_name: str, max_batch: int = 8, max_queue: int = 64,
                 max_tokens_cap: int = 1024, chat_template: str | None = None) -> None:
        from .generation import context_length, special_tokens

        self.model, self.tokenizer, self.model_name = model, tokenizer, model_name
        self.max_tokens_cap = max_tokens_cap
        self.context = context_length(model)
        eos, _ = special_tokens(model, tokenizer.eos_token_id, tokenizer.pad_token_id)
        self.engine = Engine(model, tokenizer, eos, max_batch=max_batch, max_queue=max_queue,
                             context_length=self.context)
        if chat_template is not None:
            tokenizer.chat_template = chat_template
        self.created = int(time.time())


def create_app(state: ServerState, api_key: str | None = None):
    app = FastAPI(title="loramix", version=_version())

    @app.exception_handler(ApiError)
    async def api_error(_, err: ApiError):
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_, err):
        return JSONResponse(ApiError(400, str(err)).body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_, err):
        kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        return JSONResponse(ApiError(err.status_code, str(err.detail), kind=kind).body(), status_code=err.status_code)

    @app.middleware("http")
    async def authorize(request: HttpRequest, call_next):
        if api_key is not None and request.url.path != "/health":
            if request.headers.get("authorization", "") != f"Bearer {api_key}":
                err = ApiError(401, "missing or wrong API key (Authorization: Bearer KEY)", code="invalid_api_key",
                               kind="authentication_error")
                return JSONResponse(err.body(), status_code=401)
        return await call_next(request)

    @app.get("/health")
    async def health():
        engine = state.engine
        return {"status": "ok", "model": state.model_name, "running": engine.active_rows(),
                "waiting": len(engine.waiting)}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [_model_card(state)]}

    @app.get("/v1/models/{name}")
    async def model(name: str):
        if name != state.model_name:
            raise ApiError(404, f"The model '{name}' does not exist", param="model", code="model_not_found")
        return _model_card(state)

    @app.post("/v1/completions")
    async def completions(request: HttpRequest):
        body = parse_body(await request.body())
        _check_model(body, state)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool)
                                                       for t in prompt):
            ids = list(prompt)
            if any(not 0 <= t < len(state.tokenizer) for t in ids):
                raise ApiError(400, "prompt: a token id is outside the vocabulary", param="prompt")
        elif isinstance(prompt, str):
            ids = state.tokenizer(prompt)["input_ids"]
        else:
            raise ApiError(400, "prompt must be a string (or one string in a list, or a list of token ids)",
                           param="prompt")
        return await _run(request, body, ids, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HttpRequest):
        body = parse_body(await request.body())
        _check_model(body, state)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages):
            raise ApiError(400, "messages must be a non-empty list of {role, content} objects with string content",
                           param="messages")
        if getattr(state.tokenizer, "chat_template", None) is None:
            raise ApiError(400, "this model's tokenizer has no chat template; use /v1/completions or start the "
                                "server with --chat-template FILE", param="messages")
        try:
            text = state.tokenizer.apply_chat_template([{"role": m["role"], "content": m["content"]} for m in messages],
                                                       tokenize=False, add_generation_prompt=True)
        except Exception as e:  # jinja errors from the template (e.g. unsupported roles)
            raise ApiError(400, f"messages: the chat template failed: {e}", param="messages") from None
        ids = state.tokenizer(text, add_special_tokens=False)["input_ids"]
        return await _run(request, body, ids, chat=True)

    async def _run(http: HttpRequest, body: dict, ids: list[int], chat: bool):
        params = sampling_from(body, state.max_tokens_cap)
        gate = gate_from(body, state.model.n_experts)
        if state.context is not None and len(ids) >= state.context:
            raise ApiError(400, f"the prompt has {len(ids)} tokens; this model's context is {state.context}",
                           param="messages" if chat else "prompt", code="context_length_exceeded")
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise ApiError(400, "stream must be true or false", param="stream")
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()
        job = Request(prompt_ids=ids, params=params, gate=gate,
                      emit=lambda event: loop.call_soon_threadsafe(events.put_nowait, event))
        try:
            state.engine.submit(job)
        except QueueFull as e:
            raise ApiError(429, f"the server is busy: {e}; retry later", code="rate_limit_exceeded",
                           kind="rate_limit_error") from None
        ident = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        experts = list(state.model.expert_names)
        if stream:
            return StreamingResponse(_stream(http, job, events, ident, chat, len(ids), gate, experts, body),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        text, scalings, reason, error = [], [], None, None
        try:
            while reason is None:
                event = await events.get()
                text.append(event.text)
                scalings += event.scalings or []
                reason, error = event.finish_reason, event.error
        finally:
            if reason is None:  # the client went away while waiting
                state.engine.cancel(job)
        if reason == "error":
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

    async def _stream(http, job, events, ident, chat, n_prompt, gate, experts, body):
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
                    err = ApiError(500, f"generation failed: {event.error}", kind="server_error")
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
            if not finished:  # the client disconnected mid-stream: free the slot
                state.engine.cancel(job)

    return app


def _model_card(state: ServerState) -> dict:
    return {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "loramix",
            "xlora": {"experts": list(state.model.expert_names), "n_lora_layers": state.model.n_lora_layers}}


def _check_model(body: dict, state: ServerState) -> None:
    name = body.get("model")
    if name is None:
        raise ApiError(400, "model is required", param="model")
    if name != state.model_name:
        raise ApiError(404, f"The model '{name}' does not exist; this server serves '{state.model_name}'",
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
