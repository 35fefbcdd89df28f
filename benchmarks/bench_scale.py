"""X-LoRA at a real 1B-class shape on CPU, bf16 and 4-bit: base model, PEFT and loramix; writes docs/benchmarks.md.

    python benchmarks/bench_scale.py [--prefill 512] [--decode-tokens 16] [--peft-decode-tokens 2]
                                     [--quantizations bf16 4bit] [--layers 16] [--threads 2]

The base is a random Llama with a 1B-class shape (hidden 2048, 16 layers, MLP 5632, 32 heads, 4 KV heads,
vocabulary 32000: about 0.84B parameters; no download) saved once in bf16, with nine random rank-16 experts on every
Linear module. Each (system, precision) runs in its own process on the same files. Measured: load time (loading the
base from disk, quantizing it for 4-bit, and wrapping it), one prefill forward over `--prefill` tokens, greedy decode
tokens/s after that prompt (with the KV cache; PEFT's X-LoRA refuses the cache, so it re-runs the whole sequence per
token and decodes `--peft-decode-tokens`), and the peak RSS over the timed region only (the process's high-water mark
is reset when the timed region starts, so loading does not set the figure). 4-bit is bitsandbytes' NF4 with bf16
compute. Needs about 6 GB of RAM per process.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

from common import DEFAULT, write_section

N_EXPERTS, RANK = 9, 16
SYSTEMS = ["base", "peft", "loramix"]


def shape(layers: int) -> dict:
    return dict(hidden_size=2048, num_hidden_layers=layers, intermediate_size=5632, num_attention_heads=32,
                num_key_value_heads=4, vocab_size=32000, max_position_embeddings=4096, pad_token_id=0,
                bos_token_id=1, eos_token_id=2)


def prepare(folder: str, layers: int) -> None:
    """Save the random bf16 base and nine random rank-16 experts (PEFT adapter folders) on all Linear modules."""
    import torch
    from peft import LoraConfig
    from transformers import LlamaConfig, LlamaForCausalLM

    from loramix.experts import ExpertModule, save_expert

    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)  # build in bf16 directly: half the memory of a float32 init
    base = LlamaForCausalLM(LlamaConfig(**shape(layers))).eval()
    torch.set_default_dtype(torch.float32)
    base.save_pretrained(os.path.join(folder, "base"))
    linears = {n: m for n, m in base.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    targets = sorted({n.rsplit(".", 1)[-1] for n in linears})
    config = LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=targets).to_dict()
    config = {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.items()}
    config["peft_type"], config["task_type"] = "LORA", "CAUSAL_LM"
    for e in range(N_EXPERTS):
        g = torch.Generator().manual_seed(100 + e)
        modules = {n: ExpertModule(lora_A=torch.randn(RANK, m.in_features, generator=g) / m.in_features ** 0.5,
                                   lora_B=torch.randn(m.out_features, RANK, generator=g) * 0.01, scale=2.0)
                   for n, m in linears.items()}
        save_expert(modules, config, torch.bfloat16, os.path.join(folder, f"expert_{e}"))


def peak_rss_reset() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the high-water mark (VmHWM) restarts from the current RSS


def peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024


def worker(system: str, precision: str, folder: str, threads: int, prefill: int, decode: int,
           peft_decode: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    torch.set_num_threads(threads)
    adapters = {f"expert_{e}": os.path.join(folder, f"expert_{e}") for e in range(N_EXPERTS)}
    start = time.perf_counter()
    kwargs = {"dtype": torch.bfloat16}
    if precision == "4bit":
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                           bnb_4bit_compute_dtype=torch.bfloat16)
    base = AutoModelForCausalLM.from_pretrained(os.path.join(folder, "base"), **kwargs).eval()
    if system == "peft":
        from peft import XLoraConfig, get_peft_model

        base.config.use_cache = False
        model = get_peft_model(base, XLoraConfig(task_type="CAUSAL_LM", hidden_size=2048, layerwise_scalings=True,
                                                 adapters={str(i): p for i, p in enumerate(adapters.values())}))
        model.eval()
    elif system == "loramix":
        from loramix import XLoraConfig, XLoraModel

        model = XLoraModel.from_base(base, XLoraConfig(adapters=adapters, layerwise_scalings=True))
    else:
        model = base
    load_s = time.perf_counter() - start
    ids = torch.randint(3, 32000, (1, prefill), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(input_ids=ids[:, :8])  # warm-up outside the timed region (kernels, packed 4-bit weights)
        peak_rss_reset()
        start = time.perf_counter()
        model(input_ids=ids)
        prefill_s = time.perf_counter() - start
        n = peft_decode if system == "peft" else decode
        start = time.perf_counter()
        if system == "peft":  # no KV cache: every token re-runs the sequence (PEFT's own generate does the same)
            seq = ids
            for _ in range(n):
                seq = torch.cat([seq, model(input_ids=seq).logits[:, -1:].argmax(-1)], dim=1)
        elif system == "loramix":
            model.generate(ids, max_new_tokens=n, min_new_tokens=n)
        else:
            model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        decode_s = time.perf_counter() - start
    return dict(load_s=load_s, prefill_s=prefill_s, decode_tps=n / decode_s, decode_tokens=n,
                peak_mb=peak_rss_mb())


def report(results: dict, args) -> str:
    import torch

    lines = ["## Scale", "",
             f"Written by `benchmarks/bench_scale.py` on {time.strftime('%Y-%m-%d')}: torch {torch.__version__}, "
             f"{args.threads} CPU threads, {platform.machine()}. A random Llama of a 1B-class shape (hidden 2048, "
             f"{args.layers} layers, MLP 5632, 32 heads / 4 KV heads, vocabulary 32000), nine rank-16 experts on all "
             f"Linear modules, layerwise scalings. Prefill: one forward over {args.prefill} tokens. Decode: greedy "
             f"tokens/s after that prompt (loramix and the base with their KV caches; PEFT without, as it requires). "
             f"Peak RSS: the high-water mark over the timed region only (prefill and decode), loading excluded.", ""]
    if args.note:
        lines += [args.note, ""]
    lines += ["| precision | system | load (s) | prefill (s) | decode tokens/s | peak RSS (MB) |",
              "|---|---|---|---|---|---|"]
    for (precision, system), r in results.items():
        if "error" in r:
            lines.append(f"| {precision} | {system} | fails: `{r['error'][:120]}` | | | |")
            continue
        decode = f"{r['decode_tps']:.2f}" + (f" ({r['decode_tokens']} tokens)" if system == "peft" else "")
        lines.append(f"| {precision} | {system} | {r['load_s']:.1f} | {r['prefill_s']:.2f} | {decode} | "
                     f"{r['peak_mb']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prefill", type=int, default=512, help="prompt tokens")
    parser.add_argument("--decode-tokens", type=int, default=16)
    parser.add_argument("--peft-decode-tokens", type=int, default=2, help="PEFT re-runs the sequence per token")
    parser.add_argument("--quantizations", nargs="+", default=["bf16", "4bit"], choices=["bf16", "4bit"])
    parser.add_argument("--systems", nargs="+", default=SYSTEMS, choices=SYSTEMS)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--note", help="a line for the report (e.g. the machine was shared)")
    parser.add_argument("--out", default=DEFAULT, help="the benchmarks page to update")
    parser.add_argument("--worker", nargs=3, metavar=("SYSTEM", "PRECISION", "FOLDER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker, args.threads, args.prefill, args.decode_tokens,
                                args.peft_decode_tokens)))
        return
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        prepare(folder, args.layers)
        for precision in args.quantizations:
            for system in args.systems:
                cmd = [sys.executable, os.path.abspath(__file__), "--worker", system, precision, folder,
                       "--threads", str(args.threads), "--prefill", str(args.prefill), "--decode-tokens",
                       str(args.decode_tokens), "--peft-decode-tokens", str(args.peft_decode_tokens)]
                done = subprocess.run(cmd, capture_output=True, text=True)
                if done.returncode != 0:  # a system that cannot run this setting is reported, not skipped
                    results[precision, system] = {"error": done.stderr.strip().splitlines()[-1]}
                else:
                    results[precision, system] = json.loads(done.stdout.strip().splitlines()[-1])
                print(precision, system, results[precision, system], flush=True)
    write_section("scale", report(results, args), args.out)


if __name__ == "__main__":
    main()
