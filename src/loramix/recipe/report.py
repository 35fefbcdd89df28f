"""results.json and report.md of a build, from its stages' outputs (written again on every run; no model loaded).

results.json keeps the demo's layout and extends it:
  domains.SET.{metric, rows, base, experts.EXPERT, static_merge (the cat merge, else the first merge scored),
               static_merge_linear, static_merge_cat, static_merge_ties, arrow, xlora, xlora_topk, xlora_ce_only,
               intervals.SYSTEM = [score, low, high]}   (a set's score: the mean of its rows' scores; R² for r2)
  mean_over_sets.SYSTEM = [mean of the sets' scores, low, high], over the sets named in mean_over_sets_of: those
               scored as a proportion (choice, exact_match: all in [0, 1]), else all sets when they share one
               metric; a numeric error or an R² is not averaged with accuracies (other units and ranges)
  routing.SET.EXPERT, routing_ce_only.SET.EXPERT, mixing.SET, unavailable.SYSTEM, timings, versions
Intervals are percentile bootstraps over rows (science.scoring); the mean over sets resamples each set's rows
with the same generator and averages the resampled set scores.
"""

from __future__ import annotations

import json
import os

import numpy as np

from .._version import installed_versions
from ..files import atomic_write_text

PROPORTIONS = ("choice", "exact_match")  # metrics whose scores are shares in [0, 1], averaged over sets


def averaged_sets(metrics: dict[str, str]) -> list[str]:
    """The sets a mean over sets averages: those scored as proportions, else all of them when they share one
    metric, else none."""
    shares = [name for name, metric in metrics.items() if metric in PROPORTIONS]
    if shares:
        return shares
    return list(metrics) if len(set(metrics.values())) == 1 else []


def _set_score(scores: list[float], rows: list[dict], metric: str, n: int, seed: int) -> list[float]:
    from ..science.scoring import bootstrap_interval, bootstrap_r2

    if metric == "r2":
        return [round(x, 4) for x in bootstrap_r2(scores, [r["target"] for r in rows], n=n, seed=seed)]
    return [round(x, 4) for x in bootstrap_interval(scores, n=n, seed=seed)]


def _mean_over_sets(per_set: dict[str, list[float]], rows: dict[str, list[dict]], metrics: dict[str, str],
                    n: int, seed: int) -> list[float]:
    """[mean of the set scores, low, high]: each resample draws every set's rows again (one generator)."""
    from ..science.scoring import r_squared

    rng = np.random.default_rng(seed)
    point, resampled = [], np.zeros(n)
    for name, scores in per_set.items():
        x = np.asarray(scores, dtype=float)
        idx = rng.integers(0, len(x), size=(n, len(x)))
        if metrics[name] == "r2":
            y = np.asarray([r["target"] for r in rows[name]], dtype=float)
            point.append(r_squared(list(x), list(y)))
            resampled += np.array([r_squared(list(x[i]), list(y[i])) for i in idx])
        else:
            point.append(float(x.mean()))
            resampled += x[idx].mean(1)
    resampled /= len(per_set)
    low, high = np.percentile(resampled, [2.5, 97.5])
    return [round(float(np.mean(point)), 4), round(float(low), 4), round(float(high), 4)]


def results_of(build, evaluation: dict) -> dict:
    """The scores, intervals, routing and mixing of a build (see the module docstring)."""
    spec, seed = build.recipe.evaluation, build.recipe.seed
    metrics = {s.name: s.metric for s in spec.sets}
    systems, rows = evaluation["systems"], evaluation["rows"]
    domains: dict = {}
    for name, metric in metrics.items():
        row: dict = {"metric": metric, "rows": len(rows[name]), "experts": {}, "intervals": {}}
        for system, value in systems.items():
            interval = _set_score(value["scores"][name], rows[name], metric, spec.bootstrap, seed)
            row["intervals"][system] = interval
            if system.startswith("expert:"):
                row["experts"][system.split(":", 1)[1]] = interval[0]
            else:
                row[system] = interval[0]
        merges = [s for s in ("static_merge_cat", "static_merge_linear", "static_merge_ties") if s in row]
        if merges:
            row["static_merge"] = row[merges[0]]
        domains[name] = row
    averaged = averaged_sets(metrics)
    mean = {system: _mean_over_sets({name: value["scores"][name] for name in averaged}, rows, metrics,
                                    spec.bootstrap, seed)
            for system, value in systems.items()} if averaged else {}
    out = {"name": build.recipe.name, "recipe": build.recipe.path, "base": build.base, "seed": seed,
           "experts": build.recipe.expert_names, "domains": domains, "mean_over_sets": mean,
           "mean_over_sets_of": averaged,
           "unavailable": evaluation["unavailable"]}
    for system, key in (("xlora", "routing"), ("xlora_ce_only", "routing_ce_only")):
        if system in systems:
            out[key] = {k: v for k, v in systems[system]["routing"].items()}
            out["mixing" if system == "xlora" else "mixing_ce_only"] = systems[system]["mixing"]
    return out




def write_outputs(build, evaluation: dict, figures: dict) -> dict:
    """Write results.json and report.md into the build's folder; returns the results."""
    import time

    results = results_of(build, evaluation)
    results.update({"figures": figures, "timings": dict(build.stages.timings), "stages_reused": build.stages.reused,
                    "stages_run": build.stages.ran, "seconds": round(time.perf_counter() - build.started, 1),
                    "versions": installed_versions()})
    atomic_write_text(os.path.join(build.out, "results.json"), json.dumps(results, indent=2) + "\n")
    path = os.path.join(build.out, "report.md")
    atomic_write_text(path, report_text(results))
    build.log(table(results))
    build.log(f"report: {path}")
    return results


def table(results: dict) -> str:
    """Systems (rows) by held-out sets (columns): score [low, high]; the mean over the averaged sets last."""
    sets = list(results["domains"])
    if not sets:
        return "(no held-out sets)"
    systems = list(results["domains"][sets[0]]["intervals"])
    mean, averaged = results.get("mean_over_sets") or {}, results.get("mean_over_sets_of") or []
    last = [f"mean over {', '.join(averaged)}"] if mean else []
    lines = ["| system | " + " | ".join([f"{s} ({results['domains'][s]['metric']})" for s in sets] + last) + " |",
             "|---|" + "---|" * (len(sets) + len(last))]
    for system in systems:
        cells = [_cell(results["domains"][s]["intervals"][system]) for s in sets]
        cells += [_cell(mean[system])] if mean else []
        lines.append(f"| {system} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cell(interval: list[float]) -> str:
    return f"{interval[0]:.3f} [{interval[1]:.3f}, {interval[2]:.3f}]"


def report_text(results: dict) -> str:
    """report.md: the table with 95% intervals, the gate's routing and mixing, figures, times and versions."""
    lines = [f"# {results['name']}", "", f"Recipe `{results['recipe']}`, base `{results['base']}`, seed "
             f"{results['seed']}. Scores are the mean of the rows' scores (R² for r2 sets) with a 95% percentile "
             "bootstrap interval over rows.", "", table(results), ""]
    for system, why in results.get("unavailable", {}).items():
        lines.append(f"- {system}: not available ({why})")
    for key, title in (("routing", "X-LoRA"), ("routing_ce_only", "X-LoRA, cross-entropy only")):
        if results.get(key):
            experts = results["experts"]
            lines += ["", f"## Routing: {title}", "", "mean scaling of each expert over a set's prompt tokens",
                      "", "| set | " + " | ".join(experts) + " |", "|---|" + "---|" * len(experts)]
            lines += [f"| {s} | " + " | ".join(f"{r.get(e, 0):.3f}" for e in experts) + " |"
                      for s, r in results[key].items()]
    mixing = results.get("mixing", {}).get("all")
    if mixing:
        lines += ["", "## Mixing", "", f"entropy per LoRA layer (nats): {mixing['entropy_per_layer']}; share of "
                  f"(token, layer) pairs where two experts are >= 0.2: {mixing['two_experts_share']}; share of "
                  f"layers mixing on average: {mixing['layers_mixing_share']}"]
    if results.get("figures"):
        lines += ["", "## Figures", ""] + [f"![{name}]({path})" for name, path in results["figures"].items()
                                           if path.endswith(".png")]
    lines += ["", "## Times and versions", "", "stage seconds: " + ", ".join(
        f"{k} {v}" for k, v in results["timings"].items()), "versions: " + ", ".join(
        f"{k} {v}" for k, v in results["versions"].items()), ""]
    return "\n".join(lines)
