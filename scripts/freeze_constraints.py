"""Write constraints.txt: the exact installed version of every package loramix[test] needs, directly or not.

Run it after the whole suite passes (`python -m pytest -q`); the README's set-up commands install with
`-c constraints.txt`, so a fresh machine gets the set that was tested, whatever is released later.
"""

from __future__ import annotations

import importlib.metadata as metadata
import re
import sys

from packaging.requirements import Requirement


def closure(root: str, extras: set[str]) -> dict[str, str]:
    """{distribution name: installed version} of `root`'s requirements (with `extras`), recursively."""
    found: dict[str, str] = {}
    todo = [(root, extras)]
    while todo:
        name, wanted_extras = todo.pop()
        for spec in metadata.requires(name) or []:
            req = Requirement(spec)
            env = [{"extra": e} for e in wanted_extras] or [{"extra": ""}]
            if req.marker is not None and not any(req.marker.evaluate(e) for e in env):
                continue
            key = re.sub(r"[-_.]+", "-", req.name).lower()
            try:
                version = metadata.version(req.name)
            except metadata.PackageNotFoundError:
                continue  # an optional dependency for another platform
            if key not in found:
                found[key] = version
                todo.append((req.name, set(req.extras)))
    return found


def main() -> None:
    pins = closure("loramix", {"test"})
    lines = ["# The versions the whole test suite last passed on (python -m pytest -q), written by",
             "# scripts/freeze_constraints.py. Used by the README's set-up commands: pip install ... -c constraints.txt",
             f"# Python {sys.version.split()[0]}."]
    lines += [f"{name}=={version.split('+')[0]}" for name, version in sorted(pins.items())]
    with open("constraints.txt", "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    print(f"constraints.txt: {len(pins)} packages")


if __name__ == "__main__":
    main()
