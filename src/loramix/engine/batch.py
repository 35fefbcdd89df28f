"""The decode batch (`DecodeBatch`): rows decoded together through both passes with one KV cache per pass, their
scalings frozen or folded, rows kept or joined by cache surgery."""

from __future__ import annotations

import torch

from ..backbone.kv_cache import GrowingCache
from ..config import GateOptions
from .rows import RowState, context_length, finish_reason
from .sampling import PromptLogprobs, Sampled, prompt_logprob_table, sample_next_token


class DecodeBatch:
    """Rows decoded together through both passes, each pass with its own KV cache.

    Drive it as: `prefill` the prompts, then repeat `choose` (a token per row, the finish reasons) and `keep`
    (finished rows leave the batch and both caches) and `decode` (one token per row through the model). Two
    batches with equal `GateOptions` can be joined with `merge` (the server's continuous batching). The gate
    options (`top_k_lora`, `softmax_temperature`) are passed to the model on every call, never set on it.

    Frozen scalings: once a row has `freeze_scalings_after` tokens, the scalings that produced its latest token
    are kept for it; when every row is frozen the scaling pass stops (and the batch takes no new rows). With
    `fold_frozen`, rows that then all share one set of frozen scalings run with the experts folded into the
    weights (`XLoraModel.fold`); rows that differ are mixed per token as usual."""

    def __init__(self, model, options: GateOptions = GateOptions()) -> None:
        self.model = model
        self.options = options
        self.context_length = context_length(model)  # positions past it exist nowhere (speculative drafts clamp)
        self.rows: list[RowState] = []
        self.scaling_cache = None  # None once every row is frozen
        self.mixed_cache = None
        self.mask: torch.Tensor | None = None  # (n, cached positions): 0 over left padding
        self.scalings: torch.Tensor | None = None  # (n, L, E): what produced each row's latest token
        self.frozen: torch.Tensor | None = None  # (n, 1, L, E) once every row is frozen
        self.folded = None  # FoldedWeights while the rows run folded
        self.last_sampled: Sampled | None = None  # what `choose` picked
        self.last_reasons: list[str | None] = []  # and the finish reasons it returned
        self.prompt_logprobs: list[PromptLogprobs] | None = None  # per row, from `prefill(prompt_logprobs=k)`

    @property
    def accepting(self) -> bool:
        """Whether rows may still join: the scaling pass (and its cache) is still running."""
        return self.scaling_cache is not None

    def prefill(self, rows: list[RowState], input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                prompt_logprobs: int | None = None) -> torch.Tensor:
        """Run the (left-padded) prompts through both passes; returns the logits of each row's first new token
        (n, vocab). The batch must be empty. `prompt_logprobs` = k also keeps each row's prompt log-probabilities in
        `self.prompt_logprobs` (the chosen tokens' and the k most likely, at the row's distribution temperature:
        `prompt_logprob_table`, a chunk of positions at a time), read from this same forward pass; the prompt's
        logits themselves are not kept (the caller drops the table when read)."""
        from transformers import DynamicCache

        if self.rows:
            raise ValueError("prefill: the batch already has rows; prefill another and merge it")
        device = self.model.device
        input_ids = input_ids.to(device)
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(device).long()
        self.scaling_cache, self.mixed_cache = DynamicCache(), DynamicCache()
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding: positions count real tokens only
        gate = self.options
        out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
                         past_key_values=self.mixed_cache, scaling_past_key_values=self.scaling_cache,
                         use_cache=True, logits_to_keep=1 if prompt_logprobs is None else 0,
                         top_k_lora=gate.top_k_lora, softmax_temperature=gate.softmax_temperature)
        if self.model.decodes_by_hand:  # one-token steps append in place instead of copying the cache each step
            self.scaling_cache = GrowingCache.from_cache(self.scaling_cache)
            self.mixed_cache = GrowingCache.from_cache(self.mixed_cache)
        self.rows, self.mask, self.scalings = list(rows), mask, out.scalings[:, -1]
        self.prompt_logprobs = None if prompt_logprobs is None else [
            prompt_logprob_table(out.logits[i, out.logits.shape[1] - len(row.prompt):], row.prompt,
                                 top=prompt_logprobs, temperature=row.params.distribution_temperature)
            for i, row in enumerate(rows)]
        # the last position alone (a copy when every position's logits came: their storage is freed on return)
        return out.logits[:, -1] if prompt_logprobs is None else out.logits[:, -1].clone()

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
        self.last_sampled, self.last_reasons = sampled, reasons
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
        gate = self.options
        top_k_lora, softmax_temperature = gate.top_k_lora, gate.softmax_temperature
        device = self.mask.device
        if gate.freeze_scalings_after is not None:
            self._freeze_due()
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

    def _freeze_due(self) -> None:
        """Freeze rows that have reached freeze_after tokens; when all are frozen, stop the scaling pass (and
        fold, when asked and every row has the same scalings)."""
        if self.frozen is not None:
            return
        for i, row in enumerate(self.rows):
            if row.frozen is None and len(row.tokens) >= self.options.freeze_scalings_after:
                row.frozen = self.scalings[i]
        if all(r.frozen is not None for r in self.rows):
            self.frozen = torch.stack([r.frozen for r in self.rows])[:, None]  # (n, 1, L, E)
            self.scaling_cache = None  # the scaling pass is never run again
            if self.options.fold_frozen and bool((self.frozen == self.frozen[:1]).all()):
                self.folded = self.model.fold(self.frozen[0, 0], top_k_lora=self.options.top_k_lora)


# ---- KV-cache rows ---------------------------------------------------------------------------------------------
def select_cache_rows(cache, index: torch.Tensor) -> None:
    """Keep only the rows `index` (a 1-d tensor) of a GrowingCache or a transformers cache, in place."""
    if isinstance(cache, GrowingCache):
        cache.select_rows(index)
    elif hasattr(cache, "batch_select_indices"):
        cache.batch_select_indices(index)
    else:  # older transformers
        cache.reorder_cache(index)


def crop_cache(cache, length: int) -> None:
    """Keep the first `length` positions of a GrowingCache or of a transformers cache (its layers' keys and values,
    the surface `merge_caches` uses too: `crop`'s meaning differs between transformers releases), in place."""
    if isinstance(cache, GrowingCache):
        cache.crop(length)
        return
    for layer in cache.layers:
        if getattr(layer, "keys", None) is not None and layer.keys.dim() == 4:
            layer.keys, layer.values = layer.keys[:, :, :length], layer.values[:, :, :length]


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
