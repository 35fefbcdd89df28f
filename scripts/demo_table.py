"""Rewrite the README's demo table from a demo run's results.json.

    python scripts/demo_table.py [loramix-demo/results.json] [README.md]

The table (the README block between the demo-table markers) is generated from the run's numbers by the same
function that prints it at the end of `loramix demo`, with the seed, the time and the versions that produced it
(recorded in results.json by the run), so the README never shows numbers the current code did not produce."""

from __future__ import annotations

import json
import sys

from loramix.demo.report import check_targets, summary_table
from loramix.files import atomic_write_text

START, END = "<!-- demo-table:start (scripts/demo_table.py writes this block) -->", "<!-- demo-table:end -->"


def table_block(results: dict) -> str:
    versions = ", ".join(f"{name} {version}" for name, version in results["versions"].items())
    cpu = f", {results['cpu_seconds'] / 60:.1f} CPU-minutes" if "cpu_seconds" in results else ""
    met = check_targets(results)
    kind = "`--quick`" if results["quick"] else "full"
    lines = [f"Measured by one {kind} run (`--seed {results['seed']}`, {results['seconds'] / 60:.1f} min wall-clock"
             f"{cpu} on {results.get('cpus', '?')} CPU cores; {versions}), scores in [0, 1] on held-out prompts:", "",
             summary_table(results), "",
             f"Targets met: {sum(ok for _, ok, _ in met)} of {len(met)}"
             + "".join(f"; not met: {t} ({m})" for t, ok, m in met if not ok) + "."]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    results_path = argv[0] if argv else "loramix-demo/results.json"
    readme_path = argv[1] if len(argv) > 1 else "README.md"
    with open(results_path, encoding="utf-8") as f:
        results = json.load(f)
    with open(readme_path, encoding="utf-8") as f:
        readme = f.read()
    if readme.count(START) != 1 or readme.count(END) != 1:
        print(f"{readme_path}: needs one {START!r} and one {END!r} line", file=sys.stderr)
        return 1
    head, rest = readme.split(START)
    _, tail = rest.split(END)
    atomic_write_text(readme_path, f"{head}{START}\n{table_block(results)}\n{END}{tail}")
    print(f"{readme_path}: demo table rewritten from {results_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
