"""Run logging: TensorBoard event files and a W&B offline run read back with their own libraries, the console line
without a progress bar, and the gate's routing health against a plain loop over the scalings the run produced."""

from __future__ import annotations

import glob
import json
import math
import struct

import numpy as np
import pytest
import torch
from helpers import make_experts, save_tiny_model, synthetic_task, tiny_base, write_jsonl

import loramix
from loramix import XLoraConfig, XLoraModel
from loramix.cli import main
from loramix.training.routing_health import RoutingTally, RoutingWatch, routing_alarms, routing_health
from loramix.training.settings import TrainingArgs


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny Llama with its tokenizer, two PEFT experts, and a small mix of two tasks."""
    root = tmp_path_factory.mktemp("runlog")
    save_tiny_model(root / "base")
    adapters = make_experts(tiny_base("llama"), "llama", root, n=2)
    write_jsonl(root / "train.jsonl", synthetic_task("rev", 12, seed=0) + synthetic_task("sum", 12, seed=0))
    write_jsonl(root / "eval.jsonl", synthetic_task("rev", 4, seed=1))
    return root, adapters


def _config(adapters) -> XLoraConfig:
    return XLoraConfig(adapters=adapters, xlora_depth=2, xlora_size=16, layerwise_scalings=True)


def _record_scalings(monkeypatch) -> tuple[list, list]:
    """Keep (scalings, attention mask) of every training forward of the X-LoRA model, and its layer names."""
    seen, names = [], []
    forward = XLoraModel.forward

    def recording(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        if self.training:
            seen.append((out.scalings.detach().clone(), kwargs["attention_mask"].clone()))
            names[:] = self.lora_layer_names
        return out

    monkeypatch.setattr(XLoraModel, "forward", recording)
    return seen, names


def _reference(batches) -> tuple[list[float], list[list[float]], list[list[float]]]:
    """Per layer: the mean mixing entropy (nats), each expert's mean share and top-1 rate, by plain loops over the
    attended tokens of (scalings (b, t, L, E), mask (b, t)) pairs."""
    n_layers, n_experts = batches[0][0].shape[-2:]
    entropy = [0.0] * n_layers
    share = [[0.0] * n_experts for _ in range(n_layers)]
    top1 = [[0.0] * n_experts for _ in range(n_layers)]
    tokens = 0
    for scalings, mask in batches:
        for b in range(scalings.shape[0]):
            for t in range(scalings.shape[1]):
                if not mask[b, t]:
                    continue
                tokens += 1
                for layer in range(n_layers):
                    p = [float(x) for x in scalings[b, t, layer]]
                    entropy[layer] -= sum(x * math.log(max(x, 1e-9)) for x in p)
                    for e in range(n_experts):
                        share[layer][e] += p[e]
                    top1[layer][max(range(n_experts), key=p.__getitem__)] += 1
    return ([h / tokens for h in entropy], [[v / tokens for v in row] for row in share],
            [[v / tokens for v in row] for row in top1])


def _metrics(folder) -> list[dict]:
    return [json.loads(line) for line in open(folder / "metrics.jsonl")]


def test_tensorboard_events_hold_the_run_losses_and_routing_health(tiny, tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    root, adapters = tiny
    seen, layer_names = _record_scalings(monkeypatch)
    out = tmp_path / "gate"
    args = TrainingArgs(max_steps=4, logging_steps=2, eval_steps=2, batch_size=4, lr=1e-2, progress=False,
                        report_to="tensorboard")
    result = loramix.train_xlora(str(root / "base"), _config(adapters), str(root / "train.jsonl"), str(out),
                                 args=args, eval_data=str(root / "eval.jsonl"), log=lambda _: None)
    records = _metrics(out)
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in train] == [r["step"] for r in evals] == [2, 4]
    events = EventAccumulator(str(out / "runs"), size_guidance={"scalars": 0})
    events.Reload()

    def scalars(tag):
        return [(e.step, e.value) for e in events.Scalars(tag)]

    # the event files hold the logged values, rounded to float32 as TensorBoard stores them
    for tag, key, rows in (("train/loss", "loss", train), ("train/lr", "lr", train),
                           ("train/grad_norm", "grad_norm", train), ("train/tokens_per_s", "tokens_per_s", train),
                           ("eval/loss", "eval_loss", evals), ("eval/perplexity", "eval_perplexity", evals)):
        assert scalars(tag) == [(r["step"], float(np.float32(r[key]))) for r in rows], tag
    assert result.metrics["loss"] == train[-1]["loss"] and result.metrics["eval_loss"] == evals[-1]["eval_loss"]
    # routing health of each logging window = a plain loop over the scalings of its two optimizer steps
    assert len(seen) == 4 and len(layer_names) > 1
    for window, step in ((seen[0:2], 2), (seen[2:4], 4)):
        entropy, share, top1 = _reference(window)
        for layer, name in enumerate(layer_names):
            assert dict(scalars(f"routing/entropy/{name}"))[step] == pytest.approx(entropy[layer], rel=1e-6)
        assert dict(scalars("routing/entropy"))[step] == pytest.approx(sum(entropy) / len(entropy), rel=1e-6)
        for e, expert in enumerate(adapters):
            expected_share = sum(row[e] for row in share) / len(share)
            expected_top1 = sum(row[e] for row in top1) / len(top1)
            assert dict(scalars(f"routing/share/{expert}"))[step] == pytest.approx(expected_share, rel=1e-6)
            assert dict(scalars(f"routing/top1/{expert}"))[step] == pytest.approx(expected_top1, rel=1e-6)
            assert train[step // 2 - 1]["routing"]["share"][expert] == pytest.approx(expected_share, rel=1e-12)


def _wandb_history(run_file) -> list[dict]:
    """The history rows of a W&B run file: its records (wandb's own protobuf schema) read from the log framing
    the file uses (a 7-byte header, 32 KiB blocks, each record chunk after a 7-byte crc/length/type header)."""
    from wandb.proto import wandb_internal_pb2

    data = open(run_file, "rb").read()
    assert data[:4] == b":W&B"
    block, pos, pending, rows = 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
    return rows


def test_wandb_offline_run_holds_the_losses_and_routing_keys(tiny, tmp_path, monkeypatch):
    root, adapters = tiny
    for var, value in (("WANDB_MODE", "offline"), ("WANDB_DIR", str(tmp_path / "wandb-dir")),
                       ("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config")),
                       ("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache")),
                       ("WANDB_DATA_DIR", str(tmp_path / "wandb-data")), ("WANDB_SILENT", "true"),
                       ("WANDB_CONSOLE", "off")):
        monkeypatch.setenv(var, value)
    out = tmp_path / "gate"
    args = TrainingArgs(max_steps=2, logging_steps=1, batch_size=4, lr=1e-2, progress=False, report_to="wandb")
    loramix.train_xlora(str(root / "base"), _config(adapters), str(root / "train.jsonl"), str(out), args=args,
                        log=lambda _: None)
    (run_file,) = glob.glob(str(tmp_path / "wandb-dir" / "wandb" / "offline-run-*" / "run-*.wandb"))
    rows = _wandb_history(run_file)
    assert [row["_step"] for row in rows] == [1, 2]
    train = _metrics(out)
    assert [row["train/loss"] for row in rows] == pytest.approx([r["loss"] for r in train], rel=1e-12)
    assert [row["train/lr"] for row in rows] == pytest.approx([r["lr"] for r in train], rel=1e-12)
    for row, record in zip(rows, train):
        assert row["routing/entropy"] == pytest.approx(record["routing"]["entropy"], rel=1e-12)
        for expert in adapters:
            assert row[f"routing/share/{expert}"] == pytest.approx(record["routing"]["share"][expert], rel=1e-12)
            assert f"routing/top1/{expert}" in row
        assert any(key.startswith("routing/entropy/") for key in row)


def test_no_progress_prints_a_line_every_logging_steps_and_reports_an_expert(tiny, tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    root, _ = tiny
    out = tmp_path / "expert"

    def train(steps: int) -> int:
        return main(["train-expert", "--base", str(root / "base"), "--data", str(root / "train.jsonl"), "--output",
                     str(out), "--max-steps", str(steps), "--logging-steps", "2", "--batch-size", "4", "--rank", "2",
                     "--no-progress", "--report-to", "tensorboard"])

    assert train(1) == 0  # an earlier run in the folder: a fresh run replaces its curves
    capsys.readouterr()
    assert train(5) == 0
    assert len(list((out / "runs").iterdir())) == 1
    records = _metrics(out)
    assert [r["step"] for r in records] == [2, 4, 5]
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    assert lines == [f"step {r['step']}/5: loss {r['loss']:.4f}, lr {r['lr']:.2e}, grad norm {r['grad_norm']:.3f}, "
                     f"{r['tokens_per_s']:.0f} tok/s" for r in records]
    events = EventAccumulator(str(out / "runs"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [
        (r["step"], float(np.float32(r["loss"]))) for r in records]
    assert not [tag for tag in events.Tags()["scalars"] if tag.startswith("routing/")]  # an expert has no gate


def _health(probs, mask=None):
    probs = torch.as_tensor(probs, dtype=torch.float32)
    mask = torch.ones(probs.shape[:2], dtype=torch.long) if mask is None else mask
    return routing_health(probs, mask)


def _even(n_tokens, n_layers, p):
    """(1, n_tokens, n_layers, E): every token and layer mixing by `p`."""
    return torch.tensor(p).expand(1, n_tokens, n_layers, len(p)).clone()


def test_alarms_fire_on_collapsed_and_uniform_gates_and_not_on_a_mixed_one():
    torch.manual_seed(0)
    mixed = torch.softmax(torch.randn(2, 16, 4, 3), -1)
    assert routing_alarms(_health(mixed)) == {}
    # one expert above 90% everywhere
    assert "'expert_0' holds more than 90%" in routing_alarms(_health(_even(16, 4, [0.95, 0.03, 0.02])))["collapse"]
    # sharp per token, balanced over tokens: hard routing (entropy below one bit, capped at half of ln E)
    hard = torch.zeros(1, 16, 4, 2)
    hard[0, ::2, :, 0], hard[0, 1::2, :, 1] = 0.98, 0.98
    hard[hard == 0] = 0.02
    alarms = routing_alarms(_health(hard))
    assert "mixing entropy is below 0.347 nats" in alarms["collapse"] and "uniform" not in alarms
    # a 0.8 / 0.2 split per token is a mix for two experts (entropy 0.50 nats > 0.35)
    assert routing_alarms(_health(_even(8, 2, [0.8, 0.2]))) == {}
    uniform = routing_alarms(_health(_even(8, 3, [1 / 3, 1 / 3, 1 / 3])))
    assert list(uniform) == ["uniform"]
    # padding does not count: collapsed scalings at masked positions leave the mixed health unchanged
    padded = torch.cat([mixed, _even(16, 4, [1.0, 0.0, 0.0]).expand(2, -1, -1, -1)], 1)
    mask = torch.cat([torch.ones(2, 16), torch.zeros(2, 16)], 1).long()
    with_pad, plain = _health(padded, mask), _health(mixed)
    assert with_pad.tokens == plain.tokens == 32 and routing_alarms(with_pad) == {}
    for field in ("entropy", "share", "top1"):
        torch.testing.assert_close(getattr(with_pad, field), getattr(plain, field), rtol=0, atol=0)


def test_routing_health_matches_a_plain_loop_and_reads_raw_scalings_through_a_softmax():
    torch.manual_seed(1)
    logits = torch.randn(3, 7, 5, 4)
    mask = (torch.rand(3, 7) > 0.3).long()
    probs = torch.softmax(logits, -1)
    tally = RoutingTally()
    tally.add(logits[:2], mask[:2], softmaxed=False)  # the classifier's raw scalings (enable_softmax off)
    tally.add(probs[2:], mask[2:], softmaxed=True)
    health = tally.health([f"l{i}" for i in range(5)], list("abcd"))
    entropy, share, top1 = _reference([(probs, mask)])
    assert health.tokens == int(mask.sum())
    torch.testing.assert_close(health.entropy, torch.tensor(entropy, dtype=torch.float64), rtol=1e-6, atol=0)
    torch.testing.assert_close(health.share, torch.tensor(share, dtype=torch.float64), rtol=1e-6, atol=0)
    assert health.top1.tolist() == top1


def test_the_watch_raises_each_alarm_once_and_uniform_only_when_it_stays():
    watch = RoutingWatch()
    uniform, collapsed = _health(_even(4, 2, [0.5, 0.5])), _health(_even(4, 2, [0.99, 0.01]))
    assert watch.update(uniform) == []  # a fresh gate starts near uniform
    assert [m.startswith("the gate is uniform") for m in watch.update(uniform)] == [True]
    assert watch.update(uniform) == []  # said once while it holds
    assert [m.startswith("routing collapse") for m in watch.update(collapsed)] == [True]
    assert watch.update(collapsed) == []
    assert len(watch.update(_health(_even(4, 2, [0.7, 0.3])))) == 0 and len(watch.update(collapsed)) == 1


def test_the_line_is_printed_without_a_bar_or_when_the_bar_goes_to_a_file(monkeypatch):
    import io
    import sys

    from loramix.training.run_logging import console_lines

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(sys, "stderr", Terminal())
    assert (console_lines(progress=True), console_lines(progress=False)) == (False, True)
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # redirected to a file
    assert console_lines(progress=True)


def test_report_to_is_checked_where_it_enters(monkeypatch):
    assert TrainingArgs().report_to == TrainingArgs(report_to="none").report_to == ()
    assert TrainingArgs(report_to="tensorboard, wandb").report_to == ("tensorboard", "wandb")
    assert TrainingArgs(report_to=["wandb", "none"]).report_to == ("wandb",)
    with pytest.raises(ValueError, match="report_to: 'tensorbaord' is not one of tensorboard, wandb, none"):
        TrainingArgs(report_to="tensorbaord")
    with pytest.raises(ValueError, match="report_to: "):
        TrainingArgs(report_to=3)
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else find_spec(name, *a))
    with pytest.raises(ImportError, match=r"report_to 'wandb': the wandb package is not installed \(pip install "
                                          r"'loramix\[wandb\]'\)"):
        loramix.train_xlora("no-such-base", XLoraConfig(adapters={"a": "x"}), "no-such.jsonl", "out",
                            args=TrainingArgs(report_to="wandb"))
