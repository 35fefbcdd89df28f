"""The demo's evaluate stage: every system's greedy answers to the held-out prompts, scored (the protein forward
task's R² too), beside X-LoRA's gate: its routing, how much it mixes experts, the composed task part by part."""

from __future__ import annotations

import json
import os
from typing import Callable

import torch

from ..losses import mixing_entropy
from .domains import COMPOSED, Domain, composed_parts, first_number

MIXING_THRESHOLD = 0.2  # an expert "takes part" in a layer when its scaling there is at least this


def read_jsonl(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


@torch.no_grad()
def answers_of(generate: Callable, tokenizer, prompts: list[str], max_new_tokens: int,
               batch_size: int = 64) -> list[str]:
    """Greedy answers: the generated text up to the end-of-sequence token."""
    tokenizer.padding_side = "left"
    answers = []
    for i in range(0, len(prompts), batch_size):
        enc = tokenizer(prompts[i:i + batch_size], return_tensors="pt", padding=True)
        new = generate(enc["input_ids"], enc["attention_mask"], max_new_tokens)[:, enc["input_ids"].shape[1]:]
        for row in new.tolist():
            if tokenizer.eos_token_id in row:
                row = row[:row.index(tokenizer.eos_token_id)]
            answers.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    return answers


def score(domain: Domain, answers: list[str], test: list[dict]) -> float:
    """The domain's mean score of the answers against the held-out rows' references."""
    return round(sum(domain.score(a, row["reference"]) for a, row in zip(answers, test)) / len(test), 4)


def r_squared(answers: list[str], test: list[dict]) -> float:
    """R² of the predicted forces against the rule's (1 - SS_res / SS_tot); an answer that is not a number
    predicts 0 pN, so it counts against the fit."""
    truth = [float(row["reference"]) for row in test]
    predicted = [float(first_number(a) or 0) for a in answers]
    mean = sum(truth) / len(truth)
    ss_tot = sum((y - mean) ** 2 for y in truth)
    ss_res = sum((y - p) ** 2 for y, p in zip(truth, predicted))
    return round(1.0 - ss_res / ss_tot, 4) if ss_tot else 0.0


def mixing(scalings: torch.Tensor) -> dict:
    """How much a gate mixes, measured over tokens: scalings (t, L, E), each (token, layer) a softmax over experts.

    entropy: mean over tokens of the entropy of each layer's scalings (nats; 0 is one-hot, ln E uniform);
    experts_per_layer: mean over tokens of how many experts have at least MIXING_THRESHOLD in each layer."""
    p = scalings.float()
    entropy = mixing_entropy(p)  # (L,)
    above = (p >= MIXING_THRESHOLD).sum(-1).float().mean(0)  # (L,)
    return {"entropy": round(float(entropy.mean()), 4), "entropy_max_layer": round(float(entropy.max()), 4),
            "experts_per_layer": round(float(above.mean()), 4),
            "experts_per_layer_max": round(float(above.max()), 4)}


def _hf_generate(model, tokenizer):
    def run(ids, mask, n):
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False,
                              pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    return run


def _test_rows(data: str, task: Domain) -> list[dict]:
    return read_jsonl(os.path.join(data, f"{task.name}_test.jsonl"))


def evaluate(base: str, experts: str, xlora: str, data: str, domains: list[Domain], log) -> tuple[dict, dict]:
    """Scores of every system on every domain's and the composed task's held-out prompts, X-LoRA's routing per
    domain, the protein forward R² per system and the gate's mixing; and one example answer per task."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from ..loading import load_tokenizer

    tokenizer = load_tokenizer(base)
    names = [d.name for d in domains]
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base),
                                           os.path.join(experts, names[0]), adapter_name=names[0])
    for name in names[1:]:
        peft_model.load_adapter(os.path.join(experts, name), adapter_name=name)
    peft_model.add_weighted_adapter(names, [1.0 / len(names)] * len(names), "static_merge", combination_type="cat")
    peft_model.eval()
    gate = evaluate_xlora(base, xlora, data, domains)
    results: dict = {"domains": {}, "composed": {}, "composed_parts": {}, "routing": gate["routing"], "r2": {},
                     "mixing": gate["mixing"]}
    examples: dict = {}
    for task in [*domains, COMPOSED]:
        test = _test_rows(data, task)
        prompts = [r["prompt"] for r in test]

        def peft_answers() -> list[str]:  # with whichever adapter is active
            return answers_of(_hf_generate(peft_model, tokenizer), tokenizer, prompts, task.max_new_tokens)

        with peft_model.disable_adapter():
            answers = {"base": peft_answers()}
        for name in names:
            peft_model.set_adapter(name)
            answers[name] = peft_answers()
        peft_model.set_adapter("static_merge")
        answers["static_merge"] = peft_answers()
        answers["xlora"] = gate["answers"][task.name]
        row = {"base": score(task, answers["base"], test), "experts": {n: score(task, answers[n], test) for n in names},
               "static_merge": score(task, answers["static_merge"], test), "xlora": gate["scores"][task.name]}
        results["composed" if task is COMPOSED else "domains"][task.name] = row
        if task is COMPOSED:
            parts = {system: [composed_parts(a, r["reference"]) for a, r in zip(answers[system], test)]
                     for system in ["base", *names, "static_merge", "xlora"]}
            results["composed_parts"][task.name] = {
                "prompts": len(test), "sequence_right": {k: sum(s for s, _ in v) for k, v in parts.items()},
                "force_right": {k: sum(f for _, f in v) for k, v in parts.items()},
                "force_written": {k: sum(first_number(a.split("=", 1)[-1]) is not None for a in answers[k])
                                  for k in parts},
                **gate["composed_checks"]}
        if task.name == "protein_forward":
            results["r2"][task.name] = {"base": r_squared(answers["base"], test),
                                        "experts": {n: r_squared(answers[n], test) for n in names},
                                        "static_merge": r_squared(answers["static_merge"], test),
                                        "xlora": r_squared(answers["xlora"], test)}
        examples[task.name] = {"prompt": prompts[0], "reference": test[0]["reference"],
                               "xlora": answers["xlora"][0], "base": answers["base"][0],
                               **{n: answers[n][0] for n in names}, "static_merge": answers["static_merge"][0]}
        best = max(row["experts"], key=row["experts"].get)
        log(f"  {task.name:<16} base {row['base']:.2f}  best expert {best} {row['experts'][best]:.2f}  "
            f"static merge {row['static_merge']:.2f}  X-LoRA {row['xlora']:.2f}")
    return results, examples


@torch.no_grad()
def evaluate_xlora(base: str, xlora: str, data: str, domains: list[Domain]) -> dict:
    """X-LoRA's scores and answers per task, its routing per domain (mean scaling of each expert over the
    domain's prompt tokens and all LoRA layers) and its mixing, on the domains' prompts and on the composed
    task's answers (the part where two experts are needed)."""
    from ..loading import load_tokenizer
    from ..model import XLoraModel

    tokenizer = load_tokenizer(base)
    model = XLoraModel.from_pretrained(xlora, base=base)
    names = [d.name for d in domains]

    def generate(ids, mask, n):
        return model.generate(ids, mask, max_new_tokens=n, eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=tokenizer.pad_token_id)

    out: dict = {"scores": {}, "answers": {}, "routing": {}, "mixing": {}}
    prompt_scalings = []
    for task in [*domains, COMPOSED]:
        test = _test_rows(data, task)
        prompts = [r["prompt"] for r in test]
        out["answers"][task.name] = answers_of(generate, tokenizer, prompts, task.max_new_tokens)
        out["scores"][task.name] = score(task, out["answers"][task.name], test)
        if task is COMPOSED:
            out["mixing"]["composed_answers"] = mixing(_answer_scalings(model, tokenizer, prompts,
                                                                        out["answers"][task.name]))
            out["composed_checks"] = composed_checks(model, tokenizer, test)
            continue
        tokenizer.padding_side = "left"
        enc = tokenizer(prompts, return_tensors="pt", padding=True)
        scalings = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).scalings
        tokens = scalings[enc["attention_mask"].bool()].float()  # (n, L, E)
        prompt_scalings.append(tokens)
        out["routing"][task.name] = {n: round(float(v), 4) for n, v in zip(names, tokens.mean(dim=(0, 1)))}
    out["mixing"]["domain_prompts"] = mixing(torch.cat(prompt_scalings))
    return out


def _answer_scalings(model, tokenizer, prompts: list[str], answers: list[str]) -> torch.Tensor:
    """The scalings at the positions that wrote each answer (the prompt's last token to the answer's last but
    one), all answers together: (n, L, E)."""
    rows = []
    for prompt, answer in zip(prompts, answers):
        n_prompt = len(tokenizer(prompt)["input_ids"])
        ids = tokenizer(prompt + " " + answer, return_tensors="pt")["input_ids"]
        scalings = model(input_ids=ids).scalings[0]  # (t, L, E)
        rows.append(scalings[n_prompt - 1:ids.shape[1] - 1].float())
    return torch.cat(rows)


def composed_checks(model, tokenizer, test: list[dict]) -> dict[str, dict[str, float]]:
    """Where the composed task's answer is lost, measured on the held-out rows with the reference answer given:
    force_first_digit: the mean probability of the force's first digit under three scalings: protein_forward's
    weights on every token, recall's on the prompt and the sequence and protein_forward's from the end mark on
    (the hand-over the task asks for), and the gate's own; end_mark: the gate's mean scaling of recall and of
    protein_forward (over the LoRA layers) at the end mark " =", the position that writes the force's first token."""
    names = list(model.expert_names)
    recall, forward = names.index("recall"), names.index("protein_forward")
    probs: dict[str, list[float]] = {"protein_forward_throughout": [], "recall_then_protein_forward": [], "gate": []}
    at_mark: dict[str, list[float]] = {"recall": [], "protein_forward": []}
    for row in test:
        sequence, force = row["reference"].split()
        ids = tokenizer(f"{row['prompt']} {sequence} = {force}", return_tensors="pt")["input_ids"]
        t = ids.shape[1]
        n_force = len(tokenizer(f" {force}", add_special_tokens=False)["input_ids"])  # "▁" and the digits
        digit = t - n_force + 1  # the first digit, written at position digit - 1
        handover = t - n_force - 1  # the end mark " =", which writes the "▁" before the force
        throughout = torch.zeros(1, t, model.n_lora_layers, len(names))
        throughout[..., forward] = 1
        switched = torch.zeros_like(throughout)
        switched[:, :handover, :, recall] = 1
        switched[:, handover:, :, forward] = 1
        for key, scalings in (("protein_forward_throughout", throughout), ("recall_then_protein_forward", switched),
                              ("gate", None)):
            out = model(input_ids=ids, scalings=scalings)
            probs[key].append(float(out.logits[0, digit - 1].softmax(-1)[ids[0, digit]]))
        mark = out.scalings[0, handover].float().mean(0)  # (E,): the gate's, from the last pass
        at_mark["recall"].append(float(mark[recall]))
        at_mark["protein_forward"].append(float(mark[forward]))
    return {"force_first_digit": {key: round(sum(v) / len(v), 4) for key, v in probs.items()},
            "end_mark": {key: round(sum(v) / len(v), 4) for key, v in at_mark.items()}}
