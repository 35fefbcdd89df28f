"""The command line's manners (issue 24, item 7): --version, "did you mean", no third-party noise, paths checked
before torch is imported, one printing process under torchrun, decoded text in `analyze`."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import warnings

import pytest
from helpers import make_experts, save_tiny_model, synthetic_task, tiny_base, write_jsonl

from loramix.cli import check_paths, main


def loramix(*argv: str, env: dict | None = None, cwd=None) -> subprocess.CompletedProcess:
    """The installed `loramix` command (its console script; `python -m loramix.cli` where none is installed)."""
    script = shutil.which("loramix")
    command = [script] if script else [sys.executable, "-m", "loramix.cli"]
    return subprocess.run(command + list(argv), capture_output=True, text=True, timeout=300, cwd=cwd,
                          env={**os.environ, **(env or {})})


def test_version_is_the_installed_package_metadata():
    from importlib.metadata import version

    done = loramix("--version")
    assert (done.returncode, done.stdout, done.stderr) == (0, f"loramix {version('loramix')}\n", "")


@pytest.mark.parametrize("argv,typo,meant", [
    (["genrate", "--model", "m", "--prompt", "hi"], "'genrate'", "'generate'"),
    (["train-expert", "--base", "b", "--data", "d", "--output", "o", "--max-setps", "3"], "--max-setps",
     "--max-steps"),
    (["generate", "--model", "m", "--promt", "hi"], "--promt", "--prompt"),  # the flag is required: still named
    (["train-expert", "--base", "b", "--data", "d", "--output", "o", "--lr-scheduler", "cosin"], "'cosin'",
     "'cosine'"),
])
def test_misspelt_verbs_flags_and_choices_get_the_closest_name(argv, typo, meant):
    done = loramix(*argv)
    err = done.stderr
    assert done.returncode == 2 and done.stdout == "" and err.count("\n") == 1, err
    assert typo in err and (f"did you mean {meant}?" in err or f"maybe you meant {meant}?" in err), err


def test_a_flag_that_is_a_prefix_or_far_from_every_flag_gets_no_guess():
    done = loramix("memory", "--base", "m", "--experts", "2", "--rank", "2", "--zzzzzz")
    assert done.returncode == 2 and "did you mean" not in done.stderr and "--zzzzzz" in done.stderr


def test_a_verb_prints_none_of_the_known_third_party_warnings(tmp_path):
    done = loramix("quickstart", "--out", str(tmp_path / "qs"), env={"OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    for noise in ("kernels-community", "pip install kernels", "FutureWarning", "is_gradient_checkpointing"):
        assert noise not in done.stderr, done.stderr


def test_the_filters_drop_those_two_messages_only():
    """Matched by message and module: the same libraries' other warnings still show."""
    from loramix.warnings_policy import BITSANDBYTES_LOGGER, quiet_known_warnings

    logger = logging.getLogger(BITSANDBYTES_LOGGER)
    before = list(logger.filters)
    seen: list[str] = []
    model = tiny_base("llama")
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            quiet_known_warnings()
            model.is_gradient_checkpointing  # transformers' deprecated property, as PEFT reads it
            warnings.warn_explicit("`is_gradient_checkpointing` is deprecated", FutureWarning, "elsewhere.py", 1,
                                   module="elsewhere")
            warnings.warn_explicit("another deprecation", FutureWarning, "modeling_utils.py", 1,
                                   module="transformers.modeling_utils")
        logger.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please ...", "x")
        logger.warning("another bitsandbytes warning")
    finally:
        logger.removeHandler(handler)
        logger.filters[:] = before
    assert [(str(w.message), w.filename) for w in caught] == [
        ("`is_gradient_checkpointing` is deprecated", "elsewhere.py"), ("another deprecation", "modeling_utils.py")]
    assert seen == ["another bitsandbytes warning"]


MISSING = [  # (argv with {m} for a missing path, the start of the one-line error)
    (["train-expert", "--base", "b", "--output", "o", "--data", "{m}.jsonl"], "--data: {m}.jsonl: no such data file"),
    (["train", "--base", "b", "--output", "o", "--data", "d.jsonl", "--eval-data", "{m}/held.csv", "--adapters",
      "a=d.jsonl"], "--eval-data: {m}/held.csv: no such data file"),
    (["train", "--base", "b", "--output", "o", "--data", "d.jsonl", "--adapters", "a={m}"], "--adapters a: '{m}'"),
    (["train-expert", "--base", "{m}", "--output", "o", "--data", "d.jsonl"], "--base: '{m}' does not exist"),
    (["generate", "--model", "{m}", "--prompt", "hi"], "--model: '{m}' does not exist"),
    (["analyze", "--scalings", "{m}.safetensors", "--out", "o"], "--scalings: {m}.safetensors: no such file"),
    (["export", "--model", ".", "--to", "peft", "--output", "o", "--weights", "{m}.json"],
     "--weights: {m}.json: no such file"),
    (["eval", "--model", ".", "--tasks", "t", "--include-path", "{m}"], "--include-path: {m}: no such folder"),
    (["memory", "--base", "{m}", "--experts", "2", "--rank", "2"], "--base: '{m}' does not exist"),
    (["build", "{m}.yaml"], "recipe: {m}.yaml: no such file"),
]


def test_a_missing_path_is_one_line_before_torch_is_imported(tmp_path):
    """Each verb names the flag of a path that is not there, in a process that has not imported torch."""
    (tmp_path / "d.jsonl").write_text("")
    missing = str(tmp_path / "missing")
    cases = [([a.format(m=missing) for a in argv], start.format(m=missing)) for argv, start in MISSING]
    code = ("import contextlib, io, json, sys\nfrom loramix.cli import main\nfound = []\n"
            f"for argv in {json.dumps([argv for argv, _ in cases])}:\n"
            "    with contextlib.redirect_stderr(io.StringIO()) as err:\n"
            "        found.append([main(argv), err.getvalue(), 'torch' in sys.modules])\n"
            "print(json.dumps(found))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          env={k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"})
    assert done.returncode == 0, done.stderr
    for (argv, start), (status, err, torch_imported) in zip(cases, json.loads(done.stdout)):
        assert status == 2 and err.startswith(f"loramix {argv[0]}: {start}") and err.count("\n") == 1, (argv, err)
        assert not torch_imported, argv


@pytest.mark.parametrize("flags", [
    dict(verb="generate", model="owner/repo", base="gpt2"),  # hub ids are the loader's to look up
    dict(verb="train-expert", base="gpt2", data=["owner/name:test", "packaged:set/x", "plain_name"]),
    dict(verb="export", model=".", weights="uniform"),
    dict(verb="serve", model="/no/such/checkpoint"),  # serve checks its settings first, then loads
])
def test_hub_ids_and_deferred_paths_pass_the_check(flags):
    import argparse

    check_paths(argparse.Namespace(**flags))


def _train_expert_argv(tmp_path, out) -> list[str]:
    base = save_tiny_model(tmp_path / "base")
    data = write_jsonl(tmp_path / "d.jsonl", synthetic_task("rev", 8, seed=0))
    return ["train-expert", "--base", base, "--data", data, "--output", str(out), "--max-steps", "2",
            "--batch-size", "2", "--rank", "2", "--logging-steps", "1", "--threads", "1"]


@pytest.fixture
def keep_threads():
    """Tests that run a verb in process: put torch's thread count back (a verb sets it from --threads)."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_under_torchrun_only_rank_0_prints(tmp_path, capsys, keep_threads):
    """A process with RANK=1 runs the same training (the same adapter, byte for byte) and prints nothing: no log
    lines, no JSON line, no progress bars; rank 0 prints the final JSON line."""
    assert main(_train_expert_argv(tmp_path, tmp_path / "rank0")) == 0
    printed = capsys.readouterr().out.splitlines()
    assert json.loads(printed[-1])["steps"] == 2
    done = loramix(*_train_expert_argv(tmp_path, tmp_path / "rank1"), env={"RANK": "1", "LOCAL_RANK": "1"})
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""
    assert "Loading weights" not in done.stderr and "%|" not in done.stderr, done.stderr
    name = "adapter_model.safetensors"
    assert (tmp_path / "rank1" / name).read_bytes() == (tmp_path / "rank0" / name).read_bytes()


def byte_level_bpe():
    """A GPT-2 style tokenizer: byte-level pre-tokenizer and decoder (a space is 'Ġ', a newline 'Ċ', 'é' the two
    byte characters 'Ã©'), BPE merges; ids below the tiny model's vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    merges = [("t", "h"), ("th", "e"), ("\u0120", "c"), ("\u0120c", "a"), ("\u0120ca", "t"), ("s", "a"), ("sa", "t")]
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}
    for piece in ["t", "h", "e", "c", "a", "s", "\u0120", "\u010a", "\u00c3", "\u00a9"] + [a + b for a, b in merges]:
        vocab[piece] = len(vocab)
    tok = Tokenizer(models.BPE(vocab, merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def test_analyze_prints_and_logs_decoded_text_for_a_byte_level_bpe(tmp_path, capsys, keep_threads):
    from loramix import XLoraConfig, XLoraModel
    from loramix.analysis import ScalingsLog

    base = tiny_base("llama")
    base.save_pretrained(str(tmp_path / "base"))
    model = XLoraModel.from_base(str(tmp_path / "base"), XLoraConfig(adapters=make_experts(base, "llama", tmp_path)))
    model.save_pretrained(str(tmp_path / "ck"))
    tokenizer = byte_level_bpe()
    tokenizer.save_pretrained(str(tmp_path / "ck"))
    prompt = "the cat\nsat \u00e9"
    ids = tokenizer(prompt)["input_ids"]
    assert tokenizer.convert_ids_to_tokens(ids) == ["the", "\u0120cat", "\u010a", "sat", "\u0120", "\u00c3", "\u00a9"]
    assert main(["analyze", "--model", str(tmp_path / "ck"), "--prompt", prompt, "--out", str(tmp_path / "fig"),
                 "--threads", "1"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == f"{len(ids)} tokens: {tokenizer.decode(ids)!r}"
    log = ScalingsLog.load(str(tmp_path / "fig" / "scalings.safetensors"))
    assert log.tokens == ["the", " cat", "\n", "sat", " ", "", "\u00e9"]  # 'é' shows on the token that completes it
    assert "".join(log.tokens) == tokenizer.decode(ids) == prompt
