"""Scalings logs and the paper's figures: the logged scalings are the model's, logs round-trip exactly."""

from __future__ import annotations

import pytest
import torch
from helpers import make_experts, tiny_base, tiny_tokenizer

from loramix import XLoraConfig, XLoraModel
from loramix.analysis import ScalingsLog, analyze, plot_history, plot_scalings, scalings_of_ids

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def model(tmp_path):
    base = tiny_base("llama")
    adapters = make_experts(base, "llama", tmp_path)
    return XLoraModel.from_base(base, XLoraConfig(adapters=adapters, xlora_depth=2, xlora_size=16,
                                                  layerwise_scalings=True))


def test_log_round_trip_is_exact(tmp_path):
    log = ScalingsLog(torch.rand(5, 3, 2), list("abcde"), ["l0", "l1", "l2"], ["x", "y"], [(0, 2, "p"), (2, 5, "g")])
    log.save(str(tmp_path / "s.safetensors"))
    again = ScalingsLog.load(str(tmp_path / "s.safetensors"))
    assert torch.equal(again.scalings, log.scalings)
    assert (again.tokens, again.layer_names, again.expert_names, again.segments) == \
        (log.tokens, log.layer_names, log.expert_names, log.segments)
    with pytest.raises(ValueError, match="does not match 4 tokens"):
        ScalingsLog(torch.rand(5, 3, 2), list("abcd"), ["l0", "l1", "l2"], ["x", "y"])
    (tmp_path / "bad.safetensors").write_bytes(b"junk")
    with pytest.raises(ValueError, match="bad.safetensors: not a loramix scalings log"):
        ScalingsLog.load(str(tmp_path / "bad.safetensors"))


def test_analyze_logs_the_scalings_that_generated_each_token(model, tmp_path):
    tok = tiny_tokenizer()
    summary = analyze(str(tmp_path), model=model, tokenizer=tok, prompt="fold AGW =", max_new_tokens=6)
    log = ScalingsLog.load(str(tmp_path / "scalings.safetensors"))
    prompt_ids = tok("fold AGW =", return_tensors="pt")["input_ids"]
    n = prompt_ids.shape[1]
    result = model.generate(prompt_ids, max_new_tokens=6, eos_token_id=[], return_scalings=True)
    # token i of the continuation was produced by the scalings at position n - 1 + i
    assert torch.allclose(log.scalings[n - 1:n - 1 + result.scalings.shape[1]], result.scalings[0], atol=1e-6)
    assert log.layer_names == model.lora_layer_names and log.expert_names == model.expert_names
    assert log.segments == [(0, n, "prompt"), (n, len(log.tokens), "generated")]
    assert "".join(log.tokens).startswith("fold AGW =")
    expected = log.scalings.sum(1).mean(0) / model.n_lora_layers
    assert list(summary["mean_scaling"].values()) == pytest.approx(expected.tolist(), abs=1e-4)
    for name in ("heatmap.png", "history.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG


def test_figures_from_a_saved_log_through_the_cli(model, tmp_path, capsys):
    from loramix.cli import main

    log = scalings_of_ids(model, tiny_tokenizer(), tiny_tokenizer()("abc def", return_tensors="pt")["input_ids"])
    with torch.no_grad():
        direct = model(input_ids=tiny_tokenizer()("abc def", return_tensors="pt")["input_ids"]).scalings[0]
    assert torch.equal(log.scalings, direct)
    log.save(str(tmp_path / "log.safetensors"))
    assert main(["analyze", "--scalings", str(tmp_path / "log.safetensors"), "--out", str(tmp_path / "fig")]) == 0
    assert (tmp_path / "fig" / "heatmap.png").read_bytes()[:8] == PNG
    assert "7 tokens" in capsys.readouterr().out
    assert main(["analyze", "--out", str(tmp_path / "x")]) == 2
    assert "give --model and --prompt" in capsys.readouterr().err


def test_plots_label_layers_and_experts(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    captured = {}
    monkeypatch.setattr(plt, "close", lambda fig: captured.setdefault("fig", fig))
    log = ScalingsLog(torch.rand(4, 2, 3), ["a", "b", "c", "d"], ["model.layers.0.self_attn.q_proj",
                                                                  "model.layers.1.mlp.up_proj"], ["e0", "e1", "e2"])
    plot_scalings(log, str(tmp_path / "h.png"))
    heat = captured.pop("fig").axes[0]
    assert [t.get_text() for t in heat.get_yticklabels()] == ["layers.0.q_proj", "layers.1.up_proj"]
    assert [t.get_text() for t in heat.get_xticklabels()] == ["e0", "e1", "e2"]
    assert torch.allclose(torch.tensor(heat.images[0].get_array().tolist()), log.scalings.mean(0))
    plot_history(log, str(tmp_path / "t.png"))
    lines = captured.pop("fig").axes[0].get_lines()
    assert [line.get_label() for line in lines] == ["e0", "e1", "e2"]
    assert lines[1].get_ydata().tolist() == pytest.approx(log.scalings.sum(1)[:, 1].tolist())
