"""The CUDA paths, run with `pytest -m gpu` on a machine with a GPU (skipped, with the reason, without one):
bfloat16 against float32, the dual-KV-cache generation against a no-cache loop, a 4-bit base, FSDP over NCCL.

Each compares with a reference computed in the same test: float32 on the CPU, greedy decoding that re-runs the
whole sequence at every token, the unsharded model on the same device.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import VOCAB, make_experts, tiny_base

from loramix import XLoraConfig, XLoraModel

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(),
                                 reason="no CUDA device: these tests run the GPU paths (pytest -m gpu on a GPU)")]


def _model(tmp_path, dtype=torch.float32, device="cuda", **placement) -> XLoraModel:
    base = tiny_base("llama")
    adapters = make_experts(base, "llama", tmp_path)
    torch.manual_seed(0)
    config = XLoraConfig(adapters=adapters, xlora_depth=2, xlora_size=32, layerwise_scalings=True)
    if placement:  # loaded by name (quantization needs a folder)
        base.save_pretrained(str(tmp_path / "base"))
        return XLoraModel.from_base(str(tmp_path / "base"), config, dtype=dtype, device=device, **placement)
    model = XLoraModel.from_base(copy.deepcopy(base).to(dtype), config, device=device)
    return model


def _greedy_without_cache(model, ids: torch.Tensor, n: int) -> torch.Tensor:
    """The reference decoder: the whole sequence through both passes for every new token."""
    with torch.no_grad():
        for _ in range(n):
            ids = torch.cat([ids, model(input_ids=ids).logits[:, -1:].argmax(-1)], 1)
    return ids


def test_bf16_on_the_gpu_tracks_float32_on_the_cpu(tmp_path):
    ids = torch.randint(3, VOCAB, (2, 24), generator=torch.Generator().manual_seed(0))
    reference = _model(tmp_path, torch.float32, "cpu")
    fp32 = _model(tmp_path, torch.float32, "cuda")
    bf16 = _model(tmp_path, torch.bfloat16, "cuda")
    with torch.no_grad():
        want = reference(input_ids=ids).logits
        got32 = fp32(input_ids=ids.cuda()).logits.float().cpu()
        got16 = bf16(input_ids=ids.cuda()).logits.float().cpu()
    torch.testing.assert_close(got32, want, rtol=1e-4, atol=1e-4)  # float32 on both (TF32 off by default)
    # bfloat16 keeps 8 bits of mantissa (relative step 2^-8 = 0.4%); through 2 layers and the head of a tiny model
    # the logits stay within 3% of their range, and the greedy choice agrees at nearly every position
    assert (got16 - want).abs().max() <= 0.03 * want.abs().max()
    assert (got16.argmax(-1) == want.argmax(-1)).float().mean() >= 0.9


def test_dual_cache_generation_on_the_gpu_equals_the_no_cache_loop(tmp_path):
    model = _model(tmp_path, torch.float32, "cuda")
    ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1)).cuda()
    out = model.generate(input_ids=ids, max_new_tokens=12, min_new_tokens=12, eos_token_id=None)
    assert torch.equal(out, _greedy_without_cache(model, ids, 12))


def test_a_4bit_base_generates_as_its_own_no_cache_loop(tmp_path):
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed")
    model = _model(tmp_path, torch.float16, "cuda", quantization="4bit")
    full = _model(tmp_path, torch.float16, "cuda")
    ids = torch.randint(3, VOCAB, (1, 12), generator=torch.Generator().manual_seed(2)).cuda()
    out = model.generate(input_ids=ids, max_new_tokens=8, min_new_tokens=8, eos_token_id=None)
    assert torch.equal(out, _greedy_without_cache(model, ids, 8))
    with torch.no_grad():  # 4-bit NF4 weights: the logits move by a few percent of their range, not more
        a, b = model(input_ids=ids).logits.float(), full(input_ids=ids).logits.float()
    assert (a - b).abs().max() <= 0.15 * b.abs().max()


DRIVER = """
import json, os, sys
import torch
sys.path.insert(0, {tests!r})
from helpers import VOCAB
from loramix import XLoraConfig, XLoraModel
from loramix.losses import causal_lm_loss
from loramix.training.fsdp import clip_grad_norm, full_parameters, local_bytes, saved_by_task, shard_model
from torch.distributed.device_mesh import init_device_mesh

torch.distributed.init_process_group("nccl")
rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
torch.cuda.set_device(rank)
root = sys.argv[1]
config = XLoraConfig(adapters=json.load(open(os.path.join(root, "adapters.json"))), xlora_depth=2, xlora_size=32,
                     xlora_dropout_p=0.0, use_trainable_adapters=True)


def build():
    torch.manual_seed(0)
    return XLoraModel.from_base(os.path.join(root, "base"), config, device="cpu").train()


def train(model, rows):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    g = torch.Generator().manual_seed(3)
    for _ in range(3):
        ids = torch.randint(3, VOCAB, (2 * world, 16), generator=g)[rows].cuda()
        (causal_lm_loss(model(input_ids=ids).logits, ids, reduction="sum") / (2 * world * 15)).backward()
        clip_grad_norm([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad()


sharded = build()
whole = local_bytes(sharded)
shard_model(sharded, init_device_mesh("cuda", (world,)), bf16=False)
train(sharded, slice(rank, None, world))
with full_parameters(sharded, saved_by_task):
    got = {{n: p.detach().float().cpu() for n, p in sharded.named_parameters() if p.requires_grad}}
if rank == 0:
    plain = build().cuda()
    train(plain, slice(None))
    want = {{n: p.detach().float().cpu() for n, p in plain.named_parameters() if p.requires_grad}}
    diff = max(float((got[n] - want[n]).abs().max()) for n in want)
    json.dump({{"world": world, "max_diff": diff, "whole": whole, "shard": local_bytes(sharded)}},
              open(os.path.join(root, "result.json"), "w"))
torch.distributed.destroy_process_group()
"""


def test_fsdp_over_nccl_trains_the_unsharded_weights(tmp_path):
    if not torch.distributed.is_nccl_available():
        pytest.skip("torch.distributed has no NCCL backend")
    base = tiny_base("llama")
    base.save_pretrained(str(tmp_path / "base"))
    (tmp_path / "adapters.json").write_text(json.dumps(make_experts(base, "llama", tmp_path)))
    (tmp_path / "driver.py").write_text(textwrap.dedent(DRIVER.format(tests=os.path.dirname(os.path.dirname(
        os.path.abspath(__file__))))))
    world = min(torch.cuda.device_count(), 2)  # one GPU: a one-process mesh still runs FSDP's NCCL collectives
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                           str(world), str(tmp_path / "driver.py"), str(tmp_path)], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["world"] == world
    # float32: the reference runs all rows in one forward (other matmul shapes, other rounding), the norm for
    # clipping is summed per shard; 3 Adam steps of lr 1e-2 (each moves a weight by up to 1e-2) keep the two within
    # 1e-4 (4.9e-6 measured with this driver on the CPU over gloo, 2 processes)
    assert result["max_diff"] < 1e-4, result
    assert result["shard"] <= result["whole"] / world + 8192, result  # one row of each tensor at most
