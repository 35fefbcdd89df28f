"""science/scoring.py: choice log-likelihoods and greedy scores equal a plain one-row loop on a tiny model (a
Hugging Face model and an XLoraModel), the bootstrap interval equals a hand computation."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import tiny_base, tiny_tokenizer, tiny_xlora

from loramix.science.scoring import (
    NUMERIC_CAP,
    bootstrap_interval,
    bootstrap_r2,
    choice_logliks,
    first_number,
    greedy_answers,
    is_real,
    paired_difference,
    r_squared,
    score_answer,
    score_rows,
)

ROWS = [
    {"prompt": "q abc?", "completion": "x", "choices": ["x", "yz", "w"], "answer": 0, "target": 1.5},
    {"prompt": "longer question 12?", "completion": "yz", "choices": ["yz", "x"], "answer": 0, "target": -3.0},
    {"prompt": "z", "completion": "7", "choices": ["7", "8"], "answer": 1, "target": 7.0},  # single-token choices
]


@torch.no_grad()
def _plain_logliks(model, tok, rows):
    out = []
    for row in rows:
        prompt = tok(row["prompt"])["input_ids"]
        lls = []
        for choice in row["choices"]:
            tail = tok(choice, add_special_tokens=False)["input_ids"]
            logp = model(input_ids=torch.tensor([prompt + tail])).logits[0].float().log_softmax(-1)
            lls.append(sum(float(logp[len(prompt) + j - 1, t]) for j, t in enumerate(tail)))
        out.append(lls)
    return out


@torch.no_grad()
def _plain_greedy(model, tok, row, n=6):
    ids = tok(row["prompt"])["input_ids"]
    new = []
    for _ in range(n):  # no cache, no padding: the whole sequence each step
        token = int(model(input_ids=torch.tensor([ids + new])).logits[0, -1].argmax())
        if token == tok.eos_token_id:
            break
        new.append(token)
    return tok.decode(new, skip_special_tokens=True).strip()


@pytest.fixture(scope="module")
def hf():
    return tiny_base("llama"), tiny_tokenizer()


def test_choice_logliks_equal_a_plain_loop(hf):
    model, tok = hf
    ours = choice_logliks(model, tok, ROWS, batch_size=2)
    plain = _plain_logliks(model, tok, ROWS)
    for a, b in zip(ours, plain):
        assert a == pytest.approx(b, abs=1e-4)
    scores = score_rows(model, tok, ROWS, "choice", batch_size=2)
    assert scores == [1.0 if max(range(len(p)), key=p.__getitem__) == r["answer"] else 0.0
                      for p, r in zip(plain, ROWS)]


@pytest.mark.parametrize("metric", ["exact_match", "numeric", "r2"])
def test_greedy_metrics_equal_a_plain_loop(hf, metric):
    model, tok = hf
    plain = [_plain_greedy(model, tok, row) for row in ROWS]
    assert greedy_answers(model, tok, ROWS, batch_size=2, max_new_tokens=6) == plain
    assert all(plain)  # the reference answers are not empty
    scores = score_rows(model, tok, ROWS, metric, batch_size=2, max_new_tokens=6)
    assert scores == [score_answer(answer, row, metric) for answer, row in zip(plain, ROWS)]


def test_xlora_model_scores_equal_a_plain_loop(tmp_path):
    _, _, model = tiny_xlora("llama", tmp_path)
    tok = tiny_tokenizer()
    for a, b in zip(choice_logliks(model, tok, ROWS, batch_size=4), _plain_logliks(model, tok, ROWS)):
        assert a == pytest.approx(b, abs=1e-4)
    assert greedy_answers(model, tok, ROWS, max_new_tokens=6) == [_plain_greedy(model, tok, row) for row in ROWS]


def test_answers_scored_by_hand():
    row = {"completion": "-11.0", "target": -11.0}
    assert first_number("about −3.5 kcal/mol") == -3.5
    assert score_answer(" -11.0 ", row, "exact_match") == 1.0
    assert score_answer("-10.5 kcal/mol", row, "numeric") == -0.5
    assert score_answer("no idea", row, "numeric") == -11.0  # no number: predicts 0
    assert score_answer("1e9", row, "numeric") == -NUMERIC_CAP
    assert score_answer("-10", row, "r2") == 1.0
    assert r_squared([1.0, 1.0], [0.0, 2.0]) == 0.0
    with pytest.raises(ValueError, match="metric 'f1'"):
        score_rows(None, None, ROWS, "f1")
    with pytest.raises(ValueError, match=r"rows\[0\]: metric 'numeric' needs \['target'\]"):
        score_rows(None, None, [{"prompt": "a"}], "numeric")


def test_bootstrap_interval_by_hand():
    # default_rng(0).integers(0, 5, size=(4, 5)) draws the rows [4,3,2,1,1], [0,0,0,0,4], [3,4,2,3,4], [3,3,2,2,4]:
    # resampled means 0.4, 0.8, 0.6, 0.8; sorted 0.4, 0.6, 0.8, 0.8; the 2.5th percentile sits at 3 * 0.025 =
    # 0.075 of the way from 0.4 to 0.6, the 97.5th at 2.925, between 0.8 and 0.8
    mean, low, high = bootstrap_interval([1, 0, 1, 1, 0], n=4, seed=0)
    assert (mean, low, high) == pytest.approx((0.6, 0.4 + 0.075 * 0.2, 0.8))
    assert bootstrap_interval([1, 0, 1, 1, 0], n=4, seed=0) == (mean, low, high)  # a seed gives one interval
    diff = paired_difference([1, 1, 1, 1, 1], [1, 0, 1, 1, 0], n=4, seed=0)
    assert diff == pytest.approx((0.4, 0.2, 0.6 - 0.075 * 0.2)) and is_real(diff)
    assert not is_real(paired_difference([1, 0], [1, 0]))
    r2, r2_low, r2_high = bootstrap_r2([0.0, 1.0, 0.0], [0.0, 1.0, 2.0], n=50)
    assert r2 == pytest.approx(0.5) and r2_low <= r2_high and not math.isnan(r2_low)
