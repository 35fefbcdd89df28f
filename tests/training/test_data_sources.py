"""Per-source data formats: each source read with its own format, sources from config entries, packaged data
sets, and prompt/completion rows trained as a chat."""

from __future__ import annotations

import sys
import types

import pytest
from helpers import CHAT_TEMPLATE, tiny_tokenizer, write_jsonl

from loramix.training.data import (
    DataFormat,
    DataSource,
    DataSpecError,
    load_dataset,
    source_from_mapping,
    sources_from_list,
)


def _quiet(*_):
    pass


def _ids(sources, fmt=None, tokenizer=None):
    data = load_dataset(sources, tokenizer or tiny_tokenizer(), fmt or DataFormat(), log=_quiet)
    return [(e.input_ids, e.labels) for e in data.examples]


def test_each_source_reads_its_rows_with_its_own_format(tmp_path):
    """A prompt/completion JSONL and a question/answer CSV in one run: the same examples as reading each alone
    with its format (the reference: one load_dataset per file)."""
    a = write_jsonl(tmp_path / "a.jsonl", [{"prompt": "p1", "completion": "c1"}, {"prompt": "p2", "completion": "c2"}])
    (tmp_path / "b.csv").write_text("question,answer\nq1,a1\nq2,a2\n")
    template = DataFormat(prompt_template="Q: {question} A:", completion_template=" {answer}")
    alone = _ids([a]) + _ids([str(tmp_path / "b.csv")], template)
    mixed = _ids([DataSource(a), DataSource(str(tmp_path / "b.csv"), format=template)])
    assert mixed == alone and len(mixed) == 4
    # the same through config entries: the CSV's entry overrides the run's format
    entries = [a, {"path": str(tmp_path / "b.csv"), "type": "template", "prompt_template": "Q: {question} A:",
                   "completion_template": " {answer}"}]
    assert _ids(sources_from_list(entries)) == alone


def test_a_source_inherits_the_run_format_it_does_not_override(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"body": "x" * 40}])
    run = DataFormat(max_length=8)
    (source,) = sources_from_list([{"path": path, "type": "text", "text_field": "body"}], run)
    assert source.format == DataFormat(text_field="body", max_length=8)
    with pytest.raises(ValueError, match="every row is bad.*over max_length 8"):
        load_dataset([source], tiny_tokenizer(), run, log=_quiet)


def test_entries_name_the_key_at_fault():
    cases = [({"path": "a.jsonl", "weight": 0}, "datasets[0].weight"),
             ({"path": "a.jsonl", "prompt_feld": "q"}, "datasets[0].prompt_feld"),
             ({"path": "a.jsonl", "type": "alpaca"}, "datasets[0].type"),
             ({"path": "a.jsonl", "max_length": 1}, "datasets[0].max_length"),
             ({"weight": 1}, "datasets[0]"),
             ({"path": "a.jsonl", "split": "test"}, "datasets[0].split"),
             ({"path": "a.jsonl", "type": "text", "chat": True}, "datasets[0].chat")]
    for entry, key in cases:
        with pytest.raises(DataSpecError) as err:
            source_from_mapping(entry)
        assert err.value.key == key, (entry, str(err.value))
    with pytest.raises(DataSpecError, match="weight for every source or for none"):
        sources_from_list([{"path": "a.jsonl", "weight": 1}, "b.jsonl"])


def test_packaged_sources_read_the_science_data_sets(monkeypatch):
    """`packaged:NAME` with `split:` rows come from loramix.science.datasets.load_rows(name, split)."""
    calls = []

    def load_rows(name, split):
        calls.append((name, split))
        if name != "toy/set":
            raise KeyError(f"no packaged data set {name!r}")
        return [{"prompt": f"{split} p{i}", "completion": f"c{i}"} for i in range(3)]

    fake = types.ModuleType("loramix.science.datasets")
    fake.load_rows = load_rows
    package = sys.modules.get("loramix.science") or types.ModuleType("loramix.science")
    monkeypatch.setitem(sys.modules, "loramix.science", package)
    monkeypatch.setitem(sys.modules, "loramix.science.datasets", fake)
    monkeypatch.setattr(package, "datasets", fake, raising=False)
    (test,) = sources_from_list([{"path": "packaged:toy/set", "split": "test"}])
    data = load_dataset([test, DataSource("packaged:toy/set")], tiny_tokenizer(), DataFormat(), log=_quiet)
    tok = tiny_tokenizer()
    assert [tok.decode(e.input_ids) for e in data.examples][::2] == ["test p0c0</s>", "test p2c2</s>", "train p1c1</s>"]
    assert calls == [("toy/set", "test"), ("toy/set", "train")]
    assert data.sources == ["packaged:toy/set[test]", "packaged:toy/set"]
    with pytest.raises(ValueError, match="packaged:nope/x.*no packaged data set"):
        load_dataset([DataSource("packaged:nope/x")], tiny_tokenizer(), DataFormat(), log=_quiet)


def test_chat_true_trains_prompt_completion_rows_as_a_chat(tmp_path):
    """chat: true gives the example of the same conversation written as messages (the reference)."""
    tok = tiny_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    rows = write_jsonl(tmp_path / "r.jsonl", [{"q": "hi", "a": "yo"}])
    messages = write_jsonl(tmp_path / "m.jsonl", [{"messages": [
        {"role": "system", "content": "be brief"}, {"role": "user", "content": "Q hi"},
        {"role": "assistant", "content": "yo"}]}])
    reference = _ids([messages], DataFormat(messages_field="messages"), tok)
    (source,) = sources_from_list([{"path": rows, "prompt_template": "Q {q}", "completion_template": "{a}",
                                    "chat": True, "system_prompt": "be brief"}])
    assert _ids([source], tokenizer=tok) == reference
    with pytest.raises(ValueError, match="chat: true: the tokenizer has no chat template"):
        _ids([source])
