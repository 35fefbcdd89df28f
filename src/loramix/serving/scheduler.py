"""The serving engine: continuous batching of X-LoRA decoding, one background thread, no HTTP.

Requests are admitted between decode steps: a new request's prompt is prefilled alone (both passes, each with
its own KV cache), then its batch is merged into a running one (caches left-padded to the same length and
concatenated along the batch axis, with an attention mask that hides the padding). Each step then feeds one token
per row through both passes. Rows leave the batch (and both caches) when they finish or their client goes away.
All of it is the engine's decode core (engine/: `DecodeBatch`, `sample_next_token`, `finish_reason`), the same
that `generate` drives; this module only schedules requests and reports to their owners.

A request's gating options (top-k, softmax temperature, frozen scalings) change what the classifier's output
means, so rows are batched only with rows that have the same options (a *group*); the options are passed to the
model as arguments on each call, so one request's options never reach another's. Sampling is per row (its own
generator, seeded when asked), and so are failures: a row whose sampling fails ends alone with an error; a
failure of a whole step ends the requests of that step, never the engine.

A request is one row (one prompt, one choice); an API call with several prompts or choices submits its rows all
at once (`submit_all`). On request an event carries the new token's log-probabilities, and the first event the
prompt's (`prompt_logprobs`, from the prefill's logits; with max_new_tokens 0 one forward pass, no generation).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, replace
from typing import Callable

import torch

from ..config import GateOptions
from ..engine.batch import DecodeBatch
from ..engine.params import SamplingParams
from ..engine.rows import RowState
from ..engine.sampling import PromptLogprobs, TokenLogprob, chosen_logprobs, prompt_table
from ..engine.speculative import Accepted, chosen, speculative_round
from .settings import check_count

SHUTTING_DOWN = "the server is shutting down"


class QueueFull(Exception):
    """More requests are waiting than the engine's max_queue."""


@dataclass
class Event:
    """What the engine tells a request's owner after a step: new text, and at the end why it stopped."""

    text: str = ""
    scalings: list | None = None  # per new token: expert weights summed over LoRA layers, or [layer][expert]
    finish_reason: str | None = None  # "stop" | "length" | "error"
    error: str | None = None
    logprobs: list[TokenLogprob] | None = None  # the new token's, when the request asks (Request.logprobs)
    prompt_logprobs: PromptLogprobs | None = None  # the prompt's, in the first event (Request.prompt_logprobs)
    shutdown: bool = False  # an "error" that is the engine (or server) stopping, not a fault of this request

    @classmethod
    def shutting_down(cls) -> "Event":
        """The last event of a request ended because the engine or its server is stopping."""
        return cls(finish_reason="error", error=SHUTTING_DOWN, shutdown=True)


@dataclass
class Request:
    prompt_ids: list[int]
    params: SamplingParams
    gate: GateOptions
    emit: Callable[[Event], None]  # called from the engine thread
    scalings: bool = False  # each event carries the new token's scalings, summed over LoRA layers
    scalings_per_layer: bool = False  # ... per LoRA layer instead: [layer][expert]
    logprobs: int | None = None  # k: each new token's log-probability and k alternatives (None: none)
    prompt_logprobs: int | None = None  # k: the same for the prompt's tokens, from one forward pass first
    cancelled: bool = False
    n_generated: int = 0
    released: bool = False  # counted out of the engine's in-flight requests


class Engine:
    """Continuous batching over an XLoraModel. `submit` from any thread; events come back through `emit`.

    `fold_frozen`: a group whose rows are all frozen on the same scalings runs with the experts folded into the
    weights (see `generate`'s fold_frozen; it holds a copy of the adapted weights while the group runs).
    `speculate` = N > 0: each step of a group is a speculative round (engine/speculative.py): rows keep different
    numbers of verified tokens, a row that ends mid-round leaves at its last token, and each verified token is
    its own event. Groups with frozen scalings decode plainly."""

    def __init__(self, model, tokenizer, eos_token_ids: list[int], max_batch: int = 8, max_queue: int = 64,
                 context_length: int | None = None, fold_frozen: bool = False, speculate: int = 0) -> None:
        check_count(max_batch, "max_batch", 1)
        check_count(max_queue, "max_queue", 0)
        check_count(speculate, "speculate", 0)
        self.speculate = speculate  # N > 0: exact self-speculative rounds of at most N drafted tokens a row
        self.model, self.tokenizer = model, tokenizer
        self.eos = list(eos_token_ids)
        self.max_batch, self.max_queue = max_batch, max_queue
        self.context_length = context_length
        self.fold_frozen = fold_frozen
        self.groups: list[DecodeBatch] = []
        self.waiting: deque[Request] = deque()
        self.lock = threading.Condition()
        self.stats = {"steps": 0, "max_rows_in_step": 0, "requests": 0, "tokens": 0}
        self.in_flight = 0  # accepted and not yet ended: waiting, being admitted, or running
        self._closed = False
        self.thread = threading.Thread(target=self._loop, name="loramix-engine", daemon=True)
        self.thread.start()

    # ---- API ---------------------------------------------------------------------------------------------
    def submit(self, request: Request) -> None:
        """Queue a request; QueueFull when max_batch requests run and max_queue more already wait."""
        self.submit_all([request])

    def submit_all(self, requests: list[Request]) -> None:
        """Queue several requests (the rows of one API call: its prompts and choices) all or none; QueueFull when
        they do not all fit beside the running and waiting ones (max_batch + max_queue)."""
        with self.lock:
            if self._closed:
                raise RuntimeError("the engine is shut down")
            if self.in_flight + len(requests) > self.max_batch + self.max_queue:
                raise QueueFull(f"{self.in_flight} requests are running or waiting and {len(requests)} more asked "
                                f"(max_batch {self.max_batch} + max_queue {self.max_queue})")
            self.in_flight += len(requests)
            self.waiting.extend(requests)
            self.stats["requests"] += len(requests)
            self.lock.notify()

    def cancel(self, request: Request) -> None:
        request.cancelled = True
        with self.lock:
            self.lock.notify()

    def _release(self, request: Request) -> None:
        """A request has ended (finished, failed or abandoned): its place is free."""
        with self.lock:
            if not request.released:
                request.released = True
                self.in_flight -= 1

    def active_rows(self) -> int:
        return sum(len(g.rows) for g in self.groups)

    def shutdown(self) -> None:
        with self.lock:
            self._closed = True
            self.lock.notify()
        self.thread.join(timeout=10)

    # ---- the loop -----------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self.lock:
                while not self._closed and not self.waiting and not self.groups:
                    self.lock.wait()
                if self._closed:
                    break
                admitted = []
                while self.waiting and self.active_rows() + len(admitted) < self.max_batch:
                    admitted.append(self.waiting.popleft())
            for request in admitted:
                self._guard(lambda: self._admit(request), [request])
            for group in list(self.groups):
                self._guard(lambda: self._step(group), [row.owner for row in group.rows], group)
        for group in self.groups:
            for row in group.rows:
                row.owner.emit(Event.shutting_down())

    def _guard(self, work: Callable[[], None], requests: list[Request], group: DecodeBatch | None = None) -> None:
        """Run one unit of work; an unexpected failure ends the requests involved, never the engine."""
        try:
            with torch.inference_mode():  # every step of every group: caches are inference tensors throughout
                work()
        except Exception as err:  # noqa: BLE001 - reported to the clients, the engine goes on
            for request in requests:
                if not request.released:
                    self._release(request)
                    request.emit(Event(finish_reason="error", error=f"{type(err).__name__}: {err}"))
            if group is not None and group in self.groups:
                self.groups.remove(group)

    def _admit(self, request: Request) -> None:
        """Prefill the request alone, choose its first token, and merge it into a group with its options."""
        if request.cancelled:
            self._release(request)
            return
        gate = request.gate

        if request.params.max_new_tokens == 0:  # the prompt alone (echo): one forward pass, nothing generated
            if request.prompt_logprobs is not None:
                request.emit(Event(prompt_logprobs=prompt_table(
                    self.model, request.prompt_ids, top=request.prompt_logprobs, gate=gate,
                    temperature=request.params.distribution_temperature)))
            self._release(request)
            request.emit(Event(finish_reason="length"))
            return
        fold = self.fold_frozen and gate.freeze_scalings_after is not None
        batch = DecodeBatch(self.model, replace(gate, fold_frozen=fold))
        row = RowState.start(request.prompt_ids, request.params, device=self.model.device,
                             eos_token_ids=self.eos, tokenizer=self.tokenizer, context_length=self.context_length,
                             keep_text=True, owner=request)
        logits = batch.prefill([row], torch.tensor([request.prompt_ids]), prompt_logprobs=request.prompt_logprobs)
        if batch.prompt_logprobs is not None:  # from the prefill's own logits: no second pass over the prompt
            request.emit(Event(prompt_logprobs=batch.prompt_logprobs[0]))
            batch.prompt_logprobs = None
        self._choose(batch, logits)
        if not batch.rows:
            return
        group = next((g for g in self.groups if g.options == batch.options and g.accepting), None)
        if group is None:
            self.groups.append(batch)
        else:
            group.merge(batch)

    def _step(self, group: DecodeBatch) -> None:
        """One decode step of a group: cancelled rows leave, the others get a token each."""
        kept = []
        for i, row in enumerate(group.rows):
            if row.owner.cancelled:
                self._release(row.owner)
            else:
                kept.append(i)
        group.keep(kept)
        if group.rows:
            self.stats["steps"] += 1
            self.stats["max_rows_in_step"] = max(self.stats["max_rows_in_step"], len(group.rows))
            if self.speculate:  # a round: every row gets one token or more, reported as they were verified
                self._report(group, speculative_round(group, self.speculate, logprobs=_logprobs_asked(group)))
            else:
                self._choose(group, group.decode())
        if not group.rows:
            self.groups.remove(group)

    def _choose(self, batch: DecodeBatch, logits: torch.Tensor) -> None:
        """Each row's next token and finish reason (the decode core), reported to its owner; ended rows leave.
        A row that fails here (sampling, decoding its text) ends alone with an error event."""
        batch.choose(logits, logprobs=_logprobs_asked(batch))
        self._report(batch, [chosen(batch)])

    def _report(self, batch: DecodeBatch, positions: list[Accepted]) -> None:
        """An event per row and new token, position after position (a plain step has one position, a speculative
        round one per verified token); the rows that ended leave the batch."""
        ended = set()
        for taken in positions:
            for k, (row, reason) in enumerate(zip(taken.rows, taken.reasons)):
                if id(row) in ended:  # its request already had its last event (an error at an earlier position)
                    continue
                request = row.owner
                if reason == "error":
                    event = Event(finish_reason="error", error=row.error)
                else:
                    try:
                        request.n_generated += 1
                        self.stats["tokens"] += 1
                        scalings = [_token_scalings(taken.scalings[k], request)] if request.scalings else None
                        logprobs = None if request.logprobs is None else [
                            chosen_logprobs(taken.sampled, k, request.logprobs)]
                        text = taken.texts[k] if taken.texts is not None else row.take_text(final=reason is not None)
                        event = Event(text=text, scalings=scalings, finish_reason=reason, logprobs=logprobs)
                    except Exception as err:  # noqa: BLE001 - this request alone fails
                        event = Event(finish_reason="error", error=f"{type(err).__name__}: {err}")
                if event.finish_reason is not None:
                    ended.add(id(row))
                    self._release(request)
                request.emit(event)
        batch.keep([i for i, row in enumerate(batch.rows) if id(row) not in ended])


def _logprobs_asked(batch: DecodeBatch) -> int | None:
    """The most alternatives any row of the batch asks for with its tokens (None: no row asks for log-probabilities)."""
    asked = [row.owner.logprobs for row in batch.rows if row.owner.logprobs is not None]
    return max(asked) if asked else None


def _token_scalings(scalings: torch.Tensor, request: Request) -> list:
    """One token's scalings (n_lora_layers, n_experts) as its event carries them: summed over the LoRA layers
    ([expert]), or per layer ([layer][expert]) when the request asks."""
    return scalings.float().tolist() if request.scalings_per_layer else scalings.float().sum(0).tolist()


def wait_idle(engine: Engine, timeout: float = 10.0) -> bool:
    """Until no request is running or waiting (tests and shutdown)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if not engine.waiting and not engine.groups:
            return True
        time.sleep(0.01)
    return False


__all__ = ["Engine", "Request", "Event", "QueueFull", "SHUTTING_DOWN", "wait_idle"]
