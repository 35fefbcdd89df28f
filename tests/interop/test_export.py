"""Export: a PEFT adapter and a merged model equal to the X-LoRA with fixed scalings; the mistral.rs layout and back."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from helpers import (
    make_experts,
    save_tiny_model,
    tiny_base,
    tiny_tokenizer,
    write_jsonl,
)
from peft import PeftModel
from transformers import AutoModelForCausalLM

from loramix import XLoraConfig, XLoraModel
from loramix.interop.export import export, mean_gate_scalings, scalings_from_json
from loramix.training.data import DataFormat, tokenize_row

CASES = [  # (arch, X-LoRA config): top-k with a global weight, softmax over the kept experts, dense GPT-2
    ("llama", dict(layerwise_scalings=True, top_k_lora=2, global_scaling_weight=0.7)),
    ("llama", dict(enable_softmax=False, enable_softmax_topk=True, top_k_lora=2)),
    ("gpt2", dict()),
]


def xlora(arch, tmp_path, n_experts=None, **config):
    base = tiny_base(arch)
    adapters = make_experts(base, arch, tmp_path / "experts", n_experts)
    return base, XLoraModel.from_base(copy.deepcopy(base), XLoraConfig(adapters=adapters, **config))


def fixed_logits(model, scalings, ids):
    with torch.no_grad():
        return model(input_ids=ids, scalings=scalings[None, None]).logits


@pytest.mark.parametrize("arch,config", CASES)
def test_peft_export_equals_fixed_scalings(arch, config, tmp_path, ids):
    base, model = xlora(arch, tmp_path, **config)
    torch.manual_seed(3)
    scalings = torch.rand(model.n_lora_layers, model.n_experts)
    export(model, "peft", str(tmp_path / "peft"), scalings)
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "peft")).eval()
    with torch.no_grad():
        theirs = peft_model(input_ids=ids).logits
    ours = fixed_logits(model, scalings, ids)
    assert (ours - base(input_ids=ids).logits).abs().max() > 1e-2  # the experts move the logits
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)
    saved = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert sorted(saved["target_modules"]) == sorted(model.lora_layer_names)
    for layer in model.mixed_layers():  # rank = the sum of the ranks of the experts adapting the layer
        name = model.lora_layer_names[layer.layer_index]
        expected = sum(hi - lo for lo, hi in (s for s in layer.rank_slices if s is not None))
        assert saved["rank_pattern"][name.replace(".", "\\.")] == expected


@pytest.mark.parametrize("arch,config", CASES[:1] + CASES[2:])
def test_merged_export_loads_in_transformers(arch, config, tmp_path, ids):
    # GPT-2 ties wte to the LM head: its third expert (on wte) cannot be merged, see the next test
    _, model = xlora(arch, tmp_path, n_experts=2 if arch == "gpt2" else None, **config)
    scalings = torch.rand(model.n_lora_layers, model.n_experts, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    export(model, "merged", str(tmp_path / "merged"), scalings, tokenizer=tiny_tokenizer())
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")).eval()
    with torch.no_grad():
        theirs = merged(input_ids=ids).logits
    torch.testing.assert_close(theirs, fixed_logits(model, scalings, ids), atol=1e-4, rtol=1e-4)
    assert (tmp_path / "merged" / "tokenizer.json").is_file()
    with torch.no_grad():  # the X-LoRA is restored after the export
        assert torch.equal(model(input_ids=ids).logits, before)


def test_merged_export_refuses_a_tied_adapted_embedding(tmp_path):
    _, model = xlora("gpt2", tmp_path)
    with pytest.raises(ValueError, match="'transformer.wte': the base ties its input and output embeddings"):
        export(model, "merged", str(tmp_path / "merged"))
    assert not (tmp_path / "merged").exists()


def test_weights_json_forms_and_errors(tmp_path):
    _, model = xlora("llama", tmp_path)
    names, layers = model.expert_names, model.lora_layer_names
    per_expert = tmp_path / "w1.json"
    per_expert.write_text(json.dumps({n: i + 1.0 for i, n in enumerate(names)}))
    assert torch.equal(scalings_from_json(model, str(per_expert)),
                       torch.tensor([[1.0, 2.0, 3.0]]).expand(len(layers), 3))
    per_layer = tmp_path / "w2.json"
    per_layer.write_text(json.dumps({layer: [float(i), 0.0, 1.0] for i, layer in enumerate(layers)}))
    got = scalings_from_json(model, str(per_layer))
    assert got[:, 0].tolist() == [float(i) for i in range(len(layers))]
    bad = tmp_path / "w3.json"
    bad.write_text(json.dumps({"expert_0": 1.0, "nobody": 2.0}))
    with pytest.raises(ValueError, match=r"w3.json: the top level names experts"):
        scalings_from_json(model, str(bad))
    bad.write_text(json.dumps({layers[0]: [1.0, 2.0, 3.0]}))
    with pytest.raises(ValueError, match="every LoRA layer"):
        scalings_from_json(model, str(bad))
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("")
    with pytest.raises(FileExistsError, match="taken: exists"):
        export(model, "peft", str(tmp_path / "taken"))


def test_from_data_is_the_mean_gate_scalings_over_tokens(tmp_path):
    _, model = xlora("llama", tmp_path, layerwise_scalings=True)
    tokenizer = tiny_tokenizer()
    rows = [{"prompt": "ab", "completion": "cde"}, {"prompt": "hello ", "completion": "world"}]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    got = mean_gate_scalings(model, tokenizer, [data], batch_size=2, log=lambda *_: None)
    per_token = []  # reference: one row at a time (the training tokenization), no padding
    for row in rows:
        ids = torch.tensor([tokenize_row(row, DataFormat(), tokenizer).input_ids])
        with torch.no_grad():
            per_token.append(model.compute_scalings(input_ids=ids)[0][0])  # (t, L, E)
    torch.testing.assert_close(got, torch.cat(per_token).mean(0), atol=1e-6, rtol=1e-6)


# ---- mistral.rs ------------------------------------------------------------------------------------------------
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
    assert json.loads((folder / "base" / "config.json").read_text())["rope_theta"] == base.config.rope_parameters["rope_theta"]
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


def test_cli_export_from_data_writes_a_peft_adapter(tmp_path, ids):
    from loramix.cli import main

    base_dir = save_tiny_model(tmp_path / "base")
    base = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    adapters = make_experts(base, "llama", tmp_path / "experts")
    model = XLoraModel.from_base(base_dir, XLoraConfig(adapters=adapters, layerwise_scalings=True))
    model.save_pretrained(str(tmp_path / "ck"))
    data = write_jsonl(tmp_path / "d.jsonl", [{"q": "ab", "a": "cd"}, {"q": "xyz", "a": "w"}])
    out = tmp_path / "peft"
    assert main(["export", "--model", str(tmp_path / "ck"), "--to", "peft", "--output", str(out),
                 "--from-data", data, "--prompt-field", "q", "--completion-field", "a"]) == 0
    scalings = mean_gate_scalings(model, tiny_tokenizer(), [data], DataFormat(prompt_field="q", completion_field="a"))
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), str(out)).eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(input_ids=ids).logits, fixed_logits(model, scalings, ids),
                                   atol=1e-5, rtol=1e-5)
    assert main(["export", "--model", str(tmp_path / "ck"), "--to", "peft", "--output", str(out)]) == 2  # not new


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
