"""The baselines X-LoRA is compared with: static merges of the experts and a training-free router, both built
with PEFT's public API over the same expert folders X-LoRA mixes.

  static_merge  one adapter made of all experts with PEFT's `add_weighted_adapter`, each expert weighted 1/n:
                "linear": A = sum_i sqrt(w_i s_i) A_i, B = sum_i sqrt(w_i s_i) B_i (equal ranks; the merged
                adapter's scaling is 1, so its delta is B A, cross terms included); "cat": the experts' ranks
                stacked, delta = sum_i w_i s_i B_i A_i exactly; "ties": TIES-merging of the A and B factors at
                density TIES_DENSITY (trim to the largest entries, elect a sign, average the agreeing ones)
  arrow_router  PEFT's Arrow (Ostapenko et al. 2024): per token and layer, the experts whose top singular
                direction of B A best aligns with the token's input are mixed, top-k, with no training
"""

from __future__ import annotations

import os

from torch import nn

MERGE_METHODS = ("linear", "cat", "ties")
TIES_DENSITY = 0.5  # the share of each factor's entries TIES keeps (PEFT's density)
MERGED = "static_merge"


def _base_model(base: str | nn.Module) -> nn.Module:
    if isinstance(base, nn.Module):
        return base
    from ..loading import load_base

    return load_base(base)


def _check_experts(expert_dirs: dict[str, str]) -> None:
    if not isinstance(expert_dirs, dict) or not expert_dirs:
        raise ValueError("expert_dirs: expected a non-empty {name: PEFT adapter folder} mapping")
    from ..experts import ADAPTER_CONFIG

    for name, folder in expert_dirs.items():
        if not os.path.isfile(os.path.join(folder, ADAPTER_CONFIG)):
            raise FileNotFoundError(f"expert {name!r}: {folder} has no {ADAPTER_CONFIG} (not a PEFT adapter)")


def static_merge(base: str | nn.Module, expert_dirs: dict[str, str], method: str, *,
                 weights: list[float] | None = None):
    """A PeftModel over `base` with the experts merged into one active adapter named "static_merge" by `method`
    ("linear", "cat" or "ties"), each expert weighted by `weights` (default 1/n each). The base model is wrapped
    in place when given as a module."""
    from peft import PeftModel

    if method not in MERGE_METHODS:
        raise ValueError(f"method {method!r}: expected one of {', '.join(MERGE_METHODS)}")
    _check_experts(expert_dirs)
    names = list(expert_dirs)
    weights = [1.0 / len(names)] * len(names) if weights is None else list(weights)
    if len(weights) != len(names):
        raise ValueError(f"weights: {len(weights)} weights for {len(names)} experts")
    model = PeftModel.from_pretrained(_base_model(base), expert_dirs[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(expert_dirs[name], adapter_name=name)
    options = {"density": TIES_DENSITY} if method == "ties" else {}
    try:
        model.add_weighted_adapter(names, weights, MERGED, combination_type=method, **options)
    except ValueError as e:  # e.g. "linear" over experts of different ranks
        raise ValueError(f"static_merge {method!r}: {e}") from e
    model.set_adapter(MERGED)
    for name in names:
        model.delete_adapter(name)
    model.eval()
    return model


def arrow_router(base: str | nn.Module, expert_dirs: dict[str, str], *, top_k: int = 2,
                 router_temperature: float = 1.0, seed: int = 0):
    """PEFT's Arrow router over the experts (`create_arrow_model`), top `top_k` experts per token and layer;
    NotImplementedError when the installed PEFT has no Arrow (added in PEFT 0.17)."""
    try:
        from peft import ArrowConfig, create_arrow_model
    except ImportError:
        import peft

        raise NotImplementedError(f"arrow_router: the installed PEFT {peft.__version__} has no Arrow "
                                  "(ArrowConfig / create_arrow_model, PEFT >= 0.17)") from None
    _check_experts(expert_dirs)
    config = ArrowConfig(top_k=min(top_k, len(expert_dirs)), router_temperature=router_temperature, rng_seed=seed)
    model = create_arrow_model(_base_model(base), list(expert_dirs.values()), config)
    model.eval()
    return model
