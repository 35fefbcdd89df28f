"""Cached generation for X-LoRA: one KV cache per pass, left-padded batches, sampling, streaming, frozen scalings.

PEFT turns the KV cache off for X-LoRA, so every new token re-runs the whole sequence twice. Here each pass keeps
its own cache: after the prompt, a step feeds only the new token through the scaling pass (cache 1), then through
the mixed pass (cache 2). This is exact because the model is causal: a token's hidden state in the scaling pass,
and so its scalings, never change once computed.

Frozen scalings (mistral.rs calls them non-granular): after the prompt, or after N generated tokens, the latest
scalings are kept for every later token and the scaling pass is skipped. With `fold_frozen` the weighted experts
are also added into a copy of each adapted weight for the rest of the request, so a step costs what a step of the
base model costs. What it trades: the gate no longer follows the text as it moves between domains, and the folded
copies take the memory of the adapted weights while the request runs.

One decode core serves `generate` and the server's continuous-batching engine (serving.py), so each rule of
decoding is written once:
- `RowState`: one sequence (prompt, tokens so far, budget, sampling parameters, its own generator, its text);
- `sample_next_token`: the next token of every row (penalties, greedy or sampling, failures kept per row), and
  on request the log-probabilities of the distribution sampled from; `prompt_logprobs` gives the same for the
  tokens of a prompt (one forward pass);
- `finish_reason`: EOS against min_new_tokens, stop strings, the budget (max_new_tokens and the context);
- `DecodeBatch`: rows decoded together with one KV cache per pass (prefill, decode, keep rows, merge batches),
  frozen scalings and folding; `select_cache_rows` / `merge_caches` are its cache surgery.

The core knows only token ids; a tokenizer is needed only for text (`stop` strings, streamed text).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from .config import is_finite_number, is_int
from .kv_cache import GrowingCache


@dataclass
class SamplingParams:
    """How one row picks its tokens (Hugging Face semantics); checked on construction."""

    max_new_tokens: int = 20
    min_new_tokens: int = 0
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        def bad(name, expected):
            raise ValueError(f"{name}: got {getattr(self, name)!r}, expected {expected}")

        if not is_int(self.max_new_tokens) or self.max_new_tokens < 0:
            bad("max_new_tokens", "an integer >= 0")
        if not is_int(self.min_new_tokens) or self.min_new_tokens < 0:
            bad("min_new_tokens", "an integer >= 0")
        if not is_finite_number(self.temperature) or self.temperature < 0:
            bad("temperature", "a finite number >= 0")
        if not is_finite_number(self.top_p) or not 0 < self.top_p <= 1:
            bad("top_p", "a number in (0, 1]")
        if not is_int(self.top_k) or self.top_k < 0:
            bad("top_k", "an integer >= 0 (0: off)")
        if not is_finite_number(self.repetition_penalty) or self.repetition_penalty <= 0:
            bad("repetition_penalty", "a number > 0")
        if self.seed is not None and not is_int(self.seed):
            bad("seed", "an integer or None")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not all(isinstance(s, str) and s for s in self.stop):
            bad("stop", "a list of non-empty strings")

    @property
    def greedy(self) -> bool:
        """Argmax decoding: no sampling, or a temperature below GREEDY_BELOW (0 included)."""
        return not self.do_sample or self.temperature < GREEDY_BELOW


@dataclass
class RowState:
    """One sequence being decoded: everything the rules of decoding read about it.

    `tokens` are the tokens chosen so far (an ending EOS included); the last one is the next to be fed through
    the model. `text` is their decoded text, kept only when the row needs it (stop strings, streamed text);
    `sent` is how much of it `take_text` has handed out. `frozen` holds the row's scalings (L, E) once they are
    frozen. `owner` is the driver's own handle (generate: the row index; the server's engine: the request)."""

    prompt: list[int]  # prompt ids without padding: the repetition penalty and the positions read them
    params: SamplingParams
    budget: int  # most new tokens: max_new_tokens, or less where the context ends first (token_budget)
    generator: torch.Generator
    eos_token_ids: frozenset[int] = frozenset()
    tokenizer: Any = None
    keep_text: bool = False  # decode the text after every token (streaming); stop strings imply it
    owner: Any = None
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    sent: int = 0
    frozen: torch.Tensor | None = None
    error: str | None = None  # why the row failed, when its finish reason is "error"

    @classmethod
    def start(cls, prompt: list[int], params: SamplingParams, *, device, eos_token_ids=(), tokenizer=None,
              context_length: int | None = None, prompt_length: int | None = None, keep_text: bool = False,
              owner: Any = None) -> "RowState":
        """A fresh row; `prompt_length` (default: the prompt's) is what the context budget counts."""
        if params.stop and tokenizer is None:
            raise ValueError("stop: stop strings need a tokenizer to decode the text")
        if keep_text and tokenizer is None:
            raise ValueError("keep_text: needs a tokenizer to decode the text")
        length = len(prompt) if prompt_length is None else prompt_length
        return cls(prompt=list(prompt), params=params, budget=token_budget(params, length, context_length),
                   generator=new_generator(params.seed, device), eos_token_ids=frozenset(eos_token_ids),
                   tokenizer=tokenizer, keep_text=keep_text or bool(params.stop), owner=owner)

    def push(self, token: int) -> None:
        """Record the token just chosen (and its text, when the row keeps text; an EOS adds none)."""
        self.tokens.append(token)
        if self.keep_text and token not in self.eos_token_ids:
            self.text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)

    def take_text(self, final: bool) -> str:
        """Text not handed out yet. While the row runs, a tail that could still grow into a stop string, or an
        incomplete character (U+FFFD), is held back; at the end the text is cut before the stop string."""
        text, end = self.text, len(self.text)
        if final:
            hits = [at for at in (text.find(s) for s in self.params.stop) if at >= 0]
            end = min(hits, default=end)
        else:
            if text.endswith("\ufffd"):
                end = len(text.rstrip("\ufffd"))
            for stop in self.params.stop:
                for k in range(min(len(stop) - 1, end), 0, -1):
                    if text[:end].endswith(stop[:k]):
                        end -= k
                        break
        if end <= self.sent:
            return ""
        delta, self.sent = text[self.sent:end], end
        return delta


def token_budget(params: SamplingParams, prompt_length: int, context_length: int | None) -> int:
    """How many new tokens a row may have: max_new_tokens, or what is left of the context after the prompt."""
    if context_length is None:
        return params.max_new_tokens
    return min(params.max_new_tokens, context_length - prompt_length)


def finish_reason(row: RowState) -> str | None:
    """Why the row ends with its newest token, or None: "stop" for an EOS (once min_new_tokens exist) or a stop
    string in the text, "length" when the budget (max_new_tokens or the context) is spent. The one place these
    rules live; `decode_steps` and the server's engine both ask it."""
    token, n = row.tokens[-1], len(row.tokens)
    if token in row.eos_token_ids and n > row.params.min_new_tokens:
        return "stop"
    if row.params.stop and any(s in row.text for s in row.params.stop):
        return "stop"
    if n >= row.budget:
        return "length"
    return None


# ---- token choice --------------------------------------------------------------------------------------------
# Temperatures under this pick the argmax (vLLM's rule): the distribution is one-hot up to rounding there, and a
# tiny temperature would overflow float32 in logits / T (1e-39: inf, then NaN probabilities).
GREEDY_BELOW = 1e-5


@dataclass
class Sampled:
    """What `sample_next_token` chose: one token per row, the rows whose sampling failed, and (when asked) the
    log-probabilities of the distribution each row sampled from."""

    tokens: torch.Tensor  # (n,) the chosen token per row (argmax for a row that failed)
    errors: dict[int, str]  # row index -> what went wrong
    logprobs: torch.Tensor | None = None  # (n,) log-probability of the chosen token
    top_logprobs: torch.Tensor | None = None  # (n, k) the k largest log-probabilities, largest first
    top_ids: torch.Tensor | None = None  # (n, k) their tokens


def sample_next_token(logits: torch.Tensor, rows: list[RowState], logprobs: int | None = None) -> Sampled:
    """The next token of each row from its logits (n, vocab), Hugging Face semantics in this order: repetition
    penalty over prompt + generated, EOS barred before min_new_tokens, then argmax (greedy, or a temperature
    below GREEDY_BELOW) or sampling with the row's temperature, top-k, top-p and own generator.

    Rows are independent: a row whose sampling raises (non-finite logits, say) is reported in `errors` and the
    other rows keep their tokens.

    `logprobs` = k >= 0 also returns log-probabilities of the distribution sampled from: log_softmax of the
    logits after the penalties and the temperature (temperature 1 for greedy rows), before top-k / top-p
    truncation; for the chosen token and the k most likely ones."""
    logits = logits.float()  # (n, vocab)
    edited = False
    for i, row in enumerate(rows):
        p = row.params
        if p.repetition_penalty != 1.0:
            if not edited:
                logits, edited = logits.clone(), True
            seen = torch.tensor(row.prompt + row.tokens, device=logits.device).unique()
            scores = logits[i, seen]
            logits[i, seen] = torch.where(scores < 0, scores * p.repetition_penalty, scores / p.repetition_penalty)
        if len(row.tokens) < p.min_new_tokens and row.eos_token_ids:
            if not edited:
                logits, edited = logits.clone(), True
            logits[i, sorted(row.eos_token_ids)] = -math.inf
    tokens = logits.argmax(-1)
    errors: dict[int, str] = {}
    for i, row in enumerate(rows):
        if row.params.greedy:
            continue
        try:
            tokens[i] = _sample(logits[i], row.params, row.generator)
        except Exception as err:  # noqa: BLE001 - this row alone fails
            errors[i] = f"sampling failed: {type(err).__name__}: {err}"
    sampled = Sampled(tokens=tokens, errors=errors)
    if logprobs is not None:
        temperatures = torch.tensor([[1.0 if r.params.greedy else r.params.temperature] for r in rows],
                                    device=logits.device)  # (n, 1)
        distribution = torch.log_softmax(logits / temperatures, dim=-1)  # (n, vocab)
        sampled.logprobs = distribution.gather(-1, tokens[:, None])[:, 0]
        sampled.top_logprobs, sampled.top_ids = distribution.topk(min(logprobs, distribution.shape[-1]), dim=-1)
    return sampled


@dataclass
class TokenLogprob:
    """One token with its log-probability and the most likely alternatives at its position (largest first)."""

    token: int
    logprob: float | None  # None for a prompt's first token: nothing predicts it
    top: list[tuple[int, float]]  # (token, log-probability)


def sampling_temperature(params: SamplingParams) -> float:
    """The temperature of the distribution a row samples from: its own, or 1 for greedy rows."""
    return 1.0 if params.greedy else params.temperature


def chosen_logprobs(sampled: Sampled, row: int, top: int) -> TokenLogprob:
    """Row `row` of what `sample_next_token(..., logprobs=k)` returned, with its `top` <= k alternatives (fewer
    where the vocabulary is smaller)."""
    if sampled.logprobs is None:
        raise ValueError("sampled: no log-probabilities (sample_next_token was called without logprobs)")
    alternatives = zip(sampled.top_ids[row, :top].tolist(), sampled.top_logprobs[row, :top].tolist())
    return TokenLogprob(int(sampled.tokens[row]), float(sampled.logprobs[row]), list(alternatives))


def prompt_logprobs(model, prompt: list[int], *, top: int = 0, temperature: float = 1.0,
                    top_k_lora: int | None = None, softmax_temperature: float | None = None,
                    logits: torch.Tensor | None = None) -> list[TokenLogprob]:
    """The log-probability of each prompt token given the ones before it, from one forward pass of the X-LoRA
    model over the prompt: position t's logits predict token t + 1, so the first token has none (None).

    The distribution is log_softmax(logits / temperature) (pass `sampling_temperature(params)`, i.e. 1 for
    greedy), the same that `sample_next_token` reports for generated tokens; `top` adds that many alternatives
    per position. The gate options are this call's, as in `DecodeBatch`. `logits` (t, vocab): that forward pass
    already run by the caller (`DecodeBatch.prefill(..., keep_prompt_logits=True)` of this prompt alone)."""
    if not prompt:
        raise ValueError("prompt: no tokens")
    if not is_finite_number(temperature) or temperature <= 0:
        raise ValueError(f"temperature: got {temperature!r}, expected a finite number > 0")
    ids = torch.tensor([prompt], device=model.device)  # (1, t)
    if logits is None:
        with torch.no_grad():
            logits = model(input_ids=ids, top_k_lora=top_k_lora, softmax_temperature=softmax_temperature).logits[0]
    if logits.shape[0] != len(prompt):
        raise ValueError(f"logits: {logits.shape[0]} positions for a prompt of {len(prompt)} tokens")
    distribution = torch.log_softmax(logits[:-1].float() / temperature, dim=-1)  # (t - 1, vocab)
    chosen = distribution.gather(-1, ids[0, 1:, None])[:, 0].tolist()  # (t - 1,)
    if top:
        values, tokens = distribution.topk(min(top, distribution.shape[-1]), dim=-1)  # (t - 1, top)
        alternatives = [list(zip(t, v)) for t, v in zip(tokens.tolist(), values.tolist())]
    else:
        alternatives = [[] for _ in chosen]
    return [TokenLogprob(prompt[0], None, [])] + [
        TokenLogprob(token, lp, alt) for token, lp, alt in zip(prompt[1:], chosen, alternatives)]


def _sample(row: torch.Tensor, p: SamplingParams, generator: torch.Generator) -> torch.Tensor:
    """One token from a row's logits (vocab,): temperature, then top-k, then top-p, then a draw."""
    row = row / p.temperature
    if 0 < p.top_k < row.shape[-1]:
        row = row.masked_fill(row < row.topk(p.top_k).values[-1], -math.inf)
    if p.top_p < 1.0:
        sorted_logits, order = row.sort(descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > p.top_p  # keep the smallest set reaching top_p
        row = row.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), -math.inf)
    return torch.multinomial(row.softmax(-1), 1, generator=generator)[0]


def new_generator(seed: int | None, device) -> torch.Generator:
    """A generator of its own for one row: seeded when asked, else from the OS."""
    g = torch.Generator(device=device)
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed)
    return g


# ---- the batch: rows, their two KV caches, frozen and folded scalings -----------------------------------------
class DecodeBatch:
    """Rows decoded together through both passes, each pass with its own KV cache.

    Drive it as: `prefill` the prompts, then repeat `choose` (a token per row, the finish reasons) and `keep`
    (finished rows leave the batch and both caches) and `decode` (one token per row through the model). Two
    batches with the same options can be joined with `merge` (the server's continuous batching). Gate options
    (`top_k_lora`, `softmax_temperature`) are passed to the model on every call, never set on it.

    Frozen scalings: once a row has `freeze_scalings_after` tokens, the scalings that produced its latest token
    are kept for it; when every row is frozen the scaling pass stops (and the batch takes no new rows). With
    `fold_frozen`, rows that then all share one set of frozen scalings run with the experts folded into the
    weights (`XLoraModel.fold`); rows that differ are mixed per token as usual."""

    def __init__(self, model, *, top_k_lora: int | None = None, softmax_temperature: float | None = None,
                 freeze_scalings_after: int | None = None, fold_frozen: bool = False) -> None:
        if fold_frozen and freeze_scalings_after is None:
            raise ValueError("fold_frozen: needs freeze_scalings_after")
        if freeze_scalings_after is not None and (not is_int(freeze_scalings_after) or freeze_scalings_after < 0):
            raise ValueError(f"freeze_scalings_after: got {freeze_scalings_after!r}, expected an integer >= 0")
        self.model = model
        self.options = (top_k_lora, softmax_temperature, freeze_scalings_after, fold_frozen)
        self.rows: list[RowState] = []
        self.scaling_cache = None  # None once every row is frozen
        self.mixed_cache = None
        self.mask: torch.Tensor | None = None  # (n, cached positions): 0 over left padding
        self.scalings: torch.Tensor | None = None  # (n, L, E): what produced each row's latest token
        self.frozen: torch.Tensor | None = None  # (n, 1, L, E) once every row is frozen
        self.folded = None  # FoldedWeights while the rows run folded
        self.last_sampled: Sampled | None = None  # what `choose` picked
        self.prompt_logits: torch.Tensor | None = None  # (n, t, vocab) from `prefill(keep_prompt_logits=True)`

    @property
    def accepting(self) -> bool:
        """Whether rows may still join: the scaling pass (and its cache) is still running."""
        return self.scaling_cache is not None

    def prefill(self, rows: list[RowState], input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                keep_prompt_logits: bool = False) -> torch.Tensor:
        """Run the (left-padded) prompts through both passes; returns the logits of each row's first new token
        (n, vocab). The batch must be empty. `keep_prompt_logits` keeps every position's logits in
        `prompt_logits` (for `prompt_logprobs`; the caller drops them when read)."""
        from transformers import DynamicCache

        if self.rows:
            raise ValueError("prefill: the batch already has rows; prefill another and merge it")
        device = self.model.device
        input_ids = input_ids.to(device)
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(device).long()
        self.scaling_cache, self.mixed_cache = DynamicCache(), DynamicCache()
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding: positions count real tokens only
        top_k_lora, softmax_temperature, _, _ = self.options
        out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
                         past_key_values=self.mixed_cache, scaling_past_key_values=self.scaling_cache,
                         use_cache=True, logits_to_keep=0 if keep_prompt_logits else 1, top_k_lora=top_k_lora,
                         softmax_temperature=softmax_temperature)
        if self.model.decodes_by_hand:  # one-token steps append in place instead of copying the cache each step
            self.scaling_cache = GrowingCache.from_cache(self.scaling_cache)
            self.mixed_cache = GrowingCache.from_cache(self.mixed_cache)
        self.rows, self.mask, self.scalings = list(rows), mask, out.scalings[:, -1]
        self.prompt_logits = out.logits if keep_prompt_logits else None
        return out.logits[:, -1]

    def choose(self, logits: torch.Tensor, logprobs: int | None = None) -> list[str | None]:
        """Sample each row's next token from `logits` (n, vocab), record it, and return each row's finish
        reason (`finish_reason`), or "error" for a row that failed alone (its `error` says why). What was
        sampled (tokens, and log-probabilities when `logprobs` is given) stays in `last_sampled`."""
        sampled = sample_next_token(logits, self.rows, logprobs=logprobs)
        reasons: list[str | None] = []
        for i, (row, token) in enumerate(zip(self.rows, sampled.tokens.tolist())):
            if i in sampled.errors:
                row.error = sampled.errors[i]
                reasons.append("error")
                continue
            try:
                row.push(token)
                reasons.append(finish_reason(row))
            except Exception as err:  # noqa: BLE001 - a tokenizer that fails on this row's text
                row.error = f"{type(err).__name__}: {err}"
                reasons.append("error")
        self.last_sampled = sampled
        return reasons

    def keep(self, index: list[int]) -> None:
        """Keep only these rows (positions in `rows`), in both caches too."""
        if len(index) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in index]
        if not index:
            self.scaling_cache = self.mixed_cache = self.mask = self.scalings = self.frozen = self.folded = None
            return
        keep = torch.tensor(index, device=self.mask.device)
        self.mask, self.scalings = self.mask[keep], self.scalings[keep]
        self.frozen = self.frozen[keep] if self.frozen is not None else None
        for cache in (self.scaling_cache, self.mixed_cache):
            if cache is not None:
                select_cache_rows(cache, keep)

    def merge(self, other: "DecodeBatch") -> None:
        """Add the rows of `other` (same options, both still accepting) after this batch's, left-padding the
        shorter caches and masks."""
        if other.options != self.options or not (self.accepting and other.accepting):
            raise ValueError("merge: batches must share their options and both still run the scaling pass")
        width = max(self.mask.shape[1], other.mask.shape[1])
        self.mask = torch.cat([pad_left(self.mask, width), pad_left(other.mask, width)])
        merge_caches(self.scaling_cache, other.scaling_cache, width)
        merge_caches(self.mixed_cache, other.mixed_cache, width)
        self.scalings = torch.cat([self.scalings, other.scalings])
        self.rows += other.rows

    def decode(self) -> torch.Tensor:
        """Feed every row's latest token through both passes; returns the next logits (n, vocab)."""
        top_k_lora, softmax_temperature, freeze_after, fold_frozen = self.options
        device = self.mask.device
        if freeze_after is not None:
            self._freeze_due(freeze_after, fold_frozen, top_k_lora)
        self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)
        inputs = dict(
            input_ids=torch.tensor([[r.tokens[-1]] for r in self.rows], device=device),  # (n, 1)
            position_ids=torch.tensor([[len(r.prompt) + len(r.tokens) - 1] for r in self.rows], device=device),
            attention_mask=self.mask, past_key_values=self.mixed_cache, use_cache=True, top_k_lora=top_k_lora)
        if self.frozen is not None:  # every row frozen: no scaling pass
            if self.folded is not None:  # the experts are inside the weights: one pass of the base model's cost
                with self.model.folded(self.folded):
                    out = self.model(scalings=self.frozen, **inputs)
            else:
                out = self.model(scalings=self.frozen, **inputs)
        elif any(r.frozen is not None for r in self.rows):  # some rows frozen: the scaling pass, then theirs
            inputs.pop("top_k_lora")
            scalings, self.scaling_cache = self.model.compute_scalings(
                scaling_past_key_values=self.scaling_cache, softmax_temperature=softmax_temperature,
                **{k: v for k, v in inputs.items() if k != "past_key_values"})
            scalings = scalings.clone()  # (n, 1, L, E)
            for i, row in enumerate(self.rows):
                if row.frozen is not None:
                    scalings[i, 0] = row.frozen
            out = self.model(scalings=scalings, top_k_lora=top_k_lora, **inputs)
        else:
            out = self.model(scaling_past_key_values=self.scaling_cache, softmax_temperature=softmax_temperature,
                             **inputs)
        self.scalings = out.scalings[:, -1]
        return out.logits[:, -1]

    def _freeze_due(self, freeze_after: int, fold_frozen: bool, top_k_lora: int | None) -> None:
        """Freeze rows that have reached freeze_after tokens; when all are frozen, stop the scaling pass (and
        fold, when asked and every row has the same scalings)."""
        if self.frozen is not None:
            return
        for i, row in enumerate(self.rows):
            if row.frozen is None and len(row.tokens) >= freeze_after:
                row.frozen = self.scalings[i]
        if all(r.frozen is not None for r in self.rows):
            self.frozen = torch.stack([r.frozen for r in self.rows])[:, None]  # (n, 1, L, E)
            self.scaling_cache = None  # the scaling pass is never run again
            if fold_frozen and bool((self.frozen == self.frozen[:1]).all()):
                self.folded = self.model.fold(self.frozen[0, 0], top_k_lora=top_k_lora)


# ---- KV-cache rows ---------------------------------------------------------------------------------------------
def select_cache_rows(cache, index: torch.Tensor) -> None:
    """Keep only the rows `index` (a 1-d tensor) of a GrowingCache or a transformers cache, in place."""
    if isinstance(cache, GrowingCache):
        cache.select_rows(index)
    elif hasattr(cache, "batch_select_indices"):
        cache.batch_select_indices(index)
    else:  # older transformers
        cache.reorder_cache(index)


def merge_caches(cache, other, width: int) -> None:
    """Append the rows of `other` to `cache` (both DynamicCaches), each left-padded with zeros to `width`
    positions; the attention mask must hide the padding.

    The caches are plain DynamicCaches (built without the model config), which keep every position even for
    sliding-window models; the window is applied by the attention mask, so padding and joining stay exact.
    Two GrowingCaches (a model that decodes by hand) are joined by `GrowingCache.merge`."""
    if isinstance(cache, GrowingCache) or isinstance(other, GrowingCache):
        if not (isinstance(cache, GrowingCache) and isinstance(other, GrowingCache)):
            raise ValueError("merge_caches: a GrowingCache joins only another GrowingCache")
        cache.merge(other, width)
        return
    for mine, theirs in zip(cache.layers, other.layers):
        mine.keys = torch.cat([_pad_left_kv(mine.keys, width), _pad_left_kv(theirs.keys, width)])
        mine.values = torch.cat([_pad_left_kv(mine.values, width), _pad_left_kv(theirs.values, width)])


def pad_left(x: torch.Tensor, width: int) -> torch.Tensor:
    """(n, t) -> (n, width), zeros on the left."""
    return torch.nn.functional.pad(x, (width - x.shape[1], 0))


def _pad_left_kv(x: torch.Tensor, width: int) -> torch.Tensor:
    """(n, heads, t, dim) -> (n, heads, width, dim), zeros on the left of the sequence axis."""
    return torch.nn.functional.pad(x, (0, 0, width - x.shape[2], 0))


# ---- generate: the core driven over one batch of prompts -------------------------------------------------------
@dataclass
class Step:
    """One decoding step for the rows still running (indices into the original batch)."""

    rows: torch.Tensor  # (n,) original row indices
    tokens: torch.Tensor  # (n,) the token each row just produced
    scalings: torch.Tensor | None  # (n, n_lora_layers, n_experts) used to produce them
    reasons: list[str | None]  # "stop" (eos or stop string) / "length" for rows that end here, else None


@dataclass
class GenerationResult:
    sequences: torch.Tensor  # (b, prompt + new): prompt then new tokens, pad after a row ends
    scalings: torch.Tensor | None  # (b, new, n_lora_layers, n_experts), 0 after a row ends
    n_new_tokens: list[int]
    finish_reasons: list[str]


def decode_steps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                 params: list[SamplingParams], *, eos_token_ids: list[int], freeze_scalings_after: int | None = None,
                 fold_frozen: bool = False, tokenizer=None, max_length: int | None = None,
                 top_k_lora: int | None = None, softmax_temperature: float | None = None) -> Iterator[Step]:
    """The decode loop over a batch of prompts, as a generator of steps; finished rows leave the batch and its
    caches. A row whose sampling fails raises RuntimeError naming the row."""
    b, prompt_len = input_ids.shape
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if max_length is not None and prompt_len > max_length:
        raise ValueError(f"input_ids: the prompt has {prompt_len} tokens, the model's context is {max_length}")
    batch = DecodeBatch(model, top_k_lora=top_k_lora, softmax_temperature=softmax_temperature,
                        freeze_scalings_after=freeze_scalings_after, fold_frozen=fold_frozen)
    prompts, real = input_ids.cpu(), attention_mask.bool().cpu()
    # the context budget counts the padded prompt (Hugging Face's max_length convention)
    rows = [RowState.start(prompts[r][real[r]].tolist(), params[r], device=model.device,
                           eos_token_ids=eos_token_ids, tokenizer=tokenizer, context_length=max_length,
                           prompt_length=prompt_len, owner=r) for r in range(b)]
    if max((row.budget for row in rows), default=0) <= 0:
        return
    with torch.inference_mode():  # no autograd bookkeeping at all: cheaper than no_grad on small steps
        logits = batch.prefill(rows, input_ids, attention_mask)
        while True:
            reasons = batch.choose(logits)
            for row, reason in zip(batch.rows, reasons):
                if reason == "error":
                    raise RuntimeError(f"input_ids: row {row.owner}: {row.error}")
            yield Step(rows=torch.tensor([row.owner for row in batch.rows], device=batch.mask.device),
                       tokens=batch.last_sampled.tokens, scalings=batch.scalings, reasons=reasons)
            batch.keep([i for i, reason in enumerate(reasons) if reason is None])
            if not batch.rows:
                return
            logits = batch.decode()


def generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
             max_new_tokens: int = 20, min_new_tokens: int = 0, do_sample: bool = False, temperature: float = 1.0,
             top_p: float = 1.0, top_k: int = 0, repetition_penalty: float = 1.0,
             eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None,
             stop: list[str] | None = None, tokenizer=None, seed: int | None = None, streamer=None,
             freeze_scalings_after: int | None = None, fold_frozen: bool = False,
             top_k_lora: int | None = None, softmax_temperature: float | None = None,
             return_scalings: bool = False) -> torch.Tensor | GenerationResult:
    """Generate with both KV caches. Returns prompt + new tokens (HF convention), or a GenerationResult with
    the per-token scalings when `return_scalings` (scalings[b, i] produced new token i).

    `streamer`: an object with transformers' streamer interface (`put`, `end`; TextStreamer,
    TextIteratorStreamer), batch size 1. `seed`: row r samples with seed + r. `freeze_scalings_after`: N >= 0
    generated tokens after which the latest scalings are kept and the scaling pass is skipped; `fold_frozen`
    then also folds the experts into the weights (all rows must share the frozen scalings, else they are mixed
    per token as usual). `top_k_lora`, `softmax_temperature`: the gate's options for this call (None: the
    model's config)."""
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids: expected (batch, tokens), got shape {tuple(input_ids.shape)}")
    if streamer is not None and input_ids.shape[0] != 1:
        raise ValueError("streamer: streaming works on one row at a time (batch size 1)")
    b = input_ids.shape[0]
    # each row samples from its own stream (seed + row), so rows of a batch are not copies of each other
    params = [SamplingParams(max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, do_sample=do_sample,
                             temperature=temperature, top_p=top_p, top_k=top_k,
                             repetition_penalty=repetition_penalty, seed=None if seed is None else seed + r,
                             stop=list(stop or [])) for r in range(b)]
    eos_ids, pad = special_tokens(model, eos_token_id, pad_token_id)
    new: list[list[int]] = [[] for _ in range(b)]
    new_scalings: list[list[torch.Tensor]] = [[] for _ in range(b)]
    reasons = ["length"] * b
    if streamer is not None:
        streamer.put(input_ids.cpu())
    for step in decode_steps(model, input_ids, attention_mask, params, eos_token_ids=eos_ids,
                             freeze_scalings_after=freeze_scalings_after, fold_frozen=fold_frozen,
                             tokenizer=tokenizer, max_length=context_length(model), top_k_lora=top_k_lora,
                             softmax_temperature=softmax_temperature):
        for i, (r, token) in enumerate(zip(step.rows.tolist(), step.tokens.tolist())):
            new[r].append(token)
            if return_scalings:
                new_scalings[r].append(step.scalings[i].float().cpu())
            if step.reasons[i] is not None:
                reasons[r] = step.reasons[i]
        if streamer is not None:
            streamer.put(step.tokens.cpu())
    if streamer is not None:
        streamer.end()
    width = max(len(n) for n in new)
    out = torch.full((b, input_ids.shape[1] + width), pad, dtype=input_ids.dtype)
    out[:, : input_ids.shape[1]] = input_ids.cpu()
    for r, tokens in enumerate(new):
        out[r, input_ids.shape[1]: input_ids.shape[1] + len(tokens)] = torch.tensor(tokens, dtype=input_ids.dtype)
    out = out.to(input_ids.device)
    if not return_scalings:
        return out
    scalings = torch.zeros(b, width, model.n_lora_layers, model.n_experts)
    for r, rows in enumerate(new_scalings):
        if rows:
            scalings[r, : len(rows)] = torch.stack(rows)
    return GenerationResult(sequences=out, scalings=scalings, n_new_tokens=[len(n) for n in new],
                            finish_reasons=reasons)


def special_tokens(model, eos_token_id, pad_token_id) -> tuple[list[int], int]:
    """EOS ids (the model's when not given) and the pad id (pad, else the first EOS, else 0)."""
    gen = getattr(model.base, "generation_config", None)
    cfg = model.base.config
    if eos_token_id is None:
        eos_token_id = getattr(gen, "eos_token_id", None) or getattr(cfg, "eos_token_id", None)
    eos_ids = [] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    if pad_token_id is None:
        pad_token_id = getattr(gen, "pad_token_id", None)
        pad_token_id = pad_token_id if pad_token_id is not None else getattr(cfg, "pad_token_id", None)
    if pad_token_id is None:
        pad_token_id = eos_ids[0] if eos_ids else 0
    return eos_ids, int(pad_token_id)


def context_length(model) -> int | None:
    cfg = model.base.config
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(cfg, key, None)
        if isinstance(value, int):
            return value
    return None
