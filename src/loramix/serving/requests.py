"""One API call on the engine, the same for every API: its rows submitted all or none, their events collected into
one answer or streamed as server-sent events, and every row cancelled once the call ends unfinished (a client
gone, a sibling failed, shutdown).

An answer is built and written to JSON in a worker thread (whole answers, and stream chunks carrying an echoed
prompt's log-probabilities), never on the event loop: a large answer does not stall the other clients."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import replace

from fastapi import Request as HttpRequest
from fastapi.responses import Response, StreamingResponse

from .metrics import CallCounts
from .protocol import ApiError, RequestOptions
from .responses import Reply, to_json, usage
from .scheduler import Event, QueueFull, Request
from .state import ServerState, shutting_down

DISCONNECT_POLL_S = 0.1


class Rows:
    """The engine rows of one call, choice index = prompt x n + j, and the queue where their events arrive as
    (index, event); None in the queue: the client has hung up."""

    def __init__(self, state: ServerState, prompts: list[list[int]], options: RequestOptions,
                 scope: dict | None = None) -> None:
        """Queue one row per prompt and choice, all or none (429 when they do not fit, 503 once the engine has
        stopped). Choice j of a seeded request samples with a seed derived from j, so its choices differ and each
        is reproducible. `scope`: the HTTP call's, for the metrics (metrics.py)."""
        self.state = state
        self.events: asyncio.Queue[tuple[int, Event] | None] = asyncio.Queue()
        self.finished: set[int] = set()
        loop = asyncio.get_running_loop()
        params, choices = options.params, options.choices
        self.jobs: list[Request] = []
        for ids in prompts:
            for j in range(choices.n):
                seed = params.seed if params.seed is None or j == 0 else (params.seed + j) % (1 << 64)
                self.jobs.append(Request(prompt_ids=ids, params=replace(params, seed=seed), gate=options.gate,
                                         emit=_deliverer(loop, self.events, len(self.jobs)),
                                         scalings=choices.scalings, scalings_per_layer=choices.scalings_per_layer,
                                         logprobs=choices.logprobs,
                                         prompt_logprobs=choices.logprobs if choices.echo else None))
        try:
            state.engine.submit_all(self.jobs)
        except QueueFull as e:
            raise ApiError(429, f"the server is busy: {e}; retry later", code="rate_limit_exceeded",
                           kind="rate_limit_error") from None
        except RuntimeError:  # the engine has stopped
            raise shutting_down() from None
        for job in self.jobs:
            state.running[id(job)] = (job, job.emit)
        self.counts = CallCounts(state.metrics, scope or {}, len(self.jobs), sum(len(p) for p in prompts))

    @property
    def done(self) -> bool:
        return len(self.finished) == len(self.jobs)

    def forget(self) -> None:
        """The call is over: its rows leave the server's books, and unfinished ones are cancelled."""
        for index, job in enumerate(self.jobs):
            self.counts.saw(index, job.n_generated, late=True)
            self.state.running.pop(id(job), None)
            if index not in self.finished:
                self.state.engine.cancel(job)


def failure(event: Event) -> ApiError:
    """The error a failed row's call answers: 503 when the server is stopping, else 500."""
    if event.shutdown:
        return shutting_down()
    return ApiError(500, f"generation failed: {event.error}", kind="server_error")


async def run(state: ServerState, http: HttpRequest, options: RequestOptions, prompts: list[list[int]],
              texts: list[str | None], chat: bool):
    """Generate for these prompts (token ids; `texts` their text, None where only ids came) and answer: one JSON
    object, or a stream of server-sent events when `options.stream`."""
    state.check_open()
    rows = Rows(state, prompts, options, http.scope)
    answer = Answer(state, chat, Reply(state.tokenizer, chat, options.choices, prompts, texts))
    if options.stream:
        return StreamingResponse(stream(rows, answer, options.include_usage), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    return await collect(http, rows, answer)


class Answer:
    """The envelope of one call's answer: its id, object type, creation time, model and X-LoRA experts, around the
    choices its `Reply` builds."""

    def __init__(self, state: ServerState, chat: bool, reply: Reply) -> None:
        self.reply, self.chat = reply, chat
        self.ident = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.model_name, self.experts = state.model_name, list(state.model.expert_names)

    def body(self, kind: str, choices: list[dict], **extra) -> dict:
        return {"id": self.ident, "object": kind, "created": self.created, "model": self.model_name,
                "choices": choices, **extra}

    def whole(self, rows: Rows) -> dict:
        """The answer with every choice, once all rows have finished."""
        reply = self.reply
        body = self.body("chat.completion" if self.chat else "text_completion",
                         [reply.choice(i) for i in range(len(rows.jobs))], usage=usage(reply.prompts, rows.jobs))
        if reply.choices.scalings:
            body["xlora"] = {"experts": self.experts, "scalings": reply.scalings[0]}
        return body

    def render(self, rows: Rows) -> bytes:
        """The whole answer as JSON (UTF-8): slow for a large answer, so called in a worker thread."""
        return to_json(self.whole(rows)).encode("utf-8")

    def chunk(self, choice: dict, scalings=None) -> str:
        """One server-sent event carrying one choice's delta (and the new token's scalings when asked)."""
        data = self.body("chat.completion.chunk" if self.chat else "text_completion", [choice])
        if self.reply.choices.scalings and scalings is not None:
            data["xlora"] = {"experts": self.experts, "scalings": scalings}
        return f"data: {to_json(data)}\n\n"

    def event_chunks(self, index: int, event: Event) -> list[str]:
        """The server-sent events for one engine event of choice `index`: its delta (if it carries anything), then
        the choice's end when it finishes."""
        chunks = []
        delta = self.reply.delta(index, event)
        if delta is not None:
            chunks.append(self.chunk(delta, scalings=event.scalings))
        if event.finish_reason is not None:
            chunks.append(self.chunk(self.reply.end(index, event.finish_reason)))
        return chunks


async def collect(http: HttpRequest, rows: Rows, answer: Answer):
    """Every row's events gathered into one answer; the first failed row fails the call (its siblings are
    cancelled), and a client that hangs up first gets nothing (499) and frees its rows."""
    error = None
    watcher = asyncio.create_task(_watch_disconnect(http, rows.events))
    try:
        while not rows.done and error is None:
            item = await rows.events.get()
            if item is None:
                break
            index, event = item
            rows.counts.saw(index, rows.jobs[index].n_generated)
            answer.reply.add(index, event)
            if event.finish_reason is not None:
                rows.finished.add(index)
                error = event if event.finish_reason == "error" else None
    finally:
        watcher.cancel()
        rows.forget()
    if error is not None:
        raise failure(error)
    if not rows.done:
        return Response(status_code=499)  # the client went away; nobody reads it, uvicorn drops it
    return Response(await asyncio.to_thread(answer.render, rows), media_type="application/json")


async def stream(rows: Rows, answer: Answer, include_usage: bool):
    """Each row's events as they come, one chunk each, then `data: [DONE]`; a failed row ends the stream with an
    error event. A client that disconnects mid-stream frees its rows (the generator is closed)."""
    reply = answer.reply
    try:
        for index in range(len(rows.jobs)):
            first = reply.first_delta(index)
            if first is not None:
                yield answer.chunk(first)
        while not rows.done:
            index, event = await rows.events.get()
            rows.counts.saw(index, rows.jobs[index].n_generated)
            if event.finish_reason == "error":
                rows.finished.add(index)
                yield f"data: {json.dumps(failure(event).body())}\n\n"
                break
            if event.prompt_logprobs is not None:  # an echoed prompt's: large, written off the event loop
                chunks = await asyncio.to_thread(answer.event_chunks, index, event)
            else:
                chunks = answer.event_chunks(index, event)
            for chunk in chunks:
                yield chunk
            if event.finish_reason is not None:
                rows.finished.add(index)
        else:
            if include_usage:
                kind = "chat.completion.chunk" if answer.chat else "text_completion"
                last = answer.body(kind, [], usage=usage(reply.prompts, rows.jobs))
                yield f"data: {json.dumps(last)}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        rows.forget()


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
