"""The evaluation stage of a build: every system of the recipe's `baselines` scored row by row on every held-out
set (science.scoring.score_rows), one resumable file per system (evaluation/SYSTEM.json); for X-LoRA gates also
their routing (mean scaling of each expert over a set's prompt tokens) and mixing (science.routing).

Systems: base; expert:NAME (each expert alone, a PEFT model); static_merge_{linear,cat,ties} (PEFT's
add_weighted_adapter, science.baselines); arrow (PEFT's training-free router, when the installed PEFT has it);
xlora, xlora_topk (the same gate keeping the top `top_k` experts) and xlora_ce_only (the gate trained on
cross-entropy alone).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

from ..training.data import prompt_and_completion, read_rows


def eval_rows(source, run_format=None) -> list[dict]:
    """A held-out set's rows as the scorer takes them: {"prompt" or "messages", "completion"}, and "choices" and
    an int "answer" (choice), or a float "target" (numeric, r2). The prompt is what training renders from the row
    under the format (the set's own, else `run_format`): its fields or templates, and under `chat: true` the
    messages of training (system prompt, user prompt, assistant completion), read through the chat template;
    otherwise the plain prompt, with any messages the row brought (packaged rows carry them) dropped. A row in
    the messages format keeps its own messages."""
    fmt = source.format_or(run_format) if run_format is not None else source.format
    rows = []
    for where, row in read_rows(source.path, source.split, source.max_rows):
        if "__error__" in row:
            raise ValueError(f"{where}: {row['__error__']}")
        row = dict(row)
        try:
            if "target" in row:
                row["target"] = float(row["target"])
            if "answer" in row:
                row["answer"] = int(row["answer"])
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}: target must be a number and answer an integer ({e})") from None
        if fmt is not None and fmt.kind in ("prompt_completion", "template"):
            try:
                prompt, completion = prompt_and_completion(row, fmt)
            except ValueError as e:
                raise ValueError(f"{where}: {e}") from None
            row.pop("messages", None)
            if fmt.chat:
                system = [{"role": "system", "content": fmt.system_prompt}] if fmt.system_prompt is not None else []
                row["messages"] = system + [{"role": "user", "content": prompt},
                                            {"role": "assistant", "content": completion}]
            else:
                row["prompt"], row["completion"] = prompt, completion
        rows.append(row)
    if not rows:
        raise ValueError(f"{source.label}: no held-out rows")
    return rows


def _systems(build) -> list[str]:
    names = []
    for baseline in build.recipe.evaluation.baselines:
        if baseline == "experts":
            names += [f"expert:{name}" for name in build.recipe.expert_names]
        else:
            names.append(baseline)
    return names


def evaluate_systems(build, gates: dict[str, str], fingerprints: dict) -> dict:
    """{"rows": {set: rows}, "systems": {system: {"scores": {set: per-row scores}, "routing"?, "mixing"?}},
    "unavailable": {system: why}}; each system's part is one stage."""
    spec = build.recipe.evaluation
    rows = {s.name: eval_rows(s.source, build.recipe.format) for s in spec.sets}
    out: dict[str, Any] = {"rows": rows, "systems": {}, "unavailable": {}}
    if not rows:
        return out
    sets = {s.name: s.metric for s in spec.sets}
    rows_digest = hashlib.sha256(json.dumps(rows, sort_keys=True, default=str).encode()).hexdigest()
    for system in _systems(build):
        if system == "xlora_ce_only" and system not in gates:
            continue
        inputs = _inputs(system, fingerprints)
        fingerprint = {"system": system, "inputs": inputs, "common": fingerprints["common"],
                       "evaluation": dataclasses.asdict(spec), "rows": rows_digest}
        value = build.stages.file(f"evaluation/{system.replace(':', '_')}", fingerprint,
                                  lambda system=system: _score_system(build, system, gates, rows, sets))
        if "unavailable" in value:
            out["unavailable"][system] = value["unavailable"]
        else:
            out["systems"][system] = value
    return out


def _inputs(system: str, fingerprints: dict) -> object:
    """What a system's scores depend on besides the common settings: no stage (base), one expert, all experts
    (merges, the router) or a gate."""
    if system == "base":
        return None
    if system.startswith("expert:"):
        return fingerprints["experts"][system.split(":", 1)[1]]
    if system.startswith("xlora"):
        return fingerprints["xlora_ce_only" if system == "xlora_ce_only" else "xlora"]
    return fingerprints["experts"]


def _model(build, system: str, gates: dict[str, str]):
    """The model a system is scored with; NotImplementedError when it is not available here."""
    from ..loading import load_base

    spec = build.recipe.evaluation
    if system == "base":
        return load_base(build.base)
    if system.startswith("expert:"):
        from peft import PeftModel

        return PeftModel.from_pretrained(load_base(build.base), build.experts[system.split(":", 1)[1]])
    if system.startswith("static_merge_"):
        from ..science.baselines import static_merge

        return static_merge(build.base, dict(build.experts), system[len("static_merge_"):])
    if system == "arrow":
        from ..science.baselines import arrow_router

        return arrow_router(build.base, dict(build.experts))
    from ..model import XLoraModel

    model = XLoraModel.from_pretrained(gates["xlora_ce_only" if system == "xlora_ce_only" else "xlora"],
                                       base=build.base)
    if system == "xlora_topk":
        model.set_topk_lora(spec.top_k)
    return model


def _score_system(build, system: str, gates: dict[str, str], rows: dict[str, list[dict]],
                  metrics: dict[str, str]) -> dict:
    import torch

    from ..science.scoring import score_rows

    spec = build.recipe.evaluation
    try:
        model = _model(build, system, gates)
    except NotImplementedError as e:
        build.log(f"  {system}: not available: {e}")
        return {"unavailable": str(e)}
    model.eval()
    value: dict[str, Any] = {"scores": {}}
    with torch.no_grad():
        for name, set_rows in rows.items():
            value["scores"][name] = [float(x) for x in score_rows(
                model, build.tokenizer, set_rows, metrics[name], batch_size=spec.batch_size,
                max_new_tokens=spec.max_new_tokens)]
            build.log(f"  {system:<22} {name:<20} mean {sum(value['scores'][name]) / len(set_rows):.4f}")
        if system.startswith("xlora"):
            value.update(_routing(model, build.tokenizer, rows, spec.batch_size))
    return value


def _routing(model, tokenizer, rows: dict[str, list[dict]], batch_size: int) -> dict:
    """X-LoRA's routing per set (mean scaling of each expert over the prompt tokens and LoRA layers) and mixing,
    per set and over every set's prompts."""
    import torch

    from ..science.routing import mixing, prompt_scalings, routing

    out: dict[str, Any] = {"routing": {}, "mixing": {}}
    every = []
    for name, set_rows in rows.items():
        scalings = prompt_scalings(model, tokenizer, set_rows, batch_size=batch_size)
        every.append(scalings)
        out["routing"][name] = routing(scalings, list(model.expert_names))
        out["mixing"][name] = mixing(scalings)
    out["mixing"]["all"] = mixing(torch.cat(every))
    return out
