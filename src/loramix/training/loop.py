"""Training: LoRA experts (step 2 of the paper's pipeline) and the X-LoRA gate (step 3), one loop for both.

The loop is plain PyTorch with three properties that make runs reproducible:

* **The data position is the only state of the data.** Micro-batch k of the run is `BatchPlan.micro_batch(k)`;
  optimizer step s uses micro-batches s*M .. s*M + M - 1 where M = grad_accum * world_size, and process r takes
  every world_size-th of them. Before each micro-batch the RNG is reseeded from (seed, k), so dropout masks too
  depend only on the position.
* **The loss is normalised over the global batch.** Each micro-batch contributes sum(token CE) / N, N the number
  of label tokens in all M micro-batches of the step (known from the plan, no communication), and process
  gradients are summed. So 2 processes x 1 micro-batch give the gradient of 1 process x 2 micro-batches.
* **Checkpoints are atomic and complete.** `checkpoint-<step>/` is written in a temporary folder and renamed;
  it holds a loadable model, the trainable tensors, the optimizer state (safetensors + JSON, never pickles) and
  the step. The learning-rate schedule is a function of the step. `--resume` therefore ends with the same weights
  as an uninterrupted run.

Data parallelism: under `torchrun` or `accelerate launch` (WORLD_SIZE > 1) the trainable gradients are summed
with one all-reduce per step (distributed.py). Memory: `gradient_checkpointing` recomputes the base's blocks in
backward; `mixed_precision` runs the forward under autocast with float32 trainable tensors (MixedPrecision).
The losses live in losses.py, checkpoints in checkpoints.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from ..backbone.compat import enable_activation_checkpointing
from ..checks import is_finite_number, is_int
from ..config import XLoraConfig
from ..files import append_jsonl, atomic_write_text, move_into, write_jsonl
from ..loading import base_model_id, load_base, load_tokenizer
from ..losses import RoutingLosses, causal_lm_loss, routing_losses
from .checkpoints import latest_checkpoint, load_checkpoint, prune_checkpoints, save_checkpoint, truncate_metrics
from .data import BatchPlan, DataError, DataFormat, Dataset, collate, load_dataset
from .distributed import Distributed

METRICS_NAME = "metrics.jsonl"


@dataclass
class TrainingArgs:
    """Run settings shared by both verbs (the method's settings live in XLoraConfig / the LoRA fields).
    Bad values raise ValueError naming the field, in the library as well as from the CLI."""

    output_dir: str
    max_steps: int | None = None  # optimizer steps; overrides epochs
    epochs: float | None = None  # default 1 when max_steps is not set
    lr: float = 2e-4
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
    device: str | None = None
    gradient_checkpointing: bool = False  # recompute the base's blocks in backward instead of keeping activations
    mixed_precision: str | None = None  # "bf16" | "fp16": torch.autocast, trainable tensors kept in float32

    def __post_init__(self) -> None:
        for name in ("batch_size", "grad_accum", "logging_steps", "max_steps", "eval_steps", "save_steps",
                     "save_total_limit", "warmup_steps", "seed"):
            value = getattr(self, name)
            optional = name not in ("batch_size", "grad_accum", "logging_steps", "warmup_steps", "seed")
            if value is None and optional:
                continue
            if not is_int(value):
                raise ValueError(f"{name}: must be an integer, got {value!r}")
            least = 0 if name in ("warmup_steps", "seed") else 1
            if value < least:
                raise ValueError(f"{name}: must be at least {least}, got {value}")
        if self.epochs is not None and not (is_finite_number(self.epochs) and self.epochs > 0):
            raise ValueError(f"epochs: must be a positive number, got {self.epochs!r}")
        if not (is_finite_number(self.lr) and self.lr > 0):
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




@dataclass
class TrainResult:
    output_dir: str
    metrics: dict[str, Any] = field(default_factory=dict)


# ---- what is trained: an expert or the gate -------------------------------------------------------------------
class _Task:
    """The model being trained, with how to compute its loss and how to save it."""

    model: nn.Module
    model_device: torch.device

    def trainable(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    def loss(self, batch: dict[str, torch.Tensor], n_tokens: int, n_micro: int) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    def save(self, folder: str) -> None:
        raise NotImplementedError

    def enable_gradient_checkpointing(self) -> None:
        """The base model's own checkpointing: its blocks are recomputed in backward (non-reentrant, so the
        inputs need not require grad)."""
        enable_activation_checkpointing(self.model, use_reentrant=False)


class _ExpertTask(_Task):
    def __init__(self, peft_model: nn.Module) -> None:
        self.model = peft_model

    def enable_gradient_checkpointing(self) -> None:
        enable_activation_checkpointing(self.model.get_base_model(), use_reentrant=False)

    def loss(self, batch, n_tokens, n_micro):
        logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        ce = causal_lm_loss(logits, batch["labels"], reduction="sum")
        return ce / n_tokens, {"ce_sum": ce.detach()}

    def save(self, folder):
        self.model.save_pretrained(folder)


class _LanguageModelTask(_ExpertTask):
    """Every parameter of a causal LM (pre-training a base model, as the demo does); same loss and saving."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        for p in model.parameters():
            p.requires_grad_(True)


class _GateTask(_Task):
    step = 0  # the optimizer step being computed (run_training sets it), for the annealed routing weight

    def __init__(self, xlora: nn.Module, routing: RoutingLosses) -> None:
        self.model, self.routing = xlora, routing

    def loss(self, batch, n_tokens, n_micro):
        out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        ce = causal_lm_loss(out.logits, batch["labels"], reduction="sum")
        loss, stats = ce / n_tokens, {"ce_sum": ce.detach()}
        if self.routing.any:
            aux = routing_losses(out.scalings, batch["attention_mask"], batch["expert"],
                                 self.model.config.enable_softmax)
            for name, weight in (("balance", self.routing.balance_weight), ("entropy", self.routing.entropy_weight),
                                 ("routing", self.routing.routing_weight_at(self.step))):
                if weight and name in aux:
                    loss = loss + weight * aux[name] / n_micro
                    stats[f"{name}_loss"] = aux[name].detach() / n_micro
        return loss, stats

    def save(self, folder):
        self.model.save_pretrained(folder)

    def enable_gradient_checkpointing(self) -> None:
        self.model.gradient_checkpointing_enable()  # the mixed pass; the scaling pass keeps no graph


# ---- the loop -----------------------------------------------------------------------------------------------------
class MixedPrecision:
    """bf16/fp16 mixed precision: the forward passes run under torch.autocast, the trainable tensors stay float32
    (the optimizer updates float32 master weights, whatever dtype the base was loaded in), and fp16 scales the
    loss (torch.amp.GradScaler) so that small gradients do not underflow; its state is saved in checkpoints.
    mode None: plain training, every method a no-op."""

    def __init__(self, mode: str | None, device: torch.device) -> None:
        self.dtype = {None: None, "bf16": torch.bfloat16, "fp16": torch.float16}[mode]
        self.device_type = torch.device(device).type
        self.scaler = torch.amp.GradScaler(self.device_type) if mode == "fp16" else None

    def keep_float32(self, params) -> None:
        if self.dtype is not None:
            for p in params:
                if p.dtype != torch.float32:
                    p.data = p.data.float()

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        """Gradients back to their true size before clipping (fp16)."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """optimizer.step(); with fp16 skipped when a gradient overflowed, and the loss scale updated."""
        if self.scaler is None:
            optimizer.step()
        else:
            self.scaler.step(optimizer)
            self.scaler.update()


def _lr_factor(step: int, total: int, args: TrainingArgs) -> float:
    """Learning-rate multiplier for optimizer step `step` (0-based): linear warm-up, then the schedule."""
    if step < args.warmup_steps:
        return (step + 1) / args.warmup_steps
    if args.lr_scheduler == "constant":
        return 1.0
    progress = (step - args.warmup_steps) / max(1, total - args.warmup_steps)
    if args.lr_scheduler == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def run_training(task: _Task, train: Dataset, args: TrainingArgs, pad_id: int, signature: dict[str, Any],
                 eval_data: Dataset | None = None, tokenizer=None, dist: Distributed | None = None,
                 log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train `task` on `train`; returns the final metrics. Checkpoints and metrics go to args.output_dir."""
    dist = dist or Distributed()
    out = os.path.abspath(args.output_dir)
    micro_per_step = args.grad_accum * dist.world
    plan = BatchPlan(train, args.batch_size, args.seed)
    label_counts = [sum(1 for x in e.labels if x != -100) for e in train.examples]
    total_steps = args.max_steps or max(1, math.ceil((args.epochs or 1.0) * plan.batches_per_epoch / micro_per_step))
    signature = {**signature, "batch_size": args.batch_size, "micro_batches_per_step": micro_per_step,
                 "seed": args.seed, "total_steps": total_steps, "mixed_precision": args.mixed_precision}
    params = task.trainable()
    if not params:
        raise ValueError("nothing to train: the model has no trainable parameters")
    precision = MixedPrecision(args.mixed_precision, task.model_device)
    precision.keep_float32(params.values())
    if args.gradient_checkpointing:
        task.enable_gradient_checkpointing()
    decay = [p for n, p in params.items() if p.ndim >= 2]
    no_decay = [p for n, p in params.items() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=args.lr)
    step = 0
    if dist.main:
        os.makedirs(out, exist_ok=True)
    dist.barrier()
    if args.resume:
        found = latest_checkpoint(out)
        if found is not None:
            step = load_checkpoint(found, task, optimizer, signature, precision.scaler)
            if dist.main:
                truncate_metrics(os.path.join(out, METRICS_NAME), step, warn=log)
                log(f"resuming from {found} (step {step} of {total_steps})")
        elif dist.main:
            truncate_metrics(os.path.join(out, METRICS_NAME), 0, warn=log)  # the log starts again with the run
            log(f"--resume: no complete checkpoint in {out}; starting from the beginning")
    elif dist.main and os.path.exists(os.path.join(out, METRICS_NAME)):
        os.remove(os.path.join(out, METRICS_NAME))  # a fresh run starts a fresh log
    if dist.main and train.bad_rows:
        write_jsonl(os.path.join(out, "skipped_rows.jsonl"), [dataclasses.asdict(b) for b in train.bad_rows])

    from tqdm.auto import tqdm

    bar = tqdm(total=total_steps, initial=step, disable=not (dist.main and args.progress), unit="step",
               dynamic_ncols=True)
    task.model.train()
    window: dict[str, float] = {"loss": 0.0, "tokens": 0, "seconds": 0.0, "steps": 0}
    last: dict[str, Any] = {}
    run_start = time.perf_counter()
    while step < total_steps:
        started = time.perf_counter()
        lr = args.lr * _lr_factor(step, total_steps, args)
        for group in optimizer.param_groups:
            group["lr"] = lr
        first = step * micro_per_step
        batches = [plan.micro_batch(k) for k in range(first, first + micro_per_step)]
        n_tokens = max(1, sum(label_counts[i] for b in batches for i in b))
        n_input_tokens = sum(len(train.examples[i]) for b in batches for i in b)
        ce_sum = torch.zeros((), dtype=torch.float64)
        extra: dict[str, float] = {}
        for k in range(dist.rank, micro_per_step, dist.world):
            torch.manual_seed(args.seed * 1_000_003 + first + k)  # dropout depends on the position only
            task.step = step  # (used by the gate's annealed routing weight)
            batch = {key: v.to(task.model_device) for key, v in
                     collate([train.examples[i] for i in batches[k]], pad_id).items()}
            with precision.autocast():
                loss, stats = task.loss(batch, n_tokens, micro_per_step)
            precision.backward(loss)
            ce_sum += stats.pop("ce_sum").double().cpu()
            for key, value in stats.items():
                extra[key] = extra.get(key, 0.0) + float(value)
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params.values()]
        if dist.world > 1:
            flat = dist.sum_(torch.cat([g.reshape(-1).float() for g in grads]))
            offset = 0
            for p, g in zip(params.values(), grads):
                p.grad = flat[offset:offset + g.numel()].view_as(p).to(p.dtype)
                offset += g.numel()
            ce_sum = dist.sum_(ce_sum.to(task.model_device)).cpu()
        grad_norm = None
        precision.unscale_(optimizer)
        if args.max_grad_norm:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(list(params.values()), args.max_grad_norm))
        precision.step(optimizer)
        optimizer.zero_grad(set_to_none=True)
        step += 1
        loss_value = float(ce_sum) / n_tokens
        seconds = time.perf_counter() - started
        window["loss"] += loss_value
        window["tokens"] += n_input_tokens
        window["seconds"] += seconds
        window["steps"] += 1
        bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", tok_s=f"{n_input_tokens / seconds:.0f}",
                        refresh=False)
        bar.update(1)
        if step % args.logging_steps == 0 or step == total_steps:
            record = {"step": step, "epoch": round(step * micro_per_step / plan.batches_per_epoch, 4),
                      "loss": window["loss"] / window["steps"], "lr": lr,
                      "tokens_per_s": window["tokens"] / window["seconds"], "grad_norm": grad_norm,
                      **extra}
            last.update(record)
            if dist.main:
                append_jsonl(os.path.join(out, METRICS_NAME), record)
            window = {"loss": 0.0, "tokens": 0, "seconds": 0.0, "steps": 0}
        if eval_data is not None and args.eval_steps and (step % args.eval_steps == 0 or step == total_steps):
            record = {"step": step, **evaluate(task, eval_data, args.batch_size, pad_id, dist, precision)}
            last.update(record)
            task.model.train()
            if dist.main:
                append_jsonl(os.path.join(out, METRICS_NAME), record)
                bar.write(f"step {step}: eval loss {record['eval_loss']:.4f}, perplexity "
                          f"{record['eval_perplexity']:.2f}")
        if args.save_steps and step % args.save_steps == 0 and step < total_steps:
            if dist.main:
                save_checkpoint(out, step, task, optimizer, signature, tokenizer, precision.scaler)
                prune_checkpoints(out, args.save_total_limit)
            dist.barrier()
    bar.close()
    task.model.eval()
    if eval_data is not None and "eval_loss" not in last:
        last.update(evaluate(task, eval_data, args.batch_size, pad_id, dist, precision))
    last.update({"steps": step, "seconds": time.perf_counter() - run_start, "skipped_rows": len(train.bad_rows),
                 "examples": len(train.examples)})
    return last


@torch.no_grad()
def evaluate(task: _Task, data: Dataset, batch_size: int, pad_id: int, dist: Distributed | None = None,
             precision: MixedPrecision | None = None) -> dict[str, float]:
    """Token-mean cross-entropy over `data` (label tokens only) and its perplexity."""
    dist = dist or Distributed()
    precision = precision or MixedPrecision(None, task.model_device)
    task.model.eval()
    order = sorted(range(len(data.examples)), key=lambda i: len(data.examples[i]))
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    totals = torch.zeros(2, dtype=torch.float64)  # (sum of CE, label tokens)
    for b in batches[dist.rank::dist.world]:
        batch = {k: v.to(task.model_device) for k, v in collate([data.examples[i] for i in b], pad_id).items()}
        with precision.autocast():
            _, stats = task.loss(batch, 1, 1)
        totals += torch.tensor([float(stats["ce_sum"]), float((batch["labels"][:, 1:] != -100).sum())],
                               dtype=torch.float64)
    if dist.world > 1:
        totals = dist.sum_(totals.to(task.model_device)).cpu()
    loss = float(totals[0] / totals[1].clamp_min(1))
    return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 700.0))}


# ---- public entry points ----------------------------------------------------------------------------------------
_DATA_FIELDS = {f.name for f in dataclasses.fields(DataFormat)}
_TRAIN_FIELDS = {f.name for f in dataclasses.fields(TrainingArgs)} - {"output_dir"}
_XLORA_FIELDS = {f.name for f in dataclasses.fields(XLoraConfig)} - {"adapters", "hidden_size"}
_ROUTING_FIELDS = {f.name for f in dataclasses.fields(RoutingLosses)}


def _split_options(options: dict[str, Any], groups: dict[str, set[str]]) -> dict[str, dict[str, Any]]:
    split: dict[str, dict[str, Any]] = {g: {} for g in groups}
    for key, value in options.items():
        owner = next((g for g, names in groups.items() if key in names), None)
        if owner is None:
            known = sorted(set().union(*groups.values()))
            raise TypeError(f"unknown option {key!r}; known options: {', '.join(known)}")
        split[owner][key] = value
    return split


def _as_list(data: str | list[str] | None) -> list[str]:
    if data is None:
        return []
    return [data] if isinstance(data, str) else list(data)


def _prepare_data(data, eval_data, data_weights, tokenizer, fmt: DataFormat, expert_names, dist: Distributed,
                  log) -> tuple[Dataset, Dataset | None]:
    quiet = log if dist.main else (lambda *_: None)
    train = load_dataset(_as_list(data), tokenizer, fmt, data_weights, expert_names, log=quiet)
    evaluation = None
    if eval_data:
        evaluation = load_dataset(_as_list(eval_data), tokenizer, fmt, None, expert_names, log=quiet)
    return train, evaluation


def _train_and_save(task: _Task, train: Dataset, evaluation: Dataset | None, args: TrainingArgs, tokenizer,
                    dist: Distributed, record: dict, signature: dict, log) -> TrainResult:
    """What every entry point does once its task and data are ready: record the run's settings, train, and move
    the final model and tokenizer into the output folder (written aside first, each file renamed in)."""
    out = os.path.abspath(args.output_dir)
    if dist.main:
        os.makedirs(out, exist_ok=True)
        atomic_write_text(os.path.join(out, "training_args.json"), json.dumps(record, indent=2, default=str))
    metrics = run_training(task, train, args, _pad_id(tokenizer), signature, evaluation, tokenizer, dist, log)
    if dist.main:
        tmp = tempfile.mkdtemp(prefix=".final.", dir=out)
        try:
            task.save(tmp)
            tokenizer.save_pretrained(tmp)
            move_into(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        write_jsonl(os.path.join(out, "final_metrics.jsonl"), [metrics])
        log(f"saved to {out}: loss {metrics.get('loss', float('nan')):.4f}"
            + (f", eval loss {metrics['eval_loss']:.4f}" if "eval_loss" in metrics else "")
            + f" ({metrics['steps']} steps, {metrics['seconds']:.1f}s)")
    dist.barrier()
    return TrainResult(out, metrics)


def train_expert(base: str | nn.Module, data: str | list[str], output_dir: str, *, rank: int = 8,
                 alpha: float = 16, dropout: float = 0.05, target_modules: list[str] | str | None = None,
                 eval_data: str | list[str] | None = None, data_weights: list[float] | None = None,
                 tokenizer=None, dtype: torch.dtype | None = None, quantization: Any = None,
                 trust_remote_code: bool = False,
                 log: Callable[[str], None] = print, **options) -> TrainResult:
    """Train one LoRA expert with PEFT and save it as a standard PEFT adapter folder in `output_dir`.

    `options` are TrainingArgs fields (max_steps, epochs, lr, batch_size, grad_accum, warmup_steps, save_steps,
    eval_steps, resume, seed, ...) and DataFormat fields (prompt_field, completion_field, text_field,
    messages_field, prompt_template, completion_template, max_length, train_on_prompt, strict).
    Returns the output folder and the final metrics."""
    from peft import LoraConfig, get_peft_model

    groups = _split_options(options, {"train": _TRAIN_FIELDS, "data": _DATA_FIELDS})
    args = TrainingArgs(output_dir=output_dir, **groups["train"])
    fmt = DataFormat(**groups["data"])
    if rank < 1:
        raise ValueError(f"rank: must be at least 1, got {rank}")
    if not 0 <= dropout < 1:
        raise ValueError(f"dropout: must be in [0, 1), got {dropout}")
    dist = Distributed()
    try:
        tok = load_tokenizer(tokenizer if tokenizer is not None else base_model_id(base))
        train, evaluation = _prepare_data(data, eval_data, data_weights, tok, fmt, None, dist, log)
        torch.manual_seed(args.seed)
        model = load_base(base, dtype=dtype, quantization=quantization, trust_remote_code=trust_remote_code)
        targets = target_modules or "all-linear"
        if isinstance(targets, str) and targets != "all-linear":
            targets = [t.strip() for t in targets.split(",") if t.strip()]
        lora = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
                          task_type="CAUSAL_LM")
        try:
            peft_model = get_peft_model(model, lora)
        except ValueError as e:
            raise ValueError(f"target_modules {targets}: {e}") from e
        peft_model.to(dist.device(args.device))
        task = _ExpertTask(peft_model)
        task.model_device = dist.device(args.device)
        record = {"verb": "train-expert", "base": base if isinstance(base, str) else type(base).__name__,
                  "data": _as_list(data), "data_weights": data_weights, "eval_data": _as_list(eval_data),
                  "rank": rank, "alpha": alpha, "dropout": dropout, "target_modules": targets,
                  "training": dataclasses.asdict(args), "format": dataclasses.asdict(fmt), "world_size": dist.world}
        signature = {"data": _as_list(data), "rank": rank, "alpha": alpha, "target_modules": targets}
        return _train_and_save(task, train, evaluation, args, tok, dist, record, signature, log)
    finally:
        dist.close()


def train_base(model: nn.Module, tokenizer, data: str | list[str], output_dir: str, *,
               eval_data: str | list[str] | None = None, log: Callable[[str], None] = print,
               **options) -> TrainResult:
    """Train every weight of a causal LM (e.g. a small one built from a config) on data; save it and the tokenizer.

    `options` are TrainingArgs and DataFormat fields, as in `train_expert`."""
    groups = _split_options(options, {"train": _TRAIN_FIELDS, "data": _DATA_FIELDS})
    args = TrainingArgs(output_dir=output_dir, **groups["train"])
    fmt = DataFormat(**groups["data"])
    dist = Distributed()
    try:
        train, evaluation = _prepare_data(data, eval_data, None, tokenizer, fmt, None, dist, log)
        task = _LanguageModelTask(model.to(dist.device(args.device)))
        task.model_device = dist.device(args.device)
        record = {"verb": "train-base", "data": _as_list(data), "training": dataclasses.asdict(args),
                  "format": dataclasses.asdict(fmt), "world_size": dist.world}
        return _train_and_save(task, train, evaluation, args, tokenizer, dist, record, {"data": _as_list(data)}, log)
    finally:
        dist.close()


def train_xlora(base: str | nn.Module, adapters: dict[str, str], data: str | list[str], output_dir: str, *,
                eval_data: str | list[str] | None = None, data_weights: list[float] | None = None,
                tokenizer=None, dtype: torch.dtype | None = None, quantization: Any = None,
                 trust_remote_code: bool = False,
                log: Callable[[str], None] = print, **options) -> TrainResult:
    """Train the X-LoRA gate (and the experts with use_trainable_adapters) on a data mixture.

    `options` are XLoraConfig fields (xlora_depth, xlora_size, layerwise_scalings, top_k_lora,
    softmax_temperature, use_trainable_adapters, ...), RoutingLosses fields (balance_weight, entropy_weight,
    routing_weight; routing needs expert_field), TrainingArgs and DataFormat fields as in `train_expert`.
    The final model is saved to `output_dir` in the engine's layout (XLoraModel.from_pretrained(output_dir))."""
    from ..model import XLoraModel

    groups = _split_options(options, {"train": _TRAIN_FIELDS, "data": _DATA_FIELDS, "xlora": _XLORA_FIELDS,
                                      "routing": _ROUTING_FIELDS})
    groups["train"].setdefault("lr", 1e-3)
    args = TrainingArgs(output_dir=output_dir, **groups["train"])
    fmt = DataFormat(**groups["data"])
    routing = RoutingLosses(**groups["routing"])
    if routing.routing_weight and not fmt.expert_field:
        raise ValueError("routing_weight: the supervised routing loss needs expert_field (rows naming an expert)")
    config = XLoraConfig(adapters=dict(adapters), **groups["xlora"])
    dist = Distributed()
    try:
        tok = load_tokenizer(tokenizer if tokenizer is not None else base_model_id(base))
        train, evaluation = _prepare_data(data, eval_data, data_weights, tok, fmt, config.expert_names, dist, log)
        torch.manual_seed(args.seed)
        device = dist.device(args.device)
        base_model = load_base(base, dtype=dtype, quantization=quantization, trust_remote_code=trust_remote_code)
        model = XLoraModel.from_base(base_model, config, device=device)
        if isinstance(base, str):
            model.base_model_id = base
        task = _GateTask(model, routing)
        task.model_device = device
        trainable, total = model.get_nb_trainable_parameters()
        if dist.main:
            log(f"X-LoRA: {model.n_experts} experts on {model.n_lora_layers} LoRA layers; training {trainable:,} "
                f"of {total:,} parameters on {len(train.examples)} examples x {dist.world} process(es)")
        record = {"verb": "train", "base": base if isinstance(base, str) else type(base).__name__,
                  "adapters": dict(adapters), "data": _as_list(data), "data_weights": data_weights,
                  "eval_data": _as_list(eval_data), "xlora": config.to_dict(), "routing": dataclasses.asdict(routing),
                  "training": dataclasses.asdict(args), "format": dataclasses.asdict(fmt), "world_size": dist.world}
        signature = {"data": _as_list(data), "experts": config.expert_names}
        return _train_and_save(task, train, evaluation, args, tok, dist, record, signature, log)
    finally:
        dist.close()


def _pad_id(tokenizer) -> int:
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if token_id is not None:
            return token_id
    return 0


__all__ = ["TrainingArgs", "TrainResult", "RoutingLosses", "train_base", "train_expert", "train_xlora", "evaluate",
           "latest_checkpoint", "save_checkpoint", "DataError"]
