"""The run settings of the training verbs: `TrainingArgs` for the loop, `LoraSettings` for an expert's adapter.

Each is a frozen dataclass that refuses a bad value on construction with a ValueError naming the field (the CLI's
flags carry the same names: `--batch-size` is `batch_size`). The method's own settings are `XLoraConfig`
(config.py); how rows become text is `DataFormat` and where they come from `DataSource` (training/data.py); the gate's
extra loss terms are `RoutingLosses` (losses.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..checks import is_finite_number, is_int

EXPERT_LR = 2e-4  # the learning rate when TrainingArgs.lr is None: an expert's LoRA weights
GATE_LR = 1e-3  # ... and the X-LoRA gate's classifier


@dataclass(frozen=True)
class TrainingArgs:
    """How the loop runs, shared by every training verb. Where the run writes is the entry point's `output_dir`."""

    max_steps: int | None = None  # optimizer steps; overrides epochs
    epochs: float | None = None  # default 1 when max_steps is not set
    lr: float | None = None  # None: the verb's own default (EXPERT_LR for an expert, GATE_LR for the gate)
    batch_size: int = 8  # rows per micro-batch per process
    grad_accum: int = 1
    warmup_steps: int = 0
    lr_scheduler: str = "linear"  # linear | cosine | constant (after warm-up)
    weight_decay: float = 0.0  # AdamW's, on matrices only
    max_grad_norm: float | None = 1.0  # clip the global gradient norm; None or 0: no clipping
    seed: int = 0
    logging_steps: int = 10
    eval_steps: int | None = None
    save_steps: int | None = None
    save_total_limit: int | None = None  # keep only the newest N checkpoints
    resume: bool = False
    progress: bool = True
    device: str | None = None  # default: cuda:LOCAL_RANK when available, else cpu
    gradient_checkpointing: bool = False  # recompute the base's blocks in backward instead of keeping activations
    mixed_precision: str | None = None  # "bf16" | "fp16": torch.autocast, trainable tensors kept in float32
    # shard the weights, gradients and optimizer state over the processes (FSDP2, training/fsdp.py) instead of
    # each process holding the whole model; with one process it changes nothing
    fsdp: bool = False
    # trackers that also get the metrics (training/run_logging.py): "tensorboard", "wandb", a sequence or one
    # comma-separated string of them; "none" or () for metrics.jsonl alone. Kept as a tuple of names
    report_to: str | tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name, least, optional in (("batch_size", 1, False), ("grad_accum", 1, False),
                                      ("logging_steps", 1, False), ("warmup_steps", 0, False), ("seed", 0, False),
                                      ("max_steps", 1, True), ("eval_steps", 1, True), ("save_steps", 1, True),
                                      ("save_total_limit", 1, True)):
            value = getattr(self, name)
            if value is None and optional:
                continue
            if not is_int(value):
                raise ValueError(f"{name}: must be an integer, got {value!r}")
            if value < least:
                raise ValueError(f"{name}: must be at least {least}, got {value}")
        if self.epochs is not None and not (is_finite_number(self.epochs) and self.epochs > 0):
            raise ValueError(f"epochs: must be a positive number, got {self.epochs!r}")
        if self.lr is not None and not (is_finite_number(self.lr) and self.lr > 0):
            raise ValueError(f"lr: must be a positive number, got {self.lr!r}")
        if not (is_finite_number(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"weight_decay: must be a number >= 0, got {self.weight_decay!r}")
        if self.max_grad_norm is not None and not (is_finite_number(self.max_grad_norm)
                                                   and self.max_grad_norm >= 0):
            raise ValueError(f"max_grad_norm: must be a number >= 0 (0 or None: no clipping), "
                             f"got {self.max_grad_norm!r}")
        if self.lr_scheduler not in ("linear", "cosine", "constant"):
            raise ValueError(f"lr_scheduler: one of linear, cosine, constant, got {self.lr_scheduler!r}")
        if self.mixed_precision not in (None, "bf16", "fp16"):
            raise ValueError(f"mixed_precision: None, 'bf16' or 'fp16', got {self.mixed_precision!r}")
        if self.fsdp is True and self.mixed_precision == "fp16":
            raise ValueError("fsdp: fp16 loss scaling is not implemented with sharded gradients; use "
                             "mixed_precision='bf16'")
        for name in ("resume", "progress", "gradient_checkpointing", "fsdp"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}: must be true or false, got {getattr(self, name)!r}")
        object.__setattr__(self, "report_to", _trackers(self.report_to))


def _trackers(value) -> tuple[str, ...]:
    """report_to as a tuple of distinct tracker names; ValueError naming the field for anything else."""
    names = value.split(",") if isinstance(value, str) else value
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"report_to: 'tensorboard', 'wandb', 'none' or a list of them, got {value!r}")
    names = tuple(dict.fromkeys(n.strip() for n in names if n.strip() not in ("", "none")))
    for name in names:
        if name not in ("tensorboard", "wandb"):
            raise ValueError(f"report_to: {name!r} is not one of tensorboard, wandb, none")
    return names


@dataclass(frozen=True)
class LoraSettings:
    """The LoRA adapter one expert trains: W x + (alpha / rank) B A x on each target module, dropout on x."""

    rank: int = 8
    alpha: float = 16
    dropout: float = 0.05
    # "all-linear" (PEFT's name for every linear layer but the output head), or module names: a sequence or one
    # comma-separated string, kept as a tuple of names
    target_modules: str | tuple[str, ...] = "all-linear"

    def __post_init__(self) -> None:
        if not is_int(self.rank) or self.rank < 1:
            raise ValueError(f"rank: must be at least 1, got {self.rank!r}")
        if not (is_finite_number(self.alpha) and self.alpha > 0):
            raise ValueError(f"alpha: must be a positive number, got {self.alpha!r}")
        if not (is_finite_number(self.dropout) and 0 <= self.dropout < 1):
            raise ValueError(f"dropout: must be in [0, 1), got {self.dropout!r}")
        targets = self.target_modules
        if targets == "all-linear":
            return
        names = targets.split(",") if isinstance(targets, str) else targets
        if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
            raise ValueError(f"target_modules: 'all-linear' or module names, got {targets!r}")
        names = tuple(n.strip() for n in names if n.strip())
        if not names:
            raise ValueError(f"target_modules: no module name in {targets!r}")
        object.__setattr__(self, "target_modules", names)

    @property
    def peft_target_modules(self) -> str | list[str]:
        """target_modules as PEFT's LoraConfig takes it and run records store it: "all-linear" or a list."""
        return self.target_modules if isinstance(self.target_modules, str) else list(self.target_modules)
