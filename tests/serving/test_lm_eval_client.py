"""lm-evaluation-harness (0.4.13) against the server with its default settings: `local-completions` for a
generate_until task and a multiple-choice task (token-id prompts, echo and logprobs, several prompts per request
with --batch_size 4) and `local-chat-completions` with the server's chat template. Tasks are small YAMLs over
JSONL files written here (lm-eval cannot download data in the tests). Skipped where lm_eval is not installed.

Each score is checked sample by sample: a multiple-choice answer's log-likelihoods against a direct log_softmax
of the X-LoRA logits, a generation against the model's own greedy generation."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import CHAT_TEMPLATE, tiny_tokenizer, write_jsonl

lm_eval = pytest.importorskip("lm_eval")

MC_DOCS = [{"question": f"q{i}: {a}+{b}=", "choices": [str(a + b), str(a + b + 1), "x", "no"], "answer": i % 4}
           for i, (a, b) in enumerate([(1, 2), (3, 4), (10, 5), (7, 7), (2, 9), (6, 1)])]
GEN_DOCS = [{"prompt": f"r {w}=", "target": w[::-1]} for w in ("abc", "hello", "gate", "xlora", "mix")]

GEN_TASK = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{target}}}}"
generation_kwargs:
  until: ["="]
  max_gen_toks: 6
  do_sample: false
  temperature: 0
metric_list:
  - metric: exact_match
"""

MC_TASK = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: choices
doc_to_target: answer
metric_list:
  - metric: acc
"""


@pytest.fixture(scope="module")
def served(live, reference, tmp_path_factory):
    state, server = live
    tasks = tmp_path_factory.mktemp("tasks")
    for name, template, docs in (("loramix_gen", GEN_TASK, GEN_DOCS), ("loramix_mc", MC_TASK, MC_DOCS)):
        data = write_jsonl(tasks / f"{name}.jsonl", docs)
        (tasks / f"{name}.yaml").write_text(template.format(name=name, data=data))
    calls = []  # rows per request: lm-eval's batches arrive as prompt lists
    submit_all = state.engine.submit_all
    state.engine.submit_all = lambda jobs: (calls.append(len(jobs)), submit_all(jobs))[1]
    try:
        yield server, tasks, reference[0], calls
    finally:
        del state.engine.submit_all  # the engine's own method again


def _evaluate(server, tasks, model_type: str, task: str, **extra):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    api = "chat/completions" if "chat" in model_type else "completions"
    return simple_evaluate(model=model_type, model_args={"model": "tiny-xlora",
                                                         "base_url": f"{server.url}/v1/{api}", **extra},
                           tasks=[task], log_samples=True, bootstrap_iters=0,
                           task_manager=TaskManager(include_path=str(tasks), include_defaults=False),
                           **({"apply_chat_template": True} if "chat" in model_type else {"batch_size": 4}))


def _greedy(model, ids: list[int], n: int, until: str) -> str:
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, eos_token_id=2)
    new = out[0, len(ids):].tolist()
    new = new[:new.index(2)] if 2 in new else new
    return tiny_tokenizer().decode(new).split(until)[0]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def test_multiple_choice_with_token_id_batches(served, served_checkpoint):
    server, tasks, model, calls = served
    calls.clear()
    results = _evaluate(server, tasks, "local-completions", "loramix_mc", tokenizer=str(served_checkpoint))
    assert max(calls) == 4 and sum(calls) == 4 * len(MC_DOCS)  # --batch_size 4: four token-id lists a request
    tok = tiny_tokenizer()
    correct = []
    for sample in results["samples"]["loramix_mc"]:
        doc = sample["doc"]
        scores = []
        for choice, (loglikelihood, _) in zip(doc["choices"], sample["filtered_resps"]):
            context, continuation = tok(doc["question"])["input_ids"], tok(" " + choice)["input_ids"]
            ids = context + continuation
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([ids])).logits[0].double()
            reference = torch.log_softmax(logits, -1)
            expected = sum(reference[t - 1, ids[t]].item() for t in range(len(context), len(ids)))
            assert abs(loglikelihood - expected) < 1e-4
            scores.append(expected)
        correct.append(float(max(range(len(scores)), key=scores.__getitem__) == doc["answer"]))
    assert len(correct) == len(MC_DOCS)
    assert results["results"]["loramix_mc"]["acc,none"] == pytest.approx(sum(correct) / len(correct))


def test_generate_until_with_batches(served, served_checkpoint):
    server, tasks, model, calls = served
    calls.clear()
    results = _evaluate(server, tasks, "local-completions", "loramix_gen", tokenizer=str(served_checkpoint))
    assert max(calls) > 1
    samples = results["samples"]["loramix_gen"]
    assert len(samples) == len(GEN_DOCS)
    for sample in samples:
        expected = _greedy(model, tiny_tokenizer()(sample["doc"]["prompt"])["input_ids"], 6, "=")
        assert sample["filtered_resps"][0] == expected
    hits = [float(s["filtered_resps"][0] == s["doc"]["target"]) for s in samples]
    assert results["results"]["loramix_gen"]["exact_match,none"] == pytest.approx(sum(hits) / len(hits))


def test_chat_completions_with_the_servers_template(served):
    server, tasks, model, _ = served
    results = _evaluate(server, tasks, "local-chat-completions", "loramix_gen")
    tok = tiny_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    for sample in results["samples"]["loramix_gen"]:
        messages = json.loads(sample["arguments"][0][0][0])  # what lm-eval sent: ((messages JSON,), gen_kwargs)
        ids = tok(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
                  add_special_tokens=False)["input_ids"]
        assert sample["filtered_resps"][0] == _greedy(model, ids, 6, "=")


def test_in_process_eval_scores_equal_the_servers(served, served_checkpoint):
    """`loramix.evaluate` (lm-eval in process, batched log-likelihoods and the dual-cache generate) gives the
    scores, and the per-choice log-likelihoods, that lm-eval gets through the server."""
    from loramix import evaluate
    from loramix.loading import load_tokenizer

    server, tasks, model, _ = served
    through_server = {task: _evaluate(server, tasks, "local-completions", task, tokenizer=str(served_checkpoint))
                      for task in ("loramix_mc", "loramix_gen")}
    in_process = evaluate(model, load_tokenizer(str(served_checkpoint)), ["loramix_mc", "loramix_gen"],
                          include_path=str(tasks), batch_size=4, log_samples=True, builtin_tasks=False)
    for task, metric in (("loramix_mc", "acc,none"), ("loramix_gen", "exact_match,none")):
        assert in_process["results"][task][metric] == through_server[task]["results"][task][metric]
    served_mc = {s["doc_id"]: s["filtered_resps"] for s in through_server["loramix_mc"]["samples"]["loramix_mc"]}
    for sample in in_process["samples"]["loramix_mc"]:
        for (ours, our_greedy), (theirs, their_greedy) in zip(sample["filtered_resps"], served_mc[sample["doc_id"]]):
            assert abs(ours - theirs) < 1e-4 and our_greedy == their_greedy
    served_gen = {s["doc_id"]: s["filtered_resps"] for s in through_server["loramix_gen"]["samples"]["loramix_gen"]}
    assert {s["doc_id"]: s["filtered_resps"] for s in in_process["samples"]["loramix_gen"]} == served_gen
