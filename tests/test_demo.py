"""The demo: its domains and scorers, the static merge it compares against, and a quick run end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from loramix.demo.domains import (
    COMPOSED,
    CONVERSATION_SEPARATOR,
    composed_rows,
    conversation_rows,
    domain_rows,
    handover_rows,
    make_domains,
    material_table,
    score_exact,
    score_forward,
    score_inverse,
    unfolding_force,
    with_context,
)


def test_the_force_rule_by_hand():
    # G A V L W: 1 + 2 + 4 + 5 + 7 = 19, hydrophobic neighbours V-L and L-W: + 2 * 3
    assert unfolding_force("GAVLW") == 25
    assert unfolding_force("GSG") == 4
    assert score_forward(" 25", "25") == 1.0 and score_forward("35", "25") == 0.5 and score_forward("x", "25") == 0
    assert score_inverse("GAVLW", "28") == 1.0 and score_inverse("GAVLW", "31") == 0.0
    assert score_inverse("GAXLW", "25") == 0.0 and score_inverse("GA", "3") == 0.0
    assert score_exact(" 42 ", "42") == 1.0 and score_exact("421", "42") == 0.0


def test_domains_are_deterministic_and_held_out():
    for domain in make_domains(3):
        test = domain_rows(domain, 20, 3, "test")
        assert test == domain_rows(domain, 20, 3, "test")
        train = domain_rows(domain, 200, 3, "train", exclude={r["prompt"] for r in test})
        if domain.name not in ("recall", "protein_inverse"):  # see domain_rows: those two share prompts by nature
            assert not {r["prompt"] for r in test} & {r["prompt"] for r in train}
        assert len({r["prompt"] for r in test}) == len(test)
        for row in test:  # the reference answer scores 1 with the domain's own scorer
            answer = row["completion"].strip()
            assert domain.score(answer, row["reference"]) == 1.0, (domain.name, row)
    assert material_table(3) == material_table(3) != material_table(4)


def test_composed_rows_score_each_part_and_hold_out_materials():
    table = material_table(3)
    train, test = composed_rows(3, "train", 40), composed_rows(3, "test")
    assert {r["prompt"] for r in train}.isdisjoint({r["prompt"] for r in test}) and len(test) == len(table) // 2
    for row in test:
        material = row["prompt"].split()[2]
        sequence = table[material]["sequence"]
        force = unfolding_force(sequence)
        assert row["completion"] == f" {sequence} = {force}" and row["reference"] == f"{sequence} {force}"
        text = row["prompt"] + row["completion"]  # the spans hand over from recall to protein_forward at the force
        (start, handover, first), (_, end, second) = row["expert"]
        assert (start, first, second, end) == (0, "recall", "protein_forward", len(text))
        assert text[handover:] == f" {force}" and text[:handover].endswith(f" {sequence} =")
        assert COMPOSED.score(row["completion"].strip(), row["reference"]) == 1.0
        assert COMPOSED.score(f"{sequence} =", row["reference"]) == 0.5  # the recall expert's answer alone
        assert COMPOSED.score(f"GG = {force + 5}", row["reference"]) == 0.5  # a wrong sequence, a force within 5
        assert COMPOSED.score(f"{sequence} = {force + 6}", row["reference"]) == 0.5


def test_composed_split_covers_the_sequence_lengths():
    """Held-out and training materials alternate by sequence length, so neither half lacks the long ones."""
    for seed in (0, 3):
        table = material_table(seed)
        lengths = {split: sorted(len(table[r["prompt"].split()[2]]["sequence"]) for r in composed_rows(seed, split))
                   for split in ("train", "test")}
        ranked = sorted(len(v["sequence"]) for v in table.values())
        assert lengths["train"] == ranked[0::2] and lengths["test"] == ranked[1::2]


def test_handover_rows_train_only_the_force_of_materials_no_expert_knows():
    table = material_table(3)
    rows = handover_rows(3, 200)
    assert rows == handover_rows(3, 200) and len(rows) == 200
    lengths = set()
    for row in rows:
        words = row["prompt"].split()
        material, sequence = words[2], words[5]
        assert words[:2] == ["fold", "recall"] and words[3:5] == ["sequence", "="] and words[6:] == ["="]
        assert material.endswith("ite") and material not in table
        assert row["completion"] == f" {unfolding_force(sequence)}"
        end = len(row["prompt"])
        assert row["expert"] == [[end, end + len(row["completion"]), "protein_forward"]]  # the prompt: no label
        lengths.add(len(sequence))
    assert lengths == set(range(3, 9))


def test_conversations_label_each_turn_and_train_the_last_answer():
    domains = make_domains(3)
    train = {d.name: domain_rows(d, 30, 3, "train") for d in domains}
    rows = conversation_rows(train, 300, 3)
    assert rows == conversation_rows(train, 300, 3)
    assert {len(r["expert"]) for r in rows} == {2, 3, 4, 5}
    for row in rows[:50]:
        text = row["prompt"] + row["completion"]
        spans = row["expert"]
        assert spans[0][0] == 0 and spans[-1][1] == len(text)
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))  # the turns tile the text
        assert len({name for _, _, name in spans}) == len(spans)  # distinct domains
        for k, (start, end, name) in enumerate(spans):
            turn = text[start:end]
            if k:
                assert turn.startswith(CONVERSATION_SEPARATOR + " ")
                turn = turn[len(CONVERSATION_SEPARATOR) + 1:]
            assert turn in {r["prompt"] + r["completion"] for r in train[name]}
        _, _, last = spans[-1]  # the last turn's answer is the one trained
        assert text.endswith(row["completion"]) and row["completion"] in {r["completion"] for r in train[last]}


def test_context_is_unlabelled_and_untrained_and_keeps_the_task():
    """with_context puts a generic sentence before about half of the prompts. Tokenized for the gate, a row
    gives the tokens of its whole text (the labelled span starts at a space), trains only the completion, leaves
    the context without a routing label, and routes the task's tokens as the plain row does."""
    from loramix.demo.pipeline import build_tokenizer
    from loramix.training.data import DataFormat, tokenize_row

    domains = make_domains(3)
    names = [d.name for d in domains]
    rows = domain_rows(domains[4], 200, 3, "train")  # recall
    framed = with_context(rows, 3)
    assert framed == with_context(rows, 3)
    prefixed = [(plain, row) for plain, row in zip(rows, framed) if plain != row]
    assert 70 <= len(prefixed) <= 130 and len(framed) == len(rows)
    tokenizer = build_tokenizer([r["prompt"] + r["completion"] for r in framed], vocab_size=200)
    fmt = DataFormat(expert_field="expert")
    for plain, row in prefixed[:20]:
        context = row["prompt"][:-len(plain["prompt"]) - 1]
        assert row["prompt"] == f"{context} {plain['prompt']}" and row["completion"] == plain["completion"]
        assert row["expert"] == [[len(context), len(row["prompt"] + row["completion"]), "recall"]]
        before, after = tokenize_row(plain, fmt, tokenizer, names), tokenize_row(row, fmt, tokenizer, names)
        assert after.input_ids[:-1] == tokenizer(row["prompt"] + row["completion"])["input_ids"]  # then </s>
        n = len(after.input_ids) - len(before.input_ids)  # the context's tokens
        assert after.input_ids[n:] == before.input_ids and after.labels[n:] == before.labels
        assert set(after.labels[:n]) == {-100}  # the context is not trained
        assert set(after.routing[:n - 1]) == {-100}  # nor labelled, but for its last position, which writes
        assert after.routing[n - 1] == names.index("recall")  # the task's first token
        assert after.routing[n:] == before.routing


def test_static_merge_is_xlora_with_constant_scalings(tmp_path):
    """PEFT's add_weighted_adapter(cat, uniform weights) is what the demo calls the static merge."""
    from helpers import make_experts, tiny_base
    from peft import PeftModel

    from loramix import XLoraConfig, XLoraModel

    base = tiny_base("llama")
    adapters = make_experts(base, "llama", tmp_path)
    names = list(adapters)
    import copy

    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), adapters[names[0]], adapter_name=names[0])
    for name in names[1:]:
        peft_model.load_adapter(adapters[name], adapter_name=name)
    peft_model.add_weighted_adapter(names, [1 / 3] * 3, "merge", combination_type="cat")
    peft_model.set_adapter("merge")
    model = XLoraModel.from_base(base, XLoraConfig(adapters=adapters))
    ids = torch.randint(3, 97, (2, 7), generator=torch.Generator().manual_seed(0))
    constant = torch.full((1, 1, model.n_lora_layers, 3), 1 / 3)
    with torch.no_grad():
        ours = model(input_ids=ids, scalings=constant).logits
        theirs = peft_model(input_ids=ids).logits
        plain = base(input_ids=ids).logits
    assert (ours - plain).abs().max() > 0.05  # the experts do move the logits
    assert torch.allclose(ours, theirs, atol=1e-5)


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    """`loramix demo --quick`, as CI and a new user run it."""
    from loramix.cli import main

    out = tmp_path_factory.mktemp("demo") / "out"
    assert main(["demo", "--quick", "--out", str(out), "--no-progress"]) == 0
    return out, json.loads((out / "results.json").read_text())


def test_quick_demo_writes_every_file_with_the_documented_schema(quick_demo):
    out, results = quick_demo
    names = [d.name for d in make_domains(0)]
    assert set(results) == {"domains", "composed", "composed_parts", "routing", "r2", "mixing", "history",
                            "composed_figure", "seconds", "cpu_seconds", "cpus", "quick", "seed",
                            "versions"} and results["quick"] is True
    assert set(results["composed"]) == {"material_force"}
    composed, parts = results["composed"]["material_force"], results["composed_parts"]["material_force"]
    assert set(composed) == {"base", "experts", "static_merge", "xlora"}
    scores = {"base": composed["base"], **composed["experts"], "static_merge": composed["static_merge"],
              "xlora": composed["xlora"]}
    for system, value in scores.items():  # the score is half a point per right part, from the same answers
        right = parts["sequence_right"][system] + parts["force_right"][system]
        assert value == round(right / (2 * parts["prompts"]), 4), system
    assert all(parts["force_right"][k] <= parts["force_written"][k] <= parts["prompts"] for k in scores)
    assert set(parts["force_first_digit"]) == {"protein_forward_throughout", "recall_then_protein_forward", "gate"}
    assert all(0 <= p <= 1 for p in parts["force_first_digit"].values())
    assert set(parts["end_mark"]) == {"recall", "protein_forward"} and sum(parts["end_mark"].values()) <= 1 + 1e-3
    assert set(results["r2"]["protein_forward"]["experts"]) == set(names)
    assert results["history"]["turns"] == 5
    for domain in names:
        row = results["domains"][domain]
        assert set(row) == {"base", "experts", "static_merge", "xlora"}
        assert all(name.startswith(expert_domain) for name, expert_domain in zip(row["experts"], names))
        assert all(0 <= v <= 1 for v in [row["base"], row["static_merge"], row["xlora"], *row["experts"].values()])
        assert sum(results["routing"][domain].values()) == pytest.approx(1.0, abs=1e-3)
    report = (out / "report.md").read_text()
    for domain in names:
        figure = out / "figures" / f"scalings_{domain}.png"
        assert figure.read_bytes()[:4] == b"\x89PNG" and f"figures/scalings_{domain}.png" in report
    for name in ("history", "composed_history", "composed_scalings"):
        assert (out / "figures" / f"{name}.png").read_bytes()[:4] == b"\x89PNG" and f"figures/{name}.png" in report
    assert "| **mean** |" in report and "How this compares to the paper" in report


def test_quick_demo_xlora_beats_the_static_merge_and_routes_by_domain(quick_demo):
    _, results = quick_demo
    rows = results["domains"].values()
    xlora = sum(r["xlora"] for r in rows) / len(rows)
    merge = sum(r["static_merge"] for r in rows) / len(rows)
    base = sum(r["base"] for r in rows) / len(rows)
    assert xlora >= merge and xlora > base + 0.1, (xlora, merge, base)
    own_top = [d for d, r in results["routing"].items() if max(r, key=r.get) == d]
    assert len(own_top) >= 4, results["routing"]


def test_demo_models_work_with_generate_and_analyze_afterwards(quick_demo, capsys):
    from loramix import XLoraModel
    from loramix.analysis import ScalingsLog
    from loramix.cli import main

    out, _ = quick_demo
    model = XLoraModel.from_pretrained(str(out / "xlora"))
    assert model.expert_names == [d.name for d in make_domains(0)]
    assert main(["generate", "--model", str(out / "xlora"), "--prompt", "sum 41+7 =", "--max-new-tokens", "4"]) == 0
    assert main(["analyze", "--scalings", str(out / "figures" / "history_scalings.safetensors"), "--out",
                 str(out / "again")]) == 0
    log = ScalingsLog.load(str(out / "figures" / "history_scalings.safetensors"))
    assert [label for _, _, label in log.segments] == ["recall", "arithmetic", "protein_forward", "logic",
                                                       "protein_inverse"]


def test_rerun_reuses_finished_stages(quick_demo):
    from loramix.demo import run_demo

    out, results = quick_demo
    stamp = os.path.getmtime(out / "xlora" / "xlora_classifier.safetensors")
    messages = []
    again = run_demo(str(out), quick=True, seed=0, progress=False, log=messages.append)
    assert [m for m in messages if m.startswith("[")] == [f"[{s}] reusing {out / s}" for s in
                                                            ("data", "base", "experts", "xlora")]
    assert os.path.getmtime(out / "xlora" / "xlora_classifier.safetensors") == stamp
    assert again["domains"] == results["domains"] and again["routing"] == results["routing"]


def test_demo_refuses_an_output_path_that_is_a_file(tmp_path, capsys):
    from loramix.cli import main

    target = tmp_path / "taken"
    target.write_text("keep me")
    assert main(["demo", "--quick", "--out", str(target)]) == 2
    assert f"--out {target}: exists and is not a folder" in capsys.readouterr().err
    assert target.read_text() == "keep me"


# ---- reproducibility: the same seed gives the same results, whatever the process's hash seed -----------------------
def _run(args: list[str], hash_seed: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONHASHSEED": hash_seed}
    return subprocess.run([sys.executable, "-m", "loramix.cli", *args], env=env, capture_output=True, text=True,
                          timeout=900)


def test_demo_data_does_not_depend_on_the_hash_seed(tmp_path):
    """The logic domain once drew its names from a set, whose order follows PYTHONHASHSEED: two runs with the
    same --seed trained on different data, and the whole table changed."""
    code = ("import sys; from loramix.demo.pipeline import _make_data, SCALES; from loramix.demo.domains import "
            "make_domains; _make_data(sys.argv[1], make_domains(0), dict(SCALES['quick'], train_rows=60), 0)")
    files = {}
    for hash_seed in ("1", "2"):
        folder = tmp_path / hash_seed
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        subprocess.run([sys.executable, "-c", code, str(folder)], env=env, check=True, timeout=120)
        files[hash_seed] = {p.name: p.read_bytes() for p in sorted(folder.iterdir())}
    assert files["1"].keys() == files["2"].keys() and "logic_train.jsonl" in files["1"]
    assert files["1"] == files["2"]


def test_quick_demo_reruns_to_the_same_scores(quick_demo, tmp_path):
    """A second quick run from scratch, in a process with another hash seed, writes the same scores."""
    _, results = quick_demo
    again = tmp_path / "again"
    run = _run(["demo", "--quick", "--out", str(again), "--no-progress"], hash_seed="12345")
    assert run.returncode == 0, run.stderr[-3000:]
    rerun = json.loads((again / "results.json").read_text())
    for key in ("domains", "composed", "composed_parts", "routing", "r2", "mixing", "history", "composed_figure"):
        assert rerun[key] == results[key], key


def test_the_readme_table_script_rewrites_only_its_block_from_results(quick_demo, tmp_path):
    from loramix.demo.report import summary_table

    out, results = quick_demo
    readme = tmp_path / "README.md"
    start, end = "<!-- demo-table:start (scripts/demo_table.py writes this block) -->", "<!-- demo-table:end -->"
    readme.write_text(f"# head\n{start}\nold table\n{end}\ntail\n")
    script = os.path.join(os.path.dirname(__file__), "..", "scripts", "demo_table.py")
    run = subprocess.run([sys.executable, script, str(out / "results.json"), str(readme)], capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    text = readme.read_text()
    assert text.startswith(f"# head\n{start}\n") and text.endswith(f"\n{end}\ntail\n") and "old table" not in text
    assert summary_table(results) in text
    assert all(f"{name} {version}" in text for name, version in results["versions"].items())
    assert set(results["versions"]) == {"loramix", "torch", "transformers", "peft"}
