"""Module docstrings, read with `ast`: every module says what it is for, in a summary that needs "and" once at most."""

from __future__ import annotations

import ast
import os
import re

import loramix

PACKAGE_DIR = os.path.dirname(loramix.__file__)


def module_docstrings() -> dict[str, str | None]:
    """path relative to the package -> the module's docstring (None when it has none)."""
    found = {}
    for folder, _, names in os.walk(PACKAGE_DIR):
        for name in names:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                tree = ast.parse(open(path, encoding="utf-8").read())
                found[os.path.relpath(path, PACKAGE_DIR).replace(os.sep, "/")] = ast.get_docstring(tree)
    return found


def summary(docstring: str) -> str:
    """The docstring's first paragraph, on one line."""
    return " ".join(docstring.strip().split("\n\n")[0].split())


def ands(text: str) -> int:
    return len(re.findall(r"\band\b", text, flags=re.IGNORECASE))


def test_the_reader_sees_the_rules():
    assert summary("One job: keys and values.\n  More.\n\nDetails and more and more.") == \
        "One job: keys and values. More."
    assert ands("reads and writes and checks") == 2 and ands("android, band, And") == 1


def test_every_module_has_a_docstring():
    missing = sorted(path for path, doc in module_docstrings().items() if not (doc or "").strip())
    assert missing == []


def test_no_summary_needs_and_twice():
    """A module does one job: its summary joins at most two things with "and" (a module that needs more does
    several jobs and should be split)."""
    offenders = sorted(f"{path}: {summary(doc)}" for path, doc in module_docstrings().items()
                       if doc and ands(summary(doc)) > 1)
    assert offenders == [], "\n".join(offenders)
