"""The science run's figures, drawn with loramix.analysis: per domain, the heatmap of the gate's mean scalings
(LoRA layers x experts) over the domain's held-out prompts; and the token history of the scalings across one
conversation whose turns move between the domains, each turn answered greedily by the X-LoRA model."""

from __future__ import annotations

import os

import torch

from ..analysis import ScalingsLog, plot_history, plot_scalings, scalings_of_ids
from .routing import prompt_scalings


def domain_heatmaps(model, tokenizer, rows_by_domain: dict[str, list[dict]], folder: str, *,
                    batch_size: int = 8) -> dict[str, str]:
    """One heatmap per domain (`scalings_<domain>.png` in folder) of the mean scalings over every token of its
    rows' prompts; returns domain -> path."""
    paths = {}
    for domain, rows in rows_by_domain.items():
        scalings = prompt_scalings(model, tokenizer, rows, batch_size=batch_size)
        log = ScalingsLog(scalings, [""] * scalings.shape[0], list(model.lora_layer_names), list(model.expert_names))
        safe = domain.replace("/", "_")
        paths[domain] = plot_scalings(log, os.path.join(folder, f"scalings_{safe}.png"),
                                      title=f"{domain}: mean scalings over {len(rows)} held-out prompts")
    return paths


@torch.no_grad()
def conversation_history(model, tokenizer, turns: list[tuple[str, str]], path: str, *,
                         max_new_tokens: int = 12) -> tuple[ScalingsLog, list[dict]]:
    """A chat of `turns` ((domain, user message) in order), each answered greedily by the model with the earlier
    turns as context; then one forward over the whole chat for the scalings each token had, drawn token by token
    with each turn shaded (`plot_history`). Returns the log (segments = turns) and, per turn, the domain, the
    answer and the expert with the highest mean scaling over the turn's tokens."""
    messages: list[dict] = []
    spans = []
    eos = tokenizer.eos_token_id
    for domain, text in turns:
        start = len(tokenizer(_render(tokenizer, messages), add_special_tokens=False)["input_ids"]) if messages else 0
        messages.append({"role": "user", "content": text})
        prompt = tokenizer(_render(tokenizer, messages, True), add_special_tokens=False, return_tensors="pt")
        new = model.generate(prompt["input_ids"], max_new_tokens=max_new_tokens, eos_token_id=eos)
        new = new[0, prompt["input_ids"].shape[1]:].tolist()
        new = new[:new.index(eos)] if eos in new else new
        messages.append({"role": "assistant", "content": tokenizer.decode(new, skip_special_tokens=True).strip()})
        end = len(tokenizer(_render(tokenizer, messages), add_special_tokens=False)["input_ids"])
        spans.append((start, end, domain))
    ids = tokenizer(_render(tokenizer, messages), add_special_tokens=False, return_tensors="pt")["input_ids"]
    log = scalings_of_ids(model, tokenizer, ids)
    log.segments = spans
    per_expert = log.per_expert()
    summary = [{"domain": domain, "answer": messages[2 * i + 1]["content"],
                "top_expert": log.expert_names[int(per_expert[start:end].mean(0).argmax())]}
               for i, (start, end, domain) in enumerate(spans)]
    plot_history(log, path, title="X-LoRA scalings token by token across a conversation over the domains")
    return log, summary


def _render(tokenizer, messages: list[dict], generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
