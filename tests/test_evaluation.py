"""loramix eval: lm-eval's model class against direct computations, and lm-eval's scores against a plain loop."""

from __future__ import annotations

import csv
import json

import pytest
import torch
import torch.nn.functional as F
from helpers import make_experts, tiny_base, tiny_tokenizer, write_jsonl

from loramix import XLoraConfig, XLoraModel

pytest.importorskip("lm_eval")
from lm_eval.api.instance import Instance  # noqa: E402

from loramix.evaluation import evaluate, lm_class  # noqa: E402

MC_ROWS = [{"question": q, "choices": ["abc", "xyz", "hello"], "answer": a}
           for q, a in [("pick: ", 0), ("which one? ", 1), ("q ", 2), ("last: ", 1)]]
GEN_ROWS = [{"prompt": p, "completion": c} for p, c in [("r abc=", "cba"), ("s 12+30=", "42"), ("x", "y")]]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    base = tiny_base("llama")
    adapters = make_experts(base, "llama", tmp_path_factory.mktemp("experts"), 2)
    model = XLoraModel.from_base(base, XLoraConfig(adapters=adapters, layerwise_scalings=True))
    torch.manual_seed(5)
    with torch.no_grad():
        for p in model.classifier.parameters():
            p.normal_(0, 0.5)
    return model


def direct_loglikelihood(model, context: list[int], continuation: list[int]) -> tuple[float, bool]:
    """One unpadded row, no batching: log_softmax of the X-LoRA logits at the positions before each token."""
    ids = torch.tensor([context + continuation])
    with torch.no_grad():
        logprobs = F.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
    positions = range(len(context) - 1, len(context) + len(continuation) - 1)
    total = sum(float(logprobs[p, t]) for p, t in zip(positions, continuation))
    greedy = all(int(logprobs[p].argmax()) == t for p, t in zip(positions, continuation))
    return total, greedy


def test_batched_loglikelihoods_equal_direct_log_softmax(model):
    tokenizer = tiny_tokenizer()
    lm = lm_class()(model, tokenizer, batch_size=3)
    pairs = [("hello", " world"), ("a", "b"), ("the longest context of all", " ends"), ("xy", "zzzz"), ("", "abc")]
    requests = [Instance("loglikelihood", {}, pair, i, ("t", i, 1)) for i, pair in enumerate(pairs)]
    got = lm.loglikelihood(requests, disable_tqdm=True)
    for (context, continuation), (score, greedy) in zip(pairs, got):
        ctx = tokenizer.encode(context, add_special_tokens=False) or [tokenizer.bos_token_id]
        cont = tokenizer.encode(continuation, add_special_tokens=False)
        expected, expected_greedy = direct_loglikelihood(model, ctx, cont)
        assert score == pytest.approx(expected, abs=1e-4)
        assert greedy == expected_greedy
    # a greedy continuation is recognised as such
    ctx = tokenizer.encode("abc", add_special_tokens=False)
    with torch.no_grad():
        best = int(model(input_ids=torch.tensor([ctx])).logits[0, -1].argmax())
    (_, greedy), = lm.loglikelihood([Instance("loglikelihood", {}, ("abc", tokenizer.decode([best])), 0)],
                                    disable_tqdm=True)
    assert greedy


def test_rolling_loglikelihood_is_the_whole_text_after_bos(model):
    tokenizer = tiny_tokenizer()
    lm = lm_class()(model, tokenizer, batch_size=2)
    text = "a short text to score"
    (got,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)], disable_tqdm=True)
    expected, _ = direct_loglikelihood(model, [tokenizer.bos_token_id], tokenizer.encode(text, add_special_tokens=False))
    assert got == pytest.approx(expected, abs=1e-4)


def write_tasks(folder) -> str:
    mc = write_jsonl(folder / "mc.jsonl", MC_ROWS)
    gen = write_jsonl(folder / "gen.jsonl", GEN_ROWS)
    (folder / "tiny_mc.yaml").write_text(f"""task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {mc}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
""")
    (folder / "tiny_gen.yaml").write_text(f"""task: tiny_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {gen}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{completion}}}}"
generation_kwargs:
  until: ["."]
  max_gen_toks: 6
  do_sample: false
metric_list:
  - metric: exact_match
""")
    return str(folder)


def plain_greedy(model, tokenizer, prompt: str, max_new: int, until: list[str]) -> str:
    """No cache, no batch: the full sequence through the model at every step, argmax, stop at EOS."""
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    new = []
    for _ in range(max_new):
        with torch.no_grad():
            token = int(model(input_ids=torch.tensor([ids + new])).logits[0, -1].argmax())
        if token == tokenizer.eos_token_id:
            break
        new.append(token)
    text = tokenizer.decode(new, skip_special_tokens=True)
    for stop in until:
        text = text.split(stop)[0]
    return text


def plain_mc_accuracy(model, tokenizer) -> float:
    """The argmax of the choices' log-likelihoods, one unbatched row each."""
    correct = []
    for row in MC_ROWS:
        context = row["question"].rstrip()  # lm-eval moves the context's trailing spaces to the continuation
        scores = [direct_loglikelihood(model, tokenizer.encode(context, add_special_tokens=False),
                                       tokenizer.encode(row["question"][len(context):] + " " + c,
                                                        add_special_tokens=False))[0]
                  for c in row["choices"]]
        correct.append(float(max(range(3), key=scores.__getitem__) == row["answer"]))
    return sum(correct) / len(correct)


def test_scores_equal_a_plain_loop_and_files_are_written(model, tmp_path):
    tokenizer = tiny_tokenizer()
    tasks = write_tasks(tmp_path)
    out = tmp_path / "out"
    results = evaluate(model, tokenizer, "tiny_mc,tiny_gen", include_path=tasks, batch_size=4, output=str(out),
                       log_samples=True, builtin_tasks=False)
    assert results["results"]["tiny_mc"]["acc,none"] == pytest.approx(plain_mc_accuracy(model, tokenizer))
    # generation: the same texts as a plain greedy loop, and exact match over them
    texts = [plain_greedy(model, tokenizer, row["prompt"], 6, ["."]) for row in GEN_ROWS]
    by_doc = {s["doc_id"]: s["filtered_resps"][0] for s in results["samples"]["tiny_gen"]}
    assert [by_doc[i] for i in range(len(GEN_ROWS))] == texts
    expected_em = sum(t == row["completion"] for t, row in zip(texts, GEN_ROWS)) / len(GEN_ROWS)
    assert results["results"]["tiny_gen"]["exact_match,none"] == pytest.approx(expected_em)
    # routing: per task, the expert weights (a softmax) average to a distribution
    saved = json.loads((out / "results.json").read_text())
    assert saved["results"]["tiny_mc"]["acc,none"] == results["results"]["tiny_mc"]["acc,none"]
    with open(out / "routing.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [r["task"] for r in rows] == ["tiny_gen", "tiny_mc"]
    for r in rows:
        assert sum(float(r[e]) for e in model.expert_names) == pytest.approx(1.0, abs=1e-5)
    n_mc_tokens = sum(len(tokenizer.encode(row["question"] + " " + c, add_special_tokens=False)) - 1
                      for row in MC_ROWS for c in row["choices"])
    assert int(rows[1]["tokens"]) == n_mc_tokens
    assert (out / "routing.png").stat().st_size > 1000


def test_cli_eval_writes_results_and_routing(model, tmp_path, capsys):
    from loramix.cli import main

    tokenizer = tiny_tokenizer()
    model.save_pretrained(str(tmp_path / "ck"))
    tokenizer.save_pretrained(str(tmp_path / "ck"))
    base = tmp_path / "base"
    model_base_copy = tiny_base("llama")  # the fixture's base, rebuilt from the same seed
    model_base_copy.save_pretrained(str(base))
    tasks = write_tasks(tmp_path)
    assert main(["eval", "--model", str(tmp_path / "ck"), "--base", str(base), "--tasks", "tiny_mc",
                 "--include-path", tasks, "--no-builtin-tasks", "--output", str(tmp_path / "out")]) == 0
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["results"]["tiny_mc"]["acc,none"] == pytest.approx(plain_mc_accuracy(model, tokenizer))
    assert list(saved["routing"]) == ["tiny_mc"] and "routing of tiny_mc" in capsys.readouterr().out


def test_registering_our_model_keeps_lm_evals_own_models():
    """lm-eval 0.4.13 fills its registry lazily: a model registered before its own are imported hid them all (so
    `local-completions` against the server failed after any `loramix eval` in the same process). A fresh process,
    since this one may have imported them already."""
    import subprocess
    import sys

    code = ("from loramix.evaluation import lm_class; lm_class()\n"
            "from lm_eval.api.registry import get_model\n"
            "print(get_model('local-completions').__name__, get_model('loramix').__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["LocalCompletionsAPI", "XLoraLM"]


# ---- bad task names and task options: one line, early where possible, and what was computed kept ------------------
def test_misspelt_task_is_one_line_with_a_suggestion_before_the_model_loads(tmp_path, capsys, monkeypatch):
    from loramix.cli import main

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the task names were checked")

    monkeypatch.setattr(XLoraModel, "from_pretrained", no_model)
    tasks = write_tasks(tmp_path)
    argv = ["eval", "--model", str(tmp_path / "no-such-checkpoint"), "--tasks", "tiny_mc,tiny_gne",
            "--include-path", tasks, "--no-builtin-tasks"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("loramix eval: tasks: 'tiny_gne' is not a task") and "did you mean 'tiny_gen'?" in err
    assert "lm-eval's own tasks were left out" in err
    # lm-eval's own tasks are searched unless --no-builtin-tasks
    assert main(["eval", "--model", str(tmp_path / "no-such-checkpoint"), "--tasks", "hellaswg"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'hellaswg' is not a task" in err and "'hellaswag'" in err


def bad_option_task(folder, option: str) -> str:
    """tiny_gen (generation, exact match) with `option` added to its YAML at the given place."""
    write_tasks(folder)
    text = (folder / "tiny_gen.yaml").read_text()
    if option == "unknown key":
        text = text.replace("test_split: test\n", "test_split: test\nnum_fewshoot: 2\n")
    else:  # a misspelt metric option: lm-eval only calls the metric with it after every answer is generated
        text = text.replace("  - metric: exact_match\n", "  - metric: exact_match\n    ignroe_case: true\n")
    (folder / "tiny_gen.yaml").write_text(text)
    return str(folder)


def test_bad_task_option_is_one_line_before_the_model_loads(tmp_path, capsys, monkeypatch):
    from loramix.cli import main

    monkeypatch.setattr(XLoraModel, "from_pretrained", lambda *a, **k: pytest.fail("model loaded"))
    tasks = bad_option_task(tmp_path, "unknown key")
    assert main(["eval", "--model", str(tmp_path / "ck"), "--tasks", "tiny_gen", "--include-path", tasks,
                 "--no-builtin-tasks"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("loramix eval: task 'tiny_gen': ") and "'num_fewshoot'" in err


def test_late_failure_is_one_line_and_keeps_what_was_computed(model, tmp_path, capsys):
    """The metric option fails only once the answers exist: the line names the task, and the answers (equal to a
    plain greedy loop's) and the routing so far are saved, atomically, where the line says."""
    from loramix.cli import main

    tokenizer = tiny_tokenizer()
    model.save_pretrained(str(tmp_path / "ck"))
    tokenizer.save_pretrained(str(tmp_path / "ck"))
    tiny_base("llama").save_pretrained(str(tmp_path / "base"))  # the fixture's base, rebuilt from the same seed
    (tmp_path / "tasks").mkdir()
    tasks = bad_option_task(tmp_path / "tasks", "metric option")
    out = tmp_path / "out"
    argv = ["eval", "--model", str(tmp_path / "ck"), "--base", str(tmp_path / "base"), "--tasks", "tiny_mc,tiny_gen",
            "--include-path", tasks, "--no-builtin-tasks", "--output", str(out)]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err  # lm-eval's own log lines and progress bars, then ours
    assert "Traceback" not in err
    err = err.splitlines()[-1]
    assert err.startswith("loramix eval: lm-eval stopped: task 'tiny_gen': TypeError: ")
    assert f"what was computed is in {out / 'results.json'}" in err
    saved = json.loads((out / "results.json").read_text())
    assert saved["error"].startswith("task 'tiny_gen': TypeError")
    assert sorted(saved["routing"]) == ["tiny_gen", "tiny_mc"]
    assert saved["responses"] == 3 * len(MC_ROWS) + len(GEN_ROWS)
    rows = [json.loads(line) for line in (out / "responses.jsonl").read_text().splitlines()]
    answers = {r["doc_id"]: r["resps"][0] for r in rows if r["task"] == "tiny_gen"}
    assert [answers[i] for i in range(len(GEN_ROWS))] == [plain_greedy(model, tokenizer, r["prompt"], 6, ["."])
                                                         for r in GEN_ROWS]
    assert sorted(p.name for p in out.iterdir()) == ["responses.jsonl", "results.json", "routing.csv", "routing.png"]
