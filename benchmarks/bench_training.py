"""Gate-training speed of loramix against PEFT's XLoraModel, in one run; writes the training section of
docs/benchmarks.md.

    python benchmarks/bench_training.py [--sizes tiny small] [--threads 2] [--out docs/benchmarks.md]

Both systems train the X-LoRA classifier (experts frozen) on the same saved weights (a random Llama with a
32000-token vocabulary and 8 random LoRA experts of rank 8-16 on all linear modules, as in bench_inference.py)
and the same batches: forward, next-token cross-entropy, backward, AdamW step. Each system runs in its own
process; the time is the median step after two warm-up steps, and tokens/s counts every input token.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from _report import DEFAULT, write_section
from bench_inference import RANKS, SIZES, prepare

SYSTEMS = ["peft", "loramix"]
SHAPE = {"tiny": (8, 128, 8), "small": (4, 128, 5)}  # batch, tokens, timed steps


def worker(system: str, size: str, folder: str, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(os.path.join(folder, "base"))
    adapters = {f"expert_{i}": os.path.join(folder, "experts", f"expert_{i}") for i in range(len(RANKS))}
    options = dict(xlora_depth=2, xlora_size=64, layerwise_scalings=True, xlora_dropout_p=0.0)
    if system == "peft":
        from peft import XLoraConfig, get_peft_model

        base.config.use_cache = False
        model = get_peft_model(base, XLoraConfig(task_type="CAUSAL_LM", hidden_size=base.config.hidden_size,
                                                 adapters={str(i): p for i, p in enumerate(adapters.values())},
                                                 **options))
        model.train()
    else:
        from loramix import XLoraConfig, XLoraModel

        model = XLoraModel.from_base(base, XLoraConfig(adapters=adapters, **options))
        model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    batch, tokens, steps = SHAPE[size]
    g = torch.Generator().manual_seed(0)
    times = []
    for step in range(steps + 2):
        ids = torch.randint(3, base.config.vocab_size, (batch, tokens), generator=g)
        start = time.perf_counter()
        logits = model(input_ids=ids).logits
        targets = torch.nn.functional.pad(ids[:, 1:], (0, 1), value=-100)  # labels shifted, logits left whole
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step >= 2:
            times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    return {"step_s": seconds, "tokens_per_s": batch * tokens / seconds, "trainable": sum(p.numel() for p in trainable),
            "batch": batch, "tokens": tokens}


def report(results: dict, threads: int) -> str:
    import platform

    import torch

    lines = ["## Training the gate", "",
             f"Written by `benchmarks/bench_training.py` on {time.strftime('%Y-%m-%d')}: torch {torch.__version__}, "
             f"{threads} CPU threads, float32, {platform.processor() or platform.machine()}. One optimizer step of the "
             "X-LoRA classifier (experts frozen): both passes, cross-entropy, backward through the mixed pass, AdamW. "
             "8 experts of rank 8–16 on all linear modules, layerwise scalings, classifier depth 2.", "",
             "| size | batch × tokens | PEFT step (s) | loramix step (s) | PEFT tokens/s | loramix tokens/s | "
             "loramix / PEFT |", "|---|---|---|---|---|---|---|"]
    for size, r in results.items():
        p, o = r["peft"], r["loramix"]
        cfg = SIZES[size]
        lines.append(f"| {size} (hidden {cfg['hidden_size']}, {cfg['layers']} layers) | {o['batch']} × {o['tokens']} "
                     f"| {p['step_s']:.3f} | {o['step_s']:.3f} | {p['tokens_per_s']:.0f} | {o['tokens_per_s']:.0f} "
                     f"| **{o['tokens_per_s'] / p['tokens_per_s']:.2f}×** |")
    lines += ["", "Target: ≥ 2× PEFT. Where the time goes: both systems run the same scaling pass and backward "
              "through the base model; loramix computes all experts of a layer with two matrix products over the "
              "stacked ranks, PEFT with one LoRA call per expert per layer and forward hooks on every pass.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=DEFAULT)
    parser.add_argument("--worker", nargs=3, metavar=("SYSTEM", "SIZE", "FOLDER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker, threads=args.threads)))
        return
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        for size in args.sizes:
            os.makedirs(os.path.join(folder, size))
            prepare(size, os.path.join(folder, size))
            results[size] = {}
            for system in SYSTEMS:
                done = subprocess.run([sys.executable, __file__, "--threads", str(args.threads), "--worker", system,
                                       size, os.path.join(folder, size)], capture_output=True, text=True)
                if done.returncode != 0:
                    raise SystemExit(f"{system} on {size} failed:\n{done.stderr[-3000:]}")
                results[size][system] = json.loads(done.stdout.strip().splitlines()[-1])
                print(size, system, results[size][system], flush=True)
    text = report(results, args.threads)
    write_section("training", text, args.out)
    print(text)


if __name__ == "__main__":
    main()
