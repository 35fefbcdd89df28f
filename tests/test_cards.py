"""Model cards (loramix.cards) read back with huggingface_hub's own ModelCard and checked against the real saved
configs, and the tokenizer saved beside the model."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from helpers import make_experts, save_tiny_model, synthetic_task, tiny_base, tiny_tokenizer, tiny_xlora, write_jsonl

from loramix import XLoraConfig, XLoraModel
from loramix.cards import TrainingRecord, data_name, hub_model_id
from loramix.cli import main


def _card(folder):
    from huggingface_hub import ModelCard

    return ModelCard.load(os.path.join(str(folder), "README.md"))


def _adapter_config(folder) -> dict:
    with open(os.path.join(str(folder), "adapter_config.json"), encoding="utf-8") as f:
        return json.load(f)


def _check_experts(listed: list[dict], names: list[str], folders: list) -> None:
    """The card's `experts` against each expert's saved adapter config: rank (the largest of r and rank_pattern),
    alpha and target modules."""
    assert [e["name"] for e in listed] == names
    for entry, folder in zip(listed, folders):
        saved = _adapter_config(folder)
        assert entry["rank"] == max([saved["r"], *saved.get("rank_pattern", {}).values()])
        assert entry["lora_alpha"] == saved["lora_alpha"]
        assert entry["target_modules"] == sorted({t.rsplit(".", 1)[-1] for t in saved["target_modules"]})


def test_xlora_card_lists_the_saved_config(tmp_path):
    _, adapters, model = tiny_xlora("llama", tmp_path, xlora_depth=2, xlora_size=8, layerwise_scalings=True,
                                    top_k_lora=2)
    model.base_model_id = "someone/tiny-base"  # a hub id: the card's base_model
    write_jsonl(tmp_path / "rev.jsonl", synthetic_task("rev", 3, 0))
    training = TrainingRecord(data=(str(tmp_path / "rev.jsonl"), "someone/sums:train"),
                              eval_data=(str(tmp_path / "rev.jsonl"),),
                              metrics={"eval_loss": 1.5, "eval_perplexity": math.exp(1.5), "steps": 7})
    model.save_pretrained(str(tmp_path / "saved"), training=training)
    card = _card(tmp_path / "saved")
    data = card.data
    saved = json.load(open(tmp_path / "saved" / "xlora_config.json"))
    assert data.base_model == saved["base_model_id"] == "someone/tiny-base"
    assert data.library_name == "loramix" and {"loramix", "x-lora", "mixture-of-experts"} <= set(data.tags)
    _check_experts(data.experts, saved["adapters"], [tmp_path / "saved" / n for n in saved["adapters"]])
    assert data.training_data == ["rev.jsonl", "someone/sums"] and data.datasets == ["someone/sums"]
    results = {r.metric_type: r.metric_value for r in data.eval_results}
    assert results == {"loss": 1.5, "perplexity": pytest.approx(math.exp(1.5))}
    assert {r.dataset_name for r in data.eval_results} == {"rev.jsonl"}
    for key in ("xlora_depth", "xlora_size", "top_k_lora", "layerwise_scalings"):
        assert f"`{key}`: {saved[key]}" in card.text
    assert str(tmp_path) not in str(card)  # no path of this machine in a card meant for publishing


def test_xlora_card_of_a_local_base_names_no_base_model(tmp_path):
    base = tiny_base("llama")
    base.save_pretrained(str(tmp_path / "base"))
    adapters = make_experts(base, "llama", tmp_path, n=2)
    model = XLoraModel.from_base(str(tmp_path / "base"), XLoraConfig(adapters=adapters))
    model.save_pretrained(str(tmp_path / "saved"))
    card = _card(tmp_path / "saved")
    assert card.data.base_model is None and "a local base model (`base`" in card.text
    assert "training_data" not in card.data.to_dict() and card.data.eval_results is None
    _check_experts(card.data.experts, list(adapters), list(adapters.values()))


def test_tokenizer_is_saved_beside_the_model_and_kept_on_loading(tmp_path, ids):
    from transformers import AutoTokenizer

    base, _, model = tiny_xlora("llama", tmp_path, xlora_depth=1)
    model.base_model_id = str(tmp_path / "nowhere")  # no tokenizer to fall back on
    model.save_pretrained(str(tmp_path / "a"))
    assert not os.path.exists(tmp_path / "a" / "tokenizer.json")  # none known, none saved
    tok = tiny_tokenizer()
    model.save_pretrained(str(tmp_path / "a"), tokenizer=tok)
    text = "a mix of experts"
    assert AutoTokenizer.from_pretrained(str(tmp_path / "a"))(text)["input_ids"] == tok(text)["input_ids"]
    assert not [f for f in os.listdir(tmp_path / "a") if f.startswith(".")]  # no temporary left behind
    again = XLoraModel.from_pretrained(str(tmp_path / "a"), base=base, tokenizer=str(tmp_path / "a"))
    assert again.tokenizer(text)["input_ids"] == tok(text)["input_ids"]
    again.save_pretrained(str(tmp_path / "b"))  # the kept tokenizer goes along
    assert AutoTokenizer.from_pretrained(str(tmp_path / "b"))(text)["input_ids"] == tok(text)["input_ids"]


def test_quickstart_output_generates_without_naming_a_tokenizer(tmp_path, capsys):
    from loramix.engine.generate import generate
    from loramix.loading import load_tokenizer

    assert main(["quickstart", "--out", str(tmp_path / "qs")]) == 0
    for name in os.listdir(tmp_path / "qs" / "base"):  # only the X-LoRA folder's own copy may serve
        if name.startswith(("tokenizer", "special_tokens")):
            os.remove(tmp_path / "qs" / "base" / name)
    saved = str(tmp_path / "qs" / "xlora")
    capsys.readouterr()
    assert main(["generate", "--model", saved, "--prompt", "Hello", "--max-new-tokens", "6"]) == 0
    printed = capsys.readouterr().out
    model, tok = XLoraModel.from_pretrained(saved), load_tokenizer(saved)
    expected = generate(model, tok("Hello", return_tensors="pt")["input_ids"], max_new_tokens=6, tokenizer=tok,
                        return_scalings=True)
    assert printed == expected.texts[0] + "\n" and expected.n_new_tokens == [6]
    assert _card(saved).data.library_name == "loramix"


def test_trained_expert_card_replaces_peft_blank_card(tmp_path):
    import loramix
    from loramix.training.settings import LoraSettings, TrainingArgs

    base = save_tiny_model(tmp_path / "base")
    write_jsonl(tmp_path / "rev.jsonl", synthetic_task("rev", 16, 0))
    write_jsonl(tmp_path / "rev_eval.jsonl", synthetic_task("rev", 4, 1))
    result = loramix.train_expert(base, str(tmp_path / "rev.jsonl"), str(tmp_path / "rev-expert"),
                                  lora=LoraSettings(rank=4, alpha=8), eval_data=str(tmp_path / "rev_eval.jsonl"),
                                  args=TrainingArgs(max_steps=2, batch_size=8, progress=False), log=lambda *_: None)
    card = _card(tmp_path / "rev-expert")
    assert card.data.base_model is None and "base_model: ''" not in str(card)  # PEFT's blank base is gone
    assert card.data.library_name == "peft" and "loramix" in card.data.tags
    _check_experts(card.data.experts, ["rev-expert"], [tmp_path / "rev-expert"])
    assert card.data.training_data == ["rev.jsonl"]
    results = {r.metric_type: (r.metric_value, r.dataset_name) for r in card.data.eval_results}
    assert results == {"loss": (pytest.approx(result.metrics["eval_loss"]), "rev_eval.jsonl"),
                       "perplexity": (pytest.approx(result.metrics["eval_perplexity"]), "rev_eval.jsonl")}
    assert f"Trained for {result.metrics['steps']} optimizer steps." in card.text


@pytest.mark.parametrize("kind", ["peft", "merged"])
def test_export_cards_name_the_experts_and_their_fixed_weights(kind, tmp_path):
    from loramix.interop.export import export

    _, adapters, model = tiny_xlora("llama", tmp_path, top_k_lora=2)
    model.base_model_id = "someone/tiny-base"
    scalings = torch.softmax(torch.randn(model.n_lora_layers, model.n_experts, generator=torch.Generator()
                                         .manual_seed(0)), dim=-1)
    export(model, kind, str(tmp_path / kind), scalings, tokenizer=tiny_tokenizer(), weights_from="w.json")
    data = _card(tmp_path / kind).data
    assert data.base_model == "someone/tiny-base"
    assert data.library_name == {"peft": "peft", "merged": "transformers"}[kind]
    _check_experts(data.experts, list(adapters), list(adapters.values()))
    expected = model.mixing_weights(scalings).mean(0).tolist()  # top-2 of 3 experts: one weight is 0 per layer
    assert list(data.expert_weights) == list(adapters)
    assert list(data.expert_weights.values()) == pytest.approx(expected, abs=1e-6)
    assert data.expert_weights_from == "w.json"


def test_names_in_cards(tmp_path):
    (tmp_path / "owner").mkdir()
    assert hub_model_id("meta-llama/Llama-3.2-1B") == "meta-llama/Llama-3.2-1B" and hub_model_id("gpt2") == "gpt2"
    for local in (str(tmp_path), "./base", "../x/y", "~/models/base", str(tmp_path / "owner" / "x"), "", None,
                  "a/b/c", "not an id"):
        assert hub_model_id(local) is None, local
    assert data_name(str(tmp_path / "owner")) == "owner"
    assert data_name("someone/data:test") == "someone/data" and data_name("packaged:peptides") == "packaged:peptides"
