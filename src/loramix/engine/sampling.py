"""Token choice: every row's next token from its logits (penalties, greedy or sampled, per-row failures), with the
log-probabilities of the distribution it came from, for generated tokens as for a prompt's own."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..checks import is_finite_number
from ..config import GateOptions
from .params import GREEDY_BELOW, SamplingParams  # noqa: F401  (GREEDY_BELOW: the rule's threshold)

if TYPE_CHECKING:
    from .rows import RowState

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
        temperatures = torch.tensor([[r.params.distribution_temperature] for r in rows],
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


def chosen_logprobs(sampled: Sampled, row: int, top: int) -> TokenLogprob:
    """Row `row` of what `sample_next_token(..., logprobs=k)` returned, with its `top` <= k alternatives (fewer
    where the vocabulary is smaller)."""
    if sampled.logprobs is None:
        raise ValueError("sampled: no log-probabilities (sample_next_token was called without logprobs)")
    alternatives = zip(sampled.top_ids[row, :top].tolist(), sampled.top_logprobs[row, :top].tolist())
    return TokenLogprob(int(sampled.tokens[row]), float(sampled.logprobs[row]), list(alternatives))


PROMPT_CHUNK_ELEMENTS = 1 << 22  # logits handled at once by `prompt_logprob_table`: positions x vocab (16 MB float32)


@dataclass
class PromptLogprobs:
    """The log-probabilities of a prompt's tokens as a table of tensors (no Python object per token): row t is
    position t + 1, the log-probability of `tokens[t + 1]` given the tokens before it and the k most likely tokens
    there (largest first). The first token has none (nothing predicts it)."""

    tokens: list[int]  # the prompt (t,)
    chosen: torch.Tensor  # (t - 1,) float32: the log-probability of tokens[1:]
    top_values: torch.Tensor  # (t - 1, k) float32
    top_ids: torch.Tensor  # (t - 1, k)

    def __len__(self) -> int:
        return len(self.tokens)

    def entries(self, start: int = 0, stop: int | None = None) -> list[TokenLogprob]:
        """Positions start..stop (default: all) as `TokenLogprob`s, the first token's logprob None."""
        stop = len(self.tokens) if stop is None else stop
        first = max(start, 1)  # row 0 of the table is position 1
        chosen = self.chosen[first - 1:stop - 1].tolist()
        values, ids = self.top_values[first - 1:stop - 1].tolist(), self.top_ids[first - 1:stop - 1].tolist()
        head = [TokenLogprob(self.tokens[0], None, [])] if start == 0 and stop > 0 else []
        return head + [TokenLogprob(token, lp, list(zip(t, v)))
                       for token, lp, t, v in zip(self.tokens[first:stop], chosen, ids, values)]


def prompt_logprob_table(logits: torch.Tensor, prompt: list[int], *, top: int = 0, temperature: float = 1.0,
                         chunk: int | None = None) -> PromptLogprobs:
    """The prompt's log-probabilities from the logits of one forward pass over it (t, vocab): position t's logits
    predict token t + 1, as log_softmax(logits / temperature), with the `top` most likely tokens.

    Computed `chunk` positions at a time (default: PROMPT_CHUNK_ELEMENTS // vocab), so that no float32 copy, quotient
    or log_softmax of the whole prompt's logits is ever made; every position's numbers are those of the whole
    computation (log_softmax, gather and topk are per position). The table is on the CPU."""
    if not is_finite_number(temperature) or temperature <= 0:
        raise ValueError(f"temperature: got {temperature!r}, expected a finite number > 0")
    if logits.shape[0] != len(prompt):
        raise ValueError(f"logits: {logits.shape[0]} positions for a prompt of {len(prompt)} tokens")
    positions, vocab = len(prompt) - 1, logits.shape[-1]
    k = min(top, vocab)
    chunk = chunk or max(1, PROMPT_CHUNK_ELEMENTS // vocab)
    ids = torch.tensor(prompt, device=logits.device)  # (t,)
    chosen = torch.empty(positions, dtype=torch.float32)
    top_values = torch.empty(positions, k, dtype=torch.float32)
    top_ids = torch.empty(positions, k, dtype=torch.long)
    for a in range(0, positions, chunk):
        b = min(a + chunk, positions)
        distribution = torch.log_softmax(logits[a:b].float() / temperature, dim=-1)  # (b - a, vocab)
        chosen[a:b] = distribution.gather(-1, ids[a + 1:b + 1, None])[:, 0].cpu()
        if k:
            values, tokens = distribution.topk(k, dim=-1)  # (b - a, k)
            top_values[a:b], top_ids[a:b] = values.cpu(), tokens.cpu()
    return PromptLogprobs(list(prompt), chosen, top_values, top_ids)


def prompt_logprobs(model, prompt: list[int], *, top: int = 0, temperature: float = 1.0,
                    gate: GateOptions = GateOptions(), logits: torch.Tensor | None = None) -> list[TokenLogprob]:
    """The log-probability of each prompt token given the ones before it, from one forward pass of the X-LoRA
    model over the prompt: position t's logits predict token t + 1, so the first token has none (None).

    The distribution is log_softmax(logits / temperature) (pass `params.distribution_temperature`, i.e.
    1 for greedy), the same that `sample_next_token` reports for generated tokens; `top` adds that many alternatives
    per position. `gate`: the gate options of this call, as in `DecodeBatch`. `logits` (t, vocab): that forward pass
    already run by the caller. `prompt_table` gives the same numbers as tensors (`PromptLogprobs`)."""
    return prompt_table(model, prompt, top=top, temperature=temperature, gate=gate, logits=logits).entries()


def prompt_table(model, prompt: list[int], *, top: int = 0, temperature: float = 1.0,
                 gate: GateOptions = GateOptions(), logits: torch.Tensor | None = None) -> PromptLogprobs:
    """`prompt_logprobs` as a table of tensors (`prompt_logprob_table`): one forward pass of the model over the
    prompt (unless its `logits` (t, vocab) are given), reduced a chunk of positions at a time."""
    if not prompt:
        raise ValueError("prompt: no tokens")
    if not is_finite_number(temperature) or temperature <= 0:
        raise ValueError(f"temperature: got {temperature!r}, expected a finite number > 0")
    if logits is None:
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt], device=model.device), top_k_lora=gate.top_k_lora,
                           softmax_temperature=gate.softmax_temperature).logits[0]
    return prompt_logprob_table(logits, prompt, top=top, temperature=temperature)


def sampling_distribution(row: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """The distribution a sampled row draws from, (vocab,) from its logits (vocab,): temperature, then top-k,
    then top-p, then softmax (also the verified distribution p of speculative decoding, engine/speculative.py)."""
    row = row / p.temperature
    if 0 < p.top_k < row.shape[-1]:
        row = row.masked_fill(row < row.topk(p.top_k).values[-1], -math.inf)
    if p.top_p < 1.0:
        sorted_logits, order = row.sort(descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > p.top_p  # keep the smallest set reaching top_p
        row = row.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), -math.inf)
    return row.softmax(-1)


def _sample(row: torch.Tensor, p: SamplingParams, generator: torch.Generator) -> torch.Tensor:
    """One token from a row's logits (vocab,): a draw from `sampling_distribution`."""
    return torch.multinomial(sampling_distribution(row, p), 1, generator=generator)[0]


def new_generator(seed: int | None, device) -> torch.Generator:
    """A generator of its own for one row: seeded when asked, else from the OS."""
    g = torch.Generator(device=device)
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed)
    return g
