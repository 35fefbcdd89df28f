"""science/routing.py: routing and mixing numbers on hand-made scalings; prompt scalings equal the model's own
forward row by row; the figures are written."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import tiny_tokenizer, tiny_xlora

from loramix.science.figures import domain_heatmaps
from loramix.science.routing import mixing, prompt_scalings, routing


def test_mixing_by_hand():
    # 2 tokens, 2 layers, 2 experts: layer 0 one-hot at both tokens; layer 1 half-half, then 0.9 / 0.1
    s = torch.tensor([[[1.0, 0.0], [0.5, 0.5]],
                      [[1.0, 0.0], [0.9, 0.1]]])
    h = -(0.9 * math.log(0.9) + 0.1 * math.log(0.1))
    out = mixing(s)
    assert out["entropy_per_layer"] == pytest.approx([0.0, round((math.log(2) + h) / 2, 4)])
    assert out["two_experts_share"] == 0.25  # only (token 0, layer 1) has two experts >= 0.2
    assert out["layers_mixing_share"] == 0.5  # layer 1's token mean is (0.7, 0.3)
    assert routing(s, ["a", "b"]) == {"a": pytest.approx(0.85), "b": pytest.approx(0.15)}


def test_prompt_scalings_are_the_models_row_by_row(tmp_path):
    _, _, model = tiny_xlora("llama", tmp_path, layerwise_scalings=True)
    tok = tiny_tokenizer()
    rows = [{"prompt": "ab"}, {"prompt": "longer prompt"}, {"prompt": "xyz"}]
    ours = prompt_scalings(model, tok, rows, batch_size=2)
    with torch.no_grad():
        plain = torch.cat([model(input_ids=tok(r["prompt"], add_special_tokens=False, return_tensors="pt")
                                 ["input_ids"]).scalings[0] for r in rows])
    assert torch.allclose(ours, plain.float(), atol=1e-5)
    paths = domain_heatmaps(model, tok, {"a/b": rows[:2], "c": rows[2:]}, str(tmp_path / "figures"))
    assert sorted(paths) == ["a/b", "c"] and all(p.endswith(".png") for p in paths.values())
    assert (tmp_path / "figures" / "scalings_a_b.png").stat().st_size > 1000


def test_conversation_history_covers_every_turn(tmp_path):
    from helpers import CHAT_TEMPLATE

    from loramix.science.figures import conversation_history

    _, _, model = tiny_xlora("llama", tmp_path, layerwise_scalings=True)
    tok = tiny_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    log, turns = conversation_history(model, tok, [("a", "hi"), ("b", "what?")], str(tmp_path / "h.png"),
                                      max_new_tokens=3)
    text = "".join(log.tokens)
    assert text.startswith("<user>hi|<assistant>") and "<user>what?|" in text  # the chat as rendered, answers in
    assert [s[2] for s in log.segments] == ["a", "b"] and log.segments[0][0] == 0
    assert log.segments[0][1] == log.segments[1][0] and log.segments[1][1] == len(log.tokens)
    assert [t["domain"] for t in turns] == ["a", "b"] and all(t["top_expert"] in model.expert_names for t in turns)
    assert (tmp_path / "h.png").stat().st_size > 1000
