"""loramix.memory against the real objects: parameter bytes of the built models, the KV caches' tensors after a
cached prefill, the stacked experts and the classifier of an XLoraModel; `loramix memory` end to end.
(Peak RSS against the estimate is checked by benchmarks/check_memory.py: its processes take minutes.)"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import VOCAB, make_experts, tiny_base

from loramix import XLoraConfig, XLoraModel
from loramix.cli import main
from loramix.memory import estimate_memory, read_base_config


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def cache_bytes(cache) -> int:
    return tensor_bytes(t for layer in cache.layers for t in (layer.keys, layer.values))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_estimate_equals_the_built_model(tmp_path, dtype):
    base = tiny_base("llama").to(dtype)
    adapters = make_experts(tiny_base("llama"), "llama", tmp_path, n=1)  # rank 4 on q_proj and v_proj
    model = XLoraModel.from_base(copy.deepcopy(base), XLoraConfig(adapters=adapters, xlora_depth=2, xlora_size=16,
                                                                  layerwise_scalings=True))
    batch, context = 2, 9
    estimate = estimate_memory(base.config, 1, 4, dtype=dtype, batch=batch, context=context,
                               target_modules=["q_proj", "v_proj"], xlora_depth=2, xlora_size=16)
    assert estimate.base_weights == tensor_bytes(base.parameters())
    assert estimate.experts == tensor_bytes(p for layer in model.mixed_layers() for p in (layer.lora_A, layer.lora_B))
    assert estimate.classifier == tensor_bytes(model.classifier.parameters())
    ids = torch.randint(3, VOCAB, (batch, context))
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True)
    assert estimate.kv_caches == cache_bytes(out.past_key_values) + cache_bytes(out.scaling_past_key_values)


def test_quantized_weights_equal_bitsandbytes_storage(tmp_path):
    bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    LlamaForCausalLM(config).save_pretrained(str(tmp_path))
    for bits, q in ((4, BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)),
                    (8, BitsAndBytesConfig(load_in_8bit=True))):
        model = AutoModelForCausalLM.from_pretrained(str(tmp_path), quantization_config=q, dtype=torch.float32)
        stored = tensor_bytes(model.parameters())
        for m in model.modules():  # the per-block (4-bit) or per-row (8-bit) float32 scales
            if isinstance(m, bnb.nn.Linear4bit):
                stored += tensor_bytes([m.weight.quant_state.absmax])
            elif isinstance(m, bnb.nn.Linear8bitLt):
                stored += tensor_bytes([m.weight.SCB])
        estimate = estimate_memory(config, 1, 4, dtype=torch.float32, quantization=f"{bits}bit")
        assert estimate.base_weights == stored, bits


def test_activations_scale_with_tokens_and_checkpointing_keeps_less():
    config = tiny_base("llama").config
    one = estimate_memory(config, 3, 8, batch=1, context=64)
    four = estimate_memory(config, 3, 8, batch=2, context=128)
    assert four.activations == 4 * one.activations and four.kv_caches == 4 * one.kv_caches
    assert one.activations_checkpointed < one.activations


def test_bad_input_names_the_field(tmp_path):
    config = tiny_base("llama").config
    with pytest.raises(ValueError, match="quantization"):
        estimate_memory(config, 3, 8, quantization="3bit")
    with pytest.raises(ValueError, match="target_modules"):
        estimate_memory(config, 3, 8, target_modules=["nope"])
    with pytest.raises(ValueError, match="rank"):
        estimate_memory(config, 3, 0)
    with pytest.raises(FileNotFoundError, match="config.json"):
        read_base_config(str(tmp_path))


def test_cli_memory_reads_only_the_config(tmp_path, capsys):
    tiny_base("llama").config.save_pretrained(str(tmp_path))  # a folder with config.json and no weights
    assert main(["memory", "--base", str(tmp_path / "config.json"), "--experts", "9", "--rank", "16",
                 "--dtype", "float32", "--batch", "2", "--context", "64"]) == 0
    printed = capsys.readouterr().out
    estimate = estimate_memory(tiny_base("llama").config, 9, 16, dtype=torch.float32, batch=2, context=64)
    kv_line = next(line for line in printed.splitlines() if line.startswith("two KV caches (batch 2, context 64)"))
    assert kv_line.split()[-2] == f"{estimate.kv_caches / 2**20:.1f}"
    assert "stacked experts (9 x rank 16 on 14 modules)" in printed
    assert main(["memory", "--base", str(tmp_path / "missing"), "--experts", "9", "--rank", "16"]) == 2
