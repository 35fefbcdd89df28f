"""Held-out metrics per row, and percentile-bootstrap intervals over rows, for the science table.

Metrics (`score_rows`, one float per row):
  choice       the choice with the highest log-likelihood sum_i log p(choice token i | prompt, earlier choice
               tokens) (not length-normalised) is the prediction: 1.0 when it is row["answer"], else 0.0
  exact_match  the greedy answer (up to the end-of-sequence token, stripped) equals row["completion"]
               (stripped): 1.0, else 0.0
  numeric      -min(|y_hat - y|, NUMERIC_CAP) with y = row["target"] and y_hat the first number in the greedy
               answer; an answer without a number counts as y_hat = 0. Higher is better; 0 is exact
  r2           the squared error (y_hat - y)² (y_hat as for numeric, not capped); `r_squared` turns a set of
               them into R² = 1 - sum (y_hat - y)² / sum (y - mean y)²

A row's prompt is `row["messages"]` without its final assistant turn, rendered with the tokenizer's chat
template and its generation prompt, when the row has messages (science/datasets.py rows); else `row["prompt"]`
as it is. The model is a Hugging Face causal LM (or a PEFT model) or a loramix XLoraModel: both give `.logits`
from forward(input_ids, attention_mask); greedy answers come from `model.generate` (loramix's engine for an
XLoraModel, transformers' otherwise).
"""

from __future__ import annotations

import math
import re

import numpy as np
import torch

METRICS = ("choice", "exact_match", "numeric", "r2")
NUMERIC_CAP = 20.0  # the most one numeric row can lose, so that one wild answer does not decide a mean
_NUMBER = re.compile(r"[-+−]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?")


def prompt_text(row: dict, tokenizer) -> str:
    """The text the model continues for a row (see the module docstring)."""
    messages = row.get("messages")
    if messages:
        if messages[-1].get("role") == "assistant":
            messages = messages[:-1]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return row["prompt"]


def first_number(text: str) -> float | None:
    """The first number written in text (a unicode minus counts as "-"), or None."""
    match = _NUMBER.search(text)
    if match is None:
        return None
    value = float(match.group(0).replace("−", "-"))
    return value if math.isfinite(value) else None


def _prompt_ids(tokenizer, row: dict) -> list[int]:
    text = prompt_text(row, tokenizer)
    # a chat template writes its own special tokens; a plain prompt gets the tokenizer's usual ones (e.g. BOS)
    return tokenizer(text, add_special_tokens="messages" not in row)["input_ids"]


@torch.no_grad()
def choice_logliks(model, tokenizer, rows: list[dict], *, batch_size: int = 8) -> list[list[float]]:
    """Per row, per choice: log p(choice | prompt), summed over the choice's tokens (tokenized on its own, after
    the prompt's ids). Sequences are right-padded in batches of `batch_size` (prompt, choice) pairs; a row whose
    choices are one token each takes one sequence, its prompt, read at the last position."""
    pairs = []  # (row index, ids, number of choice tokens)
    single: dict[int, list[int]] = {}  # rows whose choices are one token each: one pass over the prompt suffices
    for r, row in enumerate(rows):
        prompt = _prompt_ids(tokenizer, row)
        tails = [tokenizer(choice, add_special_tokens=False)["input_ids"] for choice in row["choices"]]
        for choice, tail in zip(row["choices"], tails):
            if not tail:
                raise ValueError(f"row {r}: choice {choice!r} has no tokens")
        if all(len(tail) == 1 for tail in tails):
            single[r] = [tail[0] for tail in tails]
            pairs.append((r, prompt, 0))
        else:
            pairs += [(r, prompt + tail, len(tail)) for tail in tails]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    scores: list[list[float]] = [[] for _ in rows]
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        width = max(len(ids) for _, ids, _ in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, (_, row_ids, _) in enumerate(chunk):
            ids[i, :len(row_ids)] = torch.tensor(row_ids)
            mask[i, :len(row_ids)] = 1
        device = next(model.parameters()).device
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float().cpu()
        logp = logits.log_softmax(-1)
        for i, (r, row_ids, n) in enumerate(chunk):
            t = len(row_ids)
            if n == 0:  # the choices' single tokens, all read at the prompt's last position
                scores[r] = [float(logp[i, t - 1, token]) for token in single[r]]
                continue
            # token j is predicted at position j - 1
            picked = logp[i, t - n - 1:t - 1].gather(-1, torch.tensor(row_ids[t - n:])[:, None])
            scores[r].append(float(picked.sum()))
    return scores


@torch.no_grad()
def greedy_answers(model, tokenizer, rows: list[dict], *, max_new_tokens: int = 16,
                   batch_size: int = 8) -> list[str]:
    """Greedy answers, left-padded in batches: the new tokens up to the end-of-sequence token, decoded and
    stripped."""
    from ..model import XLoraModel

    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    answers = []
    for start in range(0, len(rows), batch_size):
        prompts = [_prompt_ids(tokenizer, row) for row in rows[start:start + batch_size]]
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        if isinstance(model, XLoraModel):
            out = model.generate(ids, mask, max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=pad)
        else:
            device = next(model.parameters()).device
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                 max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos,
                                 pad_token_id=pad).cpu()
        for row in out[:, width:].tolist():
            if eos in row:
                row = row[:row.index(eos)]
            answers.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    return answers


def score_answer(answer: str, row: dict, metric: str) -> float:
    """One row's score for a greedy answer under `metric` ("exact_match", "numeric" or "r2")."""
    if metric == "exact_match":
        return 1.0 if answer.strip() == str(row["completion"]).strip() else 0.0
    predicted = first_number(answer)
    error = (0.0 if predicted is None else predicted) - float(row["target"])
    if metric == "numeric":
        return -min(abs(error), NUMERIC_CAP)
    if metric == "r2":
        return error * error
    raise ValueError(f"metric {metric!r}: expected one of {', '.join(METRICS)}")


def score_rows(model, tokenizer, rows: list[dict], metric: str, *, batch_size: int = 8,
               max_new_tokens: int = 16) -> list[float]:
    """One score per row under `metric` (see the module docstring); the model is put in eval mode."""
    if metric not in METRICS:
        raise ValueError(f"metric {metric!r}: expected one of {', '.join(METRICS)}")
    needed = {"choice": ("choices", "answer"), "numeric": ("target",), "r2": ("target",),
              "exact_match": ("completion",)}[metric]
    for i, row in enumerate(rows):
        missing = [k for k in needed if k not in row]
        if missing:
            raise ValueError(f"rows[{i}]: metric {metric!r} needs {missing}")
    model.eval()
    if metric == "choice":
        logliks = choice_logliks(model, tokenizer, rows, batch_size=batch_size)
        return [1.0 if int(np.argmax(ll)) == int(row["answer"]) else 0.0 for ll, row in zip(logliks, rows)]
    answers = greedy_answers(model, tokenizer, rows, max_new_tokens=max_new_tokens, batch_size=batch_size)
    return [score_answer(a, row, metric) for a, row in zip(answers, rows)]


def r_squared(squared_errors: list[float], targets: list[float]) -> float:
    """R² = 1 - sum of squared errors / sum (y - mean y)² (0 when every target is the same)."""
    y = np.asarray(targets, dtype=float)
    total = float(((y - y.mean()) ** 2).sum())
    return 1.0 - float(np.sum(squared_errors)) / total if total else 0.0


def _resamples(m: int, n: int, seed: int) -> np.ndarray:
    """(n, m) row indices drawn with replacement: numpy.random.default_rng(seed).integers(0, m, size=(n, m))."""
    if m < 1:
        raise ValueError("scores: no rows to resample")
    if n < 1:
        raise ValueError(f"n: expected at least 1 resample, got {n}")
    return np.random.default_rng(seed).integers(0, m, size=(n, m))


def _interval(stat: float, resampled: np.ndarray, level: float) -> tuple[float, float, float]:
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(resampled, [tail, 100 - tail])  # numpy's default (linear) percentile
    return float(stat), float(low), float(high)


def bootstrap_interval(scores: list[float], *, n: int = 1000, seed: int = 0,
                       level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): the mean of the scores and the percentile bootstrap interval at `level` over rows (the
    means of n resamples of the rows, _resamples; low and high their (1-level)/2 and (1+level)/2 percentiles)."""
    x = np.asarray(scores, dtype=float)
    return _interval(x.mean(), x[_resamples(len(x), n, seed)].mean(1), level)


def paired_difference(a: list[float], b: list[float], *, n: int = 1000, seed: int = 0,
                      level: float = 0.95) -> tuple[float, float, float]:
    """(mean of a - b, low, high) over the same rows scored by two systems, resampling rows (pairs kept); the
    difference is real at `level` when the interval excludes 0 (`is_real`)."""
    if len(a) != len(b):
        raise ValueError(f"paired_difference: {len(a)} and {len(b)} scores; pair the same rows")
    return bootstrap_interval([x - y for x, y in zip(a, b)], n=n, seed=seed, level=level)


def is_real(interval: tuple[float, float, float]) -> bool:
    """Whether a paired_difference interval excludes 0."""
    _, low, high = interval
    return low > 0 or high < 0


def bootstrap_r2(squared_errors: list[float], targets: list[float], *, n: int = 1000, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float, float]:
    """(R², low, high): R² of the rows and its percentile bootstrap interval over rows (as bootstrap_interval)."""
    e, y = np.asarray(squared_errors, dtype=float), np.asarray(targets, dtype=float)
    if len(e) != len(y):
        raise ValueError(f"bootstrap_r2: {len(e)} errors and {len(y)} targets")
    idx = _resamples(len(e), n, seed)
    total = ((y[idx] - y[idx].mean(1, keepdims=True)) ** 2).sum(1)
    r2 = np.where(total > 0, 1.0 - e[idx].sum(1) / np.where(total > 0, total, 1.0), 0.0)  # as r_squared
    return _interval(r_squared(e, y), r2, level)
