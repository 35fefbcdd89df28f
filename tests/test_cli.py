from __future__ import annotations

import json
import os

import pytest

from loramix import XLoraConfig
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
    from helpers import make_experts, tiny_base, tiny_tokenizer

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



TRAIN = ["train", "--base", "b", "--data", "d.jsonl", "--output", "o", "--adapters", "a=x"]


@pytest.mark.parametrize("argv,flag", [
    (["generate", "--model", "m", "--prompt", ""], "--prompt"),
    (["analyze", "--model", "m", "--prompt", "", "--out", "o"], "--prompt"),
    (["generate", "--model", "m", "--prompt", "hi", "--top-p", "0"], "--top-p"),
    (["generate", "--model", "m", "--prompt", "hi", "--temperature", "nan"], "--temperature"),
    (["generate", "--model", "m", "--prompt", "hi", "--stop", ""], "--stop"),
    (TRAIN + ["--max-grad-norm", "-1"], "--max-grad-norm"),
    (TRAIN + ["--weight-decay", "nan"], "--weight-decay"),
    (TRAIN + ["--lr", "inf"], "--lr"),
    (TRAIN + ["--data-weights", "1", "-2"], "--data-weights"),
    (TRAIN + ["--xlora-dropout-p", "1.5"], "--xlora-dropout-p"),
    (TRAIN + ["--xlora-dropout", "1.5"], "--xlora-dropout"),
    (TRAIN + ["--softmax-temperature", "0"], "--softmax-temperature"),
    (TRAIN + ["--scaling-pass-value", "inf"], "--scaling-pass-value"),
    (TRAIN + ["--batch-size", "0"], "--batch-size"),
    (TRAIN + ["--entropy-weight", "-inf"], "--entropy-weight"),
    (["train-expert", "--base", "b", "--data", "d", "--output", "o", "--rank", "0"], "--rank"),
    (["train-expert", "--base", "b", "--data", "d", "--output", "o", "--dropout", "-0.1"], "--dropout"),
    (["quickstart", "--seed", "-3"], "--seed"),
    (["demo", "--seed", "x"], "--seed"),
])
def test_bad_flags_fail_at_parse_time_in_one_line(argv, flag, capsys, monkeypatch):
    import loramix.loading
    from loramix import XLoraModel

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    for owner, name in ((XLoraModel, "from_pretrained"), (XLoraModel, "from_base"), (loramix.loading, "load_base"),
                        (loramix.loading, "load_tokenizer")):
        monkeypatch.setattr(owner, name, refuse)
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1, captured.err
    assert captured.err.startswith(f"loramix {argv[0]}: error: argument {flag}"), captured.err


def test_flags_are_named_after_config_fields_and_old_spellings_still_work(capsys):
    import dataclasses

    from loramix.cli import _parser
    from loramix.training.loop import RoutingLosses

    parser = _parser()
    new = parser.parse_args(TRAIN + ["--xlora-dropout-p", "0.3", "--balance-weight", "2", "--routing-weight", "1"])
    old = parser.parse_args(TRAIN + ["--xlora-dropout", "0.3", "--balance-loss-weight", "2",
                                     "--routing-loss-weight", "1"])
    assert vars(new) == vars(old)
    assert (new.xlora_dropout_p, new.balance_weight, new.routing_weight, new.entropy_weight) == (0.3, 2.0, 1.0, 0.0)
    defaults = parser.parse_args(TRAIN)
    config_fields = {f.name for f in dataclasses.fields(XLoraConfig)} | {f.name for f in dataclasses.fields(RoutingLosses)}
    assert config_fields - {"adapters", "hidden_size", "enable_softmax", "enable_relu_and_dropout", "use_bias",
                            "global_scaling_weight"} <= set(vars(defaults))
    assert main(["train", "--help"]) == 0
    help_text = capsys.readouterr().out
    assert "--xlora-dropout-p" in help_text and "--balance-weight" in help_text
    assert "--xlora-dropout " not in help_text and "--balance-loss-weight" not in help_text
