"""Export: a PEFT adapter and a merged model equal to the X-LoRA with fixed scalings (mistral.rs: test_mistralrs.py)."""

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
