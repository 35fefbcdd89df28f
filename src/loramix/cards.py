"""Model cards: the README.md written beside every saved X-LoRA, trained expert or export, in the Hugging Face
hub's format (YAML metadata between `---` lines, then Markdown) that `huggingface_hub.ModelCard` reads.

The metadata every card carries:

    base_model     the base model's hub id (a local base is named in the text only: a path means nothing elsewhere)
    library_name   what loads the folder: loramix for an X-LoRA, peft for a PEFT adapter (a trained expert, the
                   peft export), transformers for the merged export; the hub picks its "use this model" code by it
    tags           loramix, and what the folder is (x-lora, lora, mixture-of-experts, ...)
    experts        one entry per LoRA expert: name, rank, lora_alpha, target_modules (and its hub id, if any)
    training_data  the names of the data the weights were trained on (a file's name, a hub dataset's id)
    datasets       the hub datasets among them
    model-index    the eval table, when held-out metrics exist (eval loss and perplexity, per held-out data)

This module builds cards from plain values; the model, training and the exports hand it what they know.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .files import atomic_write_text
from .hub import looks_like_path

if TYPE_CHECKING:
    from huggingface_hub import ModelCard

CARD_NAME = "README.md"
# what loads each kind of folder (the hub's `library_name`)
LIBRARY = {"xlora": "loramix", "expert": "peft", "peft": "peft", "merged": "transformers"}
# the held-out metrics a training run reports -> the card's metric type and name
EVAL_METRICS = {"eval_loss": ("loss", "eval loss (token-mean cross-entropy)"),
                "eval_perplexity": ("perplexity", "eval perplexity")}


@dataclass(frozen=True)
class TrainingRecord:
    """What a card says about how the weights were trained: the training and held-out data (paths or hub dataset
    names, as the run was given them) and the run's final metrics (`eval_loss`, `eval_perplexity`, `steps`, ...)."""

    data: tuple[str, ...] = ()
    eval_data: tuple[str, ...] = ()
    metrics: dict[str, Any] = field(default_factory=dict)


def hub_model_id(name: str | None) -> str | None:
    """`name` when it is a hub id ("owner/repo", or a legacy "repo" such as "gpt2"), None for a local path, an
    empty name or anything else."""
    if not isinstance(name, str) or not name or looks_like_path(name) or os.path.exists(os.path.expanduser(name)):
        return None
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    return name


def data_name(source: str) -> str:
    """The name a card gives a data source: a local file or folder by its base name (no path of this machine
    leaks into a published card), a hub dataset by its id without the `:split`, anything else as it is."""
    if os.path.exists(os.path.expanduser(source)) or looks_like_path(source):
        return os.path.basename(os.path.normpath(os.path.expanduser(source)))
    return source.split(":", 1)[0] if "/" in source else source


def expert_entry(name: str, adapter_config: dict[str, Any], source: str | None = None) -> dict[str, Any]:
    """One expert as the `experts` metadata lists it, from its PEFT adapter config: name, rank (`r`; the largest
    of `rank_pattern` when it varies per module), lora_alpha, target_modules (the module names without their
    parents' path, sorted: `q_proj`, not `model.layers.0.self_attn.q_proj` once per layer), and its hub id."""
    ranks = [adapter_config.get("r")] + list((adapter_config.get("rank_pattern") or {}).values())
    targets = adapter_config.get("target_modules") or []
    if isinstance(targets, (list, tuple, set)):
        targets = sorted({str(t).rsplit(".", 1)[-1] for t in targets})
    entry = {"name": name, "rank": max(int(r) for r in ranks if isinstance(r, (int, float))),
             "lora_alpha": adapter_config.get("lora_alpha"), "target_modules": targets}
    hub_id = hub_model_id(source)
    if hub_id is not None:
        entry["hub_id"] = hub_id
    return entry


def xlora_card(*, base_model_id: str | None, experts: list[dict[str, Any]], gate: dict[str, Any],
               training: TrainingRecord | None = None, repo_id: str | None = None) -> "ModelCard":
    """The card of a saved X-LoRA. `experts`: `expert_entry` per expert, in order; `gate`: the XLoraConfig
    fields worth showing (depth, size, layerwise, top-k, temperature, ...); `repo_id`: where it is published,
    for the loading example."""
    where = repo_id or "PATH_OR_HUB_ID"
    lines = [f"An X-LoRA (Buehler & Buehler, 2024) made with loramix: {len(experts)} LoRA experts "
             f"over {_base_text(base_model_id)}, mixed per token and per layer by a small gate that reads the base "
             f"model's hidden states (two passes per token: a scaling pass, then the mixed pass).", "",
             "## Experts", "", "| expert | rank | alpha | adapted modules |", "|---|---|---|---|"]
    lines += [f"| {e['name']} | {e['rank']} | {e['lora_alpha']} | {_modules_text(e['target_modules'])} |"
              for e in experts]
    lines += ["", "## Gate", "", *[f"- `{k}`: {v}" for k, v in gate.items()], "",
              "## Use", "", "```python", "from loramix import XLoraModel", "",
              f'model = XLoraModel.from_pretrained("{where}")' + ("" if hub_model_id(base_model_id) else
                                                                  '  # base="..." where the base is not on the hub'),
              "```", "", f'or `loramix generate --model {where} --prompt "..."`.']
    return _card("xlora", base_model_id, lines, training, repo_id=repo_id,
                 tags=["loramix", "x-lora", "lora", "mixture-of-experts", "text-generation"], experts=experts)


def expert_card(*, base_model_id: str | None, adapter_config: dict[str, Any], name: str,
                training: TrainingRecord | None = None) -> "ModelCard":
    """The card of one trained LoRA expert (a PEFT adapter folder)."""
    entry = expert_entry(name, adapter_config)
    lines = [f"A LoRA expert trained with loramix on {_base_text(base_model_id)}: rank "
             f"{entry['rank']}, alpha {entry['lora_alpha']}, on {_modules_text(entry['target_modules'])}. It is a "
             f"plain PEFT adapter (`PeftModel.from_pretrained(base, folder)`), and one expert of an X-LoRA "
             f"(`loramix train --adapters {name}=FOLDER ...`)."]
    return _card("expert", base_model_id, lines, training, tags=["loramix", "lora", "peft", "text-generation"],
                 experts=[entry], name=name)


def export_card(kind: str, *, base_model_id: str | None, experts: list[dict[str, Any]],
                weights: dict[str, float], weights_from: str) -> "ModelCard":
    """The card of an X-LoRA exported with fixed expert weights: `kind` 'peft' (one LoRA adapter) or 'merged' (a
    plain transformers model). `weights`: each expert's mean weight over the LoRA layers; `weights_from`: where
    the weights came from ('uniform', a JSON file's name, the gate's mean over some data)."""
    if kind not in ("peft", "merged"):
        raise ValueError(f"kind: {kind!r} is not 'peft' or 'merged'")
    what = ("one PEFT LoRA adapter (`PeftModel.from_pretrained(base, folder)`)" if kind == "peft" else
            "a plain transformers model with the mix folded into its weights (`AutoModelForCausalLM`)")
    lines = [f"An X-LoRA over {_base_text(base_model_id)}, exported by loramix as {what}. The "
             f"gate is replaced by fixed expert weights ({weights_from}), so every token gets the same mix.", "",
             "| expert | mean weight |", "|---|---|", *[f"| {n} | {w:.4f} |" for n, w in weights.items()]]
    return _card(kind, base_model_id, lines, None, tags=["loramix", "x-lora", "lora", f"{kind}-export",
                                                           "text-generation"], experts=experts,
                 extra={"expert_weights": {n: round(float(w), 6) for n, w in weights.items()},
                        "expert_weights_from": weights_from})


def write_card(folder: str, card: "ModelCard") -> str:
    """Write `card` as `folder`/README.md (atomically, replacing a card already there); returns its path."""
    path = os.path.join(folder, CARD_NAME)
    atomic_write_text(path, str(card))
    return path


def _card(kind: str, base_model_id: str | None, lines: list[str], training: TrainingRecord | None, *,
          tags: list[str], experts: list[dict[str, Any]], repo_id: str | None = None, name: str | None = None,
          extra: dict[str, Any] | None = None) -> "ModelCard":
    from huggingface_hub import ModelCard, ModelCardData

    training = training or TrainingRecord()
    names = list(dict.fromkeys(data_name(s) for s in training.data))
    hub_datasets = [n for n in names if not _is_local(n, training.data)]
    results = _eval_results(training)
    model_name = (repo_id or name or f"loramix-{kind}") if results else None  # the eval table's model
    data = ModelCardData(base_model=hub_model_id(base_model_id), library_name=LIBRARY[kind], tags=tags,
                         pipeline_tag="text-generation", datasets=hub_datasets or None, model_name=model_name,
                         eval_results=results or None, experts=experts, training_data=names or None,
                         **(extra or {}))
    title = repo_id.split("/")[-1] if repo_id else name or {"xlora": "X-LoRA", "expert": "LoRA expert",
                                                   "peft": "X-LoRA, exported as a PEFT LoRA",
                                                   "merged": "X-LoRA, exported as a merged model"}[kind]
    body = [f"# {title}", "", *lines]
    if names:
        body += ["", "## Training data", "", *[f"- {n}" for n in names]]
    if results:
        body += ["", "## Evaluation", "", "| data | metric | value |", "|---|---|---|"]
        body += [f"| {r.dataset_name} | {r.metric_name} | {r.metric_value:.4f} |" for r in results]
    steps = training.metrics.get("steps")
    if isinstance(steps, int):
        body += ["", f"Trained for {steps} optimizer steps."]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body) + "\n")


def _eval_results(training: TrainingRecord) -> list:
    """The held-out metrics as the hub's eval results (one per metric, on the held-out data named together)."""
    from huggingface_hub import EvalResult

    held_out = ", ".join(dict.fromkeys(data_name(s) for s in training.eval_data)) or "held-out data"
    results = []
    for key, (metric_type, metric_name) in EVAL_METRICS.items():
        value = training.metrics.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value == value:
            results.append(EvalResult(task_type="text-generation", dataset_type="text", dataset_name=held_out,
                                      metric_type=metric_type, metric_value=float(value), metric_name=metric_name))
    return results


def _is_local(name: str, sources: tuple[str, ...]) -> bool:
    """Whether the data named `name` came from a local file or folder (else a hub dataset or a packaged one)."""
    for source in sources:
        if data_name(source) == name:
            return (os.path.exists(os.path.expanduser(source)) or looks_like_path(source)
                    or "/" not in source or source.startswith("packaged:"))
    return True


def _base_text(base_model_id: str | None) -> str:
    hub_id = hub_model_id(base_model_id)
    if hub_id is not None:
        return f"[{hub_id}](https://huggingface.co/{hub_id})"
    if base_model_id:
        return f"a local base model (`{os.path.basename(os.path.normpath(base_model_id))}`, not on the hub)"
    return "an unnamed base model"


def _modules_text(targets: Any) -> str:
    if isinstance(targets, (list, tuple)):
        return ", ".join(f"`{t}`" for t in targets) or "-"
    return f"`{targets}`"
