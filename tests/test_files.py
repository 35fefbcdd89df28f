"""files.py: atomic writes leave the old file or the new one, never a half-written one or a stray temporary file;
folders replace folders; JSON Lines logs round-trip exactly and only their last line may be torn."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from loramix.files import append_jsonl, atomic_write, atomic_write_text, move_into, read_jsonl, replace_dir, write_jsonl


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "report.txt"
    atomic_write_text(str(path), "old")

    def half_then_crash(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write("half of the new")
        raise KeyboardInterrupt  # a BaseException too: Ctrl-C mid-write

    with pytest.raises(KeyboardInterrupt):
        atomic_write(str(path), half_then_crash)
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["report.txt"]
    atomic_write(str(path), lambda tmp: Path(tmp).write_text("new"), suffix=".txt")
    assert path.read_text() == "new" and os.listdir(tmp_path) == ["report.txt"]


def test_replace_dir_and_move_into_replace_what_was_there(tmp_path):
    target, new = tmp_path / "ckpt", tmp_path / "ckpt.tmp"
    target.mkdir()
    (target / "stale.bin").write_text("old")
    new.mkdir()
    (new / "weights.bin").write_text("new")
    replace_dir(str(new), str(target))
    assert sorted(os.listdir(tmp_path)) == ["ckpt"] and os.listdir(target) == ["weights.bin"]

    staging = tmp_path / "staging"
    (staging / "expert_0").mkdir(parents=True)
    (staging / "expert_0" / "adapter.bin").write_text("fresh")
    (staging / "config.json").write_text("{}")
    (target / "expert_0").mkdir()
    (target / "expert_0" / "leftover.bin").write_text("old")
    move_into(str(staging), str(target))
    assert sorted(os.listdir(target)) == ["config.json", "expert_0", "weights.bin"]
    assert os.listdir(target / "expert_0") == ["adapter.bin"] and os.listdir(staging) == []


def test_jsonl_round_trip_and_only_a_torn_last_line_is_dropped(tmp_path):
    records = [{"step": 1, "loss": 2.5}, {"step": 2, "loss": 2.25, "note": "é"}]
    path = str(tmp_path / "metrics.jsonl")
    write_jsonl(path, records)
    append_jsonl(path, {"step": 3, "loss": 2.0})
    assert read_jsonl(path) == [*records, {"step": 3, "loss": 2.0}]

    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps({"step": 4})[:7])  # a crash mid-append
    warnings = []
    assert read_jsonl(path, warn=warnings.append) == [*records, {"step": 3, "loss": 2.0}]
    assert len(warnings) == 1 and warnings[0].startswith(f"{path}: dropped a torn last line (line 4)")

    lines = open(path, encoding="utf-8").read().splitlines()
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join([lines[0], "[1, 2]", *lines[1:3]]) + "\n")  # damage inside the log
    with pytest.raises(ValueError, match="^" + re.escape(f"{path}:2: not a JSON object")):
        read_jsonl(path)
