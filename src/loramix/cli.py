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


VERBS = {
    "quickstart": (quickstart, "build, run, save and reload a tiny X-LoRA offline"),
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loramix", description="X-LoRA: a mixture of LoRA experts.")
    sub = parser.add_subparsers(dest="verb", required=True)
    p = sub.add_parser("quickstart", help=VERBS["quickstart"][1])
    p.add_argument("--out", default="loramix-quickstart", help="folder for the tiny base, experts and X-LoRA")
    p.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return VERBS[args.verb][0](args)


if __name__ == "__main__":
    sys.exit(main())
