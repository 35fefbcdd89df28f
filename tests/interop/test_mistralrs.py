"""The mistral.rs layout: written by `export --to mistralrs`, read back by `from_pretrained`, refused where mistral.rs
cannot represent the model, and run by mistral.rs itself when installed."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from helpers import make_experts, tiny_base, tiny_tokenizer

from loramix import XLoraConfig, XLoraModel
from loramix.interop.export import export


def test_mistralrs_layout_round_trips_through_from_pretrained(tmp_path, ids):
    base = tiny_base("llama")
    adapters = make_experts(base, "llama", tmp_path / "experts")
    adapters.pop("expert_1")  # it adapts embed_tokens, which mistral.rs cannot (next test)
    config = XLoraConfig(adapters=adapters, layerwise_scalings=True, xlora_depth=3, xlora_size=32, top_k_lora=1)
    model = XLoraModel.from_base(copy.deepcopy(base), config)
    folder = tmp_path / "mistralrs"
    export(model, "mistralrs", str(folder), tokenizer=tiny_tokenizer())
    files = sorted(p.name for p in folder.iterdir())
    assert files == ["base", "expert_0.adapter_config.json", "expert_0.adapter_model.safetensors",
                     "expert_2.adapter_config.json", "expert_2.adapter_model.safetensors",
                     "xlora_classifier.safetensors", "xlora_config.json", "xlora_ordering.json"]
    ordering = json.loads((folder / "xlora_ordering.json").read_text())
    assert ordering["layers"] == {n: i for i, n in enumerate(model.lora_layer_names)}
    assert ordering["base_model_id"] == json.loads((folder / "xlora_config.json").read_text())["base_model_id"]
    base_config = json.loads((folder / "base" / "config.json").read_text())
    assert base_config["rope_theta"] == base.config.rope_parameters["rope_theta"]
    adapter_configs = [json.loads((folder / f"expert_{i}.adapter_config.json").read_text()) for i in (0, 2)]
    assert adapter_configs[0]["target_modules"] == adapter_configs[1]["target_modules"]  # mistral.rs insists
    again = XLoraModel.from_pretrained(str(folder))
    assert again.lora_layer_names == model.lora_layer_names and again.expert_names == model.expert_names
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5, rtol=1e-5)


def test_mistralrs_export_refuses_what_it_cannot_represent(tmp_path):
    base = tiny_base("llama")
    adapters = make_experts(base, "llama", tmp_path / "experts", 2)
    model = XLoraModel.from_base(copy.deepcopy(base), XLoraConfig(adapters=adapters))
    with pytest.raises(ValueError, match="'model.embed_tokens': mistral.rs's X-LoRA adapts only Linear layers"):
        export(model, "mistralrs", str(tmp_path / "a"))
    narrow = XLoraModel.from_base(copy.deepcopy(base), XLoraConfig(adapters={"e": adapters["expert_0"]},
                                                                  xlora_depth=2, xlora_size=16))
    with pytest.raises(ValueError, match="xlora_size: mistral.rs 0.9.5 .* needs xlora_size == hidden_size, not 16"):
        export(narrow, "mistralrs", str(tmp_path / "c"))
    clash = {"math": adapters["expert_0"], "math2": adapters["expert_0"]}
    model = XLoraModel.from_base(copy.deepcopy(base), XLoraConfig(adapters=clash))
    with pytest.raises(ValueError, match="mistral.rs would read 'math2.adapter_config.json' as expert 'math'"):
        export(model, "mistralrs", str(tmp_path / "b"))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_mistralrs_generates_loramix_greedy_tokens(tmp_path):
    """mistral.rs 0.9.5 (PyPI, CPU) on the exported folder: the same greedy tokens after a one-token prompt (its
    CPU X-LoRA Llama fails on longer prompts)."""
    pytest.importorskip("mistralrs")
    import importlib.util
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("MISTRALRS_CPU_KV_F32", "1")
    path = os.path.join(os.path.dirname(__file__), "..", "..", "scripts", "check_mistralrs.py")
    spec = importlib.util.spec_from_file_location("check_mistralrs", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    ours, theirs = script.compare_greedy(str(tmp_path / "simple"), tokens=24)  # issue 14's model
    assert len(ours) >= 8  # 24, or fewer when the end-of-sequence token comes first (in both engines)
    assert theirs == ours
    # experts of different ranks, targets, rsLoRA and patterns (padded to one rank per expert), a 3-layer gate
    # (renumbered hidden Linears, dropout written as 0), top-k and a global weight
    experts = [(4, 8, ["q_proj", "v_proj"], {}),
               (6, 4, ["o_proj", "gate_proj", "up_proj", "v_proj"],
                {"rank_pattern": {"up_proj": 2}, "alpha_pattern": {"o_proj": 12}, "use_rslora": True})]
    ours, theirs = script.compare_greedy(str(tmp_path / "hard"), tokens=24, experts=experts, xlora_depth=3,
                                         xlora_size=64, top_k_lora=1, global_scaling_weight=0.8)
    assert theirs == ours


@pytest.mark.parametrize("eos_outside", [False, True])
def test_byte_level_tokenizer_round_trips_through_its_saved_json(eos_outside, tmp_path):
    """The tokenizer the mistral.rs check and benchmark write beside an export: one id per byte-level character,
    text back exactly after a save and reload from tokenizer.json, `</s>` where asked, the pass-through template."""
    from transformers import AutoTokenizer

    from loramix.tiny import byte_level_tokenizer

    tokenizer = byte_level_tokenizer(300, eos_outside=eos_outside)
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    text = "foldA=12"
    ids = loaded(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text) and max(ids) < 300
    assert loaded.decode(ids) == text
    assert loaded(" ", add_special_tokens=False)["input_ids"] == [0]  # no byte-level mapping: a space is unknown
    assert loaded.eos_token_id == (300 if eos_outside else 2) and loaded.pad_token_id == 0
    chat = loaded.apply_chat_template([{"role": "user", "content": "ab"}, {"role": "assistant", "content": "c"}],
                                      tokenize=False)
    assert chat == "abc"
    with pytest.raises(ValueError, match="vocab_size"):
        byte_level_tokenizer(2, eos_outside=eos_outside)
