"""Exact self-speculative X-LoRA decoding: the model with its scalings frozen drafts tokens for itself, one pass
per drafted token; one scaling pass and one mixed pass over every drafted position verify them; rows keep the
verified tokens; both KV caches roll back to what was kept.

A round, for the rows of a `DecodeBatch` (each row's latest token chosen, not yet fed):

1. **Draft** γ tokens per row with the mixed pass alone, the scalings frozen at the row's last verified position
   (`DecodeBatch.scalings`): no scaling pass; the mixed cache grows by γ positions.
2. **Verify**: the mixed cache is cut back to where the round began; the latest token and the γ drafts, γ + 1
   positions, go through both passes at once (a short prefill on both caches), each position with its own
   scalings from the classifier. Position j's logits are the ones a plain step would have there.
3. **Accept**, position by position, with the decode rules of a plain step (`sample_next_token`,
   `finish_reason`): a greedy row keeps a draft while the verified choice equals it; a sampled row keeps draft d
   with probability min(1, p(d) / q(d)) and on rejection draws from max(0, p - q) renormalised (p: the verified
   distribution, q: the draft's), so its tokens have exactly the distribution of plain decoding. The first
   rejection's replacement, or after γ kept drafts the token of the last position, ends the row's round.
4. **Roll back** to the kept positions: one length for the batch (the longest row's); a shorter row's rejected
   positions stay as holes its attention mask hides (a GrowingCache: full attention only) or its positions shift
   right over left padding (transformers caches, where a sliding window counts positions).
5. **Adapt γ** per row (`adapt`): +2 after a round whose drafts were all kept (up to the cap), else what it kept;
   a row whose one-token draft is rejected decodes plainly for PAUSE steps, then drafts again. A batch drafts as
   far as its most hopeful row, never past a row's remaining budget; when no row drafts, it takes a plain step.

Rows whose scalings are frozen (`freeze_scalings_after`) already skip the scaling pass; they decode plainly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..backbone.kv_cache import GrowingCache
from .batch import crop_cache
from .rows import RowState, finish_reason
from .sampling import Sampled, sample_next_token, sampling_distribution

FIRST_GAMMA = 4  # a row's first draft length (capped by the speculate value)
PAUSE = 8  # plain steps a row takes after a rejected one-token draft, before it drafts again


@dataclass
class SpeculationStats:
    """Counts over a run: rounds, drafted tokens, drafts kept (acceptance = accepted / drafted)."""

    rounds: int = 0
    drafted: int = 0
    accepted: int = 0

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


@dataclass
class Accepted:
    """The tokens one position of a round gives to the rows that still take one there."""

    rows: list[RowState]  # the rows that take a token here
    tokens: torch.Tensor  # (k,)
    scalings: torch.Tensor  # (k, n_lora_layers, n_experts): those that produced each token
    reasons: list[str | None]  # finish reason per row ("error": the row's `error` says why)
    sampled: Sampled  # what was chosen, with log-probabilities when asked
    # each row's text handed out with its token (RowState.take_text, taken as the token was pushed: a round pushes
    # several tokens before any is reported); None: take it when reporting
    texts: list[str] | None = None


def speculative_round(batch, cap: int, logprobs: int | None = None,
                      stats: SpeculationStats | None = None) -> list[Accepted]:
    """One round for every row of `batch` (a DecodeBatch after `choose`, with no finished rows): at most `cap`
    drafted tokens per row. Returns what each position gave, in order; the caller reports them and then drops
    the rows that ended (`keep`). Falls back to one plain step where nothing can be drafted."""
    rows = batch.rows
    gamma = min(max(row_gamma(row, cap) for row in rows), max(row.budget - len(row.tokens) for row in rows) - 1)
    if gamma < 1 or batch.options.freeze_scalings_after is not None:
        for row in rows:  # a paused row counts its plain steps, then drafts one token again
            if row.gamma == 0:
                row.pause -= 1
                row.gamma = 1 if row.pause <= 0 else 0
        batch.choose(batch.decode(), logprobs=logprobs)
        return [chosen(batch)]
    start, mask = batch.mixed_cache.get_seq_length(), batch.mask
    drafts, q = draft(batch, gamma)
    logits, scalings = verify(batch, drafts, start, mask)
    steps, kept = _accept(batch, drafts, q, logits, scalings, logprobs)
    live = [i for i, n in enumerate(kept) if n is not None]
    for row, n in zip(rows, kept):
        adapt(row, n or 0, cap)
    if stats is not None:
        stats.rounds += 1
        stats.drafted += gamma * len(rows)
        stats.accepted += sum(n or 0 for n in kept)
    if live:
        _roll_back(batch, start, mask, [kept[i] if kept[i] is not None else 0 for i in range(len(rows))], scalings)
    return steps


def chosen(batch) -> Accepted:
    """What the batch's latest `choose` gave every row, as one position of a round."""
    return Accepted(list(batch.rows), batch.last_sampled.tokens, batch.scalings, batch.last_reasons,
                    batch.last_sampled)


def row_gamma(row: RowState, cap: int) -> int:
    """The row's draft length: FIRST_GAMMA until a round adapts it, never more than `cap`; 0 while it pauses."""
    return min(cap, FIRST_GAMMA if row.gamma is None else row.gamma)


def adapt(row: RowState, kept: int, cap: int) -> None:
    """The row's next draft length after a round that kept `kept` of its drafts: 2 more when it kept all it
    drafted (at most `cap`), else what it kept (at least 1); a rejected one-token draft pauses the row for PAUSE
    plain steps (routing that changes every token: a draft then costs more than it saves). A paused row that a
    batch drafts for anyway (another row drafts) is judged by that round like any other."""
    gamma = row_gamma(row, cap)
    if kept >= gamma:
        row.gamma = min(cap, gamma + 2)
    elif gamma > 1:
        row.gamma = max(kept, 1)
    else:
        row.gamma, row.pause = 0, PAUSE


# ---- 1. draft ---------------------------------------------------------------------------------------------------
def draft(batch, gamma: int) -> tuple[torch.Tensor, list[list[torch.Tensor | None]]]:
    """γ tokens per row from the mixed pass with each row's scalings frozen: (n, γ) tokens, and per row the draft
    distributions q it sampled from (None for greedy rows)."""
    model, rows, device = batch.model, batch.rows, batch.mask.device
    frozen = batch.scalings[:, None]  # (n, 1, L, E)
    tokens = torch.tensor([[r.tokens[-1]] for r in rows], device=device)  # (n, 1)
    positions = torch.tensor([[len(r.prompt) + len(r.tokens) - 1] for r in rows], device=device)
    drafts = torch.empty(len(rows), gamma, dtype=torch.long, device=device)
    q: list[list[torch.Tensor | None]] = [[] for _ in rows]
    plain = all(plain_greedy(row) for row in rows)
    for j in range(gamma):
        batch.mask = torch.cat([batch.mask, torch.ones_like(batch.mask[:, :1])], dim=1)
        out = model(input_ids=tokens, position_ids=_clamp(positions, batch), attention_mask=batch.mask,
                    past_key_values=batch.mixed_cache, use_cache=True, scalings=frozen,
                    top_k_lora=batch.options.top_k_lora)
        logits = out.logits[:, -1].float()  # (n, vocab)
        if plain:  # every row argmax of its raw logits: one call for the batch
            drafts[:, j] = logits.argmax(-1)
            for i in range(len(rows)):
                q[i].append(None)
            tokens, positions = drafts[:, j:j + 1], positions + 1
            continue
        for i, row in enumerate(rows):
            edited = edited_logits(logits[i], row, drafts[i, :j].tolist())
            if row.params.greedy:
                drafts[i, j] = edited.argmax()
                q[i].append(None)
            else:
                probs = sampling_distribution(edited, row.params)
                try:
                    token = torch.multinomial(probs, 1, generator=row.generator)[0]
                except RuntimeError:  # no distribution (non-finite logits under the frozen scalings): draft the
                    # argmax, q one-hot on it; the acceptance rule stays exact for any q, and the verified
                    # distribution decides (a row that fails there fails as in plain decoding)
                    token = torch.nan_to_num(edited, nan=-math.inf).argmax()
                    probs = torch.zeros_like(probs)
                    probs[token] = 1.0
                q[i].append(probs)
                drafts[i, j] = token
        tokens, positions = drafts[:, j:j + 1], positions + 1
    return drafts, q


def plain_greedy(row: RowState) -> bool:
    """Whether the row's next tokens are each the argmax of the raw logits: greedy, no repetition penalty, and
    no EOS barred by min_new_tokens on the way."""
    p = row.params
    return p.greedy and p.repetition_penalty == 1.0 and (
        not row.eos_token_ids or len(row.tokens) >= p.min_new_tokens)


def edited_logits(logits: torch.Tensor, row: RowState, drafted: list[int]) -> torch.Tensor:
    """`sample_next_token`'s edits of one row's logits (vocab,), float32, for a history that also holds `drafted`:
    the repetition penalty over prompt + tokens + drafted, EOS barred before min_new_tokens."""
    p = row.params
    if p.repetition_penalty != 1.0:
        logits = logits.clone()
        seen = torch.tensor(row.prompt + row.tokens + drafted, device=logits.device).unique()
        scores = logits[seen]
        logits[seen] = torch.where(scores < 0, scores * p.repetition_penalty, scores / p.repetition_penalty)
    if len(row.tokens) + len(drafted) < p.min_new_tokens and row.eos_token_ids:
        logits = logits.clone()
        logits[sorted(row.eos_token_ids)] = -math.inf
    return logits




# ---- 2. verify --------------------------------------------------------------------------------------------------
def verify(batch, drafts: torch.Tensor, start: int, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both passes over [latest token, drafts] (n, γ + 1) after the first `start` cached positions: the logits
    (n, γ + 1, vocab) and scalings (n, γ + 1, L, E) of every position. The mixed cache forgets the draft first."""
    model, rows, device = batch.model, batch.rows, mask.device
    crop_cache(batch.mixed_cache, start)
    latest = torch.tensor([[r.tokens[-1]] for r in rows], device=device)
    ids = torch.cat([latest, drafts], dim=1)  # (n, t)
    t = ids.shape[1]
    first = torch.tensor([[len(r.prompt) + len(r.tokens) - 1] for r in rows], device=device)
    positions = _clamp(first + torch.arange(t, device=device), batch)  # (n, t)
    batch.mask = torch.cat([mask, torch.ones_like(mask[:, :1]).expand(-1, t)], dim=1)  # (n, start + t)
    scaling_cache, mixed_cache, attention = batch.scaling_cache, batch.mixed_cache, batch.mask
    if isinstance(mixed_cache, GrowingCache):  # the model's own layers, in place, under a 4-d mask
        scaling_cache, mixed_cache = scaling_cache.several_tokens(), mixed_cache.several_tokens()
        causal = torch.ones(t, t, dtype=torch.bool, device=device).tril()  # (t, t): query i reads keys <= i
        attention = torch.cat([mask.bool()[:, None, None, :].expand(-1, 1, t, -1),
                               causal.expand(len(rows), 1, t, t)], dim=-1)  # (n, 1, t, start + t)
    gate = batch.options
    out = model(input_ids=ids, attention_mask=attention, position_ids=positions, past_key_values=mixed_cache,
                scaling_past_key_values=scaling_cache, use_cache=True, top_k_lora=gate.top_k_lora,
                softmax_temperature=gate.softmax_temperature)
    return out.logits, out.scalings


# ---- 3. accept --------------------------------------------------------------------------------------------------
def _accept(batch, drafts: torch.Tensor, q: list[list[torch.Tensor | None]], logits: torch.Tensor,
            scalings: torch.Tensor, logprobs: int | None) -> tuple[list[Accepted], list[int | None]]:
    """Position by position, each row's token (plain rules for greedy rows, the speculative-sampling rule for sampled
    rows), pushed with its finish reason. Returns the positions' tokens, and per row the number of drafts it kept
    (None for a row that ended in this round)."""
    rows, gamma = batch.rows, drafts.shape[1]
    kept: list[int | None] = [0] * len(rows)
    live, steps = list(range(len(rows))), []
    # rows that take the argmax of their raw logits (what sample_next_token does for them): one call for the round
    argmax = logits.float().argmax(-1) if logprobs is None and all(plain_greedy(r) for r in rows) else None
    for j in range(gamma + 1):
        if not live:
            break
        at = [rows[i] for i in live]
        if argmax is not None:
            sampled = Sampled(tokens=argmax[live, j], errors={})
        else:
            sampled = sample_next_token(logits[live, j], at, logprobs=logprobs)
        if j < gamma:
            for k, i in enumerate(live):
                if not rows[i].params.greedy and k not in sampled.errors:
                    _speculative_choice(sampled, k, rows[i], logits[i, j], drafts[i, j], q[i][j])
        reasons, texts, still = [], [], []
        for k, (i, row) in enumerate(zip(live, at)):
            token = int(sampled.tokens[k])
            reason = "error" if k in sampled.errors else _push(row, token)
            if k in sampled.errors:
                row.error = sampled.errors[k]
            reason, text = _take_text(row, reason)
            reasons.append(reason)
            texts.append(text)
            if reason is not None:
                kept[i] = None
            elif j < gamma and token == int(drafts[i, j]):
                kept[i] = j + 1
                still.append(i)
        steps.append(Accepted(at, sampled.tokens, scalings[live, j], reasons, sampled, texts))
        live = still
    return steps, kept


def _speculative_choice(sampled: Sampled, k: int, row: RowState, logits: torch.Tensor, draft: torch.Tensor,
                        q: torch.Tensor) -> None:
    """Row k of `sampled` becomes the speculative-sampling choice for a draft drawn from `q`; its log-probability
    follows the token."""
    edited = edited_logits(logits.float(), row, [])
    token = accept_or_resample(sampling_distribution(edited, row.params), q, int(draft), row.generator)
    sampled.tokens[k] = token
    if sampled.logprobs is not None:
        distribution = torch.log_softmax(edited / row.params.distribution_temperature, dim=-1)
        sampled.logprobs[k] = distribution[token]


def accept_or_resample(p: torch.Tensor, q: torch.Tensor, draft: int, generator: torch.Generator) -> int:
    """The speculative-sampling rule (Leviathan et al. 2023; Chen et al. 2023): keep `draft`, drawn from q (vocab,),
    with probability min(1, p[draft] / q[draft]), else draw from max(0, p - q) renormalised. Whatever q is, the
    token has distribution p (vocab,)."""
    u = torch.rand((), generator=generator, device=p.device)
    if u * q[draft] < p[draft]:
        return draft
    residual = (p - q).clamp(min=0)
    return int(torch.multinomial(residual if residual.sum() > 0 else p, 1, generator=generator)[0])


def _push(row: RowState, token: int) -> str | None:
    """Record the token and return the row's finish reason; "error" when decoding its text fails."""
    try:
        row.push(token)
        return finish_reason(row)
    except Exception as err:  # noqa: BLE001 - a tokenizer that fails on this row's text
        row.error = f"{type(err).__name__}: {err}"
        return "error"


def _take_text(row: RowState, reason: str | None) -> tuple[str | None, str]:
    """The row's text so far not handed out (RowState.take_text, final when the row ends), and its reason: "error"
    when decoding its text fails."""
    if reason == "error":
        return reason, ""
    try:
        return reason, row.take_text(final=reason is not None)
    except Exception as err:  # noqa: BLE001 - a tokenizer that fails on this row's text
        row.error = f"{type(err).__name__}: {err}"
        return "error", ""


# ---- 4. roll back -----------------------------------------------------------------------------------------------
def _roll_back(batch, start: int, mask: torch.Tensor, kept: list[int], scalings: torch.Tensor) -> None:
    """Keep `start` + the kept positions of each row: the latest token and its kept drafts (kept[i] + 1), under one
    length, the longest row's; the scalings of each row's last kept position become its frozen draft scalings."""
    longest = max(kept)
    length = start + longest + 1
    for cache in (batch.scaling_cache, batch.mixed_cache):
        crop_cache(cache, length)
    index = torch.tensor(kept, device=mask.device)
    new = (torch.arange(longest + 1, device=mask.device)[None] <= index[:, None]).to(mask.dtype)  # (n, longest + 1)
    if isinstance(batch.mixed_cache, GrowingCache):  # full attention: holes under the mask are exact
        batch.mask = torch.cat([mask, new], dim=1)
    else:  # a row's positions move right by what it lacks, over left padding (a sliding window counts positions)
        shifts = longest - index
        batch.mask = _shift_right(torch.cat([mask, new], dim=1), shifts)
        for cache in (batch.scaling_cache, batch.mixed_cache):
            for layer in cache.layers:
                layer.keys, layer.values = _shift_right(layer.keys, shifts, 2), _shift_right(layer.values, shifts, 2)
    batch.scalings = scalings[torch.arange(len(kept), device=index.device), index]  # (n, L, E)


def _shift_right(x: torch.Tensor, shifts: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Row i of `x` (rows on axis 0) moved `shifts[i]` places right along `dim`, zeros coming in on the left."""
    if not bool(shifts.any()):
        return x
    width = x.shape[dim]
    source = torch.arange(width, device=x.device)[None] - shifts[:, None]  # (n, width)
    valid = source >= 0
    shape = [x.shape[0]] + [1] * (x.dim() - 1)
    shape[dim] = width
    index = source.clamp(min=0).view(shape).expand_as(x)
    return torch.where(valid.view(shape), torch.gather(x, dim, index), torch.zeros((), dtype=x.dtype, device=x.device))


def _clamp(positions: torch.Tensor, batch) -> torch.Tensor:
    """Positions past the model's context (drafts a row will not keep: its budget ends first) held at its last."""
    limit = batch.context_length
    return positions if limit is None else positions.clamp(max=limit - 1)
