"""What a running `loramix serve` holds: its settings, the model with its tokenizer and engine, the limits they
imply, the requests in flight (so that shutdown can end them)."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ..engine.generate import context_length, special_tokens
from .metrics import ServerMetrics
from .protocol import ApiError, field_ranges
from .scheduler import SHUTTING_DOWN, Engine, Event, Request
from .settings import ServeSettings


def shutting_down() -> ApiError:
    """What a request gets once shutdown has begun: 503, so a client or load balancer retries elsewhere."""
    return ApiError(503, SHUTTING_DOWN, kind="server_error", code="service_unavailable")


class ServerState:
    """The served model, its tokenizer and engine, the limits read from them and from `settings`, and the requests
    in flight."""

    def __init__(self, model, tokenizer, settings: ServeSettings) -> None:
        self.model, self.tokenizer, self.settings = model, tokenizer, settings
        self.model_name = settings.model_name
        self.context = context_length(model)
        # no token covers more characters than the longest vocabulary entry (special tokens included), so a prompt
        # with more non-blank characters than context x that cannot fit and is refused before tokenizing
        longest = max((len(t) for t in tokenizer.get_vocab()), default=1)
        self.max_prompt_chars = None if self.context is None else self.context * max(longest, 1)
        eos, _ = special_tokens(model, tokenizer.eos_token_id, tokenizer.pad_token_id)
        self.engine = Engine(model, tokenizer, eos, max_batch=settings.max_batch, max_queue=settings.max_queue,
                             context_length=self.context, speculate=settings.speculate)
        self.metrics = ServerMetrics(self.engine)  # GET /metrics
        self.max_rows = settings.max_rows  # rows (prompts x n) one request may ask for
        self.ranges = field_ranges(settings.max_tokens_cap, model.n_experts, self.max_rows)
        self.created = int(time.time())
        self.closing = False
        self.running: dict[int, tuple[Request, Any]] = {}  # request id -> (request, deliver an event to its handler)
        # tokenizing a long prompt takes long: one worker thread keeps it off the event loop (and serial, as a
        # fast tokenizer is not meant to be called from several threads at once)
        self.tokenizer_pool = ThreadPoolExecutor(1, thread_name_prefix="loramix-tokenize")

    def check_open(self) -> None:
        """503 once shutdown has begun."""
        if self.closing:
            raise shutting_down()

    async def tokenize(self, fn, *args, **kwargs):
        """fn(*args, **kwargs) on the tokenizer thread, awaited without blocking the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self.tokenizer_pool, lambda: fn(*args, **kwargs))

    def drain(self) -> None:
        """Stop admitting requests (503) and end every running one now with an error; the engine drops them at
        its next step. Called first thing on shutdown, so no open response holds the process up."""
        self.closing = True
        for request, deliver in self.running.copy().values():  # a copy: handlers remove themselves
            self.engine.cancel(request)
            deliver(Event.shutting_down())

    def close(self) -> None:
        """Stop the engine thread and the tokenizer thread (blocking until the engine's current step ends)."""
        self.drain()
        self.engine.shutdown()
        self.tokenizer_pool.shutdown(wait=False, cancel_futures=True)
