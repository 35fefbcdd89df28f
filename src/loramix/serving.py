"""The serving engine: continuous batching of X-LoRA decoding, one background thread, no HTTP.

Requests are admitted between decode steps: a new request's prompt is prefilled alone (both passes, each with
its own KV cache), then its caches are left-padded to the batch's length (or the batch's to its length) and
concatenated along the batch axis, with an attention mask that hides the padding. Each step then feeds one token
per row through both passes. Rows leave the batch (and both caches) when they finish or their client goes away.

A request's gating options (top-k, softmax temperature, frozen scalings) change what the classifier's output
means, so rows are batched only with rows that have the same options (a *group*); the engine steps its groups in
turn and sets the model's options for each step only, so one request's options never reach another's.
Sampling is per row (its own generator, seeded when asked).
"""

from __future__ import annotations

import dataclasses
import itertools
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch

from .generation import SamplingParams, _generator, _pick, _select_rows


class QueueFull(Exception):
    """More requests are waiting than the engine's max_queue."""


@dataclass(frozen=True)
class GateOptions:
    """Per-request X-LoRA options; None keeps the model's own setting."""

    top_k: int | None = None
    softmax_temperature: float | None = None
    freeze_scalings_after: int | None = None
    return_scalings: bool = False

    def key(self) -> tuple:
        return (self.top_k, self.softmax_temperature, self.freeze_scalings_after)


@dataclass
class Event:
    """What the engine tells a request's owner after a step: new text, and at the end why it stopped."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    scalings: list[list[float]] | None = None  # per new token: expert weights summed over LoRA layers
    finish_reason: str | None = None  # "stop" | "length" | "error"
    error: str | None = None


@dataclass
class Request:
    prompt_ids: list[int]
    params: SamplingParams
    gate: GateOptions
    emit: Callable[[Event], None]  # called from the engine thread
    id: int = field(default_factory=itertools.count().__next__)
    cancelled: bool = False
    n_generated: int = 0
    released: bool = False  # counted out of the engine's in-flight requests


class _Row:
    """One request inside a group: its sampling state and the text it has emitted so far."""

    def __init__(self, request: Request, device) -> None:
        self.request = request
        self.generator = _generator(request.params.seed, device)
        self.tokens: list[int] = []  # generated so far, the end-of-sequence token excluded
        self.last_token = -1  # chosen, not yet fed through the model
        self.next_position = len(request.prompt_ids)
        self.frozen: torch.Tensor | None = None  # (L, E) once its scalings are frozen
        self.sent = ""  # text already emitted

    def freeze_if_due(self, scalings: torch.Tensor) -> None:
        """Keep the scalings (L, E) that produced the latest token once freeze_scalings_after tokens exist."""
        after = self.request.gate.freeze_scalings_after
        if self.frozen is None and after is not None and self.request.n_generated >= after:
            self.frozen = scalings


class _Group:
    def __init__(self, key: tuple) -> None:
        self.key = key
        self.rows: list[_Row] = []
        self.scaling_cache = None
        self.mixed_cache = None
        self.mask: torch.Tensor | None = None  # (n, cache length)
        self.accepting = True  # False once its scaling pass stopped (every row frozen)


class Engine:
    """Continuous batching over an XLoraModel. `submit` from any thread; events come back through `emit`."""

    def __init__(self, model, tokenizer, eos_token_ids: list[int], max_batch: int = 8, max_queue: int = 64,
                 context_length: int | None = None) -> None:
        if max_batch < 1 or max_queue < 0:
            raise ValueError(f"max_batch must be >= 1 and max_queue >= 0, got {max_batch} and {max_queue}")
        self.model, self.tokenizer = model, tokenizer
        self.eos = list(eos_token_ids)
        self.max_batch, self.max_queue = max_batch, max_queue
        self.context_length = context_length
        self.groups: list[_Group] = []
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
        with self.lock:
            if self._closed:
                raise RuntimeError("the engine is shut down")
            if self.in_flight >= self.max_batch + self.max_queue:
                raise QueueFull(f"{self.in_flight} requests are running or waiting (max_batch {self.max_batch} + "
                                f"max_queue {self.max_queue})")
            self.in_flight += 1
            self.waiting.append(request)
            self.stats["requests"] += 1
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
                self._guard(lambda: self._step(group), [r.request for r in group.rows], group)
        for group in self.groups:
            for row in group.rows:
                row.request.emit(Event(finish_reason="error", error="the server is shutting down"))

    def _guard(self, work: Callable[[], None], requests: list[Request], group: _Group | None = None) -> None:
        """Run one unit of work; an unexpected failure ends the requests involved, never the engine."""
        try:
            with torch.no_grad():
                work()
        except Exception as err:  # noqa: BLE001 - reported to the clients, the engine goes on
            for request in requests:
                request.emit(Event(finish_reason="error", error=f"{type(err).__name__}: {err}"))
                self._release(request)
            if group is not None and group in self.groups:
                self.groups.remove(group)

    def _options(self, key: tuple):
        top_k, temperature, _ = key
        config = self.model.config
        changes = {}
        if top_k is not None:
            changes["top_k_lora"] = top_k
        if temperature is not None:
            changes["softmax_temperature"] = temperature
        return config, (dataclasses.replace(config, **changes) if changes else config)

    def _run(self, key: tuple, fn):
        saved, config = self._options(key)
        self.model.config = config
        try:
            return fn()
        finally:
            self.model.config = saved

    def _admit(self, request: Request) -> None:
        if request.cancelled:
            self._release(request)
            return
        from transformers import DynamicCache

        device = self.model.device
        ids = torch.tensor([request.prompt_ids], device=device)
        scaling_cache, mixed_cache = DynamicCache(), DynamicCache()
        key = request.gate.key()
        out = self._run(key, lambda: self.model(input_ids=ids, past_key_values=mixed_cache,
                                                scaling_past_key_values=scaling_cache, use_cache=True,
                                                logits_to_keep=1))
        row = _Row(request, device)
        token = self._pick(row, out.logits[:, -1])
        row.last_token = token
        scalings = out.scalings[0, -1]  # (L, E)
        if self._finish_or_emit(row, token, scalings):
            return
        row.freeze_if_due(scalings)
        group = next((g for g in self.groups if g.key == key and g.accepting), None)
        if group is None:
            group = _Group(key)
            self.groups.append(group)
        _join(group, row, scaling_cache, mixed_cache, ids.shape[1])

    def _step(self, group: _Group) -> None:
        gone = [i for i, row in enumerate(group.rows) if row.request.cancelled]
        for i in gone:
            self._release(group.rows[i].request)
        if gone:
            self._drop(group, gone)
        if not group.rows:
            self.groups.remove(group)
            return
        device = self.model.device
        tokens = torch.tensor([[r.last_token] for r in group.rows], device=device)  # (n, 1)
        positions = torch.tensor([[r.next_position] for r in group.rows], device=device)  # (n, 1)
        group.mask = torch.cat([group.mask, torch.ones_like(group.mask[:, :1])], dim=1)
        frozen = [r.frozen is not None for r in group.rows]

        def step():
            inputs = dict(input_ids=tokens, attention_mask=group.mask, position_ids=positions, use_cache=True)
            if all(frozen):  # no row needs the scaling pass any more; this group takes no new rows
                group.accepting, group.scaling_cache = False, None
                scalings = torch.stack([r.frozen for r in group.rows])[:, None]  # (n, 1, L, E)
            else:
                scalings, group.scaling_cache = self.model.compute_scalings(
                    scaling_past_key_values=group.scaling_cache, **inputs)
                if any(frozen):
                    scalings = scalings.clone()
                    for i, row in enumerate(group.rows):
                        if row.frozen is not None:
                            scalings[i, 0] = row.frozen
            return self.model(scalings=scalings, past_key_values=group.mixed_cache, **inputs), scalings

        out, scalings = self._run(group.key, step)
        self.stats["steps"] += 1
        self.stats["max_rows_in_step"] = max(self.stats["max_rows_in_step"], len(group.rows))
        finished = []
        for i, row in enumerate(group.rows):
            row.next_position += 1
            token = self._pick(row, out.logits[i:i + 1, -1])
            row.last_token = token
            if self._finish_or_emit(row, token, scalings[i, -1]):
                finished.append(i)
            else:
                row.freeze_if_due(scalings[i, -1])
        if finished:
            self._drop(group, finished)
        if not group.rows:
            self.groups.remove(group)

    def _pick(self, row: _Row, logits: torch.Tensor) -> int:
        """The row's next token from its logits (1, vocab), with its own parameters, generator and step count;
        the history (prompt + generated) is what the repetition penalty reads."""
        device = logits.device
        history = torch.tensor([row.request.prompt_ids + row.tokens], device=device)
        eos = torch.tensor(self.eos or [-1], device=device)
        return int(_pick(logits, history, torch.ones_like(history), [row.request.params], [row.generator],
                         row.request.n_generated, eos)[0])

    def _finish_or_emit(self, row: _Row, token: int, scalings: torch.Tensor) -> bool:
        """Account for the token just chosen; emit its text; return True when the row is done."""
        request, params = row.request, row.request.params
        request.n_generated += 1
        self.stats["tokens"] += 1
        per_expert = [scalings.float().sum(0).tolist()] if request.gate.return_scalings else None
        if token in self.eos and request.n_generated > params.min_new_tokens:
            self._release(request)
            request.emit(Event(text=self._flush(row, final=True), scalings=per_expert, finish_reason="stop"))
            return True
        row.tokens.append(token)
        text = self.tokenizer.decode(row.tokens, skip_special_tokens=True)
        for stop in params.stop:
            at = text.find(stop)
            if at >= 0:
                self._release(request)
                request.emit(Event(text=text[len(row.sent):at] if at > len(row.sent) else "", token_ids=[token],
                                   scalings=per_expert, finish_reason="stop"))
                return True
        limit = params.max_new_tokens
        if self.context_length is not None:
            limit = min(limit, self.context_length - len(request.prompt_ids))
        if request.n_generated >= limit:
            self._release(request)
            request.emit(Event(text=text[len(row.sent):], token_ids=[token], scalings=per_expert,
                               finish_reason="length"))
            return True
        delta = self._flush(row, final=False, text=text)
        request.emit(Event(text=delta, token_ids=[token], scalings=per_expert))
        return False

    def _flush(self, row: _Row, final: bool, text: str | None = None) -> str:
        """Text not yet sent, holding back what could still become a stop string or an incomplete character."""
        if text is None:
            text = self.tokenizer.decode(row.tokens, skip_special_tokens=True)
        end = len(text)
        if not final:
            if text.endswith("\ufffd"):
                end = len(text.rstrip("\ufffd"))
            for stop in row.request.params.stop:
                for k in range(min(len(stop) - 1, end), 0, -1):
                    if text[:end].endswith(stop[:k]):
                        end = min(end, len(text[:end]) - k)
                        break
        if end <= len(row.sent):
            return ""
        delta, row.sent = text[len(row.sent):end], text[:end]
        return delta

    def _drop(self, group: _Group, indices: list[int]) -> None:
        keep = [i for i in range(len(group.rows)) if i not in set(indices)]
        group.rows = [group.rows[i] for i in keep]
        if not keep:
            return
        index = torch.tensor(keep, device=group.mask.device)
        group.mask = group.mask[index]
        for cache in (group.scaling_cache, group.mixed_cache):
            if cache is not None:
                _select_rows(cache, index)


# ---- cache surgery: joining a row to a group ---------------------------------------------------------------------
def _join(group: _Group, row: _Row, scaling_cache, mixed_cache, length: int) -> None:
    """Add a prefilled row (caches of `length` positions) to the group, left-padding whichever is shorter.

    The caches are plain DynamicCaches (built without the model config), which keep every position even for
    sliding-window models; the window is applied by the attention mask, so padding and joining stay exact."""
    mask = torch.ones((1, length), dtype=torch.long, device=row_device(mixed_cache))
    if not group.rows:
        group.rows, group.scaling_cache, group.mixed_cache, group.mask = [row], scaling_cache, mixed_cache, mask
        return
    current = group.mask.shape[1]
    width = max(current, length)
    group.mask = torch.cat([_pad_left(group.mask, width), _pad_left(mask, width)])
    for mine, theirs in ((group.scaling_cache, scaling_cache), (group.mixed_cache, mixed_cache)):
        for a, b in zip(mine.layers, theirs.layers):
            a.keys = torch.cat([_pad_left_kv(a.keys, width), _pad_left_kv(b.keys, width)])
            a.values = torch.cat([_pad_left_kv(a.values, width), _pad_left_kv(b.values, width)])
    group.rows.append(row)


def row_device(cache) -> torch.device:
    return cache.layers[0].keys.device


def _pad_left(x: torch.Tensor, width: int) -> torch.Tensor:
    """(n, t) -> (n, width), zeros on the left."""
    return torch.nn.functional.pad(x, (width - x.shape[1], 0))


def _pad_left_kv(x: torch.Tensor, width: int) -> torch.Tensor:
    """(n, heads, t, dim) -> (n, heads, width, dim), zeros on the left of the sequence axis."""
    return torch.nn.functional.pad(x, (0, 0, width - x.shape[2], 0))


def wait_idle(engine: Engine, timeout: float = 10.0) -> bool:
    """Until no request is running or waiting (tests and shutdown)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if not engine.waiting and not engine.groups:
            return True
        time.sleep(0.01)
    return False


__all__ = ["Engine", "Request", "Event", "GateOptions", "QueueFull", "wait_idle"]
