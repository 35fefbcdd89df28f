"""`loramix demo --real`: the shipped recipe run by `loramix build`, its results.json in the demo's layout."""

from __future__ import annotations

import json

import loramix.recipe.build
from loramix.cli import main


def test_demo_real_builds_the_shipped_recipe_with_the_demo_schema(tiny_recipe, tmp_path, monkeypatch):
    asked = []

    def shipped(quick=False):
        asked.append(quick)
        return str(tiny_recipe)  # the tests' tiny recipe stands in for SmolLM2's (CI downloads nothing)

    monkeypatch.setattr(loramix.recipe.build, "shipped_recipe", shipped)
    out = tmp_path / "real"
    assert main(["demo", "--real", "--quick", "--out", str(out), "--seed", "3", "--no-progress"]) == 0
    assert asked == [True]
    results = json.loads((out / "results.json").read_text())
    assert results["seed"] == 3
    for name, row in results["domains"].items():  # the synthetic demo's keys, and the new ones beside them
        assert set(row) >= {"base", "experts", "static_merge", "xlora", "xlora_topk", "intervals"}
        assert set(row["experts"]) == {"rev", "sum"}
        assert all(len(v) == 3 and v[1] <= v[0] <= v[2] for v in row["intervals"].values())
        assert set(results["routing"][name]) == {"rev", "sum"}
    assert (out / "report.md").read_text().startswith("# tiny")
