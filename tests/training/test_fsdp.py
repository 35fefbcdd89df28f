"""FSDP (training/fsdp.py) on the CPU: 2 processes over gloo against 1 process on the same global batch.

One torchrun launch (2 processes) trains the gate and the experts with `fsdp=True`, saving a sharded checkpoint
at step 2, then resumes a copy of that checkpoint on the same 2 processes, then trains one PEFT expert sharded
with gradient checkpointing; the one-process references (the same steps with grad_accum 2) and the resume on one
process run in the test's own process.

Tolerance: each sharded gradient is the sum of the two processes' micro-batch gradients, the same two float32
addends the one process accumulates (a + b = b + a exactly), so the weights agree to the last bit except where
the gradient norm for clipping is summed in another order (per shard, then over processes): a relative change of
the norm of ~1e-7, which moves an Adam update by less than 1e-6 over 4 steps. We assert 1e-6.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import save_tiny_model, synthetic_task, tiny_base, write_jsonl
from safetensors.torch import load_file

import loramix
from loramix import XLoraConfig
from loramix.cli import main
from loramix.memory import estimate_memory, read_base_config
from loramix.training.settings import LoraSettings, TrainingArgs

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="torch.distributed with the gloo backend is not available")

TARGETS = ["q_proj", "v_proj", "down_proj"]
STEPS = dict(max_steps=4, save_steps=2, batch_size=4, lr=3e-3, logging_steps=1, progress=False)
DRIVER = """
import os, shutil, sys
import torch
import loramix
from loramix import XLoraConfig
from loramix.training.settings import LoraSettings, TrainingArgs

root, steps = sys.argv[1], {steps!r}
torch.distributed.init_process_group("gloo")  # one group for both runs (each run leaves a group it did not start)
config = XLoraConfig(adapters={{n: os.path.join(root, n) for n in ("e0", "e1")}}, xlora_depth=2, xlora_size=16,
                     use_trainable_adapters=True)
base, data, held_out = (os.path.join(root, name) for name in ("base", "data.jsonl", "eval.jsonl"))
loramix.train_xlora(base, config, data, os.path.join(root, "two"), args=TrainingArgs(**steps, fsdp=True),
                    eval_data=held_out)
if os.environ["RANK"] == "0":  # a run stopped after step 2, resumed on 2 processes
    shutil.copytree(os.path.join(root, "two", "checkpoint-2"), os.path.join(root, "resumed2", "checkpoint-2"))
loramix.train_xlora(base, config, data, os.path.join(root, "resumed2"),
                    args=TrainingArgs(**steps, fsdp=True, resume=True))
loramix.train_expert(base, data, os.path.join(root, "expert2"), lora=LoraSettings(rank=4),
                     args=TrainingArgs(**{{**steps, "save_steps": 1}}, save_total_limit=1, fsdp=True,
                                       gradient_checkpointing=True))
torch.distributed.destroy_process_group()
"""


def _quiet(*_):
    pass


def _config(root) -> XLoraConfig:
    return XLoraConfig(adapters={n: str(root / n) for n in ("e0", "e1")}, xlora_depth=2, xlora_size=16,
                       use_trainable_adapters=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The tiny base, two rank-4 experts, the 2-process runs (torchrun) and the 1-process reference."""
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("fsdp")
    save_tiny_model(root / "base")
    for i, name in enumerate(("e0", "e1")):
        torch.manual_seed(10 + i)
        expert = get_peft_model(tiny_base("llama"), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                                               init_lora_weights=False))
        expert.save_pretrained(str(root / name))
    write_jsonl(root / "data.jsonl", synthetic_task("rev", 24, 0) + synthetic_task("sum", 24, 0))
    write_jsonl(root / "eval.jsonl", synthetic_task("rev", 5, 1) + synthetic_task("sum", 5, 1))  # 3 batches of 4
    (root / "driver.py").write_text(textwrap.dedent(DRIVER.format(steps=STEPS)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launch = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(root / "driver.py"), str(root)], env=env, capture_output=True, text=True)
    assert launch.returncode == 0, launch.stderr[-4000:]
    loramix.train_xlora(str(root / "base"), _config(root), str(root / "data.jsonl"), str(root / "one"),
                        args=TrainingArgs(**STEPS, grad_accum=2), eval_data=str(root / "eval.jsonl"), log=_quiet)
    return root


def _final(folder) -> dict[str, torch.Tensor]:
    """The saved classifier and experts of a run, by file and tensor name."""
    tensors = {}
    for name in ("xlora_classifier.safetensors", "e0/adapter_model.safetensors", "e1/adapter_model.safetensors"):
        for key, value in load_file(str(folder / name)).items():
            tensors[f"{name}:{key}"] = value
    return tensors


def _assert_close(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)


def _losses(folder) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in map(json.loads, open(folder / "metrics.jsonl")) if "loss" in r]


def _final_metrics(folder) -> dict:
    return json.loads((folder / "final_metrics.jsonl").read_text().splitlines()[0])


def test_two_sharded_processes_train_the_weights_of_one_process(runs):
    assert json.loads((runs / "two" / "training_args.json").read_text())["world_size"] == 2
    shards = sorted(os.listdir(runs / "two" / "checkpoint-2" / "sharded"))
    assert len(shards) == 2 and all(s.endswith(".safetensors") for s in shards)  # one file per process
    _assert_close(_final(runs / "one"), _final(runs / "two"))
    for (s1, l1), (s2, l2) in zip(_losses(runs / "one"), _losses(runs / "two"), strict=True):
        assert s1 == s2 and abs(l1 - l2) < 1e-6
    # the held-out loss: 3 batches over 2 processes (one runs a repeated batch, not counted, to keep FSDP in step)
    assert abs(_final_metrics(runs / "one")["eval_loss"] - _final_metrics(runs / "two")["eval_loss"]) < 1e-6
    trained, original = _final(runs / "two"), load_file(str(runs / "e0" / "adapter_model.safetensors"))
    assert any((trained[f"e0/adapter_model.safetensors:{k}"] - v).abs().max() > 1e-4 for k, v in original.items())


def test_an_expert_trains_sharded_with_checkpointing_as_in_one_process(runs, tmp_path):
    args = TrainingArgs(**{**STEPS, "save_steps": None}, grad_accum=2, gradient_checkpointing=True)
    loramix.train_expert(str(runs / "base"), str(runs / "data.jsonl"), str(tmp_path / "expert1"),
                         lora=LoraSettings(rank=4), args=args, log=_quiet)
    one = load_file(str(tmp_path / "expert1" / "adapter_model.safetensors"))
    _assert_close(one, load_file(str(runs / "expert2" / "adapter_model.safetensors")))


def _one_row_each(model: torch.nn.Module) -> int:
    """Bytes of one first-dimension row of every parameter: how much more than 1/N a process may hold (FSDP2 gives
    each process ceil(rows / N) rows of every tensor, the last process what remains)."""
    return sum(p[0].numel() * p.element_size() if p.dim() else p.element_size() for p in model.parameters())


def test_each_process_holds_half_the_parameters_as_the_memory_estimate_says(runs, capsys):
    whole = _final_metrics(runs / "one")["parameter_bytes_per_process"]
    shares = _final_metrics(runs / "two")["parameter_bytes_per_process"]
    assert len(whole) == 1 and len(shares) == 2 and sum(shares) == whole[0]  # every byte in exactly one shard
    margin = _one_row_each(loramix.XLoraModel.from_base(str(runs / "base"), _config(runs)))
    assert max(shares) <= whole[0] / 2 + margin, (shares, whole, margin)
    assert max(shares) < 0.55 * whole[0]  # here the margin (one row of 32-64 floats per tensor) is 3% of the model
    # loramix memory --fsdp 2: one process's share of weights, experts and the classifier
    estimate = estimate_memory(read_base_config(str(runs / "base")), 2, 4, dtype=torch.float32,
                               target_modules=TARGETS, xlora_depth=2, xlora_size=16, layerwise=False)
    assert estimate.base_weights + estimate.experts + estimate.classifier == whole[0]
    assert abs(estimate.sharded_weights(2) - max(shares)) <= margin
    assert main(["memory", "--base", str(runs / "base"), "--experts", "2", "--rank", "4", "--dtype", "float32",
                 "--target-modules", ",".join(TARGETS), "--xlora-depth", "2", "--xlora-size", "16",
                 "--broadcast-scalings", "--fsdp", "2"]) == 0
    shown = f"{estimate.sharded_weights(2) / 2**20:.1f} MiB"
    assert any(line.startswith("FSDP over 2: weights") and line.endswith(shown)
               for line in capsys.readouterr().out.splitlines())


def test_a_sharded_checkpoint_resumes_on_two_processes_and_on_one(runs, tmp_path):
    _assert_close(_final(runs / "two"), _final(runs / "resumed2"))
    assert [s for s, _ in _losses(runs / "resumed2")] == [3, 4]  # it did start from step 2
    resumed1 = tmp_path / "resumed1"
    shutil.copytree(runs / "two" / "checkpoint-2", resumed1 / "checkpoint-2")
    messages = []
    loramix.train_xlora(str(runs / "base"), _config(runs), str(runs / "data.jsonl"), str(resumed1),
                        args=TrainingArgs(**STEPS, grad_accum=2, resume=True), log=messages.append)
    assert any(f"resuming from {resumed1 / 'checkpoint-2'}" in m for m in messages), messages
    assert [s for s, _ in _losses(resumed1)] == [3, 4]
    _assert_close(_final(runs / "two"), _final(resumed1))


def test_a_cut_shard_is_named_and_not_loaded(runs, tmp_path):
    out = tmp_path / "cut"
    shutil.copytree(runs / "two" / "checkpoint-2", out / "checkpoint-2")
    shard = sorted((out / "checkpoint-2" / "sharded").iterdir())[-1]
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(ValueError, match="no intact checkpoint.*sharded"):
        loramix.train_xlora(str(runs / "base"), _config(runs), str(runs / "data.jsonl"), str(out),
                            args=TrainingArgs(**STEPS, grad_accum=2, resume=True), log=_quiet)


def test_sharded_checkpoints_beyond_the_limit_are_removed(runs):
    """The sharded expert run saved after steps 1, 2 and 3 with save_total_limit 1: the newest alone is kept."""
    kept = sorted(name for name in os.listdir(runs / "expert2") if name.startswith("checkpoint-"))
    assert kept == ["checkpoint-3"]
    assert os.listdir(runs / "expert2" / "checkpoint-3" / "sharded")


def test_fsdp_settings_are_checked_and_one_process_is_not_sharded():
    with pytest.raises(ValueError, match="fsdp: fp16"):
        TrainingArgs(fsdp=True, mixed_precision="fp16")
    with pytest.raises(ValueError, match="fsdp: must be true or false"):
        TrainingArgs(fsdp="yes")
    from loramix.training.distributed import Distributed

    assert not Distributed().shards(True)  # nothing to shard over
