"""Serving throughput of `loramix serve`: N concurrent clients, batched decoding against one request at a time,
in one run; writes the serving section of docs/benchmarks.md.

    python benchmarks/bench_serving.py [--size tiny] [--clients 1 4 8 16] [--threads 2] [--speculate N]
                                       [--out docs/benchmarks.md]

The model is bench_inference.py's random Llama (vocabulary 32000) with 8 random LoRA experts, served on a
loopback port by the real server (FastAPI + uvicorn, in this process). Each client sends requests of 32 prompt
tokens for 32 new tokens (greedy) back to back for a fixed time; throughput counts the completion tokens the
server returned. "one at a time" is the same server with --max-batch 1; with --speculate N, "speculative" is the
batched server with `loramix serve --speculate N` (exact self-speculative rounds, engine/speculative.py).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import threading
import time

from common import DEFAULT, SIZES, prepare, write_section


def word_tokenizer(vocab_size: int):
    """An offline tokenizer whose tokens are 't0' ... : enough to decode what a random model says."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"t{i}": i for i in range(3, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def serve(folder: str, max_batch: int, speculate: int = 0):
    import socket

    from loramix import XLoraConfig, XLoraModel
    from loramix.serving.app import make_server
    from loramix.serving.settings import ServeSettings
    from loramix.serving.state import ServerState

    adapters = {f"expert_{i}": os.path.join(folder, "experts", f"expert_{i}") for i in range(8)}
    model = XLoraModel.from_base(os.path.join(folder, "base"), XLoraConfig(adapters=adapters, xlora_depth=2,
                                                                           xlora_size=64, layerwise_scalings=True))
    settings = ServeSettings(model="bench", max_batch=max_batch, max_queue=256, max_tokens_cap=64,
                             log_level="warning", speculate=speculate)
    state = ServerState(model, word_tokenizer(model.base.config.vocab_size), settings)
    # a loopback port the OS chose; IPPROTO_TCP named, so that asyncio turns Nagle off on accepted connections
    listening = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    listening.bind(("127.0.0.1", 0))
    server = make_server(state)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listening]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    return state, server, thread, f"http://127.0.0.1:{listening.getsockname()[1]}"


def load(url: str, clients: int, seconds: float, vocab: int) -> dict:
    import random

    import httpx

    tokens, latencies, errors = [], [], []
    stop_at = time.perf_counter() + seconds

    def client(c: int) -> None:
        rnd = random.Random(c)
        with httpx.Client(timeout=120) as http:
            while time.perf_counter() < stop_at:
                prompt = [rnd.randrange(3, vocab) for _ in range(32)]
                start = time.perf_counter()
                r = http.post(url + "/v1/completions", json={"model": "bench", "prompt": prompt, "max_tokens": 32,
                                                             "temperature": 0})
                if r.status_code != 200:
                    errors.append(r.status_code)
                    continue
                latencies.append(time.perf_counter() - start)
                tokens.append(r.json()["usage"]["completion_tokens"])

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    return {"tokens_per_s": sum(tokens) / elapsed, "requests": len(tokens), "errors": len(errors),
            "latency_s": statistics.mean(latencies) if latencies else float("nan")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="tiny", choices=list(SIZES))
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--seconds", type=float, default=20.0, help="load time per measurement")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--speculate", type=int, default=0, help="also measure the batched server with --speculate N")
    parser.add_argument("--out", default=DEFAULT)
    args = parser.parse_args()
    import platform

    import torch

    torch.set_num_threads(args.threads)
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        prepare(args.size, folder)
        vocab = SIZES[args.size]["vocab_size"]
        runs = [("batched (max batch 16)", 16, 0), ("one at a time (max batch 1)", 1, 0)]
        if args.speculate:
            runs.append(("speculative", 16, args.speculate))
        for label, max_batch, speculate in runs:
            state, server, thread, url = serve(folder, max_batch, speculate)
            load(url, 1, 2.0, vocab)  # warm-up
            for clients in args.clients:
                results[label, clients] = load(url, clients, args.seconds, vocab)
                print(label, clients, results[label, clients], flush=True)
            server.should_exit = True
            thread.join()
            state.engine.shutdown()
    cfg = SIZES[args.size]
    lines = ["## Serving", "",
             f"Written by `benchmarks/bench_serving.py` on {time.strftime('%Y-%m-%d')}: torch {torch.__version__}, "
             f"{args.threads} CPU threads, {platform.processor() or platform.machine()}. `loramix serve` with the "
             f"{args.size} model (hidden {cfg['hidden_size']}, {cfg['layers']} layers, vocabulary "
             f"{cfg['vocab_size']}, 8 experts), clients on loopback sending 32-token prompts for 32 greedy tokens "
             f"back to back for {args.seconds:.0f} s each.", "",
             "| clients | batched tokens/s | one-at-a-time tokens/s | batched / one at a time | batched latency (s) "
             "| one-at-a-time latency (s) | errors |", "|---|---|---|---|---|---|---|"]
    for clients in args.clients:
        b, o = results["batched (max batch 16)", clients], results["one at a time (max batch 1)", clients]
        lines.append(f"| {clients} | {b['tokens_per_s']:.1f} | {o['tokens_per_s']:.1f} | "
                     f"**{b['tokens_per_s'] / o['tokens_per_s']:.2f}×** | {b['latency_s']:.2f} | {o['latency_s']:.2f} "
                     f"| {b['errors'] + o['errors']} |")
    if args.speculate:
        lines += ["", f"With `--speculate {args.speculate}` (the batched server, the same requests; its answers are "
                  "the plain engine's, token for token):", "",
                  "| clients | speculative tokens/s | / batched | speculative latency (s) | errors |",
                  "|---|---|---|---|---|"]
        for clients in args.clients:
            b, sp = results["batched (max batch 16)", clients], results["speculative", clients]
            lines.append(f"| {clients} | {sp['tokens_per_s']:.1f} | **{sp['tokens_per_s'] / b['tokens_per_s']:.2f}×** "
                         f"| {sp['latency_s']:.2f} | {sp['errors']} |")
    lines += ["", "Batched: requests that arrive together share each decode step (rows join and leave between "
              "steps). On a CPU a step's cost grows with the rows in it, so the gain is smaller than on a GPU, "
              "where a step of 16 rows costs about what a step of one costs.", ""]
    text = "\n".join(lines)
    write_section("serving", text, args.out)
    print(text)


if __name__ == "__main__":
    main()
