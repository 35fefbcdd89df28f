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

The engine knows only token ids; a tokenizer is needed only to check `stop` strings.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from .compat import with_cache


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

        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 0:
            bad("max_new_tokens", "an integer >= 0")
        if not _is_int(self.min_new_tokens) or self.min_new_tokens < 0:
            bad("min_new_tokens", "an integer >= 0")
        if not _finite(self.temperature) or self.temperature < 0:
            bad("temperature", "a finite number >= 0")
        if not _finite(self.top_p) or not 0 < self.top_p <= 1:
            bad("top_p", "a number in (0, 1]")
        if not _is_int(self.top_k) or self.top_k < 0:
            bad("top_k", "an integer >= 0 (0: off)")
        if not _finite(self.repetition_penalty) or self.repetition_penalty <= 0:
            bad("repetition_penalty", "a number > 0")
        if self.seed is not None and not _is_int(self.seed):
            bad("seed", "an integer or None")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not all(isinstance(s, str) and s for s in self.stop):
            bad("stop", "a list of non-empty strings")

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0


@dataclass
class Step:
    """One decoding step for the rows still running (indices into the original batch)."""

    rows: torch.Tensor  # (n,) original row indices
    tokens: torch.Tensor  # (n,) the token each row just produced
    scalings: torch.Tensor | None  # (n, n_lora_layers, n_experts) used to produce them
    finished: torch.Tensor  # (n,) bool: the row ends with this token
    reasons: list[str | None]  # "stop" (eos or stop string) / "length" for finished rows


@dataclass
class GenerationResult:
    sequences: torch.Tensor  # (b, prompt + new): prompt then new tokens, pad after a row ends
    scalings: torch.Tensor | None  # (b, new, n_lora_layers, n_experts), 0 after a row ends
    n_new_tokens: list[int]
    finish_reasons: list[str]


def decode_steps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                 params: list[SamplingParams], *, eos_token_ids: list[int], freeze_scalings_after: int | None = None,
                 fold_frozen: bool = False, tokenizer=None, max_length: int | None = None) -> Iterator[Step]:
    """The decode loop, as a generator of steps. Finished rows leave the batch and its caches."""
    from transformers import DynamicCache

    b, prompt_len = input_ids.shape
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if max_length is not None and prompt_len > max_length:
        raise ValueError(f"input_ids: the prompt has {prompt_len} tokens, the model's context is {max_length}")
    if any(p.stop for p in params) and tokenizer is None:
        raise ValueError("stop: stop strings need a tokenizer to decode the text")
    if fold_frozen and freeze_scalings_after is None:
        raise ValueError("fold_frozen: needs freeze_scalings_after")
    if freeze_scalings_after is not None and (not _is_int(freeze_scalings_after) or freeze_scalings_after < 0):
        raise ValueError(f"freeze_scalings_after: got {freeze_scalings_after!r}, expected an integer >= 0")
    device = model.device
    input_ids, mask = input_ids.to(device), attention_mask.to(device).long()
    rows = torch.arange(b, device=device)
    seqs = input_ids  # (n, prompt + generated): repetition penalty and stop strings read it
    generators = [_generator(p.seed, device) for p in params]
    eos = torch.tensor(eos_token_ids or [-1], device=device)
    budget = [p.max_new_tokens if max_length is None else min(p.max_new_tokens, max_length - prompt_len)
              for p in params]
    if max(budget, default=0) <= 0:
        return

    scaling_cache, mixed_cache = DynamicCache(), DynamicCache()
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding: positions count real tokens only
    next_position = mask.sum(-1, keepdim=True)  # (n, 1)
    frozen = None  # (n, 1, L, E) once the scalings are frozen
    folded = False
    try:
        with torch.no_grad():
            out = model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
                        past_key_values=mixed_cache, scaling_past_key_values=scaling_cache, use_cache=True,
                        logits_to_keep=1)
            step = 0
            while True:
                logits = out.logits[:, -1, :]  # (n, vocab)
                scalings = out.scalings[:, -1] if out.scalings is not None else frozen[:, 0]  # (n, L, E)
                tokens = _pick(logits, seqs, mask, [params[r] for r in rows.tolist()],
                               [generators[r] for r in rows.tolist()], step, eos)
                seqs = torch.cat([seqs, tokens[:, None]], dim=1)
                step += 1
                reasons: list[str | None] = []
                for i, r in enumerate(rows.tolist()):
                    if tokens[i].item() in eos_token_ids and step > params[r].min_new_tokens:
                        reasons.append("stop")
                    elif params[r].stop and _hits_stop(tokenizer, seqs[i, prompt_len:], params[r].stop):
                        reasons.append("stop")
                    elif step >= budget[r]:
                        reasons.append("length")
                    else:
                        reasons.append(None)
                finished = torch.tensor([x is not None for x in reasons], device=device)
                yield Step(rows=rows, tokens=tokens, scalings=scalings, finished=finished, reasons=reasons)
                if bool(finished.all()):
                    return
                if bool(finished.any()):  # finished rows leave the batch and both caches
                    keep = (~finished).nonzero().squeeze(1)
                    rows, tokens, seqs, mask = rows[keep], tokens[keep], seqs[keep], mask[keep]
                    next_position, scalings = next_position[keep], scalings[keep]
                    frozen = frozen[keep] if frozen is not None else None
                    for cache in (scaling_cache, mixed_cache):
                        if cache is not None:
                            _select_rows(cache, keep)
                if frozen is None and freeze_scalings_after is not None and step >= freeze_scalings_after:
                    frozen, scaling_cache = scalings[:, None], None  # the scaling pass is never run again
                    if fold_frozen and bool((frozen == frozen[:1]).all()):
                        _fold(model, frozen[:1])
                        folded = True
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
                inputs = dict(input_ids=tokens[:, None], attention_mask=mask, position_ids=next_position,
                              past_key_values=mixed_cache, use_cache=True)
                if folded:  # experts are inside the weights: the base model alone, one pass
                    base_inputs = {k: v for k, v in inputs.items() if k != "past_key_values"}
                    out = model.base(**with_cache(model.base, mixed_cache), **base_inputs, return_dict=True)
                    out.scalings = None
                else:
                    out = model(scaling_past_key_values=scaling_cache, scalings=frozen, **inputs)
                next_position = next_position + 1
    finally:
        if folded:
            _unfold(model)


def generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
             max_new_tokens: int = 20, min_new_tokens: int = 0, do_sample: bool = False, temperature: float = 1.0,
             top_p: float = 1.0, top_k: int = 0, repetition_penalty: float = 1.0,
             eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None,
             stop: list[str] | None = None, tokenizer=None, seed: int | None = None, streamer=None,
             freeze_scalings_after: int | None = None, fold_frozen: bool = False,
             return_scalings: bool = False) -> torch.Tensor | GenerationResult:
    """Generate with both KV caches. Returns prompt + new tokens (HF convention), or a GenerationResult with
    the per-token scalings when `return_scalings` (scalings[b, i] produced new token i).

    `streamer`: an object with transformers' streamer interface (`put`, `end`; TextStreamer,
    TextIteratorStreamer), batch size 1. `seed`: row r samples with seed + r. `freeze_scalings_after`: N >= 0
    generated tokens after which the latest scalings are kept and the scaling pass is skipped; `fold_frozen`
    then also folds the experts into the weights (all rows must share the frozen scalings, else they are mixed
    per token as usual)."""
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
                             tokenizer=tokenizer, max_length=context_length(model)):
        for i, r in enumerate(step.rows.tolist()):
            new[r].append(int(step.tokens[i]))
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


# ---- token choice --------------------------------------------------------------------------------------------
def _pick(logits: torch.Tensor, seqs: torch.Tensor, mask: torch.Tensor, params: list[SamplingParams],
          generators: list, step: int, eos: torch.Tensor) -> torch.Tensor:
    """Next token per row: repetition penalty, min_new_tokens, then argmax or temperature/top-k/top-p sampling."""
    logits = logits.float().clone()  # (n, vocab)
    for i, p in enumerate(params):
        if p.repetition_penalty != 1.0:
            seen = seqs[i][mask[i].bool()].unique()  # prompt (minus padding) + generated; same width as mask
            scores = logits[i, seen]
            logits[i, seen] = torch.where(scores < 0, scores * p.repetition_penalty, scores / p.repetition_penalty)
        if step < p.min_new_tokens and eos[0] >= 0:
            logits[i, eos] = -math.inf
    if all(p.greedy for p in params):
        return logits.argmax(-1)
    tokens = logits.argmax(-1)
    for i, p in enumerate(params):
        if p.greedy:
            continue
        row = logits[i] / p.temperature
        if 0 < p.top_k < row.shape[-1]:
            row = row.masked_fill(row < row.topk(p.top_k).values[-1], -math.inf)
        if p.top_p < 1.0:
            sorted_logits, order = row.sort(descending=True)
            probs = sorted_logits.softmax(-1)
            drop = probs.cumsum(-1) - probs > p.top_p  # keep the smallest set reaching top_p
            row = row.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), -math.inf)
        tokens[i] = torch.multinomial(row.softmax(-1), 1, generator=generators[i])[0]
    return tokens


def _generator(seed: int | None, device) -> torch.Generator:
    g = torch.Generator(device=device)
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed)
    return g


def _hits_stop(tokenizer, generated: torch.Tensor, stop: list[str]) -> bool:
    text = tokenizer.decode(generated.tolist(), skip_special_tokens=True)
    return any(s in text for s in stop)


def _select_rows(cache, keep: torch.Tensor) -> None:
    if hasattr(cache, "batch_select_indices"):
        cache.batch_select_indices(keep)
    else:  # older transformers
        cache.reorder_cache(keep)


# ---- folding frozen scalings into the weights -----------------------------------------------------------------
def _fold(model, frozen: torch.Tensor) -> None:
    """Give every mixed layer a folded weight W0 + sum_e w_e s_e B_e A_e for the frozen weights (1, 1, L, E)."""
    weights = model._mixing_weights(frozen)[0, 0]  # (L, E)
    for layer in model.mixed_layers():  # refuse before any layer is folded (quantized or offloaded weights)
        layer.check_foldable()
    for layer in model.mixed_layers():
        layer.fold(weights[layer.layer_index])


def _unfold(model) -> None:
    for layer in model.mixed_layers():
        layer.unfold()


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

