"""`--config FILE.yaml` for the training verbs: every flag as a key, `datasets` with a format per source, flags
on the command line over the file, errors naming the key and its line; `--chat-template` for training."""

from __future__ import annotations

import pytest
from helpers import CHAT_TEMPLATE, recorded_training_calls, save_tiny_model

import loramix.cli
import loramix.training.loop
from loramix.cli import main

CONFIG = """\
base: b
output: o
adapters: [a=x, b=y]
max-steps: 5
batch_size: 4
layerwise_scalings: true
lr_scheduler: cosine
prompt_field: q
max_length: 64
datasets:
  - {path: d.jsonl, weight: 1}
  - {path: e.csv, weight: 3, prompt_template: "Q: {question}", completion_template: " {answer}"}
eval_datasets: [h.jsonl]
"""


def test_a_config_file_gives_the_call_its_flags_give(tmp_path, monkeypatch):
    from loramix.training.data import DataFormat, DataSource

    (tmp_path / "c.yaml").write_text(CONFIG)
    flags = ["train", "--base", "b", "--output", "o", "--adapters", "a=x", "b=y", "--max-steps", "5",
             "--batch-size", "4", "--layerwise-scalings", "--lr-scheduler", "cosine", "--prompt-field", "q",
             "--max-length", "64", "--data", "d.jsonl", "--data", "e.csv", "--data-weights", "1", "3",
             "--eval-data", "h.jsonl"]
    by_flags, by_file, overridden = recorded_training_calls(monkeypatch, [
        flags, ["train", "--config", str(tmp_path / "c.yaml")],
        ["train", "--config", str(tmp_path / "c.yaml"), "--max-steps", "9", "--data", "z.jsonl"]])
    csv_format = DataFormat(prompt_field="q", max_length=64, prompt_template="Q: {question}",
                            completion_template=" {answer}")
    # the file's sources carry their own format: the CSV its templates, the JSONL the run's
    assert by_file[0][2] == (DataSource("d.jsonl", 1.0), DataSource("e.csv", 3.0, format=csv_format))
    assert by_flags[0][2] == (DataSource("d.jsonl", 1.0), DataSource("e.csv", 3.0))
    assert by_file[0][:2] == by_flags[0][:2] and by_file[1] == by_flags[1]  # every other setting the same
    assert overridden[0][2] == (DataSource("z.jsonl"),) and overridden[1]["args"].max_steps == 9


@pytest.mark.parametrize("text, message", [
    ("max_stpes: 5\n", "c.yaml:1: max_stpes: not a flag of loramix train-expert (did you mean max_steps?)"),
    ("base: b\nrank: 0\n", "c.yaml:2: rank: got '0', expected an integer >= 1"),
    ("base: b\nbf16: yes please\n", "c.yaml:2: bf16: expected true or false"),
    ("base: b\nlr_scheduler: wavy\n", "c.yaml:2: lr_scheduler: one of linear, cosine, constant"),
    ("base: b\noutput: o\ndatasets:\n  - {path: d.jsonl, max_length: 1}\n",
     "c.yaml:4: datasets[0].max_length: must be at least 2"),
])
def test_config_errors_name_the_key_and_its_line(tmp_path, monkeypatch, capsys, text, message):
    monkeypatch.setattr(loramix.cli, "check_paths", lambda args: None)
    (tmp_path / "c.yaml").write_text(text)
    assert main(["train-expert", "--config", str(tmp_path / "c.yaml"), "--output", "o", "--base", "b"]) == 2
    assert message in capsys.readouterr().err


def test_chat_template_gives_the_training_verbs_a_template(tmp_path, monkeypatch):
    """--chat-template: the tokenizer handed to the entry point is the base's with the file's template."""
    base = save_tiny_model(tmp_path / "base")
    (tmp_path / "chat.jinja").write_text(CHAT_TEMPLATE)
    (call,) = recorded_training_calls(monkeypatch, [["train-expert", "--base", base, "--data", "d.jsonl", "--output", "o",
                                    "--chat-template", str(tmp_path / "chat.jinja")]])
    tokenizer = call[1]["tokenizer"]
    assert tokenizer.chat_template == CHAT_TEMPLATE
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "<user>hi|"
