"""Decode speed against the other engines: loramix, mistral.rs (Rust), PEFT and the base model, side by side.

Two sizes: the issue's "tiny" Llama (hidden 64, 2 layers, vocabulary 128, two rank-4 experts on q_proj, v_proj and
down_proj) and "small" (hidden 1024, 8 layers, vocabulary 32000, eight rank-16 experts on all linear modules), both
random, with a layerwise gate. Each engine decodes greedily after a one-token prompt (mistral.rs 0.9.5's CPU X-LoRA
fails on longer prompts) at its own defaults, granular (scalings per token) and frozen (scalings kept after the
first new token; mistral.rs's "non-granular" mode, `tgt_non_granular_index`). All engines run in one process per
size, in interleaved rounds (each round runs every system once), and the page reports each system's median
tokens/s over the rounds: the machine is noisy, so only same-round ratios mean much. The tokens of loramix and
mistral.rs are compared.

mistral.rs runs offline from a folder in its X-LoRA layout written by `loramix export --to mistralrs` (flat
`<expert>.adapter_*` files, an ordering file, the base with `rope_theta`, a tokenizer with a pass-through chat template; its EOS sits outside the
model's vocabulary so that no engine stops early). When `import mistralrs` fails, the script installs
mistralrs==0.9.5 from PyPI into its own virtual environment (--venv) and runs the measuring process there.
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

from common import DEFAULT, write_section

MISTRALRS_VERSION = "0.9.5"
PEER_SIZES = {
    "tiny": dict(hidden_size=64, layers=2, intermediate_size=128, heads=4, vocab_size=128, ranks=[4, 4],
                 targets=["q_proj", "v_proj", "down_proj"], tokens=900, peft_tokens=100),
    "small": dict(hidden_size=1024, layers=8, intermediate_size=2752, heads=16, vocab_size=32000, ranks=[16] * 8,
                  targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                  tokens=64, peft_tokens=16),
}
SYSTEMS = ["base", "peft", "loramix", "mistralrs", "loramix-frozen", "mistralrs-frozen", "loramix-folded",
           "loramix-speculative"]
SPECULATE = 8  # loramix-speculative: granular decoding with speculate=8 (engine/speculative.py), the same tokens
READING = """### Reading the numbers

- Each engine runs at its defaults (torch on --threads, mistral.rs with its own thread pool, f16 KV cache); the
  last table puts mistral.rs on one thread too. At the tiny size a step is almost all fixed cost (two passes of
  two layers whose products take microseconds), so the tiny tables compare per-step machinery: Rust's against
  Python's. On the small size the products dominate and the engines' kernels decide.
- Both engines produced the same greedy tokens in every table (mistral.rs with its f16 KV cache); the gate's hidden
  width is the model's because mistral.rs 0.9.5 shapes its classifier's last layer that way.
- The profile compares the three ways loramix can run a decode step on the same model, in one process: through
  `base(...)` (the model's forward, twice a step), the model's decoder layers called directly with positions, masks
  and rotary table built once a step (`model.decodes_by_hand = False`), and the hand-written one-token step
  (backbone/decoder.py, the default). cProfile inflates Python calls, so its shares overstate the machinery; the last
  row is measured without it.
- *Folded* includes the fold (once per request, 2·R·in·out operations per adapted matrix against 2·R·(in + out) per
  token for mixing the experts unfolded): on the small size (R = 128, 56 matrices of 1024 × 1024 to 1024 × 2752)
  that costs more than a 64-token answer saves, so folded trails frozen there; on the tiny size it is cheap and
  folded leads.

### What each change bought (tiny, granular and frozen tokens/s)

Measured while building the hand-written step, one change after another, with the same model (900 greedy tokens,
best of 3, torch on one thread) while another job kept the machine's second core busy, so read the steps, not the
absolute values, against the tables above.

| change | granular | frozen |
|---|---|---|
| before: the model's layers run directly, DynamicCache | 734 | 1270 |
| hand-written one-token layer (`_decode_layer`), no mask functions | 881 | 1606 |
| each layer's parts looked up once (`LayerParts`) | 976 | 1708 |
| mixed LoRA layers: F.linear for a plain base, no dropout call | 1017 | 1798 |
| rotary by a gather and a pre-signed sin; float32 RMSNorm without casts; classifier without module calls | 1080 | 1913 |
| one-token head layout by `view` (no transposes) | 1116 | 1945 |
| embeddings looked up once per step for both passes | 1138 | 1993 |
| `GrowingCache`: KV appends in place (DynamicCache's `cat` was a fifth of the CPU time) | 1236 | 2118 |
| mixed LoRA layers read their Parameters from a plain tuple | 1359 | 2384 |
| `RotaryRows`: the rotary table computed once and looked up | 1413 | 2523 |

Tried and dropped: `torch.compile` (inductor, CPU, dynamic shapes) of the hand-written layer took 107 us a call
against 85 us eager, after a 17 s compile; a fused rotate-half by a permutation matmul is exact on CPU but not
under TF32 on a GPU. No GPU was lent to this work, so there is no CUDA table (mistral.rs's `mistralrs-cuda`, CUDA
graphs) yet.
"""
PROMPT = "a"  # one token


# ---- the models, in both layouts ------------------------------------------------------------------------------
def build(size: str, folder: str) -> None:
    """Base + PEFT experts (loramix reads these) and the same X-LoRA in mistral.rs's layout under folder/mistralrs."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from loramix import XLoraConfig, XLoraModel
    from loramix.interop.mistralrs import export_mistralrs
    from loramix.tiny import random_experts

    cfg = PEER_SIZES[size]
    vocab = cfg["vocab_size"]
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(
        vocab_size=vocab, hidden_size=cfg["hidden_size"], num_hidden_layers=cfg["layers"],
        intermediate_size=cfg["intermediate_size"], num_attention_heads=cfg["heads"], num_key_value_heads=cfg["heads"],
        max_position_embeddings=4096, pad_token_id=0, bos_token_id=1, eos_token_id=vocab)).eval()  # EOS never made
    base.generation_config.eos_token_id = vocab
    base.save_pretrained(os.path.join(folder, "base"))
    tokenizer(vocab).save_pretrained(os.path.join(folder, "base"))
    adapters = random_experts(base, os.path.join(folder, "experts"), cfg["ranks"], targets=cfg["targets"],
                              magnitude=3.0)
    # the gate's hidden width is the model's: mistral.rs 0.9.5 shapes its classifier's last layer that way
    model = XLoraModel.from_base(base, XLoraConfig(adapters=adapters, xlora_depth=2, xlora_size=cfg["hidden_size"],
                                                   layerwise_scalings=True))
    torch.manual_seed(1)
    with torch.no_grad():  # a gate that moves with the text, so that granular and frozen differ
        for p in model.classifier.parameters():
            p.normal_(0, 0.5)
    model.save_pretrained(os.path.join(folder, "loramix"))
    # mistral.rs's layout, written by `loramix export --to mistralrs`: the base (with rope_theta) and tokenizer go
    # to mistralrs/base, beside the ordering file, config, classifier and flat adapters
    export_mistralrs(model, os.path.join(folder, "mistralrs"), tokenizer=tokenizer(vocab))


def tokenizer(vocab_size: int):
    """A byte-level tokenizer mistral.rs can read, with `</s>` at id `vocab_size`, outside what the model can
    produce (every run makes its full number of tokens)."""
    from loramix.tiny import byte_level_tokenizer

    return byte_level_tokenizer(vocab_size, eos_outside=True)


# ---- measuring (runs in the environment that has mistralrs) ---------------------------------------------------
def worker(size: str, folder: str, threads: int, rounds: int) -> dict:
    os.environ["HF_HUB_OFFLINE"] = "1"
    import mistralrs
    import torch
    from transformers import AutoModelForCausalLM

    from loramix import XLoraModel
    from loramix.interop.mistralrs import BASE_FOLDER, ORDERING_NAME

    torch.set_num_threads(threads)
    cfg = PEER_SIZES[size]
    n, n_peft = cfg["tokens"], cfg["peft_tokens"]
    base_dir = os.path.join(folder, "base")
    ids = tokenizer(cfg["vocab_size"])(PROMPT, add_special_tokens=False, return_tensors="pt")["input_ids"]  # (1, 1)
    base = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    model = XLoraModel.from_pretrained(os.path.join(folder, "loramix"),
                                       base=AutoModelForCausalLM.from_pretrained(base_dir))
    peft = peft_model(base_dir, folder, model)

    def runner(frozen: bool):
        which = mistralrs.Which.XLora(
            xlora_model_id=os.path.join(folder, "mistralrs"), order=os.path.join(folder, "mistralrs", ORDERING_NAME),
            model_id=os.path.join(folder, "mistralrs", BASE_FOLDER), arch=mistralrs.Architecture.Llama,
            tokenizer_json=os.path.join(folder, "mistralrs", BASE_FOLDER, "tokenizer.json"),
            tgt_non_granular_index=1 if frozen else None)
        return mistralrs.Runner(which=which, token_source="none")

    runners = {"mistralrs": runner(False), "mistralrs-frozen": runner(True)}

    def mistralrs_tokens(name: str) -> list[int]:
        response = runners[name].send_chat_completion_request(mistralrs.ChatCompletionRequest(
            messages=[{"role": "user", "content": PROMPT}], model="xlora", max_tokens=n, temperature=0.0,
            logprobs=True, top_logprobs=1))
        return [entry.top_logprobs[0].token for entry in response.choices[0].logprobs.content]

    common = dict(max_new_tokens=n)  # the EOS lies outside the vocabulary: every run makes n tokens
    runs = {
        "base": lambda: base.generate(ids, do_sample=False, use_cache=True, pad_token_id=0,
                                      max_new_tokens=n)[0, 1:].tolist(),
        "peft": lambda: peft.generate(input_ids=ids, do_sample=False, pad_token_id=0,
                                      max_new_tokens=n_peft)[0, 1:].tolist(),
        "loramix": lambda: model.generate(ids, **common)[0, 1:].tolist(),
        "mistralrs": lambda: mistralrs_tokens("mistralrs"),
        "loramix-frozen": lambda: model.generate(ids, freeze_scalings_after=1, **common)[0, 1:].tolist(),
        "mistralrs-frozen": lambda: mistralrs_tokens("mistralrs-frozen"),
        "loramix-folded": lambda: model.generate(ids, freeze_scalings_after=1, fold_frozen=True,
                                                 **common)[0, 1:].tolist(),
        "loramix-speculative": lambda: model.generate(ids, speculate=SPECULATE, **common)[0, 1:].tolist(),
    }
    acceptance = model.generate(ids, speculate=SPECULATE, return_scalings=True, **common).speculation.acceptance
    tokens = {}
    for name, run in runs.items():  # warm-up, and the tokens to compare
        start = time.perf_counter()
        tokens[name] = run()
        print(f"{size} {name}: warm-up {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    speeds: dict[str, list[float]] = {name: [] for name in runs}
    with torch.no_grad():
        for _ in range(rounds):
            for name, run in runs.items():
                start = time.perf_counter()
                made = len(run())
                speeds[name].append(made / (time.perf_counter() - start))
    return {"size": size, "speeds": speeds, "tokens": tokens, "n": n, "n_peft": n_peft, "acceptance": acceptance,
            "mistralrs_threads": os.environ.get("RAYON_NUM_THREADS", "its default"),
            "mistralrs_version": getattr(mistralrs, "__version__", MISTRALRS_VERSION)}


def peft_model(base_dir: str, folder: str, ours):
    """PEFT's XLoraModel over the same experts, with our classifier's weights (no KV cache: PEFT forbids it)."""
    import torch
    from peft import XLoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    base.config.use_cache = False
    experts = os.path.join(folder, "experts")
    adapters = {str(i): os.path.join(experts, name) for i, name in enumerate(sorted(os.listdir(experts)))}
    model = get_peft_model(base, XLoraConfig(task_type="CAUSAL_LM", hidden_size=base.config.hidden_size,
                                             adapters=adapters, xlora_depth=2, xlora_size=ours.config.xlora_size,
                                             layerwise_scalings=True)).eval()
    theirs = [m for m in model.base_model.internal_xlora_classifier.layers if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        for linear, own in zip(theirs, ours.classifier.hidden_linears() + [ours.classifier.last]):
            linear.weight.copy_(own.weight)
            linear.bias.copy_(own.bias)
    return model


# ---- where a decode step's time goes ----------------------------------------------------------------------------
PROFILE_PARTS = [  # (label, [(file path's tail, function name), ...] whose cumulative times add up, [... subtracted])
    ("scaling pass (decoder layers, no LM head)", [("loramix/model.py", "_scaling_pass")], []),
    ("gate: classifier, mixing weights", [("loramix/model.py", "_classify"), ("loramix/model.py", "mixing_weights")],
     []),
    ("mixed pass (decoder layers, last norm, LM head)", [("loramix/model.py", "forward")],
     [("loramix/model.py", "_scaling_pass"), ("loramix/model.py", "_classify"),
      ("loramix/model.py", "mixing_weights")]),
    ("  of both passes: positions, masks, rotary table", [("masking_utils.py", "create_causal_mask"),
                                                           ("masking_utils.py", "create_sliding_window_causal_mask"),
                                                           ("modeling_rope_utils.py", "wrapper"),
                                                           ("backbone/decoder.py", "rows")], []),
    ("  of both passes: KV cache appends", [("cache_utils.py", "update"), ("backbone/kv_cache.py", "update")], []),
    ("sampling (sample_next_token)", [("engine/sampling.py", "sample_next_token")], []),
    ("rows, caches and the loop (the rest)", [("engine/generate.py", "generate")],
     [("loramix/model.py", "forward"), ("engine/sampling.py", "sample_next_token")]),
]
# the three ways a decode step can run, oldest first: (label, model.direct_layers, model.decodes_by_hand)
PROFILE_PATHS = [("through base(...)", False, False), ("model's layers run directly", True, False),
                 ("hand-written step (default)", True, True)]


def profile_decode(size: str, folder: str, threads: int, tokens: int = 300) -> dict:
    """For each way a step can run (PROFILE_PATHS): tokens/s of a granular greedy generate of `tokens` tokens
    (best of 3, no profiler), and the shares of one such generate under cProfile; returns
    {path: {part: share of the time, "us_per_token": under the profiler, "tokens_per_s": without it}}."""
    import cProfile
    import pstats

    import torch
    from transformers import AutoModelForCausalLM

    from loramix import XLoraModel

    torch.set_num_threads(threads)
    model = XLoraModel.from_pretrained(os.path.join(folder, "loramix"),
                                       base=AutoModelForCausalLM.from_pretrained(os.path.join(folder, "base")))
    ids = tokenizer(PEER_SIZES[size]["vocab_size"])(PROMPT, add_special_tokens=False, return_tensors="pt")["input_ids"]
    result = {}
    for path, direct, by_hand in PROFILE_PATHS:
        model.direct_layers, model.decodes_by_hand = direct, by_hand
        model.generate(ids, max_new_tokens=20)
        best = 0.0
        for _ in range(3):
            start = time.perf_counter()
            model.generate(ids, max_new_tokens=tokens)
            best = max(best, tokens / (time.perf_counter() - start))
        profiler = cProfile.Profile()
        profiler.enable()
        model.generate(ids, max_new_tokens=tokens)
        profiler.disable()
        stats = pstats.Stats(profiler).stats  # {(file, line, function): (calls, calls, own, cumulative, callers)}

        def cumulative(where: list[tuple[str, str]]) -> float:
            total = 0.0
            for file, function in where:  # the outermost entry of each name (nested `update`s are inside it)
                times = [v[3] for (f, _, fn), v in stats.items() if f.endswith(file) and fn == function]
                total += max(times, default=0.0) if function == "update" else sum(times)
            return total

        whole = cumulative([("engine/generate.py", "generate")])
        result[path] = {label: (cumulative(add) - cumulative(sub)) / whole for label, add, sub in PROFILE_PARTS}
        result[path]["us_per_token"] = whole / tokens * 1e6
        result[path]["tokens_per_s"] = best
    model.direct_layers, model.decodes_by_hand = True, True
    return result


# ---- the page ---------------------------------------------------------------------------------------------------
def report(results: dict, threads: int, rounds: int, profile: dict | None = None) -> str:
    import platform

    import torch

    version = next(iter(results.values()))["mistralrs_version"]
    lines = ["## Against other engines (peers)", "",
             f"Written by `benchmarks/bench_peers.py` on {time.strftime('%Y-%m-%d')}: torch {torch.__version__}, "
             f"{threads} CPU threads for torch, mistral.rs {version} (PyPI wheel, CPU, its defaults: f16 KV cache, "
             f"its own thread pool), float32 weights, {platform.processor() or platform.machine()}. Greedy decoding "
             f"after a one-token prompt (mistral.rs's CPU X-LoRA fails on longer ones); tokens/s end to end, median "
             f"of {rounds} interleaved rounds (min–max in brackets). *Frozen*: scalings kept after the first new token "
             "(mistral.rs: `tgt_non_granular_index=1`); *folded*: frozen with the experts folded into the weights. "
             "PEFT has no KV cache.", ""]
    for title, r in results.items():
        cfg = PEER_SIZES[r["size"]]
        speeds = r["speeds"]
        med = {k: statistics.median(v) for k, v in speeds.items()}
        lines += [f"### {title}: mistral.rs threads {r['mistralrs_threads']}; hidden {cfg['hidden_size']}, "
                  f"{cfg['layers']} layers, vocabulary {cfg['vocab_size']}, "
                  f"{len(cfg['ranks'])} experts of rank {cfg['ranks'][0]} on {', '.join(cfg['targets'])}", "",
                  "| system | tokens | tokens/s (median) | range |", "|---|---|---|---|"]
        for name in SYSTEMS:
            made = r["n_peft"] if name == "peft" else r["n"]
            lines.append(f"| {name} | {made} | {med[name]:.1f} | {min(speeds[name]):.1f}–{max(speeds[name]):.1f} |")

        def ratio(a: str, b: str) -> str:
            per_round = sorted(x / y for x, y in zip(speeds[a], speeds[b]))
            return f"{statistics.median(per_round):.2f}× ({per_round[0]:.2f}–{per_round[-1]:.2f})"

        lines += ["", "| ratio (per round, median and range) | value | goal |", "|---|---|---|",
                  f"| loramix / mistral.rs, granular | {ratio('loramix', 'mistralrs')} | ≥ 1.2× |",
                  f"| loramix frozen / mistral.rs non-granular | {ratio('loramix-frozen', 'mistralrs-frozen')} "
                  "| ≥ 1.0× |",
                  f"| loramix / base (cached generate) | {ratio('loramix', 'base')} | (bench_inference: ≥ 0.5×) |",
                  f"| loramix frozen + folded / base, the fold included | {ratio('loramix-folded', 'base')} "
                  "| (bench_inference: ≥ 0.9×) |",
                  f"| loramix / PEFT | {ratio('loramix', 'peft')} | |",
                  f"| mistral.rs / base | {ratio('mistralrs', 'base')} | |",
                  f"| loramix speculative (speculate={SPECULATE}) / mistral.rs, granular | "
                  f"{ratio('loramix-speculative', 'mistralrs')} | ≥ 1.2× |",
                  f"| loramix speculative / loramix granular (acceptance {r['acceptance']:.2f}) | "
                  f"{ratio('loramix-speculative', 'loramix')} | ≥ 1.5× |", ""]
        for ours, theirs in (("loramix", "mistralrs"), ("loramix-frozen", "mistralrs-frozen"), ("loramix", "peft"),
                             ("loramix-frozen", "loramix-folded"), ("loramix-speculative", "loramix")):
            a, b = r["tokens"][ours], r["tokens"][theirs]
            same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            verdict = "the same tokens" if a == b else f"the same first {same} tokens (of {len(a)} and {len(b)})"
            lines.append(f"- {ours} and {theirs} produced {verdict}.")
        lines.append("")
    if profile:
        paths = list(profile)
        lines += ["### Where a granular decode step goes (tiny, cProfile)", "",
                  f"One greedy `generate` of 300 tokens under cProfile (which inflates Python calls), {threads} "
                  "thread(s); shares of the whole run. The math of a step is microseconds at this size: nearly all "
                  "of it is per-call machinery.", "",
                  "| part | " + " | ".join(paths) + " |", "|---|" + "---|" * len(paths)]
        for label, _, _ in PROFILE_PARTS:
            lines.append(f"| {label} | " + " | ".join(f"{profile[p][label] * 100:.0f}%" for p in paths) + " |")
        lines.append("| time per token under the profiler | " +
                     " | ".join(f"{profile[p]['us_per_token'] / 1e3:.2f} ms" for p in paths) + " |")
        lines.append("| tokens/s without the profiler (best of 3) | " +
                     " | ".join(f"{profile[p]['tokens_per_s']:.0f}" for p in paths) + " |")
        lines.append("")
    lines += READING.splitlines()
    return "\n".join(lines) + "\n"


def mistralrs_python(venv: str) -> str:
    """An interpreter that imports mistralrs: this one, else the benchmark's own venv (made and filled if absent)."""
    if subprocess.run([sys.executable, "-c", "import mistralrs"], capture_output=True).returncode == 0:
        return sys.executable
    python = os.path.join(venv, "bin", "python")
    if not os.path.isfile(python):
        subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", venv], check=True)
    if subprocess.run([python, "-c", "import mistralrs"], capture_output=True).returncode != 0:
        subprocess.run([python, "-m", "pip", "install", f"mistralrs=={MISTRALRS_VERSION}"], check=True)
    return python


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=list(PEER_SIZES), choices=list(PEER_SIZES))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--venv", default=os.path.expanduser("~/.cache/loramix/mistralrs-venv"),
                        help="where mistralrs is installed when the running Python lacks it")
    parser.add_argument("--single-threaded", action="store_true",
                        help="also run each size with mistral.rs on one thread (RAYON_NUM_THREADS=1), torch on "
                             "--threads")
    parser.add_argument("--out", default=DEFAULT)
    parser.add_argument("--worker", nargs=2, metavar=("SIZE", "FOLDER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker, threads=args.threads, rounds=args.rounds)))
        return
    python = mistralrs_python(args.venv)
    results, profile = {}, None
    with tempfile.TemporaryDirectory() as folder:
        runs = [(size, size, {}) for size in args.sizes]
        if args.single_threaded:
            runs += [(f"{size}, every engine on one thread", size, {"RAYON_NUM_THREADS": "1"}) for size in args.sizes]
        for title, size, env in runs:
            if not os.path.isdir(os.path.join(folder, size)):
                os.makedirs(os.path.join(folder, size))
                build(size, os.path.join(folder, size))
            done = subprocess.run([python, __file__, "--threads", str(args.threads), "--rounds", str(args.rounds),
                                   "--worker", size, os.path.join(folder, size)], capture_output=True, text=True,
                                  env={**os.environ, **env})
            if done.returncode != 0:
                raise SystemExit(f"{title} failed:\n{done.stderr[-3000:]}")
            results[title] = json.loads(done.stdout.strip().splitlines()[-1])
            print(title, {k: round(statistics.median(v), 1) for k, v in results[title]["speeds"].items()}, flush=True)
            if title == "tiny":
                profile = profile_decode(size, os.path.join(folder, size), args.threads)
    text = report(results, args.threads, args.rounds, profile)
    write_section("peers", text, args.out)
    print(text)


if __name__ == "__main__":
    main()
