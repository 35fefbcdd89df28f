from __future__ import annotations

import json
import os

import pytest
from helpers import recorded_training_calls

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


def test_generate_speculate_prints_the_same_completion(tmp_path, capsys):
    """`loramix generate --speculate N`: the plain run's text, and the same dominant experts per token."""
    from helpers import make_experts, tiny_base, tiny_tokenizer

    from loramix import XLoraConfig, XLoraModel

    base, tokenizer = tiny_base("llama"), tiny_tokenizer()
    base.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    model = XLoraModel.from_base(str(tmp_path / "base"), XLoraConfig(adapters=make_experts(base, "llama", tmp_path)))
    model.save_pretrained(str(tmp_path / "xlora"))
    args = ["generate", "--model", str(tmp_path / "xlora"), "--prompt", "the cat", "--max-new-tokens", "24",
            "--show-experts"]
    assert main(args + ["--speculate", "0"]) == 0
    plain = capsys.readouterr().out
    assert main(args + ["--speculate", "6"]) == 0
    assert capsys.readouterr().out == plain
    assert main(args + ["--speculate", "-1"]) == 2
    assert "--speculate" in capsys.readouterr().err



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


def test_flags_are_named_after_config_fields_and_old_spellings_still_work(capsys, monkeypatch):
    import dataclasses

    from loramix.losses import RoutingLosses

    new, old = recorded_training_calls(monkeypatch, [
        TRAIN + ["--xlora-dropout-p", "0.3", "--balance-weight", "2", "--routing-weight", "1"],
        TRAIN + ["--xlora-dropout", "0.3", "--balance-loss-weight", "2", "--routing-loss-weight", "1"]])
    assert new == old
    (_, config, _, _), kwargs = new
    assert (config.xlora_dropout_p, kwargs["routing"]) == (0.3, RoutingLosses(balance_weight=2.0, routing_weight=1.0))
    capsys.readouterr()
    assert main(["train", "--help"]) == 0
    help_text = capsys.readouterr().out
    fields = {f.name for f in dataclasses.fields(XLoraConfig)} | {f.name for f in dataclasses.fields(RoutingLosses)}
    fields -= {"adapters", "hidden_size", "enable_softmax", "enable_relu_and_dropout", "use_bias",
               "global_scaling_weight"}
    assert all(f"--{name.replace('_', '-')}" in help_text for name in fields), help_text
    assert "--xlora-dropout-p" in help_text and "--balance-weight" in help_text
    assert "--xlora-dropout " not in help_text and "--balance-loss-weight" not in help_text


def test_train_flags_build_the_settings_a_python_user_builds(monkeypatch, capsys):
    from loramix.losses import RoutingLosses
    from loramix.training.data import DataFormat, DataSource
    from loramix.training.settings import LoraSettings, TrainingArgs

    run_flags = ["--max-steps", "5", "--epochs", "2", "--lr", "0.01", "--batch-size", "4", "--grad-accum", "2",
                 "--warmup-steps", "1", "--lr-scheduler", "cosine", "--weight-decay", "0.1", "--max-grad-norm", "0",
                 "--seed", "3", "--logging-steps", "2", "--eval-steps", "3", "--save-steps", "4",
                 "--save-total-limit", "2", "--resume", "--no-progress", "--device", "cpu",
                 "--gradient-checkpointing", "--bf16", "--eval-data", "h.jsonl", "--tokenizer", "t",
                 "--dtype", "bfloat16", "--trust-remote-code", "--data", "e.jsonl", "--data-weights", "1", "3",
                 "--prompt-template", "Q: {q}\\n", "--completion-template", " {a}", "--max-length", "64",
                 "--train-on-prompt", "--strict"]
    gate_flags = ["--adapters", "a=x", "b=y", "--xlora-depth", "2", "--xlora-size", "32", "--layerwise-scalings",
                  "--top-k-lora", "1", "--softmax-temperature", "0.5", "--scaling-pass-value", "0.25",
                  "--use-trainable-adapters", "--entropy-weight", "-0.5", "--expert-field", "task",
                  "--routing-weight", "1", "--routing-anneal-steps", "7"]
    expert = ["train-expert", "--base", "b", "--data", "d.jsonl", "--output", "o"]
    calls = recorded_training_calls(monkeypatch, [
        TRAIN, TRAIN + run_flags + gate_flags, expert,
        expert + ["--rank", "4", "--alpha", "8", "--dropout", "0.1", "--target-modules", "q_proj,v_proj"]])
    loading = dict(tokenizer=None, dtype=None, quantization=None, trust_remote_code=False)
    assert calls[0] == (("b", XLoraConfig(adapters={"a": "x"}), (DataSource("d.jsonl"),), "o"),
                        dict(args=TrainingArgs(), data_format=DataFormat(), routing=RoutingLosses(), eval_data=None,
                             **loading))
    import torch

    args = TrainingArgs(max_steps=5, epochs=2.0, lr=0.01, batch_size=4, grad_accum=2, warmup_steps=1,
                        lr_scheduler="cosine", weight_decay=0.1, max_grad_norm=None, seed=3, logging_steps=2,
                        eval_steps=3, save_steps=4, save_total_limit=2, resume=True, progress=False, device="cpu",
                        gradient_checkpointing=True, mixed_precision="bf16")
    data_format = DataFormat(prompt_template="Q: {q}\n", completion_template=" {a}", expert_field="task",
                             max_length=64, train_on_prompt=True, strict=True)
    config = XLoraConfig(adapters={"a": "x", "b": "y"}, xlora_depth=2, xlora_size=32, layerwise_scalings=True,
                         top_k_lora=1, softmax_temperature=0.5, scaling_pass_value=0.25, use_trainable_adapters=True)
    routing = RoutingLosses(entropy_weight=-0.5, routing_weight=1.0, routing_anneal_steps=7)
    assert calls[1] == (("b", config, (DataSource("d.jsonl", 1.0), DataSource("e.jsonl", 3.0)), "o"),
                        dict(args=args, data_format=data_format, routing=routing, eval_data=(DataSource("h.jsonl"),),
                             tokenizer="t", dtype=torch.bfloat16, quantization=None, trust_remote_code=True))
    assert calls[2] == (("b", (DataSource("d.jsonl"),), "o"),
                        dict(lora=LoraSettings(), args=TrainingArgs(), data_format=DataFormat(), eval_data=None,
                             **loading))
    assert calls[3][1]["lora"] == LoraSettings(rank=4, alpha=8.0, dropout=0.1, target_modules=("q_proj", "v_proj"))
    # a value the flag's parser accepts but the settings refuse is refused once, naming the field, before any call
    assert main(TRAIN + ["--data", "e.jsonl", "--data-weights", "1"]) == 2
    assert "data weights: 1 weights for 2 data sources" in capsys.readouterr().err and len(calls) == 4


def test_enable_softmax_topk_replaces_the_softmax_over_all_experts(monkeypatch):
    """`--enable-softmax-topk` gives the config a Python user writes for it (it used to be refused, always)."""
    calls = recorded_training_calls(monkeypatch, [TRAIN + ["--top-k-lora", "1", "--enable-softmax-topk"]])
    assert calls[0][0][1] == XLoraConfig(adapters={"a": "x"}, top_k_lora=1, enable_softmax=False,
                                         enable_softmax_topk=True)
    assert main(TRAIN + ["--enable-softmax-topk"]) == 2  # without --top-k-lora: refused, naming the field


def test_generate_prints_what_the_server_returns_for_the_same_request(tmp_path, capsys):
    """`loramix generate --stop X` prints the server's text for the same request: cut before the stop string."""
    from helpers import post_json, save_served_checkpoint, serving

    checkpoint = save_served_checkpoint(tmp_path)
    request = {"model": "tiny-xlora", "prompt": "the cat", "max_tokens": 12, "temperature": 0}
    with serving(checkpoint) as (_, server):
        whole = post_json(server, "/v1/completions", request).json()["choices"][0]
        stop = whole["text"][4:6]  # a stop string inside the text
        stopped = post_json(server, "/v1/completions", {**request, "stop": [stop]}).json()["choices"][0]
    assert len(stop) == 2 and stopped["finish_reason"] == "stop"
    assert stopped["text"] == whole["text"][:whole["text"].find(stop)]
    args = ["generate", "--model", str(checkpoint), "--prompt", "the cat", "--max-new-tokens", "12"]
    for extra in ([], ["--stream"]):
        assert main(args + ["--stop", stop] + extra) == 0
        assert capsys.readouterr().out == stopped["text"] + "\n"
    assert main(args) == 0
    assert capsys.readouterr().out == whole["text"] + "\n"


# ---- --threads: torch's CPU threads, for every verb ------------------------------------------------------------------
MEMORY = ["memory", "--base", "unused", "--experts", "2", "--rank", "4"]


@pytest.fixture
def threads_seen(monkeypatch):
    """Runs `main(argv)` with `memory` replaced by a verb that reads torch's thread count; restores the count."""
    import torch

    import loramix.cli as cli

    before = torch.get_num_threads()
    seen = []
    monkeypatch.setitem(cli.VERBS, "memory", (lambda args: seen.append(torch.get_num_threads()) or 0, "memory"))

    def run(argv) -> int:
        assert main(argv) == 0
        return seen.pop()

    yield run
    torch.set_num_threads(before)


def physical_cores_allowed() -> int:
    """The rule, computed apart: the CPUs this process may run on, counted once per physical core."""
    cpus = os.sched_getaffinity(0)
    cores = set()
    for cpu in cpus:
        folder = f"/sys/devices/system/cpu/cpu{cpu}/topology"
        with open(f"{folder}/physical_package_id") as package, open(f"{folder}/core_id") as core:
            cores.add((int(package.read()), int(core.read())))
    return min(len(cpus), len(cores))


def test_threads_flag_sets_torch_threads_for_the_verb(threads_seen, monkeypatch):
    import torch

    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # the flag wins over the environment
    assert threads_seen(MEMORY + ["--threads", "1"]) == 1
    assert threads_seen(MEMORY + ["--threads", "3"]) == 3
    torch.set_num_threads(5)
    assert threads_seen(MEMORY) == 5  # OMP_NUM_THREADS set and no flag: torch's own choice is left alone


@pytest.mark.skipif(not os.path.isdir("/sys/devices/system/cpu/cpu0/topology") or not hasattr(os, "sched_getaffinity"),
                    reason="needs Linux's CPU topology")
def test_threads_default_is_the_physical_cores_the_process_may_use(threads_seen, monkeypatch):
    import torch

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    torch.set_num_threads(7)
    assert threads_seen(MEMORY) == physical_cores_allowed()
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # torchrun's processes on this machine share the cores
    assert threads_seen(MEMORY) == max(1, physical_cores_allowed() // 2)


@pytest.mark.parametrize("bad", ["0", "-1", "x"])
def test_bad_threads_value_exits_2_naming_the_flag(bad, capsys):
    from loramix.cli import VERBS

    for verb in VERBS:  # every verb has the flag, checked before anything runs
        assert main([verb, "--threads", bad]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "argument --threads: got" in err, (verb, err)
