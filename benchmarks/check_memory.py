"""The memory estimate (loramix.memory) against measured peaks: RSS on CPU, one process per measurement.

    python benchmarks/check_memory.py [--shapes small medium] [--threads 2]

Each measurement builds a random Llama from its config and X-LoRA with random rank-r experts, resets the process's
peak RSS (Linux /proc/self/clear_refs) and runs either generation (prefill batch x context, then 4 cached tokens)
or one gate-training step (forward and backward over batch x context tokens). Measured = peak RSS minus the RSS
before the model was built: the interpreter, torch, transformers and the code pages of the kernels, touched by a
warm-up run of a tiny X-LoRA first (its memory freed).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

SHAPES = {  # name: (model config, n_experts, rank, batch, context)
    "small": (dict(hidden_size=256, num_hidden_layers=4, intermediate_size=688, num_attention_heads=4,
                   num_key_value_heads=4, vocab_size=32000), 4, 8, 2, 256),
    "medium": (dict(hidden_size=512, num_hidden_layers=6, intermediate_size=1376, num_attention_heads=8,
                    num_key_value_heads=2, vocab_size=32000), 9, 16, 2, 512),
    "wide": (dict(hidden_size=1024, num_hidden_layers=4, intermediate_size=2816, num_attention_heads=16,
                  num_key_value_heads=4, vocab_size=16000), 9, 16, 1, 1024),
}


def rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field))


def worker(shape: str, mode: str, folder: str, threads: int) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from loramix import XLoraConfig, XLoraModel
    from loramix.memory import estimate_memory

    torch.set_num_threads(threads)
    cfg, n_experts, rank, batch, context = SHAPES[shape]
    config = LlamaConfig(**cfg, max_position_embeddings=4096)
    estimate = estimate_memory(config, n_experts, rank, dtype=torch.float32, batch=batch, context=context)
    warm_up(os.path.join(folder, "warm-up-expert"))
    before = rss_kb("VmRSS") * 1024
    torch.manual_seed(0)
    base = LlamaForCausalLM(config).eval()
    adapters = {f"expert_{i}": os.path.join(folder, f"expert_{i}") for i in range(n_experts)}
    model = XLoraModel.from_base(base, XLoraConfig(adapters=adapters, layerwise_scalings=True))
    ids = torch.randint(3, cfg["vocab_size"], (batch, context), generator=torch.Generator().manual_seed(0))
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak (VmHWM) to the current RSS
    if mode == "generate":
        model.generate(ids, max_new_tokens=4)
        expected = estimate.inference()
    else:
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        expected = estimate.training()
    measured = rss_kb("VmHWM") * 1024 - before
    return dict(shape=shape, mode=mode, estimate=expected, measured=measured)


def warm_up(folder: str) -> None:
    """Run generation and a training step of a tiny X-LoRA so that kernel code pages are resident before `before`."""
    import gc

    import torch

    from loramix import XLoraConfig, XLoraModel
    from loramix.tiny import tiny_llama

    model = XLoraModel.from_base(tiny_llama(), XLoraConfig(adapters={"w": folder}, layerwise_scalings=True))
    ids = torch.randint(3, 128, (2, 16))
    model.generate(ids, max_new_tokens=2)
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    del model
    gc.collect()


def prepare(shape: str, folder: str) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from loramix.tiny import random_experts

    cfg, n_experts, rank, _, _ = SHAPES[shape]
    base = LlamaForCausalLM(LlamaConfig(**cfg, max_position_embeddings=4096))
    random_experts(base, folder, [rank] * n_experts, magnitude=0.1)
    from loramix.tiny import tiny_llama

    random_experts(tiny_llama(), os.path.join(folder, "warm-up"), [4])
    os.replace(os.path.join(folder, "warm-up", "expert_0"), os.path.join(folder, "warm-up-expert"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["small", "medium"], choices=list(SHAPES))
    parser.add_argument("--modes", nargs="+", default=["generate", "train"], choices=["generate", "train"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--worker", nargs=3, metavar=("SHAPE", "MODE", "FOLDER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker, args.threads)))
        return
    print("| shape | run | estimate (MiB) | measured peak RSS (MiB) | measured / estimate |")
    print("|---|---|---|---|---|")
    for shape in args.shapes:
        with tempfile.TemporaryDirectory() as folder:
            prepare(shape, folder)
            for mode in args.modes:
                out = subprocess.run([sys.executable, __file__, "--threads", str(args.threads), "--worker", shape,
                                      mode, folder], check=True, capture_output=True, text=True).stdout
                r = json.loads(out.strip().splitlines()[-1])
                print(f"| {shape} | {mode} | {r['estimate'] / 2**20:.0f} | {r['measured'] / 2**20:.0f} | "
                      f"{r['measured'] / r['estimate']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
