"""Training data: every file type and format, loss masks, bad rows with file and line, mixing and batching."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from helpers import tiny_tokenizer, write_jsonl

from loramix.training.data import (
    BatchPlan,
    DataError,
    DataFormat,
    DataSource,
    collate,
    data_sources,
    load_dataset,
    read_rows,
)


def _quiet(*_):
    pass


def _load(paths, fmt=None, **kw):
    return load_dataset([str(p) for p in paths], tiny_tokenizer(), fmt or DataFormat(), log=_quiet, **kw)


def _trained_text(example) -> str:
    tok = tiny_tokenizer()
    return tok.decode([i for i, lab in zip(example.input_ids, example.labels) if lab != -100],
                      skip_special_tokens=False)


def test_prompt_completion_masks_the_prompt(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "Q: 2+2?", "completion": " 4"}])
    (example,) = _load([path]).examples
    tok = tiny_tokenizer()
    assert tok.decode(example.input_ids) == "Q: 2+2? 4</s>"
    assert _trained_text(example) == " 4</s>"
    (full,) = _load([path], DataFormat(train_on_prompt=True)).examples
    assert full.labels == full.input_ids


def test_every_file_type_gives_the_same_examples(tmp_path):
    rows = [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(5)]
    jsonl = write_jsonl(tmp_path / "d.jsonl", rows)
    (tmp_path / "d.json").write_text(json.dumps(rows))
    with open(tmp_path / "d.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["prompt", "completion"])
        w.writeheader()
        w.writerows(rows)
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    reference = [e.input_ids for e in _load([jsonl]).examples]
    for other in ("d.json", "d.csv", "d.parquet", "saved"):
        assert [e.input_ids for e in _load([tmp_path / other]).examples] == reference, other


def test_templates_keep_numbers_as_written(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [])
    with open(path, "w") as f:
        f.write('{"question": "force of AAG", "answer": 1.50, "n": 7.250}\n')
    fmt = DataFormat(prompt_template="Question: {question} | Answer:", completion_template=" {answer} ({n})")
    (example,) = _load([path], fmt).examples
    assert tiny_tokenizer().decode(example.input_ids) == "Question: force of AAG | Answer: 1.50 (7.250)</s>"
    assert _trained_text(example) == " 1.50 (7.250)</s>"


def test_plain_text_trains_on_every_token(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"body": "hello world"}])
    (example,) = _load([path], DataFormat(text_field="body")).examples
    assert example.labels == example.input_ids and tiny_tokenizer().decode(example.input_ids) == "<s>hello world</s>" \
        or tiny_tokenizer().decode(example.input_ids) == "hello world</s>"


def test_chat_trains_on_assistant_turns_only(tmp_path):
    tok = tiny_tokenizer()
    tok.chat_template = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}|{% endfor %}"
                         "{% if add_generation_prompt %}<assistant>{% endif %}")
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "bye"}, {"role": "assistant", "content": "ciao"}]
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": chat}])
    (example,) = load_dataset([path], tok, DataFormat(messages_field="messages"), log=_quiet).examples
    assert tok.decode(example.input_ids) == "<user>hi|<assistant>hello|<user>bye|<assistant>ciao|"
    trained = [i if lab != -100 else None for i, lab in zip(example.input_ids, example.labels)]
    runs, current = [], []
    for t in trained + [None]:
        if t is None and current:
            runs.append(tok.decode(current))
            current = []
        elif t is not None:
            current.append(t)
    assert runs == ["hello|", "ciao|"]
    with pytest.raises(DataError, match="no chat template"):
        load_dataset([path], tiny_tokenizer(), DataFormat(messages_field="messages"), log=_quiet)


def test_bad_rows_are_reported_with_file_and_line(tmp_path):
    rows = [{"prompt": "a", "completion": "b"}, {"prompt": "a"}, {"prompt": "a", "completion": ""},
            {"prompt": "a", "completion": "x" * 100}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    with open(path, "a") as f:
        f.write("{not json\n")
    messages = []
    ds = load_dataset([path], tiny_tokenizer(), DataFormat(max_length=50), log=messages.append)
    assert len(ds.examples) == 1
    assert [(b.source, b.reason.split(" (")[0]) for b in ds.bad_rows] == [
        (f"{path}:2", "missing field 'completion'"), (f"{path}:3", "empty completion"),
        (f"{path}:4", "102 tokens, over max_length 50"), (f"{path}:5", "not valid JSON")]
    assert messages[0].startswith("skipped 4 bad row(s)") and f"{path}:2" in messages[1]
    with pytest.raises(DataError, match=f"{path}:2: missing field 'completion'"):
        load_dataset([path], tiny_tokenizer(), DataFormat(max_length=50, strict=True), log=_quiet)


def test_unusable_sources_fail_before_training(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(DataError, match=r"no row has the field\(s\) \['prompt', 'completion'\].*question"):
        _load([path])
    with pytest.raises(DataError, match=r"\['colour'\]"):
        _load([path], DataFormat(prompt_template="{question} {colour}", completion_template="{answer}"))
    with pytest.raises(DataError, match="no such data file"):
        _load([tmp_path / "missing.jsonl"])
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataError, match="bad.parquet: cannot read as Parquet"):
        _load([tmp_path / "bad.parquet"])
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(DataError, match="unknown data file type"):
        _load([tmp_path / "d.txt"])
    with pytest.raises(DataError, match="2 weights for 1 data sources"):
        _load([path], DataFormat(prompt_field="question", completion_field="answer"), weights=[1, 2])


def test_hub_dataset_names_go_to_datasets(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(repo, split):
        calls.append((repo, split))
        if repo == "someone/offline":
            raise ConnectionError("no network")
        return [{"prompt": "p", "completion": "c"}]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert list(read_rows("someone/some-data")) == [("someone/some-data:row 0", {"prompt": "p", "completion": "c"})]
    with pytest.raises(DataError, match="someone/offline:test.*split 'test'.*no network"):
        list(read_rows("someone/offline:test"))
    assert calls == [("someone/some-data", "train"), ("someone/offline", "test")]


def test_mixing_weights_set_each_sources_share(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"prompt": "a", "completion": str(i)} for i in range(100)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"prompt": "b", "completion": str(i)} for i in range(20)])
    ds = _load([a, b], weights=[1.0, 3.0])
    plan = BatchPlan(ds, batch_size=4, seed=0)
    drawn = [ds.source_of[i] for k in range(plan.batches_per_epoch) for i in plan.micro_batch(k)]
    assert len(drawn) == 120 and drawn.count(1) == 90  # 3/4 of the epoch from the 20-row source
    # the same mix given as DataSources: the same dataset, the same batches
    typed = load_dataset([DataSource(str(a), 1.0), DataSource(str(b), 3.0)], tiny_tokenizer(), DataFormat(),
                         log=_quiet)
    assert (typed.sources, typed.weights, typed.source_of) == (ds.sources, ds.weights, ds.source_of)
    typed_plan = BatchPlan(typed, batch_size=4, seed=0)
    assert [typed_plan.micro_batch(k) for k in range(30)] == [plan.micro_batch(k) for k in range(30)]


def test_data_sources_are_built_once_with_their_shares():
    assert data_sources("a.jsonl") == (DataSource("a.jsonl"),)
    assert data_sources(["a.jsonl", "b.jsonl"], [1, 3]) == (DataSource("a.jsonl", 1), DataSource("b.jsonl", 3))
    typed = (DataSource("a.jsonl", 2.0), DataSource("b.jsonl", 1.0))
    assert data_sources(typed) == typed and data_sources(list(typed)) == typed
    import pathlib

    assert data_sources([pathlib.Path("a.jsonl"), DataSource("b.jsonl")]) == (DataSource("a.jsonl"),
                                                                             DataSource("b.jsonl"))
    for data, weights, message in [
        ([], None, "no data given"),
        (["a.jsonl"], [1, 2], "data weights: 2 weights for 1 data sources"),
        (["a.jsonl", "b.jsonl"], [1, -2], "data weights: must be positive numbers, got -2 for b.jsonl"),
        (["a.jsonl"], [float("nan")], "data weights: must be positive numbers, got nan for a.jsonl"),
        ([DataSource("a.jsonl")], [1], "data weights: give the weights of DataSource items on the items"),
        ([DataSource("a.jsonl", 1.0), "b.jsonl"], None, "give a weight for every source or for none"),
        ([""], None, "data: expected a file, folder or dataset name, got ''"),
    ]:
        with pytest.raises(DataError, match=message):
            data_sources(data, weights)
    with pytest.raises(DataError, match="data weights: must be positive numbers, got 0"):
        DataSource("a.jsonl", 0)


def test_length_grouping_cuts_padding_and_is_deterministic(tmp_path):
    import random

    rnd = random.Random(0)
    rows = [{"prompt": "p", "completion": "x" * rnd.randint(1, 60)} for _ in range(256)]
    ds = _load([write_jsonl(tmp_path / "d.jsonl", rows)], DataFormat(max_length=128))

    def pad_fraction(batches):
        padded = sum(max(len(ds.examples[i]) for i in b) * len(b) for b in batches)
        return 1 - sum(len(e) for e in ds.examples) / padded

    grouped = BatchPlan(ds, batch_size=8, seed=1)
    batches = [grouped.micro_batch(k) for k in range(grouped.batches_per_epoch)]
    g = torch.Generator().manual_seed(1)
    order = torch.randperm(256, generator=g).tolist()
    unsorted = [order[i:i + 8] for i in range(0, 256, 8)]
    assert sorted(i for b in batches for i in b) == list(range(256))
    assert pad_fraction(batches) < 0.05 < 0.3 < pad_fraction(unsorted)
    assert BatchPlan(ds, batch_size=8, seed=1).micro_batch(37) == grouped.micro_batch(37)
    assert grouped.micro_batch(grouped.batches_per_epoch) != grouped.micro_batch(0)  # epoch 2 reshuffles
    batch = collate([ds.examples[i] for i in batches[0]], pad_id=0)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert int(batch["attention_mask"].sum()) == sum(len(ds.examples[i]) for i in batches[0])


def test_expert_labels_are_optional_per_row_but_must_exist(tmp_path):
    rows = [{"prompt": "a", "completion": "b", "task": "math"}, {"prompt": "c", "completion": "d"},
            {"prompt": "e", "completion": "f", "task": ""}, {"prompt": "g", "completion": "h", "task": "bio"}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    ds = _load([path], DataFormat(expert_field="task"), expert_names=["bio", "math"])
    assert [set(e.routing[:-1]) for e in ds.examples] == [{1}, {-100}, {-100}, {0}]  # unlabelled: cross-entropy only
    unlabelled = write_jsonl(tmp_path / "u.jsonl", rows[1:3])
    with pytest.raises(DataError, match="expert field 'task': no row .* names an expert"):
        _load([unlabelled], DataFormat(expert_field="task"), expert_names=["bio", "math"])
    bad = write_jsonl(tmp_path / "b.jsonl", [{"prompt": "a", "completion": "b", "task": "chem"}] + rows[:1])
    assert [b.reason for b in _load([bad], DataFormat(expert_field="task"), expert_names=["bio", "math"]).bad_rows] \
        == ["task='chem' is not one of the experts ['bio', 'math']"]


# ---- defects of issue 10: each row-level fault is one bad row, never an aborted load ------------------------------
def _reasons(ds):
    return [(b.source, b.reason) for b in ds.bad_rows]


def test_a_deeply_nested_jsonl_line_is_one_bad_row(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "completion": "b"}])
    with open(path, "a") as f:
        f.write("[" * 100_000 + "]" * 100_000 + "\n")
        f.write('{"prompt": "c", "completion": "d"}\n')
    ds = _load([path])
    assert len(ds.examples) == 2 and _reasons(ds) == [(f"{path}:2", "JSON nested too deeply")]
    with pytest.raises(DataError, match=f"{path}:2: JSON nested too deeply"):
        _load([path], DataFormat(strict=True))
    whole = tmp_path / "d.json"
    whole.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(DataError, match=f"{whole}: JSON nested too deeply"):
        _load([whole])


def test_a_chat_row_whose_template_raises_is_one_bad_row(tmp_path):
    tok = tiny_tokenizer()
    tok.chat_template = ("{% for m in messages %}{% if m.content == 'boom' %}{{ raise_exception('no boom here') }}"
                         "{% endif %}<{{ m.role }}>{{ m.content }}|{% endfor %}"
                         "{% if add_generation_prompt %}<assistant>{% endif %}")
    good = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    bad = [{"role": "user", "content": "boom"}, {"role": "assistant", "content": "hello"}]
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": good}, {"messages": bad}, {"messages": good}])
    ds = load_dataset([path], tok, DataFormat(messages_field="messages"), log=_quiet)
    assert len(ds.examples) == 2
    assert _reasons(ds) == [(f"{path}:2", "the chat template failed: TemplateError: no boom here")]


def test_a_utf8_bom_is_not_part_of_the_data(tmp_path):
    rows = [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(3)]
    reference = [e.input_ids for e in _load([write_jsonl(tmp_path / "plain.jsonl", rows)]).examples]
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(r) + "\n" for r in rows).encode())
    (tmp_path / "bom.json").write_bytes(b"\xef\xbb\xbf" + json.dumps(rows).encode())
    (tmp_path / "bom.csv").write_bytes(b"\xef\xbb\xbf" + "prompt,completion\n".encode()
                                       + "".join(f"{r['prompt']},{r['completion']}\n" for r in rows).encode())
    for name in ("bom.jsonl", "bom.json", "bom.csv"):
        ds = _load([tmp_path / name])
        assert [e.input_ids for e in ds.examples] == reference and not ds.bad_rows, name


def test_lists_and_objects_are_bad_rows_numbers_and_booleans_keep_their_text(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": ["a", "b"], "completion": "c"},
                                              {"prompt": "a", "completion": {"x": 1}},
                                              {"prompt": "a", "completion": True}])
    with open(path, "a") as f:
        f.write('{"prompt": 1e5, "completion": -0.10}\n')
    ds = _load([path])
    assert _reasons(ds) == [(f"{path}:1", "field 'prompt' is a list, expected text"),
                            (f"{path}:2", "field 'completion' is an object, expected text")]
    assert [tiny_tokenizer().decode(e.input_ids) for e in ds.examples] == ["atrue</s>", "1e5-0.10</s>"]
    template = DataFormat(prompt_template="{q}", completion_template="{a}")
    listed = write_jsonl(tmp_path / "t.jsonl", [{"q": "x", "a": [1]}, {"q": "x", "a": "y"}])
    assert _reasons(_load([listed], template)) == [(f"{listed}:1", "field 'a' is a list, expected text")]
    expert = write_jsonl(tmp_path / "e.jsonl", [{"prompt": "a", "completion": "b", "task": ["bio"]},
                                                {"prompt": "a", "completion": "b", "task": "bio"}])
    # the expert field may hold a list, of [start, end, expert] spans (issue 15); any other list is a bad row
    assert _reasons(_load([expert], DataFormat(expert_field="task"), expert_names=["bio"])) == [
        (f"{expert}:1", "task: a span must be [start, end, expert] with 0 <= start < end <= 2 (characters of "
                        "prompt + completion), got 'bio'")]


def test_a_csv_field_over_the_csv_modules_default_limit_is_one_long_row(tmp_path):
    import csv as csv_module

    limit = csv_module.field_size_limit()
    path = tmp_path / "d.csv"
    with open(path, "w", newline="") as f:
        w = csv_module.writer(f)
        w.writerows([["prompt", "completion"], ["a", "b"], ["a", "x" * 200_000], ["c", "d"]])
    ds = _load([path])
    assert len(ds.examples) == 2
    assert _reasons(ds) == [(f"{path}:3", "200002 tokens, over max_length 512")]
    assert csv_module.field_size_limit() == limit  # the process-wide setting is left as it was


def test_a_line_that_is_not_utf8_is_one_bad_row(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"prompt": "a", "completion": "b"}\n{"prompt": "\xff", "completion": "b"}\n'
                     b'{"prompt": "c", "completion": "d"}\n')
    ds = _load([path])
    assert len(ds.examples) == 2 and _reasons(ds) == [(f"{path}:2", "not valid UTF-8")]


def test_a_lone_surrogate_is_one_bad_row(tmp_path):  # found by tests/test_data_fuzz.py
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "a\\ud800", "completion": "b"}\n{"prompt": "c", "completion": "d"}\n')
    ds = _load([path])
    assert len(ds.examples) == 1 and _reasons(ds) == [
        (f"{path}:1", "the text holds a lone surrogate (e.g. \\ud800), which is not valid Unicode")]


# ---- routing labels per token: spans of a prompt/completion row, messages of a chat (issue 15) ------------------
def _routing_by_token(example) -> list[tuple[str, int]]:
    """(token text, routing label of the position *before* it): the expert that should write each token."""
    tok = tiny_tokenizer()
    return [(tok.decode([i]), r) for i, r in zip(example.input_ids[1:], example.routing[:-1])]


def test_expert_spans_label_the_tokens_they_cover_and_leave_the_rest_unlabelled(tmp_path):
    # prompt + completion = "fold ab = xy = 7": "xy" is expert 0's to write, " = 7" expert 1's, the prompt nobody's
    row = {"prompt": "fold ab =", "completion": " xy = 7", "task": [[9, 12, "recall"], [12, 16, "forward"]]}
    path = write_jsonl(tmp_path / "d.jsonl", [row])
    (example,) = _load([path], DataFormat(expert_field="task"), expert_names=["recall", "forward"]).examples
    tok = tiny_tokenizer()
    assert tok.decode(example.input_ids, skip_special_tokens=False) == "fold ab = xy = 7</s>"  # cut, not changed
    written = _routing_by_token(example)
    assert "".join(t for t, r in written if r == 0) == " xy"
    assert "".join(t for t, r in written if r == 1) == " = 7</s>"
    assert "".join(t for t, r in written if r == -100) == "old ab ="  # (the first token is nobody's to write)
    assert example.routing[-1] == -100  # the last position predicts nothing
    assert _trained_text(example) == " xy = 7</s>"  # the loss mask is the completion's, spans or not


@pytest.mark.parametrize("where", ["starts after a space", "starts at the completion's first word",
                                   "ends after a space"])
def test_expert_spans_cut_where_the_whole_text_tokenizes(tmp_path, where):
    """A span that starts or ends just after a space gives the tokens of the whole text: the space goes with the
    word after it, as the tokenizer puts it, not into a token of its own, and each word keeps its span's label."""
    from loramix.demo.pipeline import build_tokenizer

    prompt, completion = "the list is long . recall kazoite colour =", " red ="
    text = prompt + completion
    tok = build_tokenizer([text] * 3, vocab_size=120)
    recall, red = text.index("recall"), text.index("red")  # both just after a space
    span = {"starts after a space": [recall, len(text) - 2], "starts at the completion's first word":
            [red, len(text)], "ends after a space": [0, recall]}[where]
    row = {"prompt": prompt, "completion": completion, "task": [[*span, "recall"]]}
    (example,) = load_dataset([write_jsonl(tmp_path / "d.jsonl", [row])], tok, DataFormat(expert_field="task"),
                              expert_names=["recall"], log=lambda *a: None).examples
    assert example.input_ids[:-1] == tok(text)["input_ids"] and example.input_ids[-1] == tok.eos_token_id
    pieces = tok.convert_ids_to_tokens(example.input_ids)
    written_by = [-100] + example.routing[:-1]  # token t is written by the expert routed at position t - 1
    first_re, last_re = pieces.index("▁re"), len(pieces) - 1 - pieces[::-1].index("▁re")  # "recall", "red"
    assert pieces[first_re - 1] == "." and pieces[last_re - 1] == "▁="  # no token of its own for either space
    labelled = [t for t, r in zip(pieces, written_by) if r == 0]
    if where == "starts after a space":  # "recall kazoite colour = red", not the last " ="
        assert labelled == pieces[first_re:-2] and written_by[first_re - 1] == -100
    elif where == "starts at the completion's first word":  # "red =" and the end of the row
        assert labelled == pieces[last_re:]
    else:  # everything before "recall" (the first token is nobody's to write)
        assert labelled == pieces[1:first_re]


def test_expert_spans_that_are_malformed_name_the_field(tmp_path):
    rows = [{"prompt": "ab", "completion": " c", "task": [[0, 9, "recall"]]},
            {"prompt": "ab", "completion": " c", "task": [[0, 2, "recall"], [1, 3, "recall"]]},
            {"prompt": "ab", "completion": " c", "task": [[0, 2, "chem"]]},
            {"prompt": "ab", "completion": " c", "task": [[0, 2, "recall"]]}]
    ds = _load([write_jsonl(tmp_path / "d.jsonl", rows)], DataFormat(expert_field="task"), expert_names=["recall"])
    assert [b.reason.split(":")[0].split("=")[0] for b in ds.bad_rows] == ["task", "task", "task"]
    assert "0 <= start < end <= 4" in ds.bad_rows[0].reason and "overlap" in ds.bad_rows[1].reason
    assert "'chem' is not one of the experts" in ds.bad_rows[2].reason and len(ds.examples) == 1


def test_chat_messages_carry_their_own_expert_label(tmp_path):
    tok = tiny_tokenizer()
    tok.chat_template = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}|{% endfor %}"
                         "{% if add_generation_prompt %}<assistant>{% endif %}")
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello", "expert": "a"},
            {"role": "user", "content": "bye", "expert": "b"}, {"role": "assistant", "content": "ciao"}]
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": chat}, {"messages": [dict(m, expert=None) for m in chat]}])
    labelled, plain = load_dataset([path], tok, DataFormat(messages_field="messages"), expert_names=["a", "b"],
                                   log=_quiet).examples
    assert tok.decode(labelled.input_ids) == tok.decode(plain.input_ids)
    written = _routing_by_token(labelled)
    assert "".join(t for t, r in written if r == 0) == "<assistant>hello|"  # the lead-in goes with its turn
    assert "".join(t for t, r in written if r == 1) == "<user>bye|"
    assert "".join(t for t, r in written if r == -100) == "user>hi|<assistant>ciao|"
    assert set(plain.routing) == {-100}  # an unlabelled chat trains on cross-entropy only
    assert labelled.labels == plain.labels  # and the loss mask does not depend on the labels
    batch = collate([labelled, plain], pad_id=0)
    assert batch["expert"].tolist()[0] == labelled.routing and batch["expert"].shape == batch["input_ids"].shape
