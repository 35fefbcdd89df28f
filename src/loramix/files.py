"""Writing files so that a crash leaves nothing half-written: atomic files or folders (a temporary beside,
then a rename), JSON Lines logs whose torn last line is dropped on reading, and write errors that name the file."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import tempfile
from typing import Callable


def atomic_write(path: str, write: Callable[[str], object], suffix: str = "") -> None:
    """Call write(tmp) on a temporary path in the same folder, then rename it to `path`; on failure, remove it.
    `suffix` keeps an extension for writers that read the format from the name (matplotlib)."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=suffix, dir=folder)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException as err:
        if os.path.exists(tmp):
            os.remove(tmp)
        named = write_failure(err, path, "; the old file, if any, is unchanged")
        if named is None:
            raise
        raise named from err


_OS_ERROR_TEXT = re.compile(r"\(os error (\d+)\)|\bOs \{ code: (\d+)")  # Rust's io::Error, shown or debugged


def write_failure(err: BaseException, path: str, after: str = "") -> OSError | None:
    """The failed write `err` as one OSError naming `path` and the errno, for a write error that names no file
    (a full disk, ENOSPC, or a file-size limit, EFBIG, raised by `write`; Rust writers such as safetensors and
    tokenizers report the errno only in their text, "os error 27"). `after` ends the message. None when `err` is
    no such error (it names a file already, or is no I/O error)."""
    if isinstance(err, OSError):
        if err.filename is not None or err.errno is None:
            return None
        code = err.errno
    elif isinstance(err, Exception) and (found := _OS_ERROR_TEXT.search(str(err))):
        code = int(found[1] or found[2])
    else:
        return None
    name = errno.errorcode.get(code, "?")
    return OSError(code, f"{os.strerror(code)} ({name}) writing {path}{after}")


def atomic_write_text(path: str, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    atomic_write(path, write)


def replace_dir(new: str, target: str) -> None:
    """Move the finished folder `new` to `target`, replacing an older one."""
    if os.path.isdir(target):
        old = target + ".old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
        os.replace(new, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(new, target)


def move_into(tmp: str, folder: str) -> None:
    """Move every entry of the finished temporary folder `tmp` into `folder`, each by an atomic rename (a folder
    replaces the folder of the same name)."""
    for name in os.listdir(tmp):
        src, dst = os.path.join(tmp, name), os.path.join(folder, name)
        if os.path.isdir(src) and os.path.isdir(dst):
            shutil.rmtree(dst)
        os.replace(src, dst)


def append_jsonl(path: str, record: dict) -> None:
    """Append one JSON line (a log: a crash mid-append can leave a torn last line, which read_jsonl handles)."""
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
    except OSError as err:
        named = write_failure(err, path)
        if named is None:
            raise
        raise named from err


def write_jsonl(path: str, records: list[dict]) -> None:
    """Write `records` as JSON Lines, atomically."""
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in records))


def read_jsonl(path: str, warn: Callable[[str], None] | None = None) -> list[dict]:
    """The records of a JSON Lines log written with append_jsonl.

    A crash in the middle of an append leaves a torn last line: it is dropped, and `warn` is told which file lost
    it. A line elsewhere that is not a JSON object is damage, not a crash: ValueError naming file:line."""
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    numbered = [(n, line) for n, line in enumerate(lines, 1) if line.strip()]
    records = []
    for n, line in numbered:
        try:
            record = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            record = None
        if isinstance(record, dict):
            records.append(record)
        elif n == numbered[-1][0]:
            if warn is not None:
                warn(f"{path}: dropped a torn last line (line {n}), left by a crash while it was written")
        else:
            raise ValueError(f"{path}:{n}: not a JSON object; the log is damaged (only its last line may be torn)")
    return records
