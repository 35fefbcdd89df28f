"""The `loramix` command: a table of verbs, each a plain function imported only when used."""

from __future__ import annotations

import argparse
import sys


def quickstart(args: argparse.Namespace) -> int:
    """Build a tiny X-LoRA offline (random base, three random experts), run it, save it, load it back."""
    import os
    import time

    import torch

    from . import XLoraConfig, XLoraModel
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
    """Complete a prompt; --stream prints tokens as they come, --show-experts marks each token's top expert."""
    from . import XLoraModel
    from .generation import SamplingParams, context_length, decode_steps, special_tokens

    model = XLoraModel.from_pretrained(args.model, base=args.base)
    tokenizer = load_tokenizer(args.model, args.base or model.base_model_id)
    ids = tokenizer(args.prompt, return_tensors="pt")["input_ids"]
    params = SamplingParams(max_new_tokens=args.max_new_tokens, do_sample=args.temperature > 0,
                            temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                            stop=args.stop or [])
    eos_ids, _ = special_tokens(model, tokenizer.eos_token_id, tokenizer.pad_token_id)
    colour = sys.stdout.isatty() and not args.no_colour
    tokens: list[int] = []
    pieces: list[str] = []  # the text each token adds, marked with its dominant expert when asked
    decoded = ""
    for step in decode_steps(model, ids, None, [params], eos_token_ids=eos_ids, tokenizer=tokenizer,
                             freeze_scalings_after=args.freeze_scalings_after, max_length=context_length(model)):
        token = int(step.tokens[0])
        if token in eos_ids:
            break
        tokens.append(token)
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        piece, decoded = text[len(decoded):], text
        if args.show_experts:
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


def load_tokenizer(model_dir: str, base: str | None):
    """The tokenizer saved beside the X-LoRA checkpoint, else the base model's."""
    from transformers import AutoTokenizer

    for source in (model_dir, base):
        if not source:
            continue
        try:
            return AutoTokenizer.from_pretrained(source)
        except (OSError, ValueError):
            continue
    raise SystemExit(f"loramix: no tokenizer in {model_dir!r} or the base model {base!r}; save one there")


VERBS = {
    "quickstart": (quickstart, "build, run, save and reload a tiny X-LoRA offline"),
    "generate": (generate, "complete a prompt with a saved X-LoRA model"),
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loramix", description="X-LoRA: a mixture of LoRA experts.")
    sub = parser.add_subparsers(dest="verb", required=True)
    p = sub.add_parser("quickstart", help=VERBS["quickstart"][1])
    p.add_argument("--out", default="loramix-quickstart", help="folder for the tiny base, experts and X-LoRA")
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("generate", help=VERBS["generate"][1])
    p.add_argument("--model", required=True, help="X-LoRA checkpoint folder or hub id")
    p.add_argument("--base", help="base model (default: the checkpoint's base_model_id)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    p.add_argument("--freeze-scalings-after", type=int, help="keep the scalings after N generated tokens")
    p.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    p.add_argument("--show-experts", action="store_true", help="mark each token with its dominant expert")
    p.add_argument("--no-colour", action="store_true", help="plain [i] marks even on a terminal")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return VERBS[args.verb][0](args)
    except (ValueError, FileNotFoundError, OSError) as err:
        print(f"loramix {args.verb}: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
