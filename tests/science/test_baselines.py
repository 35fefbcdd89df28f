"""science/baselines.py: PEFT's linear and cat merges equal the weight deltas merged by hand, and Arrow over a
single expert equals that expert alone."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from helpers import tiny_base
from peft import LoraConfig, get_peft_model

from loramix.science.baselines import arrow_router, static_merge

TARGETS = ["q_proj", "v_proj"]


def _experts(base, folder, specs):
    """Two saved PEFT experts with random A and B: specs = [(rank, alpha), ...]."""
    dirs = {}
    for i, (rank, alpha) in enumerate(specs):
        torch.manual_seed(10 + i)
        model = get_peft_model(copy.deepcopy(base), LoraConfig(r=rank, lora_alpha=alpha, target_modules=TARGETS,
                                                              init_lora_weights=False))
        model.save_pretrained(str(folder / f"e{i}"))
        dirs[f"e{i}"] = str(folder / f"e{i}")
    return dirs


def _factors(folder, module):
    from safetensors.torch import load_file

    weights = load_file(f"{folder}/adapter_model.safetensors")
    a = next(v for k, v in weights.items() if k.endswith(f"{module}.lora_A.weight"))
    b = next(v for k, v in weights.items() if k.endswith(f"{module}.lora_B.weight"))
    return a, b


def _hand_merged(base, dirs, specs, method):
    """The base with W + delta per target: linear (B_sum A_sum, each factor weighted sqrt(w s)), cat (sum w s B A)."""
    merged = copy.deepcopy(base)
    w = 1.0 / len(dirs)
    for name, module in merged.named_modules():
        if name.split(".")[-1] not in TARGETS:
            continue
        key = ".".join(name.split(".")[-3:])  # layers.N.self_attn.q_proj -> N.self_attn.q_proj
        factors = [(_factors(d, key), alpha / rank) for d, (rank, alpha) in zip(dirs.values(), specs)]
        if method == "linear":
            a = sum(math.sqrt(w * s) * a for (a, _), s in factors)
            b = sum(math.sqrt(w * s) * b for (_, b), s in factors)
            delta = b @ a
        else:
            delta = sum(w * s * (b @ a) for (a, b), s in factors)
        with torch.no_grad():
            module.weight += delta
    return merged


@pytest.mark.parametrize("method,specs", [("linear", [(4, 8), (4, 4)]), ("cat", [(4, 8), (2, 6)])])
def test_static_merge_equals_the_hand_merged_delta(tmp_path, method, specs):
    base = tiny_base("llama")
    dirs = _experts(base, tmp_path, specs)
    ids = torch.tensor([[1, 5, 9, 14, 3, 40, 22]])
    with torch.no_grad():
        ours = static_merge(copy.deepcopy(base), dirs, method)(input_ids=ids).logits
        hand = _hand_merged(base, dirs, specs, method)(input_ids=ids).logits
        plain = base(input_ids=ids).logits
    assert torch.allclose(ours, hand, atol=1e-5)
    assert not torch.allclose(ours, plain, atol=1e-3)  # the merge changes the output


def test_static_merge_errors_name_the_problem(tmp_path):
    base = tiny_base("llama")
    with pytest.raises(ValueError, match="method 'mean'"):
        static_merge(base, {"a": str(tmp_path)}, "mean")
    with pytest.raises(FileNotFoundError, match="expert 'a'"):
        static_merge(base, {"a": str(tmp_path)}, "cat")
    dirs = _experts(base, tmp_path, [(4, 8), (2, 4)])
    with pytest.raises(ValueError, match="static_merge 'linear'"):
        static_merge(copy.deepcopy(base), dirs, "linear")  # unequal ranks


def test_arrow_over_one_expert_is_that_expert(tmp_path):
    from peft import PeftModel

    base = tiny_base("llama")
    dirs = _experts(base, tmp_path, [(4, 8)])
    ids = torch.tensor([[1, 5, 9, 14, 3, 40, 22]])
    with torch.no_grad():
        arrow = arrow_router(copy.deepcopy(base), dirs, top_k=1)(input_ids=ids).logits
        alone = PeftModel.from_pretrained(copy.deepcopy(base), dirs["e0"])(input_ids=ids).logits
    assert torch.allclose(arrow, alone, atol=1e-5)
