"""Looking at the gate, as the paper does: scalings of a prompt as a heatmap (LoRA layers x experts) with the
scalings summed over layers as bars (paper Figs. 2-3), and the token-by-token history of the summed scalings
over a text (paper Fig. 4).

A scalings log is one safetensors file: the tensor "scalings" (tokens, n_lora_layers, n_experts) and, in the
metadata, the tokens' text, the LoRA layer names and the expert names (JSON lists), so figures can be redrawn
without the model. matplotlib is imported only when drawing.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .engine.text import TokenTexts
from .files import atomic_write


@dataclass
class ScalingsLog:
    scalings: torch.Tensor  # (tokens, n_lora_layers, n_experts)
    tokens: list[str]
    layer_names: list[str]
    expert_names: list[str]
    segments: list[tuple[int, int, str]] | None = None  # (first token, end token, label), e.g. the turns of a chat

    def __post_init__(self) -> None:
        t, n_layers, n_experts = self.scalings.shape
        if len(self.tokens) != t or len(self.layer_names) != n_layers or len(self.expert_names) != n_experts:
            raise ValueError(f"scalings log: tensor {tuple(self.scalings.shape)} does not match {len(self.tokens)} "
                             f"tokens, {len(self.layer_names)} layer names, {len(self.expert_names)} experts")

    def per_expert(self) -> torch.Tensor:
        """(tokens, n_experts): scalings summed over LoRA layers."""
        return self.scalings.float().sum(1)

    def save(self, path: str) -> None:
        meta = {"tokens": json.dumps(self.tokens), "layer_names": json.dumps(self.layer_names),
                "expert_names": json.dumps(self.expert_names), "segments": json.dumps(self.segments or [])}
        tensors = {"scalings": self.scalings.detach().float().contiguous().cpu()}
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))

    @classmethod
    def load(cls, path: str) -> "ScalingsLog":
        try:
            with safe_open(path, framework="pt") as f:
                meta = f.metadata() or {}
                scalings = f.get_tensor("scalings")
        except Exception as e:  # safetensors raises its own error types for bad files
            raise ValueError(f"{path}: not a loramix scalings log (safetensors with a 'scalings' tensor): {e}") \
                from e
        missing = [k for k in ("tokens", "layer_names", "expert_names") if k not in meta]
        if missing:
            raise ValueError(f"{path}: scalings log metadata lacks {missing}")
        segments = [tuple(s) for s in json.loads(meta.get("segments", "[]"))] or None
        return cls(scalings, json.loads(meta["tokens"]), json.loads(meta["layer_names"]),
                   json.loads(meta["expert_names"]), segments)


@torch.no_grad()
def scalings_of_ids(model, tokenizer, ids: torch.Tensor) -> ScalingsLog:
    """One forward over ids (1, t); a causal model gives each token the scalings it had when it was generated.
    The tokens' strings are their text as the server's log-probabilities show it (`TokenTexts`): each decoded
    against the tokens before it, so joined they are the decoded text (no byte-level marks such as 'Ġ' or 'Ċ');
    a special token shows its name, and a token that ends inside a character shows ""."""
    scalings = model(input_ids=ids.to(model.device)).scalings[0]  # (t, L, E)
    texts = TokenTexts(tokenizer)
    tokens = [texts.push(i) for i in ids[0].tolist()]
    return ScalingsLog(scalings.float().cpu(), tokens, list(model.lora_layer_names), list(model.expert_names))


def _short(name: str) -> str:
    """'model.layers.3.self_attn.q_proj' -> 'layers.3.q_proj' for axis labels."""
    parts = name.split(".")
    keep = [p for p in parts if p not in ("model", "self_attn", "mlp", "transformer", "base_model")]
    return ".".join(keep) or name


def plot_scalings(log: ScalingsLog, path: str, title: str = "") -> str:
    """Heatmap of the mean scalings over the tokens (LoRA layers x experts), and the same summed over layers
    as bars beneath (paper Figs. 2-3). Returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mean = log.scalings.float().mean(0).numpy()  # (L, E)
    n_layers, n_experts = mean.shape
    height = max(4.0, 0.18 * n_layers + 2.5)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(1.1 * n_experts + 3.5, height + 2.2),
                                      gridspec_kw={"height_ratios": [height, 2.2]})
    image = top.imshow(mean, aspect="auto", cmap="viridis", vmin=0.0)
    top.set_yticks(range(n_layers), [_short(n) for n in log.layer_names], fontsize=6 if n_layers > 30 else 8)
    top.set_xticks(range(n_experts), log.expert_names, rotation=30, ha="right", fontsize=8)
    top.set_ylabel("LoRA layer")
    top.set_title(title or "scalings (mean over the tokens)", fontsize=10)
    fig.colorbar(image, ax=top, fraction=0.04)
    summed = mean.sum(0)  # (E,)
    bottom.bar(range(n_experts), summed, color=[f"C{i}" for i in range(n_experts)])
    bottom.set_xticks(range(n_experts), log.expert_names, rotation=30, ha="right", fontsize=8)
    bottom.set_ylabel("summed over layers")
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return path


def plot_history(log: ScalingsLog, path: str, title: str = "") -> str:
    """Token-by-token scalings summed over layers, one line per expert, turns shaded (paper Fig. 4)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per_expert = log.per_expert().numpy()  # (t, E)
    t = per_expert.shape[0]
    fig, ax = plt.subplots(figsize=(min(24.0, max(8.0, 0.16 * t)), 4.5))
    for segment_index, (start, end, label) in enumerate(log.segments or []):
        ax.axvspan(start - 0.5, end - 0.5, color="0.92" if segment_index % 2 == 0 else "white", zorder=0)
        ax.text((start + end - 1) / 2, 1.01, label, transform=ax.get_xaxis_transform(), ha="center", fontsize=7)
    for e, name in enumerate(log.expert_names):
        ax.plot(range(t), per_expert[:, e], label=name, color=f"C{e}", linewidth=1.3)
    if t <= 120:
        ax.set_xticks(range(t), [tok.replace("\n", "\\n") for tok in log.tokens], rotation=90, fontsize=6)
    ax.set_xlim(-0.5, t - 0.5)
    ax.set_ylabel("scaling summed over layers")
    ax.set_xlabel("token")
    ax.legend(fontsize=7, ncol=min(5, len(log.expert_names)), loc="upper left", bbox_to_anchor=(0, -0.25 if t <= 120
                                                                                                   else -0.12))
    if title:
        ax.set_title(title, fontsize=10, pad=14)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return path


def _save(fig, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110), suffix=".png")


def analyze(out: str, model=None, tokenizer=None, prompt: str | None = None, max_new_tokens: int = 0,
            log: ScalingsLog | None = None) -> dict:
    """Figures for one prompt (and its greedy continuation) or for a saved log; returns a summary."""
    os.makedirs(out, exist_ok=True)
    if log is None:
        if model is None or tokenizer is None or prompt is None:
            raise ValueError("analyze: give a model, its tokenizer and a prompt, or a saved scalings log")
        from .engine.generate import special_tokens
        from .engine.text import until_eos

        ids = tokenizer(prompt, return_tensors="pt")["input_ids"].to(model.device)
        n_prompt = ids.shape[1]
        if max_new_tokens > 0:
            eos, _ = special_tokens(model, tokenizer.eos_token_id, tokenizer.pad_token_id)
            generated = model.generate(ids, max_new_tokens=max_new_tokens, eos_token_id=eos)[0, n_prompt:]
            new = until_eos(generated.tolist(), eos)
            ids = torch.cat([ids, torch.tensor([new], dtype=ids.dtype, device=ids.device)], dim=1)
        log = scalings_of_ids(model, tokenizer, ids)
        if ids.shape[1] > n_prompt:
            log.segments = [(0, n_prompt, "prompt"), (n_prompt, ids.shape[1], "generated")]
        log.save(os.path.join(out, "scalings.safetensors"))
    heatmap = plot_scalings(log, os.path.join(out, "heatmap.png"))
    history = plot_history(log, os.path.join(out, "history.png"))
    mean = log.per_expert().mean(0) / max(1, len(log.layer_names))
    return {"tokens": len(log.tokens), "text": "".join(log.tokens), "heatmap": heatmap, "history": history,
            "mean_scaling": dict(zip(log.expert_names, [round(float(x), 4) for x in mean]))}
