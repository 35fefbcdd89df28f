"""Where a training run reports its metrics besides metrics.jsonl: TensorBoard, Weights & Biases, the console.

`TrainingArgs.report_to` (`--report-to`) names the trackers, each through its own library, an optional extra:

* "tensorboard": `torch.utils.tensorboard.SummaryWriter`, event files in OUTPUT/runs/ (`tensorboard --logdir
  OUTPUT/runs`). A fresh run removes the event files of an earlier run there; a resumed run appends a new file
  whose first event purges the old files' steps after the checkpoint, so the curves show one run.
* "wandb": `wandb.init` (project $WANDB_PROJECT or "loramix", run name $WANDB_NAME or the output folder's name,
  files under $WANDB_DIR or OUTPUT/wandb/); WANDB_MODE=offline writes the run without a network (`wandb sync`
  uploads it later). A run already started in the process (`wandb.init` by the caller) is logged to and left open.

Every `logging_steps` the loop hands `RunLog.train` its metrics line and, for the gate, its routing health
(training/routing_health.py); both trackers get the same values at the same optimizer step:

    train/loss, train/lr, train/grad_norm, train/tokens_per_s, train/epoch, train/<gate term>_loss
    eval/loss, eval/perplexity                                          (every eval_steps, and at the end)
    routing/entropy, routing/entropy/<layer>, routing/share/<expert>, routing/top1/<expert>

Without a progress bar (`--no-progress`), or with stderr not a terminal (output to a file), the same line is
printed every `logging_steps` ("step 20/100: loss 2.3012, lr 9.00e-04, grad norm 0.412, 5310 tok/s, routing
entropy ..."). Routing alarms are printed when they start to hold.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import sys
from typing import Any, Callable, Sequence

from .routing_health import RoutingHealth, RoutingWatch

TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb"}  # report_to name -> the package it needs
RUNS_DIR = "runs"  # TensorBoard's event files, under the output folder


def check_trackers(report_to: Sequence[str]) -> None:
    """ImportError naming the extra to install when a tracker's package is missing (cheap: nothing is imported)."""
    for name in report_to:
        if importlib.util.find_spec(TRACKERS[name]) is None:
            raise ImportError(f"report_to {name!r}: the {TRACKERS[name]} package is not installed "
                              f"(pip install 'loramix[{name}]')")


def console_lines(progress: bool) -> bool:
    """Whether each metrics line is printed: without a progress bar, or when the bar goes to a file or a pipe
    (stderr not a terminal), where its redraws are no use to a reader."""
    isatty = getattr(sys.stderr, "isatty", None)
    return not progress or not (isatty is not None and isatty())


def train_scalars(record: dict[str, Any]) -> dict[str, float]:
    """A metrics line as tracker scalars: every number but the step, as train/<key> (eval_<x> as eval/<x>)."""
    values = {}
    for key, value in record.items():
        if key == "step" or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        values[f"eval/{key[5:]}" if key.startswith("eval_") else f"train/{key}"] = float(value)
    return values


def log_line(record: dict[str, Any], total_steps: int, health: RoutingHealth | None = None) -> str:
    """The console form of a metrics line (see the module docstring)."""
    parts = [f"loss {record['loss']:.4f}", f"lr {record['lr']:.2e}"]
    if record.get("grad_norm") is not None:
        parts.append(f"grad norm {record['grad_norm']:.3f}")
    parts.append(f"{record['tokens_per_s']:.0f} tok/s")
    parts += [f"{key} {value:.4f}" for key, value in record.items() if key.endswith("_loss")]
    if health is not None:
        parts.append(health.summary())
    return f"step {record['step']}/{total_steps}: " + ", ".join(parts)


class _TensorBoard:
    def __init__(self, output_dir: str, start_step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        folder = os.path.join(output_dir, RUNS_DIR)
        if start_step == 0:  # a fresh run starts fresh curves
            for old in glob.glob(os.path.join(glob.escape(folder), "events.out.tfevents.*")):
                os.remove(old)
        # resumed: steps after the checkpoint, logged by the killed run, are purged from the older files
        self.writer = SummaryWriter(folder, purge_step=start_step + 1 if start_step else None)

    def scalars(self, values: dict[str, float], step: int) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def close(self) -> None:
        self.writer.close()  # flushes


class _WandB:
    def __init__(self, output_dir: str, config: dict[str, Any]) -> None:
        import wandb

        self.wandb, self.owned = wandb, wandb.run is None
        if self.owned:
            folder = os.environ.get("WANDB_DIR") or output_dir
            os.makedirs(folder, exist_ok=True)
            wandb.init(project=os.environ.get("WANDB_PROJECT") or "loramix",
                       name=os.environ.get("WANDB_NAME") or os.path.basename(output_dir), dir=folder, config=config)
        self.run = wandb.run

    def scalars(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        if self.owned:
            self.run.finish()


class RunLog:
    """One run's reporting: its trackers (`report_to`, opened here), the console line (`console`, when there is no
    progress bar) and the routing alarms, which go to `log`. `config` (JSON values) is the run's record for the
    tracker; `start_step` is 0, or the step a resumed run starts from."""

    def __init__(self, report_to: Sequence[str], output_dir: str, *, total_steps: int, start_step: int = 0,
                 config: dict[str, Any] | None = None, console: bool = False,
                 log: Callable[[str], None] = print) -> None:
        check_trackers(report_to)
        self.total_steps, self.console, self.log = total_steps, console, log
        self.watch = RoutingWatch()
        self.trackers: list[Any] = []
        try:
            for name in report_to:
                self.trackers.append(_TensorBoard(output_dir, start_step) if name == "tensorboard"
                                     else _WandB(output_dir, config or {}))
        except BaseException:
            self.close()
            raise

    def train(self, record: dict[str, Any], health: RoutingHealth | None = None) -> None:
        """A metrics line (`_Loop.metrics`: step, loss, lr, grad_norm, tokens_per_s, ...) and the gate's routing
        over the same steps."""
        values = train_scalars(record)
        if health is not None:
            values.update(health.scalars())
        self._scalars(values, record["step"])
        if self.console:
            self.log(log_line(record, self.total_steps, health))
        if health is not None:
            for message in self.watch.update(health):
                self.log(f"warning: step {record['step']}: {message}")

    def evaluation(self, record: dict[str, Any]) -> None:
        """An evaluation: step, eval_loss, eval_perplexity."""
        self._scalars(train_scalars(record), record["step"])

    def _scalars(self, values: dict[str, float], step: int) -> None:
        for tracker in self.trackers:
            tracker.scalars(values, step)

    def close(self) -> None:
        """Flush and close every tracker (the run's end, or its failure)."""
        trackers, self.trackers = self.trackers, []
        for tracker in trackers:
            tracker.close()


__all__ = ["RUNS_DIR", "TRACKERS", "RunLog", "check_trackers", "console_lines", "log_line", "train_scalars"]
