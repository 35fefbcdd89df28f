"""docs/benchmarks.md holds one section per benchmark script; each script rewrites only its own section."""

from __future__ import annotations

import os

DEFAULT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "docs", "benchmarks.md")
ORDER = ["inference", "training", "serving", "scale"]


def write_section(name: str, text: str, path: str = DEFAULT) -> None:
    """Replace the section `name` of the page (between its markers), keeping the others; atomic."""
    sections: dict[str, str] = {}
    if os.path.isfile(path):
        page = open(path, encoding="utf-8").read()
        for other in ORDER:
            start, end = f"<!-- {other}:start -->", f"<!-- {other}:end -->"
            if start in page and end in page:
                sections[other] = page[page.index(start) + len(start):page.index(end)].strip("\n")
    sections[name] = text.strip("\n")
    body = ["# Benchmarks", "", "Each section is written by one script in `benchmarks/`; rerun it to refresh its "
            "section. Ratios compare systems measured in the same run on the same machine.", ""]
    for other in ORDER:
        if other in sections:
            body += [f"<!-- {other}:start -->", sections[other], f"<!-- {other}:end -->", ""]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("\n".join(body))
    os.replace(tmp, path)
