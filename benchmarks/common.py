"""What the benchmark scripts share: the model sizes, the saved random weights, timing, one process per system,
and docs/benchmarks.md, which holds one section per script (each script rewrites only its own section)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

DEFAULT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "docs", "benchmarks.md")
ORDER = ["inference", "peers", "training", "serving", "scale", "gpu"]

SIZES = {
    "tiny": dict(hidden_size=256, layers=4, intermediate_size=688, heads=4, vocab_size=32000),
    "small": dict(hidden_size=1024, layers=8, intermediate_size=2752, heads=16, vocab_size=32000),
}
RANKS = [8, 8, 10, 10, 12, 12, 16, 16]


def prepare(size: str, folder: str) -> None:
    from loramix.tiny import random_experts, tiny_llama

    base = tiny_llama(seed=0, **SIZES[size])
    base.save_pretrained(os.path.join(folder, "base"))
    random_experts(base, os.path.join(folder, "experts"), RANKS, magnitude=0.5)


def best_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def run_systems(script: str, sizes: list[str], systems: list[str], threads: int) -> dict:
    """Prepare each size's weights once, then run `script --worker SYSTEM SIZE FOLDER` per system, each in its
    own process; returns {size: {system: the worker's JSON}}."""
    results: dict = {}
    with tempfile.TemporaryDirectory() as folder:
        for size in sizes:
            os.makedirs(os.path.join(folder, size))
            prepare(size, os.path.join(folder, size))
            results[size] = {}
            for system in systems:
                done = subprocess.run([sys.executable, script, "--threads", str(threads), "--worker", system, size,
                                       os.path.join(folder, size)], capture_output=True, text=True)
                if done.returncode != 0:
                    raise SystemExit(f"{system} on {size} failed:\n{done.stderr[-3000:]}")
                results[size][system] = json.loads(done.stdout.strip().splitlines()[-1])
                print(size, system, results[size][system], flush=True)
    return results


def bench_main(script: str, doc: str, systems: list[str], worker, report, section: str) -> None:
    """The command line shared by the benchmarks that run one process per system and size."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=DEFAULT)
    parser.add_argument("--worker", nargs=3, metavar=("SYSTEM", "SIZE", "FOLDER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker, threads=args.threads)))
        return
    text = report(run_systems(script, args.sizes, systems, args.threads), args.threads)
    write_section(section, text, args.out)
    print(text)


def write_section(name: str, text: str, path: str = DEFAULT) -> None:
    """Replace the section `name` of the page (between its markers), keeping the others; atomic."""
    sections: dict[str, str] = {}
    if os.path.isfile(path):
        page = open(path, encoding="utf-8").read()
        for other in ORDER:
            start, end = f"<!-- {other}:start -->", f"<!-- {other}:end -->"
            if start in page and end in page:
                sections[other] = page[page.index(start) + len(start):page.index(end)].strip("\n")
    sections[name] = text.strip("\n")
    body = ["# Benchmarks", "", "Each section is written by one script in `benchmarks/`; rerun it to refresh its "
            "section. Ratios compare systems measured in the same run on the same machine.", ""]
    for other in ORDER:
        if other in sections:
            body += [f"<!-- {other}:start -->", sections[other], f"<!-- {other}:end -->", ""]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    from loramix.files import atomic_write_text

    atomic_write_text(path, "\n".join(body))
