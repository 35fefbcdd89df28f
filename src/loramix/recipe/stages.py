"""Resumable stages of a build: a stage's output (a folder or a JSON file) is reused when it was finished with
the same inputs, and made again otherwise.

A finished folder holds `.stage.json`, written last: the stage's fingerprint (its settings, and its inputs'
fingerprints, as JSON values), the size of every file it wrote, and the seconds it took. On a rerun a folder whose
record matches the fingerprint and whose files are all there with their sizes is reused; one without a record
(the run stopped inside it), with another fingerprint, or with a file missing or of another size is removed and
made again. The record also keeps a digest of the files, which later stages put in their fingerprints: a stage
made again makes every stage after it again. A file stage's JSON holds its fingerprint beside its value and is
written atomically.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from typing import Any, Callable

from ..files import atomic_write_text

STAGE_FILE = ".stage.json"


def _inventory(folder: str) -> dict[str, int]:
    """{relative path: size} of every file under `folder` but the stage record."""
    sizes = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, folder)
            if rel != STAGE_FILE:
                sizes[rel] = os.path.getsize(path)
    return sizes


def _digest(folder: str) -> str:
    """sha256 over the stage's files (names and bytes, in sorted order): what a later stage's fingerprint records
    of this stage's output, so that it is made again when this stage was."""
    import hashlib

    h = hashlib.sha256()
    for rel in sorted(_inventory(folder)):
        h.update(rel.encode() + b"\0")
        with open(os.path.join(folder, rel), "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def _read_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


class Stages:
    """The stages of one build under `out`: `folder` and `file` run a stage or reuse its output; `timings` and
    `reused` say what happened (a reused stage reports the seconds it took when it ran)."""

    def __init__(self, out: str, log: Callable[[str], None] = print) -> None:
        self.out, self.log = out, log
        self.timings: dict[str, float] = {}
        self.reused: list[str] = []
        self.ran: list[str] = []
        self.digests: dict[str, str] = {}  # stage name -> the digest of its folder's files

    def folder(self, name: str, fingerprint: Any, make: Callable[[str], None]) -> str:
        """The stage's folder `out/name`, made by `make(folder)` unless a finished one with this fingerprint is
        there."""
        folder = os.path.join(self.out, name)
        record = _read_json(os.path.join(folder, STAGE_FILE))
        if (isinstance(record, dict) and record.get("fingerprint") == _plain(fingerprint)
                and record.get("files") == _inventory(folder)):
            self._reuse(name, folder, record.get("seconds", 0.0))
            self.digests[name] = record.get("digest") or _digest(folder)
            return folder
        if os.path.lexists(folder):
            what = "changed settings" if isinstance(record, dict) else "unfinished"
            if isinstance(record, dict) and record.get("fingerprint") == _plain(fingerprint):
                what = "damaged (a file is missing or changed)"
            self.log(f"[{name}] {what}: making it again")
            shutil.rmtree(folder) if os.path.isdir(folder) else os.remove(folder)
        start = self._start(name)
        make(folder)
        os.makedirs(folder, exist_ok=True)
        seconds = self._done(name, start)
        self.digests[name] = _digest(folder)
        record = {"fingerprint": _plain(fingerprint), "files": _inventory(folder), "seconds": round(seconds, 1),
                  "digest": self.digests[name]}
        atomic_write_text(os.path.join(folder, STAGE_FILE), json.dumps(record, indent=1))
        return folder

    def file(self, name: str, fingerprint: Any, make: Callable[[], Any]) -> Any:
        """The value of the stage's JSON file `out/name.json`, computed by `make()` unless the file holds this
        fingerprint."""
        path = os.path.join(self.out, f"{name}.json")
        record = _read_json(path)
        if isinstance(record, dict) and record.get("fingerprint") == _plain(fingerprint) and "value" in record:
            self._reuse(name, path, record.get("seconds", 0.0))
            return record["value"]
        start = self._start(name)
        value = make()
        seconds = self._done(name, start)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        atomic_write_text(path, json.dumps({"fingerprint": _plain(fingerprint), "seconds": round(seconds, 1),
                                            "value": value}, indent=1))
        return _plain(value)

    def _reuse(self, name: str, where: str, seconds: float) -> None:
        self.log(f"[{name}] done before, reusing {where}")
        self.reused.append(name)
        self.timings[name] = float(seconds)

    def _start(self, name: str) -> float:
        self.log(f"[{name}] ...")
        self.ran.append(name)
        return time.perf_counter()

    def _done(self, name: str, start: float) -> float:
        seconds = time.perf_counter() - start
        self.timings[name] = round(seconds, 1)
        self.log(f"[{name}] done in {seconds:.1f}s")
        return seconds


def _plain(value: Any) -> Any:
    """`value` as JSON gives it back (tuples become lists), so a fingerprint compares equal to its record."""
    return json.loads(json.dumps(value, default=str))
