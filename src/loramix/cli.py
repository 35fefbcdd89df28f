"""The `loramix` command: a table of verbs, each a plain function imported only when used."""

from __future__ import annotations

import argparse
import math
import sys


def quickstart(args: argparse.Namespace) -> int:
    """Build a tiny X-LoRA offline (random base, three random experts), run it, save it, load it back."""
    import os
    import time

    import torch

    from .config import XLoraConfig
    from .model import XLoraModel
    from .tiny import random_experts, tiny_llama

    start = time.time()
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    base = tiny_llama(seed=args.seed)
    base_dir = os.path.join(out, "base")
    base.save_pretrained(base_dir)
    adapters = random_experts(base, os.path.join(out, "experts"), ranks=[4, 8, 16], seed=args.seed)
    config = XLoraConfig(adapters=adapters, xlora_depth=2, xlora_size=32, layerwise_scalings=True)
    model = XLoraModel.from_base(base_dir, config)
    print(f"X-LoRA over a tiny Llama: {model.n_experts} experts on {model.n_lora_layers} LoRA layers "
          f"({model.lora_layer_names[0]} ... {model.lora_layer_names[-1]})")
    ids = torch.randint(3, 128, (1, 12), generator=torch.Generator().manual_seed(args.seed))
    with torch.no_grad():
        result = model(input_ids=ids, labels=ids)
    print(f"logits {tuple(result.logits.shape)}, scalings {tuple(result.scalings.shape)}, loss {result.loss:.4f}")
    mean = result.scalings.mean(dim=(0, 1, 2))
    for name, weight in zip(model.expert_names, mean.tolist()):
        print(f"  mean scaling of {name:<10} {weight:.3f}")
    saved = os.path.join(out, "xlora")
    model.save_pretrained(saved)
    again = XLoraModel.from_pretrained(saved)
    with torch.no_grad():
        same = torch.equal(again(input_ids=ids).logits, result.logits)
    print(f"saved to {saved}; reloaded model gives {'identical' if same else 'DIFFERENT'} logits "
          f"({time.time() - start:.1f}s)")
    return 0 if same else 1


def generate(args: argparse.Namespace) -> int:
    """Complete a prompt; --stream prints tokens as they come, --show-experts marks each token's top expert. The
    text is the server's for the same request (engine/text.py: up to the EOS, cut before a stop string)."""
    from .config import GateOptions
    from .engine.generate import context_length, decode_steps, special_tokens
    from .engine.params import SamplingParams
    from .loading import load_tokenizer
    from .model import XLoraModel

    model = XLoraModel.from_pretrained(args.model, base=args.base, **_placement(args))
    tokenizer = load_tokenizer(args.model, args.base or model.base_model_id)
    ids = tokenizer(args.prompt, return_tensors="pt")["input_ids"]
    params = SamplingParams(max_new_tokens=args.max_new_tokens, do_sample=args.temperature > 0,
                            temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                            stop=args.stop or [])
    eos_ids, _ = special_tokens(model, tokenizer.eos_token_id, tokenizer.pad_token_id)
    colour = sys.stdout.isatty() and not args.no_colour
    pieces: list[str] = []  # the text each step hands out, marked with its token's dominant expert when asked
    gate = GateOptions(freeze_scalings_after=args.freeze_scalings_after)
    for step in decode_steps(model, ids, None, [params], eos_token_ids=eos_ids, tokenizer=tokenizer, gate=gate,
                             max_length=context_length(model)):
        piece = step.texts[0]
        if args.show_experts and piece:
            expert = int(step.scalings[0].float().sum(0).argmax())  # summed over LoRA layers
            piece = paint(piece, expert, True) if colour else f"{piece}[{expert}]"
        pieces.append(piece)
        if args.stream:
            sys.stdout.write(piece)
            sys.stdout.flush()
    sys.stdout.write(("" if args.stream else "".join(pieces)) + "\n")
    if args.show_experts:
        legend = ", ".join(paint(f"[{i}] {n}", i, colour) for i, n in enumerate(model.expert_names))
        print(f"experts: {legend}")
    return 0


_COLOURS = [31, 32, 33, 34, 35, 36, 91, 92, 93, 94, 95, 96]


def paint(text: str, expert: int, colour: bool) -> str:
    return f"\x1b[{_COLOURS[expert % len(_COLOURS)]}m{text}\x1b[0m" if colour else text


def _training_options(args: argparse.Namespace, expert_field: str | None = None) -> dict:
    """What both training verbs pass their entry point besides the base, the data and the output folder: the
    loop's settings, the data format, the held-out data and how the base is loaded, each built (and checked) once."""
    from .training.data import DataFormat, data_sources
    from .training.settings import TrainingArgs

    run = TrainingArgs(max_steps=args.max_steps, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                       grad_accum=args.grad_accum, warmup_steps=args.warmup_steps, lr_scheduler=args.lr_scheduler,
                       weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm or None, seed=args.seed,
                       logging_steps=args.logging_steps, eval_steps=args.eval_steps, save_steps=args.save_steps,
                       save_total_limit=args.save_total_limit, resume=args.resume, progress=not args.no_progress,
                       device=args.device, gradient_checkpointing=args.gradient_checkpointing,
                       mixed_precision="bf16" if args.bf16 else "fp16" if args.fp16 else None)
    data_format = DataFormat(prompt_field=args.prompt_field, completion_field=args.completion_field,
                             text_field=args.text_field, messages_field=args.messages_field,
                             prompt_template=_unescape(args.prompt_template),
                             completion_template=_unescape(args.completion_template), expert_field=expert_field,
                             max_length=args.max_length, train_on_prompt=args.train_on_prompt, strict=args.strict)
    return dict(args=run, data_format=data_format, eval_data=data_sources(args.eval_data) if args.eval_data else None,
                tokenizer=args.tokenizer, dtype=_dtype(args.dtype), quantization=_placement(args)["quantization"],
                trust_remote_code=args.trust_remote_code)


def _unescape(template: str | None) -> str | None:
    """Shell users write \\n for a newline in --prompt-template; turn the two-character escapes into characters."""
    return None if template is None else template.replace("\\n", "\n").replace("\\t", "\t")


def _dtype(name: str | None):
    import torch

    return None if name is None else {"float32": torch.float32, "bfloat16": torch.bfloat16,
                                      "float16": torch.float16}[name]


def _add_placement_flags(p: argparse.ArgumentParser, *, inference: bool) -> None:
    """How the base model is loaded: dtype, a bitsandbytes 4-bit / 8-bit base and (inference) a device map."""
    g = p.add_argument_group("base model placement")
    if inference:  # the training verbs have their own --dtype and --device
        g.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="dtype to load the base model in")
        g.add_argument("--device", help="e.g. cpu, cuda, cuda:1 (default: where transformers puts it)")
        g.add_argument("--device-map", help="transformers' device_map: auto, balanced, or a JSON object "
                                            "{module: device}; with --offload-folder for 'disk'")
        g.add_argument("--offload-folder", help="folder for weights a device map offloads to disk")
    bits = g.add_mutually_exclusive_group()
    bits.add_argument("--load-in-4bit", action="store_true", help="a 4-bit (NF4) bitsandbytes base")
    bits.add_argument("--load-in-8bit", action="store_true", help="an 8-bit (LLM.int8) bitsandbytes base")


def _placement(args: argparse.Namespace) -> dict:
    """The loader's keyword arguments from the placement flags (see `loading.load_base`)."""
    import json

    placement = dict(dtype=_dtype(args.dtype),
                     quantization="4bit" if args.load_in_4bit else "8bit" if args.load_in_8bit else None)
    device_map = getattr(args, "device_map", None)
    if device_map is not None and device_map.lstrip().startswith("{"):
        try:
            device_map = json.loads(device_map)
        except ValueError as err:
            raise ValueError(f"--device-map: not a JSON object ({err})") from None
    for key, value in (("device", getattr(args, "device", None)), ("device_map", device_map),
                       ("offload_folder", getattr(args, "offload_folder", None))):
        if value is not None:
            placement[key] = value
    return placement


def train_expert(args: argparse.Namespace) -> int:
    """Train one LoRA expert on its domain's data; writes a PEFT adapter folder."""
    from .training.data import data_sources
    from .training.loop import train_expert as run
    from .training.settings import LoraSettings

    lora = LoraSettings(rank=args.rank, alpha=args.alpha, dropout=args.dropout,
                        target_modules=args.target_modules or "all-linear")
    options = _training_options(args)
    result = run(args.base, data_sources(args.data, args.data_weights), args.output, lora=lora, **options)
    print(json_line(result.metrics))
    return 0


def train(args: argparse.Namespace) -> int:
    """Train the X-LoRA gate over frozen experts on a mixture of their data."""
    from .config import XLoraConfig
    from .losses import RoutingLosses
    from .training.data import data_sources
    from .training.loop import train_xlora

    adapters = {}
    for item in args.adapters:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--adapters: {item!r} is not NAME=DIR")
        if name in adapters:
            raise ValueError(f"--adapters: expert name {name!r} given twice")
        adapters[name] = path
    config = XLoraConfig(adapters=adapters, xlora_depth=args.xlora_depth, xlora_size=args.xlora_size,
                         layerwise_scalings=args.layerwise_scalings, top_k_lora=args.top_k_lora,
                         # the softmax over the kept top-k replaces the softmax over all experts (PEFT's semantics)
                         enable_softmax=not args.enable_softmax_topk, enable_softmax_topk=args.enable_softmax_topk,
                         softmax_temperature=args.softmax_temperature,
                         use_trainable_adapters=args.use_trainable_adapters, xlora_dropout_p=args.xlora_dropout_p,
                         scaling_pass_value=args.scaling_pass_value)
    routing = RoutingLosses(balance_weight=args.balance_weight, entropy_weight=args.entropy_weight,
                            routing_weight=args.routing_weight, routing_anneal_steps=args.routing_anneal_steps)
    options = _training_options(args, expert_field=args.expert_field)
    result = train_xlora(args.base, config, data_sources(args.data, args.data_weights), args.output,
                         routing=routing, **options)
    print(json_line(result.metrics))
    return 0


def json_line(record: dict) -> str:
    import json

    return json.dumps({k: (round(v, 6) if isinstance(v, float) else v) for k, v in record.items()})


# ---- argument types: every number is checked at parse time, so bad flags fail before any model is loaded ----------
def _number(kind: type, ok, expected: str):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or (kind is float and not math.isfinite(value)) or not ok(value):
            raise argparse.ArgumentTypeError(f"got {text!r}, expected {expected}")
        return value

    parse.__name__ = expected
    return parse


positive_int = _number(int, lambda v: v >= 1, "an integer >= 1")
non_negative_int = _number(int, lambda v: v >= 0, "an integer >= 0")
positive_float = _number(float, lambda v: v > 0, "a finite number > 0")
non_negative_float = _number(float, lambda v: v >= 0, "a finite number >= 0")
finite_float = _number(float, lambda v: True, "a finite number")
dropout_float = _number(float, lambda v: 0 <= v < 1, "a number in [0, 1)")
top_p_float = _number(float, lambda v: 0 < v <= 1, "a number in (0, 1]")


def non_empty(text: str) -> str:
    if not text:
        raise argparse.ArgumentTypeError("must not be empty")
    return text


class _Parser(argparse.ArgumentParser):
    """Usage errors are one line naming the flag (exit code 2), not the usage block."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _alias(group, old: str, dest: str, **kwargs) -> None:
    """An old spelling of a flag, kept working but hidden from --help."""
    group.add_argument(old, dest=dest, default=argparse.SUPPRESS, help=argparse.SUPPRESS, **kwargs)


def _add_training_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base", required=True, help="base model folder or hub id")
    p.add_argument("--data", required=True, action="append",
                   help="JSONL/JSON/CSV/Parquet file, save_to_disk folder or hub dataset name[:split] (repeatable)")
    p.add_argument("--data-weights", type=positive_float, nargs="+",
                   help="relative share of each --data source in the mix")
    p.add_argument("--eval-data", action="append", help="held-out data for evaluation loss and perplexity")
    p.add_argument("--output", required=True, help="output folder (checkpoints go to OUTPUT/checkpoint-<step>/)")
    p.add_argument("--tokenizer", help="tokenizer folder or hub id (default: the base model's)")
    g = p.add_argument_group("data format")
    g.add_argument("--prompt-field", default="prompt")
    g.add_argument("--completion-field", default="completion")
    g.add_argument("--text-field", help="train on plain text in this field")
    g.add_argument("--messages-field", help="train on chats in this field (the tokenizer's chat template)")
    g.add_argument("--prompt-template", help="e.g. 'Question: {question}\\nAnswer:'")
    g.add_argument("--completion-template", help="e.g. ' {answer}'")
    g.add_argument("--train-on-prompt", action="store_true", help="take the loss on prompt tokens too")
    g.add_argument("--max-length", type=positive_int, default=512, help="longer rows are reported and skipped")
    g.add_argument("--strict", action="store_true", help="stop at the first bad row instead of skipping it")
    g = p.add_argument_group("optimisation")
    g.add_argument("--max-steps", type=positive_int)
    g.add_argument("--epochs", type=positive_float)
    g.add_argument("--lr", type=positive_float, help="learning rate (default 2e-4 for experts, 1e-3 for the gate)")
    g.add_argument("--batch-size", type=positive_int, default=8, help="rows per micro-batch and process")
    g.add_argument("--grad-accum", type=positive_int, default=1)
    g.add_argument("--warmup-steps", type=non_negative_int, default=0)
    g.add_argument("--lr-scheduler", choices=["linear", "cosine", "constant"], default="linear")
    g.add_argument("--weight-decay", type=non_negative_float, default=0.0)
    g.add_argument("--max-grad-norm", type=non_negative_float, default=1.0, help="0 turns clipping off")
    g.add_argument("--seed", type=non_negative_int, default=0)
    g.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="dtype to load the base model in")
    g.add_argument("--device", help="default: cuda:LOCAL_RANK when available, else cpu")
    _add_placement_flags(p, inference=False)
    g.add_argument("--trust-remote-code", action="store_true")
    g.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute the base's blocks in backward instead of keeping their activations")
    precision = g.add_mutually_exclusive_group()
    precision.add_argument("--bf16", action="store_true", help="mixed precision: autocast to bfloat16, float32 weights")
    precision.add_argument("--fp16", action="store_true", help="mixed precision: autocast to float16 with loss scaling")
    g = p.add_argument_group("run")
    g.add_argument("--logging-steps", type=positive_int, default=10)
    g.add_argument("--eval-steps", type=positive_int)
    g.add_argument("--save-steps", type=positive_int)
    g.add_argument("--save-total-limit", type=positive_int)
    g.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


def demo(args: argparse.Namespace) -> int:
    """The paper's experiment, offline: tokenizer, tiny base, five experts, the gate, scores, figures, report."""
    from .demo import run_demo

    run_demo(args.out, quick=args.quick, fresh=args.fresh, seed=args.seed, progress=not args.no_progress)
    return 0


def analyze(args: argparse.Namespace) -> int:
    """Figures of a model's scalings for a prompt (heatmap + bars, token history), or of a saved scalings log."""
    from .analysis import ScalingsLog
    from .analysis import analyze as run

    if args.scalings:
        if args.model or args.prompt:
            raise ValueError("--scalings draws a saved log; do not give --model or --prompt with it")
        summary = run(args.out, log=ScalingsLog.load(args.scalings))
    else:
        if not args.model or args.prompt is None:
            raise ValueError("give --model and --prompt (or --scalings FILE)")
        from .loading import load_tokenizer
        from .model import XLoraModel

        model = XLoraModel.from_pretrained(args.model, base=args.base, **_placement(args))
        tokenizer = load_tokenizer(args.model, args.base or model.base_model_id)
        summary = run(args.out, model=model, tokenizer=tokenizer, prompt=args.prompt,
                      max_new_tokens=args.max_new_tokens)
    print(f"{summary['tokens']} tokens: {summary['text']!r}")
    for name, value in summary["mean_scaling"].items():
        print(f"  mean scaling of {name:<20} {value:.3f}")
    print(f"wrote {summary['heatmap']} and {summary['history']}")
    return 0


def serve(args: argparse.Namespace) -> int:
    """An OpenAI-compatible HTTP server for an X-LoRA checkpoint."""
    settings = _serve_settings(args)  # every flag checked in a second, before any heavy import or loading
    settings.probe_address()
    import signal

    from .serving.app import load_state, make_server

    if settings.host not in ("127.0.0.1", "localhost", "::1") and not settings.api_key:
        print(f"loramix serve: warning: listening on {settings.host} without --api-key", file=sys.stderr)
    state = load_state(settings, placement=_placement(args))
    print(f"serving {state.model_name} ({state.model.n_experts} experts) on http://{settings.host}:{settings.port}/v1",
          flush=True)
    # uvicorn drains on SIGTERM/SIGINT, then re-raises the signal to the handler found before it: a stop asked for
    # is a clean exit (code 0), not a death by signal
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    try:
        make_server(state).run()
    finally:
        state.close()
    return 0


def _serve_settings(args: argparse.Namespace):
    """serve's flags as ServeSettings (each flag is the field of its name), which checks them; ValueError naming
    the flag."""
    import dataclasses

    from .serving.settings import ServeSettings

    return ServeSettings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ServeSettings)})


def export(args: argparse.Namespace) -> int:
    """Export for another server: a PEFT LoRA or a merged model with fixed expert weights, or mistral.rs's X-LoRA."""
    from .interop.export import export as run
    from .interop.export import mean_gate_scalings, scalings_from_json
    from .model import XLoraModel
    from .training.data import DataFormat

    model = XLoraModel.from_pretrained(args.model, base=args.base, **_placement(args))
    tokenizer = _maybe_tokenizer(args.model, args.base or model.base_model_id)
    if args.from_data and args.weights:
        raise ValueError("give --weights or --from-data, not both")
    scalings = None
    if args.from_data:
        if tokenizer is None:
            raise ValueError("--from-data: no tokenizer beside the checkpoint or in the base model")
        fmt = DataFormat(prompt_field=args.prompt_field, completion_field=args.completion_field,
                         text_field=args.text_field, messages_field=args.messages_field,
                         prompt_template=_unescape(args.prompt_template),
                         completion_template=_unescape(args.completion_template), max_length=args.max_length)
        scalings = mean_gate_scalings(model, tokenizer, args.from_data, fmt, batch_size=args.batch_size)
    elif args.weights and args.weights != "uniform":
        scalings = scalings_from_json(model, args.weights)
    options = {"base_model_id": args.base_model_id} if args.base_model_id else {}
    folder = run(model, args.to, args.output, scalings=scalings, tokenizer=tokenizer, **options)
    if scalings is not None:
        for name, value in zip(model.expert_names, scalings.mean(0).tolist()):
            print(f"  mean scaling of {name:<20} {value:.3f}")
    print(f"wrote {args.to} export to {folder}")
    return 0


def _maybe_tokenizer(model_dir: str, base: str | None):
    """The tokenizer beside the checkpoint or of the base model, or None when neither has one."""
    from .loading import load_tokenizer

    try:
        return load_tokenizer(model_dir, base)
    except (FileNotFoundError, ValueError):
        return None


def eval_(args: argparse.Namespace) -> int:
    """Benchmark with lm-evaluation-harness in process; writes its results and the routing per task."""
    from .evaluation import evaluate, load_tasks
    from .loading import load_tokenizer
    from .model import XLoraModel

    # lm-eval missing, a misspelt task or a bad task YAML: one line before the model loads
    tasks = load_tasks(args.tasks, include_path=args.include_path, builtin_tasks=not args.no_builtin_tasks)
    model = XLoraModel.from_pretrained(args.model, base=args.base, **_placement(args))
    tokenizer = load_tokenizer(args.model, args.base or model.base_model_id)
    limit = None if args.limit is None else (int(args.limit) if args.limit >= 1 else args.limit)
    results = evaluate(model, tokenizer, tasks, limit=limit, batch_size=args.batch_size, output=args.output,
                       num_fewshot=args.num_fewshot)
    from lm_eval.utils import make_table

    print(make_table(results))
    for task, weights in results["routing"].items():
        print(f"routing of {task}: " + ", ".join(f"{name} {w:.3f}" for name, w in weights.items()))
    if args.output:
        print(f"wrote results.json, routing.csv and routing.png to {args.output}")
    return 0


def memory(args: argparse.Namespace) -> int:
    """Print what a run will hold in memory, from the base's config alone (no weights are loaded)."""
    from .memory import DTYPES, estimate_memory, format_estimate, read_base_config

    targets = "all-linear" if args.target_modules == "all-linear" else args.target_modules.split(",")
    estimate = estimate_memory(read_base_config(args.base), args.experts, args.rank, dtype=DTYPES[args.dtype],
                               quantization=args.quantization, batch=args.batch, context=args.context,
                               target_modules=targets, layerwise=not args.broadcast_scalings,
                               xlora_depth=args.xlora_depth, xlora_size=args.xlora_size)
    print(format_estimate(estimate))
    return 0


VERBS = {
    "serve": (serve, "an OpenAI-compatible HTTP server for an X-LoRA model"),
    "demo": (demo, "the paper's experiment end to end, offline, with its figures"),
    "analyze": (analyze, "figures of the scalings for a prompt or a saved scalings log"),
    "quickstart": (quickstart, "build, run, save and reload a tiny X-LoRA offline"),
    "generate": (generate, "complete a prompt with a saved X-LoRA model"),
    "train-expert": (train_expert, "train one LoRA expert (a PEFT adapter folder)"),
    "train": (train, "train the X-LoRA gate over frozen experts"),
    "eval": (eval_, "lm-evaluation-harness tasks in process, with the routing per task"),
    "export": (export, "a PEFT LoRA, a merged model or a mistral.rs X-LoRA folder, to serve elsewhere"),
    "memory": (memory, "estimate the memory a run will hold, from the base's config alone"),
}


def _serve_flags(p: argparse.ArgumentParser) -> None:
    """Flags named after ServeSettings' fields, with its defaults; ServeSettings checks their values."""
    import dataclasses

    from .serving.settings import LOG_LEVELS, ServeSettings

    default = {f.name: f.default for f in dataclasses.fields(ServeSettings)}
    _add_placement_flags(p, inference=True)
    p.add_argument("--model", required=True, help="X-LoRA checkpoint folder or hub id")
    p.add_argument("--base", help="base model (default: the checkpoint's base_model_id)")
    p.add_argument("--host", default=default["host"], help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=default["port"])
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every route but /health")
    p.add_argument("--max-batch", type=int, default=default["max_batch"], help="requests decoded together")
    p.add_argument("--max-queue", type=int, default=default["max_queue"], help="waiting requests beyond this get 429")
    p.add_argument("--max-tokens-cap", type=int, default=default["max_tokens_cap"],
                   help="largest max_tokens a request may ask for")
    p.add_argument("--served-model-name", help="the model id clients use (default: the folder's name)")
    p.add_argument("--max-request-bytes", type=int, default=default["max_request_bytes"],
                   help="larger request bodies get 413 (default: 1 MiB)")
    p.add_argument("--max-logprob-entries", type=int, default=default["max_logprob_entries"],
                   help="most log-probability entries in one answer: (echoed prompt tokens + max_tokens) x n x "
                        "(1 + logprobs), summed over prompts; more is a 400 (default: 262144)")
    p.add_argument("--chat-template", help="a Jinja chat template file, for tokenizers without one")
    p.add_argument("--trust-remote-code", action="store_true", help="run the base model's own code (off)")
    p.add_argument("--log-level", default=default["log_level"],
                   help=f"uvicorn's: {', '.join(LOG_LEVELS)} (default: {default['log_level']})")


def _demo_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="smaller run (about 2 minutes; used in CI)")
    p.add_argument("--out", default="loramix-demo", help="output folder (reused stages are skipped)")
    p.add_argument("--fresh", action="store_true", help="redo every stage")
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _analyze_flags(p: argparse.ArgumentParser) -> None:
    _add_placement_flags(p, inference=True)
    p.add_argument("--model", help="X-LoRA checkpoint folder or hub id")
    p.add_argument("--base", help="base model (default: the checkpoint's base_model_id)")
    p.add_argument("--prompt", type=non_empty)
    p.add_argument("--max-new-tokens", type=non_negative_int, default=0, help="also generate and show these tokens")
    p.add_argument("--scalings", help="a saved scalings log (.safetensors) instead of a model")
    p.add_argument("--out", required=True, help="folder for heatmap.png, history.png, scalings.safetensors")


def _quickstart_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="loramix-quickstart", help="folder for the tiny base, experts and X-LoRA")
    p.add_argument("--seed", type=non_negative_int, default=0)


def _generate_flags(p: argparse.ArgumentParser) -> None:
    _add_placement_flags(p, inference=True)
    p.add_argument("--model", required=True, help="X-LoRA checkpoint folder or hub id")
    p.add_argument("--base", help="base model (default: the checkpoint's base_model_id)")
    p.add_argument("--prompt", required=True, type=non_empty)
    p.add_argument("--max-new-tokens", type=positive_int, default=64)
    p.add_argument("--temperature", type=non_negative_float, default=0.0, help="0: greedy")
    p.add_argument("--top-p", type=top_p_float, default=1.0)
    p.add_argument("--top-k", type=non_negative_int, default=0, help="0: no top-k cut")
    p.add_argument("--seed", type=non_negative_int)
    p.add_argument("--stop", action="append", type=non_empty, help="stop string (repeatable)")
    p.add_argument("--freeze-scalings-after", type=non_negative_int,
                   help="keep the scalings after N generated tokens")
    p.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    p.add_argument("--show-experts", action="store_true", help="mark each token with its dominant expert")
    p.add_argument("--no-colour", action="store_true", help="plain [i] marks even on a terminal")


def _train_expert_flags(p: argparse.ArgumentParser) -> None:
    _add_training_flags(p)
    g = p.add_argument_group("LoRA")
    g.add_argument("--rank", type=positive_int, default=8)
    g.add_argument("--alpha", type=positive_float, default=16)
    g.add_argument("--dropout", type=dropout_float, default=0.05)
    g.add_argument("--target-modules", help="comma-separated module names (default: all linear layers)")


def _train_flags(p: argparse.ArgumentParser) -> None:
    _add_training_flags(p)
    p.add_argument("--adapters", required=True, nargs="+", metavar="NAME=DIR", help="the experts, in order")
    g = p.add_argument_group("X-LoRA (flags named after the XLoraConfig fields)")
    g.add_argument("--xlora-depth", type=positive_int, default=1)
    g.add_argument("--xlora-size", type=positive_int, default=2048)
    g.add_argument("--xlora-dropout-p", type=dropout_float, default=0.2)
    _alias(g, "--xlora-dropout", "xlora_dropout_p", type=dropout_float)
    g.add_argument("--layerwise-scalings", action="store_true")
    g.add_argument("--top-k-lora", type=positive_int)
    g.add_argument("--enable-softmax-topk", action="store_true",
                   help="softmax over the top-k kept experts instead of over all experts (needs --top-k-lora)")
    g.add_argument("--softmax-temperature", type=positive_float, default=1.0)
    g.add_argument("--scaling-pass-value", type=finite_float, default=0.0)
    g.add_argument("--use-trainable-adapters", action="store_true", help="train the experts too")
    g = p.add_argument_group("routing losses (flags named after the RoutingLosses fields)")
    g.add_argument("--balance-weight", type=non_negative_float, default=0.0, help="load-balancing term over experts")
    _alias(g, "--balance-loss-weight", "balance_weight", type=non_negative_float)
    g.add_argument("--entropy-weight", type=finite_float, default=0.0,
                   help="entropy of the scalings (positive sharpens the routing)")
    _alias(g, "--entropy-loss-weight", "entropy_weight", type=finite_float)
    g.add_argument("--expert-field", help="field naming each row's expert (for --routing-weight)")
    g.add_argument("--routing-weight", type=non_negative_float, default=0.0, help="supervised routing loss")
    g.add_argument("--routing-anneal-steps", type=non_negative_int, default=0,
                   help="lower the routing weight linearly to 0 over this many steps (0: constant)")
    _alias(g, "--routing-loss-weight", "routing_weight", type=non_negative_float)


def _export_flags(p: argparse.ArgumentParser) -> None:
    _add_placement_flags(p, inference=True)
    p.add_argument("--model", required=True, help="X-LoRA checkpoint folder or hub id")
    p.add_argument("--base", help="base model (default: the checkpoint's base_model_id)")
    p.add_argument("--to", required=True, choices=["peft", "merged", "mistralrs"])
    p.add_argument("--output", required=True, help="a new (or empty) folder")
    p.add_argument("--weights", help="peft/merged: 'uniform' (default) or a JSON file of fixed expert weights")
    p.add_argument("--from-data", action="append", help="peft/merged: the gate's mean weights over this data")
    p.add_argument("--batch-size", type=positive_int, default=8, help="rows per forward pass with --from-data")
    p.add_argument("--base-model-id", help="mistralrs: the base's id to record (default: write it to OUTPUT/base)")
    g = p.add_argument_group("data format (--from-data)")
    g.add_argument("--prompt-field", default="prompt")
    g.add_argument("--completion-field", default="completion")
    g.add_argument("--text-field")
    g.add_argument("--messages-field")
    g.add_argument("--prompt-template")
    g.add_argument("--completion-template")
    g.add_argument("--max-length", type=positive_int, default=512)


def _eval_flags(p: argparse.ArgumentParser) -> None:
    _add_placement_flags(p, inference=True)
    p.add_argument("--model", required=True, help="X-LoRA checkpoint folder or hub id")
    p.add_argument("--base", help="base model (default: the checkpoint's base_model_id)")
    p.add_argument("--tasks", required=True, help="comma-separated lm-eval task names")
    p.add_argument("--include-path", help="a folder of extra task YAMLs")
    p.add_argument("--limit", type=positive_float, help="documents per task (a fraction if below 1)")
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--num-fewshot", type=non_negative_int)
    p.add_argument("--no-builtin-tasks", action="store_true", help="only --include-path's tasks (skips indexing lm-eval's)")
    p.add_argument("--output", help="folder for results.json, routing.csv, routing.png")


def _memory_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base", required=True, help="base model folder or its config.json (only the config is read)")
    p.add_argument("--experts", type=positive_int, required=True, help="number of LoRA experts")
    p.add_argument("--rank", type=positive_int, required=True, help="rank of each expert")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--quantization", choices=["4bit", "8bit"], help="a bitsandbytes base")
    p.add_argument("--batch", type=positive_int, default=1)
    p.add_argument("--context", type=positive_int, default=2048, help="tokens per sequence")
    p.add_argument("--target-modules", default="all-linear", help="comma-separated module names")
    p.add_argument("--xlora-depth", type=positive_int, default=1)
    p.add_argument("--xlora-size", type=positive_int, default=2048)
    p.add_argument("--broadcast-scalings", action="store_true", help="one scaling per expert for all layers")


FLAGS = {  # verb -> the function that adds its flags
    "serve": _serve_flags,
    "demo": _demo_flags,
    "analyze": _analyze_flags,
    "quickstart": _quickstart_flags,
    "generate": _generate_flags,
    "train-expert": _train_expert_flags,
    "train": _train_flags,
    "export": _export_flags,
    "eval": _eval_flags,
    "memory": _memory_flags,
}


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="loramix", description="X-LoRA: a mixture of LoRA experts.")
    sub = parser.add_subparsers(dest="verb", required=True)
    for verb, (_, help_text) in VERBS.items():
        p = sub.add_parser(verb, help=help_text)
        FLAGS[verb](p)
        p.add_argument("--threads", type=positive_int,
                       help="torch's CPU threads (default: OMP_NUM_THREADS when set, else the physical cores this "
                            "process may run on, shared among torchrun's processes)")
    return parser


def default_threads() -> int:
    """Threads for torch when --threads is not given: the CPUs in this process's affinity mask, no more than the
    physical cores among them where /sys tells (two threads on one core's hyper-threads only spin), divided
    among the processes torchrun starts on this machine (LOCAL_WORLD_SIZE)."""
    import os

    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    cores = set()
    for cpu in cpus:
        try:
            topology = f"/sys/devices/system/cpu/cpu{cpu}/topology/"
            with open(topology + "physical_package_id") as package, open(topology + "core_id") as core:
                cores.add((package.read().strip(), core.read().strip()))
        except OSError:  # not Linux, or /sys hidden: the affinity mask alone
            cores = set(cpus)
            break
    per_machine = os.environ.get("LOCAL_WORLD_SIZE", "1")
    processes = int(per_machine) if per_machine.isdigit() and int(per_machine) > 0 else 1
    return max(1, min(len(cpus), len(cores)) // processes)


def _set_threads(threads: int | None) -> None:
    """torch's intra-op threads for the verb: --threads, else OMP_NUM_THREADS (left to torch), else the default."""
    import os

    if threads is None and os.environ.get("OMP_NUM_THREADS"):
        return
    import torch

    torch.set_num_threads(threads or default_threads())


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
    except SystemExit as done:  # --help (0) or a usage error already printed (2)
        return done.code if isinstance(done.code, int) else 2
    _set_threads(args.threads)
    try:
        return VERBS[args.verb][0](args)
    except (ValueError, OSError, ImportError, NotImplementedError) as err:
        print(f"loramix {args.verb}: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
