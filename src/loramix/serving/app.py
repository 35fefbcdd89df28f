"""`loramix serve`'s HTTP face: the FastAPI app (thin routes, OpenAI-style error bodies, the API key) on uvicorn,
over a model loaded by `load_state`.

Routes: GET /health, GET /metrics (Prometheus, metrics.py), GET /v1/models, POST /v1/completions (completions.py),
POST /v1/chat/completions (chat.py), streaming as server-sent events or one JSON answer; requests run on the
continuous-batching engine (scheduler.py) through requests.py. Request fields are checked in protocol.py and
answers built in responses.py. GET / is the explorer page (page/), a client of the same routes.

The X-LoRA extension: an optional request field
    "xlora": {"return_scalings": true, "top_k": 2, "softmax_temperature": 0.5, "freeze_scalings_after": 16}
sets the gate for that request only; with return_scalings the answer (or each stream chunk) carries
"xlora": {"experts": [...names], "scalings": [[per-expert weight summed over LoRA layers] per new token]}
(with "return_scalings": "layers", [[[weight per expert] per LoRA layer] per new token]).

Every error, bad request or not, gets an OpenAI-style JSON body {"error": {"message", "type", "param", "code"}}.
A client that hangs up frees its slot; on shutdown (SIGTERM) new requests get 503 and running ones end at once
with an error, so the process exits within seconds.
"""

from __future__ import annotations

import asyncio
import hmac
from contextlib import asynccontextmanager

import uvicorn
from fastapi import FastAPI
from fastapi import Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from .._version import __version__
from .chat import create_chat_completion
from .completions import create_completion
from .metrics import MetricsMiddleware
from .page import PAGE_PATHS, add_page_routes
from .protocol import ApiError, openapi_body, request_schemas, short_value
from .settings import ServeSettings, check_api_key
from .state import ServerState

SHUTDOWN_GRACE_S = 5  # uvicorn's backstop: tasks still running this long after shutdown starts are cancelled
OPEN_PATHS = PAGE_PATHS | {"/health"}  # answered without the API key: nothing in them is the model's


def create_app(state: ServerState) -> FastAPI:
    """The app serving `state`; it closes the state (engine and tokenizer threads) when it shuts down."""
    @asynccontextmanager
    async def lifespan(_):
        yield
        await asyncio.to_thread(state.close)

    app = FastAPI(title="loramix", version=__version__, lifespan=lifespan)
    if state.settings.api_key is not None:
        app.add_middleware(RequireKey, api_key=state.settings.api_key)
    # outermost: a request refused for its key counts too
    app.add_middleware(MetricsMiddleware, metrics=state.metrics, routes=app.router.routes)
    _add_error_handlers(app)
    _add_routes(app, state)
    add_page_routes(app)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    """Every error as an OpenAI-style JSON body, a server bug (500) included, never plain text."""
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
    async def server_error(_, err):
        return ApiError(500, f"internal error: {type(err).__name__}", kind="server_error").response()


def _add_routes(app: FastAPI, state: ServerState) -> None:
    completion_schema, chat_schema = request_schemas(state.model_name, state.ranges, state.max_rows)

    @app.get("/health")
    async def health():
        state.check_open()  # a load balancer stops sending requests here
        return {"status": "ok", "model": state.model_name, "running": state.engine.active_rows(),
                "waiting": len(state.engine.waiting)}

    @app.get("/metrics", include_in_schema=False)
    async def metrics():  # Prometheus' text format (metrics.py); behind the API key when there is one
        body, content_type = state.metrics.exposition()
        return Response(body, media_type=content_type)

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
        return await create_completion(state, request)

    @app.post("/v1/chat/completions", openapi_extra=openapi_body(chat_schema))
    async def chat_completions(request: HttpRequest):
        return await create_chat_completion(state, request)


def _model_card(state: ServerState) -> dict:
    return {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "loramix",
            "xlora": {"experts": list(state.model.expert_names), "n_lora_layers": state.model.n_lora_layers,
                      "lora_layers": list(state.model.lora_layer_names)},
            "chat_template": getattr(state.tokenizer, "chat_template", None) is not None}


class RequireKey:
    """ASGI middleware: every route but /health and the page's files (OPEN_PATHS) needs `Authorization: Bearer
    KEY`; the scheme is case-insensitive (RFC 7235) and the key is compared in constant time
    (`hmac.compare_digest`). An empty or blank key is refused (ValueError naming --api-key), so that `Bearer` with
    nothing after it never passes."""

    def __init__(self, app, api_key: str) -> None:
        check_api_key(api_key)
        self.app, self.key = app, api_key.encode("utf-8")

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS and not self.authorized(scope["headers"]):
            err = ApiError(401, "missing or wrong API key (Authorization: Bearer KEY)", code="invalid_api_key",
                           kind="authentication_error")
            await err.response()(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def authorized(self, headers: list[tuple[bytes, bytes]]) -> bool:
        value = next((v for k, v in headers if k == b"authorization"), b"")
        scheme, _, key = value.strip().partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(key.strip(), self.key)


class Server(uvicorn.Server):
    """uvicorn's server, draining the app's requests the moment shutdown begins (SIGTERM, SIGINT, should_exit):
    uvicorn would otherwise wait for every open response, i.e. for generations whose clients may have left."""

    def __init__(self, state: ServerState, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.state = state

    async def shutdown(self, sockets=None) -> None:
        self.state.drain()
        await super().shutdown(sockets=sockets)


def make_server(state: ServerState) -> Server:
    """A uvicorn server for `create_app(state)` on the settings' host and port; `.run()` serves until
    SIGTERM/SIGINT or `should_exit` (`.run(sockets=[...])` on sockets bound already)."""
    settings = state.settings
    config = uvicorn.Config(create_app(state), host=settings.host, port=settings.port, log_level=settings.log_level,
                            timeout_graceful_shutdown=SHUTDOWN_GRACE_S)
    return Server(state, config)


def load_state(settings: ServeSettings, placement: dict | None = None) -> ServerState:
    """Load the checkpoint (`placement`: dtype, quantization, device, device_map, ... as `from_pretrained` takes
    them) and its tokenizer (with --chat-template's, if given), and start the engine."""
    from ..loading import load_tokenizer
    from ..model import XLoraModel

    model = XLoraModel.from_pretrained(settings.model, base=settings.base, trust_remote_code=settings.trust_remote_code,
                                       **(placement or {}))
    tokenizer = load_tokenizer(settings.model, settings.base or model.base_model_id,
                               chat_template_file=settings.chat_template)
    return ServerState(model, tokenizer, settings)
