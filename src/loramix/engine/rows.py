"""One sequence being decoded (`RowState`) with the rules of its end: the token budget, the finish reason."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .params import SamplingParams
from .sampling import new_generator
from .text import RowText


@dataclass
class RowState:
    """One sequence being decoded: everything the rules of decoding read about it.

    `tokens` are the tokens chosen so far (an ending EOS included); the last one is the next to be fed through
    the model. `text` is their text (`RowText`: up to the EOS, cut before a stop string), kept only when the row
    needs it (stop strings, or a caller that asks for the text); `take_text` hands it out. `frozen` holds the
    row's scalings (L, E) once they are frozen. `owner` is the driver's own handle (generate: the row index; the
    server's engine: the request)."""

    prompt: list[int]  # prompt ids without padding: the repetition penalty, the positions and the text read them
    params: SamplingParams
    budget: int  # most new tokens: max_new_tokens, or less where the context ends first (token_budget)
    generator: torch.Generator
    eos_token_ids: frozenset[int] = frozenset()
    text: RowText | None = None
    owner: Any = None
    tokens: list[int] = field(default_factory=list)
    frozen: torch.Tensor | None = None
    gamma: int | None = None  # speculative decoding: the row's draft length, adapted each round (None: not yet)
    pause: int = 0  # speculative decoding: plain steps left while the row's drafts are paused (gamma 0)
    error: str | None = None  # why the row failed, when its finish reason is "error"

    @classmethod
    def start(cls, prompt: list[int], params: SamplingParams, *, device, eos_token_ids=(), tokenizer=None,
              context_length: int | None = None, prompt_length: int | None = None, keep_text: bool = False,
              owner: Any = None) -> "RowState":
        """A fresh row; `prompt_length` (default: the prompt's) is what the context budget counts. The row keeps
        its text (decoded by `tokenizer`) when `keep_text` or when it has stop strings."""
        if params.stop and tokenizer is None:
            raise ValueError("stop: stop strings need a tokenizer to decode the text")
        if keep_text and tokenizer is None:
            raise ValueError("keep_text: needs a tokenizer to decode the text")
        length = len(prompt) if prompt_length is None else prompt_length
        text = RowText(tokenizer, prompt, params.stop, eos_token_ids) if keep_text or params.stop else None
        return cls(prompt=list(prompt), params=params, budget=token_budget(params, length, context_length),
                   generator=new_generator(params.seed, device), eos_token_ids=frozenset(eos_token_ids),
                   text=text, owner=owner)

    def push(self, token: int) -> None:
        """Record the token just chosen (and its text, when the row keeps text)."""
        self.tokens.append(token)
        if self.text is not None:
            self.text.push(token)

    def take_text(self, final: bool) -> str:
        """Text not handed out yet (`RowText.take`): while the row runs, a tail that could still grow into a stop
        string is held back; at the end (`final`) the rest, cut before the stop string. "" without text."""
        return "" if self.text is None else self.text.take(final)


def context_length(model) -> int | None:
    """The model's context: its config's max_position_embeddings (or the name its family gives it), else None."""
    cfg = model.base.config
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(cfg, key, None)
        if isinstance(value, int):
            return value
    return None


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
    if row.text is not None and row.text.stopped:
        return "stop"
    if n >= row.budget:
        return "length"
    return None
