"""Inference speed of loramix against PEFT's XLoraModel and the base model, in one run; writes docs/benchmarks.md.

    python benchmarks/bench_inference.py [--sizes tiny small] [--threads 2] [--out docs/benchmarks.md]

Each system runs in its own process (so that its peak memory, max RSS, is its own) on the same saved weights:
a random Llama (vocabulary 32000, as Llama-2) and 8 random LoRA experts of rank 8-16 on all linear modules. Measured: prefill (one forward over
256 and 1024 tokens, best of a few runs), greedy decode tokens/s for 128 new tokens after a 32-token prompt
(PEFT: fewer tokens on the small size, since without a KV cache each token re-runs the sequence; that flatters
PEFT, whose cost per token grows with the length).
"""

from __future__ import annotations

import os
import resource
import time

from common import RANKS, SIZES, bench_main, best_time

SYSTEMS = ["base", "peft", "loramix", "loramix-frozen"]


def worker(system: str, size: str, folder: str, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(os.path.join(folder, "base")).eval()
    adapters = {f"expert_{i}": os.path.join(folder, "experts", f"expert_{i}") for i in range(len(RANKS))}
    if system == "peft":
        from peft import XLoraConfig, get_peft_model

        base.config.use_cache = False
        model = get_peft_model(base, XLoraConfig(task_type="CAUSAL_LM", hidden_size=base.config.hidden_size,
                                                 adapters={str(i): p for i, p in enumerate(adapters.values())},
                                                 xlora_depth=2, xlora_size=64, layerwise_scalings=True)).eval()
    elif system.startswith("loramix"):
        from loramix import XLoraConfig, XLoraModel

        model = XLoraModel.from_base(base, XLoraConfig(adapters=adapters, xlora_depth=2, xlora_size=64,
                                                       layerwise_scalings=True))
    else:
        model = base
    vocab = base.config.vocab_size
    g = torch.Generator().manual_seed(0)
    result = {}
    repeats = 3 if size == "tiny" else 2
    with torch.no_grad():
        if system != "loramix-frozen":  # frozen scalings change decoding only
            for n in (256, 1024):
                ids = torch.randint(3, vocab, (1, n), generator=g)
                result[f"prefill_{n}"] = best_time(lambda: model(input_ids=ids), repeats)
        prompt = torch.randint(3, vocab, (1, 32), generator=g)
        new = 32 if (system == "peft" and size == "small") else 128
        runs = {"decode": {}}
        if system == "base":
            runs["decode"] = dict(use_cache=True, do_sample=False, pad_token_id=0)
        elif system == "peft":
            runs["decode"] = dict(do_sample=False, pad_token_id=0)
        elif system == "loramix":
            runs["decode"] = {}
        else:
            runs = {"decode": dict(freeze_scalings_after=0), "decode_folded": dict(freeze_scalings_after=0,
                                                                                   fold_frozen=True)}
        for key, kwargs in runs.items():
            def run():
                out = model.generate(input_ids=prompt, max_new_tokens=new, min_new_tokens=new, eos_token_id=None,
                                     **kwargs)
                assert out.shape[1] == 32 + new
            result[key] = new / best_time(run, 1)
            result[f"{key}_tokens"] = new
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


def fmt_ratio(x: float) -> str:
    return f"{x:.2f}×"


def report(results: dict, threads: int) -> str:
    import platform

    import torch

    lines = ["## Inference", "",
             f"Written by `benchmarks/bench_inference.py` on {time.strftime('%Y-%m-%d')}: torch {torch.__version__}, "
             f"{threads} CPU threads, float32, {platform.processor() or platform.machine()}. "
             "8 LoRA experts of rank 8–16 on all linear modules, layerwise scalings, classifier depth 2. "
             "PEFT is `peft.XLoraModel` (no KV cache: it forbids it). Rerun the script to refresh this page.", ""]
    for size, by_system in results.items():
        cfg = SIZES[size]
        lines += [f"### {size}: hidden {cfg['hidden_size']}, {cfg['layers']} layers", "",
                  "| system | prefill 256 (ms) | prefill 1024 (ms) | decode tokens/s | peak RSS (MB) |",
                  "|---|---|---|---|---|"]
        for system, r in by_system.items():
            p256 = f"{r['prefill_256'] * 1e3:.1f}" if "prefill_256" in r else "(as loramix)"
            p1024 = f"{r['prefill_1024'] * 1e3:.1f}" if "prefill_1024" in r else "(as loramix)"
            decode = f"{r['decode']:.1f}" + (f" ({r['decode_tokens']} tokens)" if r["decode_tokens"] != 128 else "")
            if "decode_folded" in r:
                decode += f"; folded {r['decode_folded']:.1f}"
            lines.append(f"| {system} | {p256} | {p1024} | {decode} | {r['peak_rss_mb']:.0f} |")
        base, peft, ours, frozen = (by_system[s] for s in SYSTEMS)
        lines += ["", "| ratio | value | target |", "|---|---|---|",
                  f"| loramix decode / PEFT decode | {fmt_ratio(ours['decode'] / peft['decode'])} | ≥ 14× |",
                  f"| loramix decode / base decode | {fmt_ratio(ours['decode'] / base['decode'])} | ≥ 0.5× |",
                  f"| loramix prefill 256 / base prefill 256 (time) | "
                  f"{fmt_ratio(ours['prefill_256'] / base['prefill_256'])} | ≤ 2× |",
                  f"| PEFT prefill 256 / base prefill 256 (time) | {fmt_ratio(peft['prefill_256'] / base['prefill_256'])} | |",
                  f"| loramix prefill 1024 / base prefill 1024 (time) | "
                  f"{fmt_ratio(ours['prefill_1024'] / base['prefill_1024'])} | |",
                  f"| frozen decode / base decode | {fmt_ratio(frozen['decode'] / base['decode'])} | |",
                  f"| frozen + folded decode / base decode | {fmt_ratio(frozen['decode_folded'] / base['decode'])} "
                  f"| ≥ 0.9× |", ""]
    ceiling = ", ".join(f"{size} {by['base']['decode'] / by['peft']['decode']:.1f}×" for size, by in results.items())
    lines += ["### Reading the numbers", "",
              f"- The base model with its KV cache decodes {ceiling} faster than PEFT's X-LoRA here. X-LoRA runs two "
              "passes per token, so no X-LoRA can beat the base model: a target of 14× PEFT needs a machine where "
              "the base model is more than 14× PEFT (as in the issue's measurement, 244 vs 6.8 tokens/s). loramix "
              "stays above 0.5× the base because its scaling pass stops at the last hidden state (no LM head) and "
              "its one-token steps run through hand-written decoder layers (backbone/decoder.py).",
              "- Prefill runs both passes over the prompt through the model's own layers, so its time is bounded "
              "below by about (2 × decoder layers + experts + LM head) / (decoder layers + LM head) of the base's, "
              "1.9× on the small size: the ≤ 2× target leaves little room, and no change to the per-step machinery "
              "moves it.",
              "- *Folded* includes the fold itself (W0 + the mixed update, once per request): it costs about "
              "in·out/(in+out) tokens of per-token LoRA work per adapted matrix, so it pays off on long answers "
              "and costs on short ones.",
              "- PEFT on the small size decodes 32 tokens, not 128: without a cache its cost per token grows with the "
              "length, so the shorter run flatters PEFT.",
              "- Peak RSS is each process's maximum, and loading the weights sets it on these sizes; the runtime "
              "state of every system (KV caches, stacked experts) stays below that peak.", ""]
    return "\n".join(lines) + "\n"


def main() -> None:
    bench_main(__file__, __doc__, SYSTEMS, worker, report, "inference")


if __name__ == "__main__":
    main()
