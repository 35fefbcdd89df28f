from __future__ import annotations

import json
import os

from loramix.cli import main


def test_quickstart_builds_saves_and_reloads(tmp_path, capsys):
    assert main(["quickstart", "--out", str(tmp_path / "qs")]) == 0
    printed = capsys.readouterr().out
    assert "identical logits" in printed
    saved = tmp_path / "qs" / "xlora"
    config = json.load(open(saved / "xlora_config.json"))
    assert config["adapters"] == ["expert_0", "expert_1", "expert_2"]
    assert sorted(os.listdir(saved / "expert_1")) == ["adapter_config.json", "adapter_model.safetensors"]


def test_generate_prints_the_greedy_completion(tmp_path, capsys):
    from conftest import make_experts, tiny_base, tiny_tokenizer

    from loramix import XLoraConfig, XLoraModel

    base, tokenizer = tiny_base("llama"), tiny_tokenizer()
    base.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    adapters = make_experts(base, "llama", tmp_path)
    model = XLoraModel.from_base(str(tmp_path / "base"), XLoraConfig(adapters=adapters, xlora_depth=1))
    model.save_pretrained(str(tmp_path / "xlora"))
    prompt = tokenizer("the cat", return_tensors="pt")["input_ids"]
    expected = model.generate(prompt, max_new_tokens=8, eos_token_id=tokenizer.eos_token_id)
    text = tokenizer.decode(expected[0, prompt.shape[1]:], skip_special_tokens=True)

    args = ["generate", "--model", str(tmp_path / "xlora"), "--prompt", "the cat", "--max-new-tokens", "8"]
    assert main(args) == 0
    assert capsys.readouterr().out == text + "\n"
    assert main(args + ["--stream"]) == 0
    assert capsys.readouterr().out == text + "\n"
    assert main(args + ["--show-experts"]) == 0
    marked, legend = capsys.readouterr().out.splitlines()
    scalings = model.generate(prompt, max_new_tokens=8, return_scalings=True,
                              eos_token_id=tokenizer.eos_token_id).scalings[0].sum(1).argmax(-1)
    pieces = [tokenizer.decode(expected[0, prompt.shape[1] + i: prompt.shape[1] + i + 1]) for i in range(8)]
    assert marked == "".join(f"{p}[{int(e)}]" for p, e in zip(pieces, scalings))
    assert legend.startswith("experts: [0] expert_0")
    assert main(args[:-2] + ["--max-new-tokens", "-1"]) == 2
    assert "--max-new-tokens" in capsys.readouterr().err

