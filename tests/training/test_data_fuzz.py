"""Fuzzing the data loaders (issue 10 §3): any file content gives a Dataset or a DataError that names the file,
and every skipped row names its file and line. Never another exception type."""

from __future__ import annotations

import codecs
import csv
import io
import json
import os
import tempfile

from helpers import tiny_tokenizer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loramix.training.data import DataError, DataFormat, load_dataset

FUZZ = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
TOKENIZER = tiny_tokenizer()
CHAT_TOKENIZER = tiny_tokenizer()
CHAT_TOKENIZER.chat_template = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}|{% endfor %}"
                                "{% if add_generation_prompt %}<assistant>{% endif %}")
FORMATS = [DataFormat(max_length=64), DataFormat(text_field="prompt", max_length=64),
           DataFormat(prompt_template="Q: {prompt}", completion_template=" {completion}", max_length=64),
           DataFormat(messages_field="messages", max_length=64)]

# text with everything JSON can carry: control characters, lone surrogates, non-BMP characters
any_text = st.text(st.characters(codec=None, exclude_categories=()), max_size=20)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | any_text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(any_text, inner, max_size=3),
    max_leaves=8)
field_values = st.one_of(json_values, st.sampled_from(["x" * 300, "hello", "a\ud800b", ["a"], {"a": "b"}]))
messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system"]) | any_text,
                                           "content": field_values}), max_size=4)
rows = st.dictionaries(st.sampled_from(["prompt", "completion", "messages", "other"]) | any_text,
                       field_values | messages, max_size=4)


def _write(name: str, content: bytes) -> str:
    folder = tempfile.mkdtemp(prefix="fuzz-")
    path = os.path.join(folder, name)
    with open(path, "wb") as f:
        f.write(content)
    return path


def _check(path: str) -> None:
    """Load with every format: a Dataset whose bad rows name the file, or a DataError naming it."""
    for fmt in FORMATS:
        tokenizer = CHAT_TOKENIZER if fmt.kind == "messages" else TOKENIZER
        try:
            ds = load_dataset([path], tokenizer, fmt, log=lambda *_: None)
        except DataError as e:
            assert path in str(e), str(e)
            continue
        assert ds.examples and all(0 < len(e) <= fmt.max_length for e in ds.examples)
        assert all(len(e.labels) == len(e.input_ids) and any(x != -100 for x in e.labels) for e in ds.examples)
        assert all(b.source.startswith(path + ":") and b.reason for b in ds.bad_rows)


def _maybe_bom(bom: bool, data: bytes) -> bytes:
    return codecs.BOM_UTF8 + data if bom else data


@FUZZ
@given(content=st.binary(max_size=300))
def test_jsonl_of_random_bytes(content):
    _check(_write("d.jsonl", content))


@FUZZ
@given(lines=st.lists(rows, min_size=1, max_size=5), bom=st.booleans(), nested=st.integers(0, 3),
       garbage=st.lists(st.binary(max_size=20), max_size=2))
def test_jsonl_of_random_rows(lines, bom, nested, garbage):
    text = "".join(json.dumps(r) + "\n" for r in lines).encode("utf-8")
    text += b"".join(g + b"\n" for g in garbage)
    if nested:
        text += b"[" * (10 ** (nested + 2)) + b"]" * (10 ** (nested + 2)) + b"\n"
    _check(_write("d.jsonl", _maybe_bom(bom, text)))


@FUZZ
@given(value=json_values | st.lists(rows, max_size=4) | st.fixed_dictionaries({"data": st.lists(rows, max_size=4)}),
       bom=st.booleans(), nested=st.booleans())
def test_json_of_random_values(value, bom, nested):
    text = json.dumps(value).encode("utf-8")
    if nested:
        text = b"[" * 100_000 + text + b"]" * 100_000
    _check(_write("d.json", _maybe_bom(bom, text)))


cells = st.text(st.characters(exclude_categories=("Cs",)), max_size=15) | st.just("x" * 140_000)


@FUZZ
@given(header=st.lists(st.sampled_from(["prompt", "completion", "text"]) | cells, max_size=4),
       body=st.lists(st.lists(cells, max_size=5), max_size=4), bom=st.booleans(),
       raw=st.none() | st.binary(max_size=100))
def test_csv_of_random_cells(header, body, bom, raw):
    if raw is not None:
        content = raw
    else:
        out = io.StringIO(newline="")
        writer = csv.writer(out)
        writer.writerow(header)
        writer.writerows(body)
        content = out.getvalue().encode("utf-8")
    _check(_write("d.csv", _maybe_bom(bom, content)))

