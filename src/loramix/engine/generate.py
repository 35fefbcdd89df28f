"""`generate` / `decode_steps`: the decode core driven over one batch of prompts, with the model facts they read
(EOS and pad ids, the context length)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from ..config import GateOptions
from .batch import DecodeBatch
from .params import SamplingParams
from .rows import RowState, context_length  # noqa: F401  (context_length: re-exported)
from .speculative import SpeculationStats, chosen, speculative_round


@dataclass
class Step:
    """One decoding step for the rows still running (indices into the original batch)."""

    rows: torch.Tensor  # (n,) original row indices
    tokens: torch.Tensor  # (n,) the token each row just produced
    scalings: torch.Tensor | None  # (n, n_lora_layers, n_experts) used to produce them
    reasons: list[str | None]  # "stop" (eos or stop string) / "length" for rows that end here, else None
    texts: list[str] | None = None  # the text each row hands out at this step (RowText.take), given a tokenizer


@dataclass
class GenerationResult:
    sequences: torch.Tensor  # (b, prompt + new): prompt then new tokens, pad after a row ends
    scalings: torch.Tensor | None  # (b, new, n_lora_layers, n_experts), 0 after a row ends
    n_new_tokens: list[int]
    finish_reasons: list[str]
    texts: list[str] | None = None  # each row's text (the text rule, engine/text.py), when a tokenizer is given
    speculation: SpeculationStats | None = None  # rounds, drafted and accepted tokens (speculate > 0)


def decode_steps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                 params: list[SamplingParams], *, eos_token_ids: list[int], gate: GateOptions = GateOptions(),
                 tokenizer=None, max_length: int | None = None, speculate: int = 0,
                 stats: SpeculationStats | None = None) -> Iterator[Step]:
    """The decode loop over a batch of prompts, as a generator of steps; finished rows leave the batch and its
    caches. A row whose sampling fails raises RuntimeError naming the row. With a `tokenizer` each step also
    carries the text each row hands out (`Step.texts`; joined over the steps, the row's text: engine/text.py).

    `speculate` = N > 0: exact self-speculative decoding (engine/speculative.py), at most N drafted tokens per
    verification; a round's verified tokens come out as consecutive steps, each for the rows that took a token
    there, and `stats` (when given) counts the drafts. 0: one token per row per step through both passes."""
    b, prompt_len = input_ids.shape
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if max_length is not None and prompt_len > max_length:
        raise ValueError(f"input_ids: the prompt has {prompt_len} tokens, the model's context is {max_length}")
    if not isinstance(speculate, int) or isinstance(speculate, bool) or speculate < 0:
        raise ValueError(f"speculate: got {speculate!r}, expected an integer >= 0 (0: off)")
    batch = DecodeBatch(model, gate)
    prompts, real = input_ids.cpu(), attention_mask.bool().cpu()
    # the context budget counts the padded prompt (Hugging Face's max_length convention)
    rows = [RowState.start(prompts[r][real[r]].tolist(), params[r], device=model.device,
                           eos_token_ids=eos_token_ids, tokenizer=tokenizer, context_length=max_length,
                           prompt_length=prompt_len, keep_text=tokenizer is not None, owner=r) for r in range(b)]
    if max((row.budget for row in rows), default=0) <= 0:
        return
    with torch.inference_mode():  # no autograd bookkeeping at all: cheaper than no_grad on small steps
        logits = batch.prefill(rows, input_ids, attention_mask)
        batch.choose(logits)
        rounds = [chosen(batch)]
        while True:
            ended = set()
            for taken in rounds:
                for row, reason in zip(taken.rows, taken.reasons):
                    if reason == "error":
                        raise RuntimeError(f"input_ids: row {row.owner}: {row.error}")
                    if reason is not None:
                        ended.add(id(row))
                texts = None if tokenizer is None else taken.texts if taken.texts is not None else [
                    row.take_text(final=reason is not None) for row, reason in zip(taken.rows, taken.reasons)]
                yield Step(rows=torch.tensor([row.owner for row in taken.rows], device=batch.mask.device),
                           tokens=taken.tokens, scalings=taken.scalings, reasons=taken.reasons, texts=texts)
            batch.keep([i for i, row in enumerate(batch.rows) if id(row) not in ended])
            if not batch.rows:
                return
            if speculate:
                rounds = speculative_round(batch, speculate, stats=stats)
            else:
                batch.choose(batch.decode())
                rounds = [chosen(batch)]


def generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
             max_new_tokens: int = 20, min_new_tokens: int = 0, do_sample: bool = False, temperature: float = 1.0,
             top_p: float = 1.0, top_k: int = 0, repetition_penalty: float = 1.0,
             eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None,
             stop: list[str] | None = None, tokenizer=None, seed: int | None = None, streamer=None,
             freeze_scalings_after: int | None = None, fold_frozen: bool = False,
             top_k_lora: int | None = None, softmax_temperature: float | None = None,
             return_scalings: bool = False, speculate: int = 0) -> torch.Tensor | GenerationResult:
    """Generate with both KV caches. Returns prompt + new tokens (HF convention), or a GenerationResult with
    the per-token scalings when `return_scalings` (scalings[b, i] produced new token i) and, given a `tokenizer`,
    each row's text (decoded against its prompt, up to the EOS, cut before a stop string: engine/text.py).

    `streamer`: an object with transformers' streamer interface (`put`, `end`; TextStreamer,
    TextIteratorStreamer), batch size 1. `seed`: row r samples with seed + r. `freeze_scalings_after`: N >= 0
    generated tokens after which the latest scalings are kept and the scaling pass is skipped; `fold_frozen`
    then also folds the experts into the weights (all rows must share the frozen scalings, else they are mixed
    per token as usual). `top_k_lora`, `softmax_temperature`: the gate's options for this call (None: the
    model's config). `speculate` = N > 0: exact self-speculative decoding, at most N drafted tokens per
    verification (engine/speculative.py: the same tokens greedily, the same distribution sampled; the result's
    `speculation` counts the drafts); not with `freeze_scalings_after`, which skips the scaling pass already."""
    if speculate and freeze_scalings_after is not None:
        raise ValueError("speculate: frozen scalings (freeze_scalings_after) already skip the scaling pass; "
                         "choose one or the other")
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
    texts = None if tokenizer is None else [""] * b
    new_scalings: list[list[torch.Tensor]] = [[] for _ in range(b)]
    reasons = ["length"] * b
    if streamer is not None:
        streamer.put(input_ids.cpu())
    gate = GateOptions(top_k_lora=top_k_lora, softmax_temperature=softmax_temperature,
                       freeze_scalings_after=freeze_scalings_after, fold_frozen=fold_frozen)
    stats = SpeculationStats() if speculate else None
    for step in decode_steps(model, input_ids, attention_mask, params, eos_token_ids=eos_ids, gate=gate,
                             tokenizer=tokenizer, max_length=context_length(model), speculate=speculate, stats=stats):
        for i, (r, token) in enumerate(zip(step.rows.tolist(), step.tokens.tolist())):
            new[r].append(token)
            if return_scalings:
                new_scalings[r].append(step.scalings[i].float().cpu())
            if step.reasons[i] is not None:
                reasons[r] = step.reasons[i]
            if texts is not None:
                texts[r] += step.texts[i]
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
                            finish_reasons=reasons, texts=texts, speculation=stats)


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
