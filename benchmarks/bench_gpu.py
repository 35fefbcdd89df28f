"""GPU benchmark: the paper's shape (a Mistral-7B base, nine rank-16 experts on every linear module) on one CUDA
device, random weights built from a config (no download); writes the "gpu" section of docs/benchmarks.md.

    python benchmarks/bench_gpu.py [--out docs/benchmarks.md]
    python benchmarks/bench_gpu.py --shape tiny --device cpu --out /tmp/page.md   # checks the script itself

Measured, in one process, with progress printed as it goes (under 8 minutes on an H100):

* prefill tokens/s (one forward over 512 and 2048 tokens, best of 3) and greedy decode tokens/s (128 new tokens
  after a 32-token prompt) for the base alone (before the experts are swapped in), loramix granular (both passes
  every token), speculative (`speculate=N`, exact), frozen scalings and frozen + folded experts;
* serving: N concurrent rows decoded together by the engine (N = 1, 8, 32, 64), total and per-row tokens/s;
* peak memory of each (torch.cuda.max_memory_allocated);
* the base's one-token step compiled (`torch.compile(mode="reduce-overhead")`: CUDA graphs over a static cache),
  when there is time left, against its eager step, to show what the engine would gain from it.

Without CUDA (and without `--device cpu`) it prints why and measures nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import DEFAULT, write_section  # noqa: E402

SHAPES = {  # MistralConfig fields
    "mistral-7b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=32000),
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512),
}
N_EXPERTS, RANK = 9, 16
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PROMPT, NEW = 32, 128
CLIENTS = (1, 8, 32, 64)
SPECULATE = (4, 8)
BUDGET_S = 8 * 60
START = time.perf_counter()


def progress(message: str) -> None:
    print(f"[{time.perf_counter() - START:6.1f}s] {message}", flush=True)


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeats: int = 1) -> float:
    """Best wall time of `repeats` calls after one warm-up call."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def peak_gib(device) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def reset_peak(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def build_base(shape: str, device, dtype):
    """A Mistral-shaped causal LM with random weights, built on `device` in `dtype` (no weights read)."""
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(**SHAPES[shape], sliding_window=None, max_position_embeddings=4096,
                           pad_token_id=0, bos_token_id=1, eos_token_id=2)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            base = MistralForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    return base.eval()


def write_experts(base, folder: str) -> dict[str, str]:
    """Nine PEFT adapter folders of rank RANK on every linear module of the decoder layers, random A and B."""
    import torch
    from peft import LoraConfig
    from safetensors.torch import save_file

    adapters = {}
    modules = [(name, m) for name, m in base.named_modules()
               if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in TARGETS]
    g = torch.Generator().manual_seed(1)
    for e in range(N_EXPERTS):
        path = os.path.join(folder, f"expert_{e}")
        LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=TARGETS, task_type="CAUSAL_LM").save_pretrained(path)
        tensors = {}
        for name, m in modules:
            a = torch.randn(RANK, m.in_features, generator=g) / m.in_features ** 0.5
            b = torch.randn(m.out_features, RANK, generator=g) * 0.01
            tensors[f"base_model.model.{name}.lora_A.weight"] = a.to(torch.bfloat16)
            tensors[f"base_model.model.{name}.lora_B.weight"] = b.to(torch.bfloat16)
        save_file(tensors, os.path.join(path, "adapter_model.safetensors"))
        adapters[f"expert_{e}"] = path
    return adapters


def prefill_rates(forward, vocab: int, device) -> dict:
    import torch

    rates = {}
    with torch.inference_mode():
        for n in (512, 2048):
            ids = torch.randint(3, vocab, (1, n), device=device)
            rates[f"prefill_{n}"] = n / timed(lambda: forward(ids), device, repeats=3)
    return rates


def decode_rate(generate, prompt, device, new: int = NEW) -> float:
    """Generated tokens per second (all rows) of one greedy `generate(prompt, new)` call."""
    rows = prompt.shape[0]
    return rows * new / timed(lambda: generate(prompt, new), device)


def bench_base(base, vocab: int, device) -> dict:
    import torch

    reset_peak(device)
    prompt = torch.randint(3, vocab, (1, PROMPT), device=device)

    def generate(ids, new):
        with torch.inference_mode():
            return base.generate(input_ids=ids, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                                 use_cache=True, pad_token_id=0)

    result = prefill_rates(lambda ids: base(input_ids=ids), vocab, device)
    result["decode"] = decode_rate(generate, prompt, device)
    result["peak_gib"] = peak_gib(device)
    return result


def bench_compiled_base(base, vocab: int, device) -> dict:
    """The base's decode with a static cache and its forward compiled with CUDA graphs (HF's own path)."""
    import torch

    prompt = torch.randint(3, vocab, (1, PROMPT), device=device)
    compiled = torch.compile(base.forward, mode="reduce-overhead", fullgraph=False)
    eager_forward, base.forward = base.forward, compiled
    try:
        def generate(ids, new):
            with torch.inference_mode():
                return base.generate(input_ids=ids, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                                     cache_implementation="static", pad_token_id=0)

        started = time.perf_counter()
        generate(prompt, 8)  # compiles (and records the graphs)
        compile_s = time.perf_counter() - started
        return {"decode": decode_rate(generate, prompt, device), "compile_s": compile_s}
    finally:
        base.forward = eager_forward


def bench_xlora(model, vocab: int, device) -> dict:
    import torch

    prompt = torch.randint(3, vocab, (1, PROMPT), device=device)
    systems: dict = {}

    def generating(**options):
        def generate(ids, new):
            return model.generate(input_ids=ids, max_new_tokens=new, min_new_tokens=new, eos_token_id=None,
                                  **options)
        return generate

    reset_peak(device)
    systems["granular"] = prefill_rates(lambda ids: model(input_ids=ids), vocab, device)
    systems["granular"]["decode"] = decode_rate(generating(), prompt, device)
    systems["granular"]["peak_gib"] = peak_gib(device)
    progress(f"granular: {systems['granular']}")
    for n in SPECULATE:
        reset_peak(device)
        out = model.generate(input_ids=prompt, max_new_tokens=NEW, min_new_tokens=NEW, eos_token_id=None,
                             speculate=n, return_scalings=True)
        systems[f"speculative {n}"] = {"decode": decode_rate(generating(speculate=n), prompt, device),
                                       "acceptance": out.speculation.acceptance, "peak_gib": peak_gib(device)}
        progress(f"speculative {n}: {systems[f'speculative {n}']}")
    for name, options in (("frozen", dict(freeze_scalings_after=0)),
                          ("folded", dict(freeze_scalings_after=0, fold_frozen=True))):
        reset_peak(device)
        systems[name] = {"decode": decode_rate(generating(**options), prompt, device), "peak_gib": peak_gib(device)}
        progress(f"{name}: {systems[name]}")
    return systems


def bench_clients(model, vocab: int, device) -> dict:
    """N rows decoded together (what the server's scheduler batches for N clients): total tokens/s and peak."""
    import torch

    rates = {}
    for n in CLIENTS:
        reset_peak(device)
        prompt = torch.randint(3, vocab, (n, PROMPT), device=device)
        rate = decode_rate(lambda ids, new: model.generate(input_ids=ids, max_new_tokens=new, min_new_tokens=new,
                                                           eos_token_id=None), prompt, device, new=64)
        rates[n] = {"total": rate, "per_client": rate / n, "peak_gib": peak_gib(device)}
        progress(f"{n} clients: {rates[n]}")
    return rates


def report(results: dict) -> str:
    def fmt(value, digits=1):
        return "–" if value is None else f"{value:,.{digits}f}"

    r = results
    lines = ["## GPU", "",
             f"`benchmarks/bench_gpu.py` on {r['device_name']} (torch {r['torch']}): a {r['shape']} base with "
             f"{N_EXPERTS} experts of rank {RANK} on {', '.join(TARGETS)}, random weights in {r['dtype']}, one "
             f"process; {r['seconds']:.0f} s in all. Decode: {NEW} new tokens after {PROMPT}, greedy, batch 1.", "",
             "| system | prefill 512 tok/s | prefill 2048 tok/s | decode tok/s | vs base | peak GiB |",
             "|---|---:|---:|---:|---:|---:|"]
    base = r["systems"]["base"]["decode"]
    for name, s in r["systems"].items():
        extra = f" (acceptance {s['acceptance']:.2f})" if "acceptance" in s else ""
        lines.append(f"| {name}{extra} | {fmt(s.get('prefill_512'), 0)} | {fmt(s.get('prefill_2048'), 0)} | "
                     f"{fmt(s['decode'])} | {s['decode'] / base:.2f}x | {fmt(s.get('peak_gib'), 2)} |")
    lines += ["", "Serving: N rows decoded together by the engine (64 new tokens each), as the scheduler batches N "
              "clients.", "", "| clients | tokens/s, all | tokens/s per client | peak GiB |", "|---:|---:|---:|---:|"]
    for n, c in r["clients"].items():
        lines.append(f"| {n} | {fmt(c['total'])} | {fmt(c['per_client'])} | {fmt(c.get('peak_gib'), 2)} |")
    compiled = r.get("compiled")
    lines.append("")
    if isinstance(compiled, dict):
        lines.append(f"The base's one-token step compiled with CUDA graphs (`torch.compile(mode=\"reduce-overhead\")`"
                     f", static cache): {fmt(compiled['decode'])} tokens/s against {fmt(base)} eager "
                     f"({compiled['decode'] / base:.2f}x), after {compiled['compile_s']:.0f} s of compilation. "
                     f"loramix's own step is not compiled yet.")
    else:
        lines.append(f"Compiled step: {compiled}.")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=list(SHAPES), default="mistral-7b")
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu, to check the script on a tiny shape")
    parser.add_argument("--out", default=DEFAULT)
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled-step comparison")
    args = parser.parse_args()
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("bench_gpu.py: no CUDA device here (torch.cuda.is_available() is False), so nothing was measured; "
              "run it on a GPU machine, or with --shape tiny --device cpu to check the script")
        return
    device = torch.device(args.device)
    dtype = torch.bfloat16
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "the CPU"
    progress(f"building the {args.shape} base on {name}")
    base = build_base(args.shape, device, dtype)
    vocab = base.config.vocab_size
    results = {"device_name": name, "torch": torch.__version__, "shape": args.shape, "dtype": "bfloat16",
               "systems": {}}
    results["systems"]["base"] = bench_base(base, vocab, device)
    progress(f"base: {results['systems']['base']}")
    if args.no_compile or device.type != "cuda":
        results["compiled"] = "not measured (--no-compile, or not on CUDA)"
    else:
        try:
            results["compiled"] = bench_compiled_base(base, vocab, device)
            progress(f"compiled base: {results['compiled']}")
        except Exception as err:  # a compiler failure is a finding, not the end of the run
            results["compiled"] = f"failed ({type(err).__name__}: {str(err).splitlines()[0][:200]})"
            progress(f"compiled base: {results['compiled']}")
    from loramix import XLoraConfig, XLoraModel

    with tempfile.TemporaryDirectory() as folder:
        progress("writing the experts")
        adapters = write_experts(base, folder)
        model = XLoraModel.from_base(base, XLoraConfig(adapters=adapters, xlora_depth=2, xlora_size=2048,
                                                       layerwise_scalings=True))
    model.classifier.to(device)
    progress(f"X-LoRA: {model.n_experts} experts on {model.n_lora_layers} layers")
    results["systems"].update(bench_xlora(model, vocab, device))
    results["clients"] = bench_clients(model, vocab, device)
    results["seconds"] = time.perf_counter() - START
    text = report(results)
    write_section("gpu", text, args.out)
    print(json.dumps(results, default=str))
    print(text)
    if results["seconds"] > BUDGET_S:
        progress(f"over the {BUDGET_S} s budget")


if __name__ == "__main__":
    main()
