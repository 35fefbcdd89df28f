"""`loramix eval` against lm-eval's own CLI: the same flags (`--num_fewshot`, `--seed`, `--gen_kwargs`,
`--apply_chat_template`, `--log_samples`, `--output_path`) give the same results and samples, in the same files,
read back with lm-eval's own file helpers and the `datasets` JSON loader its tracker's dataset card uses. Bad
options are one line before the model loads."""

from __future__ import annotations

import json
import os
import sys

import pytest
from helpers import save_served_checkpoint, write_jsonl

from loramix import XLoraModel

pytest.importorskip("lm_eval")
from lm_eval.utils import (  # noqa: E402
    get_file_task_name,
    get_latest_filename,
    get_results_filenames,
    get_sample_results_filenames,
    sanitize_model_name,
)

from loramix.cli import main  # noqa: E402
from loramix.evaluation import EvalSeeds, lm_class, parse_gen_kwargs  # noqa: E402

TRAIN = [{"prompt": f"{a}+{b}=", "completion": str(a + b)} for a, b in [(1, 2), (3, 4), (2, 2), (5, 1), (6, 2)]]
TEST = [{"prompt": p, "completion": c} for p, c in [("1+1=", "2"), ("2+3=", "5"), ("4+4=", "8")]]
MC = [{"question": q, "choices": ["abc", "xyz", "hello"], "answer": a} for q, a in [("pick:", 0), ("which?", 1),
                                                                                    ("q", 2), ("last:", 1)]]
FLAGS = ["--tasks", "tiny_gen", "tiny_mc", "--num_fewshot", "2", "--seed", "3,4,5,6", "--gen_kwargs",
         "do_sample=true", "temperature=1.0", "top_k=5", "--apply_chat_template", "--log_samples", "--batch_size",
         "4"]


def write_tasks(folder) -> str:
    """A generation task and a multiple-choice one, each with a few-shot split to draw examples from."""
    folder.mkdir(exist_ok=True)
    files = {name: write_jsonl(folder / f"{name}.jsonl", rows)
             for name, rows in [("train", TRAIN), ("test", TEST), ("mc", MC)]}
    (folder / "tiny_gen.yaml").write_text(f"""task: tiny_gen
dataset_path: json
dataset_kwargs:
  data_files:
    train: {files['train']}
    test: {files['test']}
training_split: train
fewshot_split: train
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{completion}}}}"
generation_kwargs:
  until: ["."]
  max_gen_toks: 5
  do_sample: false
metric_list:
  - metric: exact_match
""")
    (folder / "tiny_mc.yaml").write_text(f"""task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    train: {files['mc']}
    test: {files['mc']}
fewshot_split: train
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
""")
    return str(folder)


def read_lm_eval_output(folder) -> tuple[str, dict, dict[str, list[dict]]]:
    """What lm-eval's tooling finds under an output folder: (model folder, the latest results, {task: samples}),
    the files picked by lm-eval's own helpers and the samples read by the `datasets` JSON loader."""
    from datasets import load_dataset

    files = sorted(os.path.join(root, name) for root, _, names in os.walk(folder) for name in names)
    results_file = get_latest_filename(get_results_filenames(files))
    samples = {}
    for path in get_sample_results_filenames(files):
        rows = load_dataset("json", data_files=path, split="train").to_list()
        samples[get_file_task_name(os.path.basename(path))] = sorted(rows, key=lambda r: r["doc_id"])
    with open(results_file, encoding="utf-8") as f:
        return os.path.basename(os.path.dirname(results_file)), json.load(f), samples


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return str(save_served_checkpoint(tmp_path_factory.mktemp("served")))  # its tokenizer has a chat template


def test_the_same_flags_give_lm_evals_own_results_and_files(checkpoint, tmp_path, monkeypatch):
    import lm_eval.tasks
    from lm_eval.__main__ import cli_evaluate

    # lm-eval's CLI indexes its own ~10k task YAMLs (20 s on 2 cores) besides --include_path: skipped, as ours is
    own_manager = lm_eval.tasks.TaskManager
    monkeypatch.setattr(lm_eval.tasks, "TaskManager",
                        lambda *a, **k: own_manager(*a, **{**k, "include_defaults": False}))
    tasks = write_tasks(tmp_path / "tasks")
    lm_class()  # registers "loramix" in lm-eval's model registry
    theirs, ours = tmp_path / "lm-eval", tmp_path / "loramix"
    monkeypatch.setattr(sys, "argv", ["lm-eval", "run", "--model", "loramix", "--model_args",
                                      f"pretrained={checkpoint}", "--include_path", tasks,
                                      "--output_path", str(theirs), *FLAGS])
    cli_evaluate()
    assert main(["eval", "--model", checkpoint, "--include_path", tasks, "--no-builtin-tasks",
                 "--output_path", str(ours), *FLAGS]) == 0

    folder, expected, expected_samples = read_lm_eval_output(theirs)
    got_folder, got, got_samples = read_lm_eval_output(ours)
    assert got_folder == folder == sanitize_model_name(checkpoint)
    for key in ("results", "n-shot", "n-samples", "configs", "versions", "higher_is_better", "task_hashes",
                "model_source", "model_name", "chat_template", "chat_template_sha", "fewshot_as_multiturn",
                "system_instruction"):
        assert got[key] == expected[key], key
    for key in ("model", "model_args", "gen_kwargs", "random_seed", "numpy_seed", "torch_seed", "fewshot_seed",
                "limit", "bootstrap_iters"):
        assert got["config"][key] == expected["config"][key], key
    assert got["config"]["fewshot_seed"] == 6 and got["n-shot"] == {"tiny_gen": 2, "tiny_mc": 2}
    assert got["config"]["gen_kwargs"] == {"do_sample": True, "temperature": 1.0, "top_k": 5}
    assert got["chat_template"] and got["fewshot_as_multiturn"] is True
    # every sample: the same prompts (chat-templated, two few-shot turns), the same sampled answers and scores
    assert sorted(got_samples) == sorted(expected_samples) == ["tiny_gen", "tiny_mc"]
    for task in expected_samples:
        assert got_samples[task] == expected_samples[task]
    prompt = got_samples["tiny_gen"][0]["arguments"]["gen_args_0"]["arg_0"]
    assert prompt.count("<user>") == 3 and prompt.endswith("<assistant>")  # CHAT_TEMPLATE's markers
    # loramix's own files beside lm-eval's
    assert {"results.json", "routing.csv", "routing.png", folder} <= set(os.listdir(ours))
    assert not [n for n in os.listdir(ours) if n.startswith(".lm-eval-")]  # no staging folder left


def test_the_seed_and_gen_kwargs_read_as_lm_eval_reads_them():
    assert EvalSeeds.parse("42") == EvalSeeds(42, 42, 42, 42)
    assert EvalSeeds.parse("0,None,8,52") == EvalSeeds(0, None, 8, 52)
    assert EvalSeeds.parse("1,2,3") == EvalSeeds(1, 2, 3, 1234)  # the fourth is lm-eval's default
    assert EvalSeeds() == EvalSeeds(0, 1234, 1234, 1234)
    assert parse_gen_kwargs(["temperature=0.5,until=['a, b', '.']", "do_sample=True"]) == {
        "temperature": 0.5, "until": ["a, b", "."], "do_sample": True}
    assert parse_gen_kwargs(['{"max_gen_toks": 3}']) == {"max_gen_toks": 3}
    assert parse_gen_kwargs(None) is None


@pytest.mark.parametrize("flags, message", [
    (["--gen-kwargs", "temprature=1"], "gen_kwargs: 'temprature' is not a generation option loramix takes; did "
                                       "you mean 'temperature'?"),
    (["--gen_kwargs", "max_gen_toks"], "gen_kwargs: expected key=value, got 'max_gen_toks'"),
    (["--seed", "1,2"], "seed: one integer, or 3-4 comma-separated integers or None"),
    (["--seed", "x"], "seed: 'x' is not an integer or None"),
    (["--log_samples"], "--log-samples / --predict-only need --output"),
    (["--fewshot-as-multiturn"], "--fewshot-as-multiturn needs --apply-chat-template"),
])
def test_bad_options_are_one_line_before_the_model_loads(tmp_path, capsys, monkeypatch, flags, message):
    monkeypatch.setattr(XLoraModel, "from_pretrained", lambda *a, **k: pytest.fail("model loaded"))
    tasks = write_tasks(tmp_path / "tasks")
    assert main(["eval", "--model", str(tmp_path / "ck"), "--tasks", "tiny_gen", "--include-path", tasks,
                 "--no-builtin-tasks", *flags]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"loramix eval: {message}")


def test_an_unsupported_generation_option_of_a_task_names_it(checkpoint, tmp_path, capsys):
    tasks = write_tasks(tmp_path / "tasks")
    yaml = tmp_path / "tasks" / "tiny_gen.yaml"
    yaml.write_text(yaml.read_text().replace("  do_sample: false\n", "  do_sample: false\n  num_beams: 4\n"))
    assert main(["eval", "--model", checkpoint, "--tasks", "tiny_gen", "--include-path", tasks,
                 "--no-builtin-tasks", "--limit", "1"]) == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert "task 'tiny_gen': generation_kwargs: 'num_beams' is not a generation option loramix takes" in err
