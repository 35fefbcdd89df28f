"""Fixtures the tests share; the builders they use live in helpers.py."""

from __future__ import annotations

import pytest
import torch
from helpers import VOCAB, save_served_checkpoint, serving, tiny_tokenizer

from loramix import XLoraModel


@pytest.fixture
def ids():
    """Two rows of nine random token ids (no special ids)."""
    torch.manual_seed(7)
    return torch.randint(3, VOCAB, (2, 9))


@pytest.fixture(scope="module")
def served_checkpoint(tmp_path_factory):
    """A saved X-LoRA checkpoint with a chat template, for the server tests (one per test module)."""
    return save_served_checkpoint(tmp_path_factory.mktemp("served"))


@pytest.fixture(scope="module")
def live(served_checkpoint):
    """The served checkpoint on a live server, room for 72 rows (8 decoded, 64 waiting), max_tokens up to 64:
    (state, LiveServer), one per test module."""
    with serving(served_checkpoint, max_batch=8, max_queue=64, max_tokens_cap=64) as live:
        yield live


@pytest.fixture(scope="module")
def reference(served_checkpoint):
    """An independent copy of the served model and its tokenizer, for one-at-a-time references: (model, tok)."""
    return XLoraModel.from_pretrained(str(served_checkpoint)), tiny_tokenizer()
