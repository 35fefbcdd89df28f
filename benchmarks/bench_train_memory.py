"""Peak memory of one X-LoRA gate training step, with and without gradient checkpointing (and with bf16 autocast).

Each setting runs in a fresh process: build a random Llama and three rank-8 experts on every linear module, then
one forward + backward of the gate loss. Reported: the bytes of the tensors autograd keeps for backward (exact,
counted with saved_tensors_hooks, weights excluded) and the step's peak RSS above the RSS before it (CPU; the
allocator reuses memory freed while building the experts, so it is a lower bound). Usage: python benchmarks/bench_train_memory.py [--layers 8 ...]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys


def _step(opts: dict) -> dict:
    import resource
    import tempfile
    import time

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from loramix import XLoraConfig, XLoraModel
    from loramix.losses import causal_lm_loss

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1000, hidden_size=opts["hidden"], intermediate_size=opts["hidden"] * 4,
                         num_hidden_layers=opts["layers"], num_attention_heads=8, num_key_value_heads=8,
                         max_position_embeddings=opts["seq"])
    base = LlamaForCausalLM(config)
    folder = tempfile.mkdtemp()
    adapters = {}
    for e in range(3):
        peft = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=8, target_modules="all-linear"))
        peft.save_pretrained(f"{folder}/e{e}")
        adapters[f"e{e}"] = f"{folder}/e{e}"
    model = XLoraModel.from_base(base, XLoraConfig(adapters=adapters, xlora_depth=2))
    if opts["checkpointing"]:
        model.gradient_checkpointing_enable()
    model.train()
    ids = torch.randint(0, 1000, (opts["batch"], opts["seq"]))

    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()

    saved: dict[int, int] = {}  # storage -> bytes of every tensor kept for backward (outside checkpointed blocks)

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    before = rss()
    started = time.perf_counter()
    context = torch.autocast("cpu", dtype=torch.bfloat16) if opts["bf16"] else torch.autocast("cpu", enabled=False)
    with context, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = causal_lm_loss(model(input_ids=ids).logits, ids)
    loss.backward()
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    activations = sum(n for ptr, n in saved.items() if ptr not in weights)
    return {"peak_above_start_mb": round((peak - before) / 2 ** 20), "saved_mb": round(activations / 2 ** 20),
            "step_s": round(seconds, 2)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(json.dumps(_step(json.loads(args.one))))
        return
    print(f"Llama hidden {args.hidden}, {args.layers} layers, batch {args.batch} x {args.seq} tokens, 3 rank-8 experts")
    print("| checkpointing | bf16 | saved for backward (MB) | peak RSS above start (MB) | step (s) |\n"
          "|---|---|---|---|---|")
    for checkpointing, bf16 in ((False, False), (True, False), (False, True), (True, True)):
        opts = {**vars(args), "checkpointing": checkpointing, "bf16": bf16}
        opts.pop("one")
        out = subprocess.run([sys.executable, __file__, "--one", json.dumps(opts)], capture_output=True, text=True,
                             check=True)
        result = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"| {checkpointing} | {bf16} | {result['saved_mb']} | {result['peak_above_start_mb']} | "
              f"{result['step_s']} |")


if __name__ == "__main__":
    main()
