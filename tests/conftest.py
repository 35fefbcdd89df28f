"""Fixtures the tests share; the builders they use live in helpers.py."""

from __future__ import annotations

import pytest
import torch
from helpers import VOCAB, save_served_checkpoint


@pytest.fixture
def ids():
    """Two rows of nine random token ids (no special ids)."""
    torch.manual_seed(7)
    return torch.randint(3, VOCAB, (2, 9))


@pytest.fixture(scope="module")
def served_checkpoint(tmp_path_factory):
    """A saved X-LoRA checkpoint with a chat template, for the server tests (one per test module)."""
    return save_served_checkpoint(tmp_path_factory.mktemp("served"))
