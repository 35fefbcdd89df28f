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
with one all-reduce per step (training/distributed.py). Memory: `gradient_checkpointing` recomputes the base's blocks in
backward; `mixed_precision` runs the forward under autocast with float32 trainable tensors (MixedPrecision).

The entry points take typed settings, each checked where it was built: `XLoraConfig` (the method),
`TrainingArgs` and `LoraSettings` (training/settings.py), `DataFormat` and `DataSource` (training/data.py),
`RoutingLosses` (losses.py). The base model is loaded once.
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
from typing import Any, Callable, Sequence

import torch
from torch import nn

from ..backbone.compat import enable_activation_checkpointing
from ..cards import TrainingRecord, expert_card, write_card
from ..config import XLoraConfig
from ..files import append_jsonl, atomic_write_text, move_into, write_jsonl
from ..loading import base_model_id, load_base, load_tokenizer
from ..losses import RoutingLosses, causal_lm_loss, routing_losses
from .checkpoints import (
    FINAL_PREFIX,
    clear_stale_temporaries,
    naming_write_errors,
    prune_checkpoints,
    restore_replaced_checkpoints,
    resume_from,
    save_checkpoint,
    save_sharded_checkpoint,
    truncate_metrics,
)
from .data import BatchPlan, DataError, DataFormat, Dataset, DataSource, collate, data_sources, load_dataset
from .distributed import Distributed
from .fsdp import clip_grad_norm, full_parameters, is_sharded, local_bytes, saved_by_task, shard_model
from .routing_health import RoutingHealth, RoutingTally
from .run_logging import RunLog, check_trackers, console_lines
from .settings import EXPERT_LR, GATE_LR, LoraSettings, TrainingArgs

METRICS_NAME = "metrics.jsonl"
# the files a run writes atomically in its output folder (a killed write leaves `.<name>.XXXXXXXX`)
_RUN_FILES = ("training_args.json", METRICS_NAME, "skipped_rows.jsonl", "final_metrics.jsonl")


@dataclass
class TrainResult:
    """What a training entry point returns: the folder it wrote and the run's final metrics."""

    output_dir: str
    metrics: dict[str, Any] = field(default_factory=dict)


# ---- what is trained: an expert or the gate -------------------------------------------------------------------
class _Task:
    """The model being trained, with how to compute its loss and how to save it."""

    model: nn.Module
    model_device: torch.device
    data: tuple[tuple[str, ...], tuple[str, ...]] = ((), ())  # training and held-out data, named in model cards

    def trainable(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    def loss(self, batch: dict[str, torch.Tensor], n_tokens: int, n_micro: int) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    def save(self, folder: str, metrics: dict[str, Any] | None = None) -> None:
        """Save the model to `folder` (with its model card; `metrics`: the run's final metrics, for its eval
        table; None at an intermediate checkpoint)."""
        raise NotImplementedError

    def training_record(self, metrics: dict[str, Any] | None) -> TrainingRecord:
        """What the model card says about this run: its data and, at the end, its final metrics."""
        return TrainingRecord(data=self.data[0], eval_data=self.data[1], metrics=dict(metrics or {}))

    def enable_gradient_checkpointing(self) -> None:
        """The base model's own checkpointing: its blocks are recomputed in backward (non-reentrant, so the
        inputs need not require grad)."""
        enable_activation_checkpointing(self.model, use_reentrant=False)


class _ExpertTask(_Task):
    name = "expert"  # the expert's name in its model card (the output folder's)

    def __init__(self, peft_model: nn.Module) -> None:
        self.model = peft_model

    def enable_gradient_checkpointing(self) -> None:
        enable_activation_checkpointing(self.model.get_base_model(), use_reentrant=False)

    def loss(self, batch, n_tokens, n_micro):
        logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        ce = causal_lm_loss(logits, batch["labels"], reduction="sum")
        return ce / n_tokens, {"ce_sum": ce.detach()}

    def save(self, folder, metrics=None):
        self.model.save_pretrained(folder)
        config = getattr(self.model, "peft_config", {}).get("default")
        if config is not None:  # PEFT's own card names neither the base nor the data: ours replaces it
            write_card(folder, expert_card(base_model_id=config.base_model_name_or_path,
                                           adapter_config=config.to_dict(), name=self.name,
                                           training=self.training_record(metrics)))


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
        loss, stats = ce / n_tokens, {"ce_sum": ce.detach(), "scalings": out.scalings.detach()}
        if self.routing.any:
            aux = routing_losses(out.scalings, batch["attention_mask"], batch["expert"],
                                 self.model.config.enable_softmax)
            for name, weight in (("balance", self.routing.balance_weight), ("entropy", self.routing.entropy_weight),
                                 ("routing", self.routing.routing_weight_at(self.step))):
                if weight and name in aux:
                    loss = loss + weight * aux[name] / n_micro
                    stats[f"{name}_loss"] = aux[name].detach() / n_micro
        return loss, stats

    def save(self, folder, metrics=None):
        self.model.save_pretrained(folder, training=self.training_record(metrics))

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


@dataclass
class _StepStats:
    """What one optimizer step measured."""

    loss: float  # token-mean cross-entropy over the step's global batch
    lr: float
    grad_norm: float | None  # the global gradient norm before clipping; None when clipping is off
    tokens: int  # input tokens of the global batch
    seconds: float
    extra: dict[str, float]  # the gate's extra terms, summed over this process's micro-batches


class _Window:
    """The steps since the last metrics line: their mean loss and throughput."""

    def __init__(self) -> None:
        self.loss, self.tokens, self.seconds, self.steps = 0.0, 0, 0.0, 0

    def add(self, stats: _StepStats) -> None:
        self.loss += stats.loss
        self.tokens += stats.tokens
        self.seconds += stats.seconds
        self.steps += 1


class _Loop:
    """One run's fixed parts (the batch plan, the optimizer, the precision, the output folder) and its steps."""

    routing: RoutingTally | None = None  # the gate's routing since the last metrics line

    def __init__(self, task: _Task, train: Dataset, args: TrainingArgs, output_dir: str, pad_id: int,
                 signature: dict[str, Any], dist: Distributed) -> None:
        if args.lr is None:
            raise ValueError("lr: run_training needs a learning rate (the entry points set their verb's default)")
        self.task, self.train, self.args, self.pad_id, self.dist = task, train, args, pad_id, dist
        self.out = os.path.abspath(output_dir)
        self.metrics_path = os.path.join(self.out, METRICS_NAME)
        self.micro_per_step = args.grad_accum * dist.world
        self.plan = BatchPlan(train, args.batch_size, args.seed)
        self.label_counts = [sum(1 for x in e.labels if x != -100) for e in train.examples]
        self.total_steps = args.max_steps or max(1, math.ceil((args.epochs or 1.0) * self.plan.batches_per_epoch
                                                              / self.micro_per_step))
        self.signature = {**signature, "batch_size": args.batch_size, "micro_batches_per_step": self.micro_per_step,
                          "seed": args.seed, "total_steps": self.total_steps,
                          "mixed_precision": args.mixed_precision}
        self.params = task.trainable()
        if not self.params:
            raise ValueError("nothing to train: the model has no trainable parameters")
        self.precision = MixedPrecision(args.mixed_precision, task.model_device)
        self.precision.keep_float32(self.params.values())
        if args.gradient_checkpointing:
            task.enable_gradient_checkpointing()
        self.sharded = dist.shards(args.fsdp)
        self.parameter_bytes = [local_bytes(task.model)]  # per process: the whole model, or each one's shards
        if self.sharded:  # FSDP (training/fsdp.py): the Parameters become shards, gradients are reduce-scattered
            shard_model(task.model, dist.mesh(task.model_device), bf16=args.mixed_precision == "bf16")
            self.params = task.trainable()
            self.parameter_bytes = dist.gather_ints(local_bytes(task.model))
        decay = [p for p in self.params.values() if p.ndim >= 2]
        no_decay = [p for p in self.params.values() if p.ndim < 2]
        self.optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                            {"params": no_decay, "weight_decay": 0.0}], lr=args.lr)

    def start(self, log: Callable[[str], None]) -> int:
        """The step to start from (0, or the newest intact checkpoint's with `resume`, a damaged newer one
        named and passed over); readies the output folder (what a killed save left is removed and named) and the
        metrics log (cut back to that step), and writes the skipped rows."""
        dist, out = self.dist, self.out
        if dist.main:
            os.makedirs(out, exist_ok=True)
            for path in restore_replaced_checkpoints(out):
                log(f"put back {path} (a run was killed while replacing it)")
            removed = clear_stale_temporaries(out, _RUN_FILES)
            if removed:
                log(f"removed what a killed save left in {out}: {', '.join(map(os.path.basename, removed))}")
        dist.barrier()
        step = 0
        if self.args.resume:
            resumed = resume_from(out, self.task, self.optimizer, self.signature, self.precision.scaler,
                                  log=log if dist.main else _silent)
            if resumed is not None:
                found, step = resumed
                if dist.main:
                    truncate_metrics(self.metrics_path, step, warn=log)
                    log(f"resuming from {found} (step {step} of {self.total_steps})")
            elif dist.main:
                truncate_metrics(self.metrics_path, 0, warn=log)  # the log starts again with the run
                log(f"--resume: no checkpoint in {out}; starting from the beginning")
        elif dist.main and os.path.exists(self.metrics_path):
            os.remove(self.metrics_path)  # a fresh run starts a fresh log
        if dist.main and self.train.bad_rows:
            write_jsonl(os.path.join(out, "skipped_rows.jsonl"), [dataclasses.asdict(b) for b in self.train.bad_rows])
        return step

    def optimizer_step(self, step: int) -> _StepStats:
        """Optimizer step `step` (0-based): its micro-batches forward and backward, the gradients summed over the
        processes, clipped, and applied."""
        started = time.perf_counter()
        lr = self.args.lr * _lr_factor(step, self.total_steps, self.args)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        first = step * self.micro_per_step
        batches = [self.plan.micro_batch(k) for k in range(first, first + self.micro_per_step)]
        n_tokens = max(1, sum(self.label_counts[i] for b in batches for i in b))
        n_input_tokens = sum(len(self.train.examples[i]) for b in batches for i in b)
        ce_sum, extra = self._backward(step, first, batches, n_tokens)
        ce_sum = self._sum_gradients(ce_sum)
        grad_norm = None
        self.precision.unscale_(self.optimizer)
        if self.args.max_grad_norm:
            grad_norm = clip_grad_norm(list(self.params.values()), self.args.max_grad_norm)
        self.precision.step(self.optimizer)
        self.optimizer.zero_grad(set_to_none=True)
        return _StepStats(float(ce_sum) / n_tokens, lr, grad_norm, n_input_tokens, time.perf_counter() - started,
                          extra)

    def _backward(self, step: int, first: int, batches: list[list[int]],
                  n_tokens: int) -> tuple[torch.Tensor, dict[str, float]]:
        """Forward and backward of this process's micro-batches of the step (every world-th, from its rank);
        returns their summed cross-entropy (float64, CPU) and extra terms."""
        ce_sum = torch.zeros((), dtype=torch.float64)
        extra: dict[str, float] = {}
        for k in range(self.dist.rank, self.micro_per_step, self.dist.world):
            if self.sharded:  # FSDP: accumulate whole gradients locally, reduce-scatter once, after the last one
                self.task.model.set_requires_gradient_sync(k + self.dist.world >= self.micro_per_step)
            torch.manual_seed(self.args.seed * 1_000_003 + first + k)  # dropout depends on the position only
            self.task.step = step  # (used by the gate's annealed routing weight)
            batch = {key: v.to(self.task.model_device) for key, v in
                     collate([self.train.examples[i] for i in batches[k]], self.pad_id).items()}
            with self.precision.autocast():
                loss, stats = self.task.loss(batch, n_tokens, self.micro_per_step)
            self.precision.backward(loss)
            ce_sum += stats.pop("ce_sum").double().cpu()
            scalings = stats.pop("scalings", None)
            if scalings is not None:  # the gate: its routing health over the logging window
                self.routing = self.routing or RoutingTally()
                self.routing.add(scalings, batch["attention_mask"], self.task.model.config.enable_softmax)
            for key, value in stats.items():
                extra[key] = extra.get(key, 0.0) + float(value)
        return ce_sum, extra

    def _sum_gradients(self, ce_sum: torch.Tensor) -> torch.Tensor:
        """Sum the trainable gradients (one all-reduce of them all) and the cross-entropy over the processes."""
        if self.dist.world == 1:
            return ce_sum
        if self.sharded:  # FSDP has reduce-scattered (summed) the gradients in backward
            return self.dist.sum_(ce_sum.to(self.task.model_device)).cpu()
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params.values()]
        flat = self.dist.sum_(torch.cat([g.reshape(-1).float() for g in grads]))
        offset = 0
        for p, g in zip(self.params.values(), grads):
            p.grad = flat[offset:offset + g.numel()].view_as(p).to(p.dtype)
            offset += g.numel()
        return self.dist.sum_(ce_sum.to(self.task.model_device)).cpu()

    def metrics(self, step: int, window: _Window, stats: _StepStats,
                health: RoutingHealth | None = None) -> dict[str, Any]:
        """The metrics line after `step`: the window's means, the last step's lr, gradient norm and terms, and the
        gate's routing (`routing_health`)."""
        record = {"step": step, "epoch": round(step * self.micro_per_step / self.plan.batches_per_epoch, 4),
                  "loss": window.loss / window.steps, "lr": stats.lr,
                  "tokens_per_s": window.tokens / window.seconds, "grad_norm": stats.grad_norm, **stats.extra}
        if health is not None:
            record["routing"] = health.record()
        if self.dist.main:
            append_jsonl(self.metrics_path, record)
        return record

    def routing_health(self) -> RoutingHealth | None:
        """The gate's routing over the attended tokens of every process since the last call (None when an expert
        trains); every process must call it (a collective sum)."""
        if self.routing is None:
            return None
        tally, self.routing = self.routing, None
        return tally.health(self.task.model.lora_layer_names, self.task.model.expert_names, self.dist.sum_)

    def evaluation(self, step: int, data: Dataset) -> dict[str, Any]:
        """The eval loss and perplexity after `step`, logged; the model goes back to training mode."""
        record = {"step": step, **evaluate(self.task, data, self.args.batch_size, self.pad_id, self.dist,
                                           self.precision)}
        self.task.model.train()
        if self.dist.main:
            append_jsonl(self.metrics_path, record)
        return record

    def checkpoint(self, step: int, tokenizer) -> None:
        """checkpoint-<step>, written by the main process (sharded: by every process, training/checkpoints.py);
        the oldest beyond save_total_limit removed."""
        if self.sharded:
            save_sharded_checkpoint(self.out, step, self.task, self.optimizer, self.signature, self.dist, tokenizer)
        elif self.dist.main:
            save_checkpoint(self.out, step, self.task, self.optimizer, self.signature, tokenizer,
                            self.precision.scaler)
        if self.dist.main:
            prune_checkpoints(self.out, self.args.save_total_limit, newest=step)
        self.dist.barrier()


def run_training(task: _Task, train: Dataset, args: TrainingArgs, output_dir: str, pad_id: int,
                 signature: dict[str, Any], eval_data: Dataset | None = None, tokenizer=None,
                 dist: Distributed | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train `task` on `train` (`args.lr` resolved, not None); returns the final metrics. Checkpoints, the
    metrics log and the skipped rows go to `output_dir`; `signature` (JSON values) must match on resume."""
    from tqdm.auto import tqdm

    dist = dist or Distributed()
    loop = _Loop(task, train, args, output_dir, pad_id, signature, dist)
    step = loop.start(log)
    if loop.sharded and dist.main:
        log(f"FSDP over {dist.world} processes: parameters {max(loop.parameter_bytes) / 2**20:.1f} MiB per process "
            f"(of {sum(loop.parameter_bytes) / 2**20:.1f} MiB)")
    # the trackers and the console line (training/run_logging.py), on the main process only
    report = RunLog(args.report_to if dist.main else (), loop.out, total_steps=loop.total_steps, start_step=step,
                    config={**loop.signature, "training": dataclasses.asdict(args)},
                    console=dist.main and console_lines(args.progress), log=log if dist.main else _silent)
    bar = tqdm(total=loop.total_steps, initial=step, disable=not (dist.main and args.progress), unit="step",
               dynamic_ncols=True)
    task.model.train()
    window, last = _Window(), {}
    run_start = time.perf_counter()
    try:
        while step < loop.total_steps:
            stats = loop.optimizer_step(step)
            step += 1
            window.add(stats)
            bar.set_postfix(loss=f"{stats.loss:.4f}", lr=f"{stats.lr:.2e}",
                            tok_s=f"{stats.tokens / stats.seconds:.0f}", refresh=False)
            bar.update(1)
            if step % args.logging_steps == 0 or step == loop.total_steps:
                health = loop.routing_health()
                record = loop.metrics(step, window, stats, health)
                last.update(record)
                report.train(record, health)
                window = _Window()
            if eval_data is not None and args.eval_steps and (step % args.eval_steps == 0
                                                              or step == loop.total_steps):
                record = loop.evaluation(step, eval_data)
                last.update(record)
                report.evaluation(record)
                if dist.main:
                    bar.write(f"step {step}: eval loss {record['eval_loss']:.4f}, perplexity "
                              f"{record['eval_perplexity']:.2f}")
            if args.save_steps and step % args.save_steps == 0 and step < loop.total_steps:
                loop.checkpoint(step, tokenizer)
        bar.close()
        task.model.eval()
        if eval_data is not None and "eval_loss" not in last:
            last.update(evaluate(task, eval_data, args.batch_size, pad_id, dist, loop.precision))
            report.evaluation({"step": step, "eval_loss": last["eval_loss"],
                               "eval_perplexity": last["eval_perplexity"]})
    finally:
        report.close()
    last.update({"steps": step, "seconds": time.perf_counter() - run_start, "skipped_rows": len(train.bad_rows),
                 "examples": len(train.examples), "parameter_bytes_per_process": loop.parameter_bytes})
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
    own = batches[dist.rank::dist.world]
    # sharded, every process must run as many forwards (each gathers weights): a repeated batch, not counted
    repeats = (-(-len(batches) // dist.world) - len(own)) if is_sharded(task.model) else 0
    for n, b in enumerate(own + batches[:1] * repeats):
        batch = {k: v.to(task.model_device) for k, v in collate([data.examples[i] for i in b], pad_id).items()}
        with precision.autocast():
            _, stats = task.loss(batch, 1, 1)
        if n >= len(own):
            continue
        totals += torch.tensor([float(stats["ce_sum"]), float((batch["labels"][:, 1:] != -100).sum())],
                               dtype=torch.float64)
    if dist.world > 1:
        totals = dist.sum_(totals.to(task.model_device)).cpu()
    loss = float(totals[0] / totals[1].clamp_min(1))
    return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 700.0))}


# ---- public entry points ----------------------------------------------------------------------------------------
DataArg = str | os.PathLike | DataSource | Sequence[str | os.PathLike | DataSource]  # one or a list


def _given(value: Any, kind: type, name: str) -> Any:
    """`value` when it is a `kind`, a default `kind()` for None; TypeError naming the parameter otherwise."""
    if value is None:
        return kind()
    if not isinstance(value, kind):
        raise TypeError(f"{name}: expected a {kind.__name__}, got {type(value).__name__}")
    return value


def _run_args(args: TrainingArgs | None, default_lr: float) -> TrainingArgs:
    """`args` with the verb's own learning rate where it leaves `lr` unset."""
    args = _given(args, TrainingArgs, "args")
    check_trackers(args.report_to)  # a missing tracker package stops the run before anything loads
    return args if args.lr is not None else dataclasses.replace(args, lr=default_lr)


def _eval_sources(eval_data: DataArg | None) -> tuple[DataSource, ...]:
    """The held-out sources (none for None or an empty list); every row counts once, so no weights."""
    if eval_data is None or (not isinstance(eval_data, (str, os.PathLike, DataSource)) and len(eval_data) == 0):
        return ()
    sources = data_sources(eval_data)
    if sources[0].weight is not None:
        raise DataError("eval_data: weights apply to training data only (every held-out row counts once)")
    return sources


def _prepare_data(data: tuple[DataSource, ...], eval_data: tuple[DataSource, ...], tokenizer, fmt: DataFormat,
                  expert_names: list[str] | None, dist: Distributed, log) -> tuple[Dataset, Dataset | None]:
    quiet = log if dist.main else (lambda *_: None)
    train = load_dataset(data, tokenizer, fmt, expert_names=expert_names, log=quiet)
    evaluation = load_dataset(eval_data, tokenizer, fmt, expert_names=expert_names, log=quiet) if eval_data else None
    return train, evaluation


def _data_record(data: tuple[DataSource, ...], eval_data: tuple[DataSource, ...]) -> dict[str, Any]:
    """The sources as training_args.json lists them."""
    weights = None if data[0].weight is None else [s.weight for s in data]
    formats = {s.label: dataclasses.asdict(s.format) for s in (*data, *eval_data) if s.format is not None}
    return {"data": [s.label for s in data], "data_weights": weights, "eval_data": [s.label for s in eval_data],
            **({"source_formats": formats} if formats else {})}


def _save_final(task: _Task, tokenizer, out: str, metrics: dict[str, Any]) -> None:
    """The final model and tokenizer, written aside first and each file renamed into `out`."""
    tmp = tempfile.mkdtemp(prefix=FINAL_PREFIX, dir=out)
    try:
        with naming_write_errors(tmp, out, "; the final model was not saved (the checkpoints are kept)"):
            task.save(tmp, metrics)
            tokenizer.save_pretrained(tmp)
        move_into(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _train_and_save(task: _Task, train: Dataset, evaluation: Dataset | None, args: TrainingArgs, output_dir: str,
                    tokenizer, dist: Distributed, record: dict, signature: dict, log) -> TrainResult:
    """What every entry point does once its task and data are ready: record the run's settings, train, and move
    the final model and tokenizer into the output folder (written aside first, each file renamed in)."""
    out = os.path.abspath(output_dir)
    if dist.main:
        os.makedirs(out, exist_ok=True)
        record = {**record, "output_dir": out, "training": dataclasses.asdict(args), "world_size": dist.world}
        atomic_write_text(os.path.join(out, "training_args.json"), json.dumps(record, indent=2, default=str))
    metrics = run_training(task, train, args, out, _pad_id(tokenizer), signature, evaluation, tokenizer, dist, log)
    # sharded: the trained and expert weights gathered whole on every process (collective), written by the main one
    with full_parameters(task.model, saved_by_task) if is_sharded(task.model) else contextlib.nullcontext():
        if dist.main:
            _save_final(task, tokenizer, out, metrics)
    if dist.main:
        write_jsonl(os.path.join(out, "final_metrics.jsonl"), [metrics])
        log(f"saved to {out}: loss {metrics.get('loss', float('nan')):.4f}"
            + (f", eval loss {metrics['eval_loss']:.4f}" if "eval_loss" in metrics else "")
            + f" ({metrics['steps']} steps, {metrics['seconds']:.1f}s)")
    dist.barrier()
    return TrainResult(out, metrics)


def train_expert(base: str | nn.Module, data: DataArg, output_dir: str, *, lora: LoraSettings | None = None,
                 args: TrainingArgs | None = None, data_format: DataFormat | None = None,
                 eval_data: DataArg | None = None, tokenizer=None, dtype: torch.dtype | None = None,
                 quantization: Any = None, trust_remote_code: bool = False,
                 log: Callable[[str], None] = print) -> TrainResult:
    """Train one LoRA expert with PEFT and save it as a standard PEFT adapter folder in `output_dir`.

    `lora`: the adapter (LoraSettings()); `args`: the loop (TrainingArgs(), lr EXPERT_LR when unset);
    `data_format`: how rows become text (DataFormat()); `data` / `eval_data`: paths or DataSources. `base` is a
    folder, a hub id or a loaded model (`dtype`, `quantization`, `trust_remote_code` apply to loading it by name).
    Returns the output folder and the final metrics."""
    from peft import LoraConfig, get_peft_model

    lora = _given(lora, LoraSettings, "lora")
    args = _run_args(args, EXPERT_LR)
    fmt = _given(data_format, DataFormat, "data_format")
    train_sources, eval_sources = data_sources(data), _eval_sources(eval_data)
    dist = Distributed()
    try:
        tok = load_tokenizer(tokenizer if tokenizer is not None else base_model_id(base))
        train, evaluation = _prepare_data(train_sources, eval_sources, tok, fmt, None, dist, log)
        torch.manual_seed(args.seed)
        _check_fsdp(args, dist, quantization)
        model = load_base(base, dtype=dtype, quantization=quantization, trust_remote_code=trust_remote_code)
        targets = lora.peft_target_modules
        peft_config = LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                 target_modules=targets, task_type="CAUSAL_LM")
        try:
            peft_model = get_peft_model(model, peft_config)
        except ValueError as e:
            raise ValueError(f"target_modules {targets}: {e}") from e
        peft_config.base_model_name_or_path = base_model_id(base)  # a local base by its absolute path
        # sharded (FSDP), the base stays where it was read: each process moves only its shards to the device
        task = _ExpertTask(peft_model if dist.shards(args.fsdp) else peft_model.to(dist.device(args.device)))
        task.model_device = dist.device(args.device)
        task.name = os.path.basename(os.path.abspath(output_dir))
        task.data = (tuple(s.path for s in train_sources), tuple(s.path for s in eval_sources))
        record = {"verb": "train-expert", "base": base if isinstance(base, str) else type(base).__name__,
                  **_data_record(train_sources, eval_sources), "lora": dataclasses.asdict(lora),
                  "format": dataclasses.asdict(fmt)}
        signature = {"data": [s.path for s in train_sources], "rank": lora.rank, "alpha": lora.alpha,
                     "target_modules": targets}
        return _train_and_save(task, train, evaluation, args, output_dir, tok, dist, record, signature, log)
    finally:
        dist.close()


def train_base(model: nn.Module, tokenizer, data: DataArg, output_dir: str, *, args: TrainingArgs | None = None,
               data_format: DataFormat | None = None, eval_data: DataArg | None = None,
               log: Callable[[str], None] = print) -> TrainResult:
    """Train every weight of a causal LM (e.g. a small one built from a config) on data; save it and the tokenizer.

    `args`, `data_format`, `data` and `eval_data` as in `train_expert` (lr EXPERT_LR when unset)."""
    args = _run_args(args, EXPERT_LR)
    fmt = _given(data_format, DataFormat, "data_format")
    train_sources, eval_sources = data_sources(data), _eval_sources(eval_data)
    dist = Distributed()
    try:
        train, evaluation = _prepare_data(train_sources, eval_sources, tokenizer, fmt, None, dist, log)
        task = _LanguageModelTask(model.to(dist.device(args.device)))
        task.model_device = dist.device(args.device)
        record = {"verb": "train-base", **_data_record(train_sources, eval_sources),
                  "format": dataclasses.asdict(fmt)}
        signature = {"data": [s.path for s in train_sources]}
        return _train_and_save(task, train, evaluation, args, output_dir, tokenizer, dist, record, signature, log)
    finally:
        dist.close()


def train_xlora(base: str | nn.Module, config: XLoraConfig, data: DataArg, output_dir: str, *,
                args: TrainingArgs | None = None, data_format: DataFormat | None = None,
                routing: RoutingLosses | None = None, eval_data: DataArg | None = None, tokenizer=None,
                dtype: torch.dtype | None = None, quantization: Any = None, trust_remote_code: bool = False,
                log: Callable[[str], None] = print) -> TrainResult:
    """Train the X-LoRA gate (and the experts with `config.use_trainable_adapters`) on a data mixture.

    `config`: the experts (`adapters`, name -> PEFT folder) and the gate; `args`: the loop (TrainingArgs(), lr
    GATE_LR when unset); `data_format`: how rows become text, and `expert_field` for the routing loss;
    `routing`: the gate's extra terms (RoutingLosses(), none); `data` / `eval_data`, `base` and its loading
    options as in `train_expert`. The base is loaded once, by `XLoraModel.from_base`. The final model is saved
    to `output_dir` in the engine's layout (XLoraModel.from_pretrained(output_dir))."""
    from ..model import XLoraModel

    if not isinstance(config, XLoraConfig):
        raise TypeError(f"config: expected an XLoraConfig (the experts and the gate), got {type(config).__name__}")
    args = _run_args(args, GATE_LR)
    fmt = _given(data_format, DataFormat, "data_format")
    routing = _given(routing, RoutingLosses, "routing")
    train_sources, eval_sources = data_sources(data), _eval_sources(eval_data)
    if routing.routing_weight and not any(s.format_or(fmt).expert_field for s in train_sources):
        raise ValueError("routing_weight: the supervised routing loss needs expert_field (rows naming an expert)")
    dist = Distributed()
    try:
        tok = load_tokenizer(tokenizer if tokenizer is not None else base_model_id(base))
        train, evaluation = _prepare_data(train_sources, eval_sources, tok, fmt, config.expert_names, dist, log)
        torch.manual_seed(args.seed)
        device = dist.device(args.device)
        _check_fsdp(args, dist, quantization)
        model = XLoraModel.from_base(base, config, dtype=dtype, quantization=quantization,
                                     device="cpu" if dist.shards(args.fsdp) else device,  # FSDP moves the shards
                                     trust_remote_code=trust_remote_code)
        task = _GateTask(model, routing)
        task.model_device = device
        task.data = (tuple(s.path for s in train_sources), tuple(s.path for s in eval_sources))
        trainable, total = model.get_nb_trainable_parameters()
        if dist.main:
            log(f"X-LoRA: {model.n_experts} experts on {model.n_lora_layers} LoRA layers; training {trainable:,} "
                f"of {total:,} parameters on {len(train.examples)} examples x {dist.world} process(es)")
        record = {"verb": "train", "base": base if isinstance(base, str) else type(base).__name__,
                  **_data_record(train_sources, eval_sources), "xlora": config.to_dict(),
                  "routing": dataclasses.asdict(routing), "format": dataclasses.asdict(fmt)}
        signature = {"data": [s.path for s in train_sources], "experts": config.expert_names}
        return _train_and_save(task, train, evaluation, args, output_dir, tok, dist, record, signature, log)
    finally:
        dist.close()


def _check_fsdp(args: TrainingArgs, dist: Distributed, quantization: Any) -> None:
    """Refuse what FSDP does not shard, before the base is loaded."""
    if dist.shards(args.fsdp) and args.mixed_precision == "fp16":  # --fsdp or accelerate's FSDP config
        raise NotImplementedError("--fsdp with --fp16: loss scaling over sharded gradients is not implemented; "
                                  "use --bf16")
    if dist.shards(args.fsdp) and quantization is not None:
        raise NotImplementedError("--fsdp with a 4-bit or 8-bit base: bitsandbytes weights are not sharded by "
                                  "FSDP here; load the base in bfloat16 (--dtype bfloat16) to shard it")


def _silent(*_: Any) -> None:
    pass


def _pad_id(tokenizer) -> int:
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if token_id is not None:
            return token_id
    return 0


__all__ = ["TrainResult", "train_base", "train_expert", "train_xlora", "run_training", "evaluate", "MixedPrecision",
           "METRICS_NAME"]
