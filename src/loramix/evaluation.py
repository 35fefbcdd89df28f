"""Benchmarks with EleutherAI's lm-evaluation-harness (`lm-eval`, optional), in process, plus the routing per task.

`evaluate` runs lm-eval's tasks on an XLoraModel through a small lm-eval model class ("loramix" in lm-eval's
registry):
- `loglikelihood`: rows of context + continuation, right-padded, one forward pass per batch; the score of a
  continuation is the sum over its tokens of log_softmax(logits)[position before the token, token], and it is
  greedy when every one of its tokens is the argmax there;
- `loglikelihood_rolling`: the text cut into lm-eval's disjoint windows of the model's context, scored the same way;
- `generate_until`: batches through `XLoraModel.generate` (both KV caches), cut at the first until-string.
Each row's gate scalings are summed per task (context and continuation tokens for log-likelihoods, generated
tokens for generation), giving the mean routing of each task: a table (routing.csv) and a figure (routing.png).

`load_tasks` checks the task names and builds the tasks before any model is loaded; a failure of lm-eval later
is one ValueError naming the task, after what was computed is saved.

lm-eval is imported only when used: `pip install lm-eval` (tested with 0.4.13).
"""

from __future__ import annotations

import csv
import difflib
import json
import os
import traceback
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .files import atomic_write, atomic_write_text

MODEL_NAME = "loramix"
_LM_CLASS = None


def lm_class():
    """The lm-eval model class (a TemplateLM), registered as "loramix" on first use."""
    global _LM_CLASS
    if _LM_CLASS is not None:
        return _LM_CLASS
    try:
        # lm-eval fills its model registry with its own models only while the registry is empty: import them
        # first, or registering ours would hide `local-completions` and the rest from later lm-eval runs
        import lm_eval.models  # noqa: F401
        from lm_eval.api.model import TemplateLM
        from lm_eval.api.registry import register_model
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
    except ImportError as err:
        raise ImportError(f"loramix eval needs lm-eval (pip install lm-eval==0.4.13): {err}") from None

    class XLoraLM(TemplateLM):
        """An XLoraModel and its tokenizer as an lm-eval model."""

        def __init__(self, model, tokenizer, batch_size: int = 8, max_length: int | None = None) -> None:
            super().__init__()
            from .engine.generate import context_length

            self.model, self.tokenizer, self.batch_size = model, tokenizer, int(batch_size)
            self.max_length = max_length or context_length(model) or 2048
            self.routing = RoutingTotals(model.n_lora_layers, model.n_experts)
            self._task_of_row: list[str] = []

        @property
        def eot_token_id(self) -> int:
            return self.tokenizer.eos_token_id

        @property
        def prefix_token_id(self) -> int:
            bos = self.tokenizer.bos_token_id
            return bos if bos is not None else self.eot_token_id

        def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
            return self.tokenizer.encode(string, add_special_tokens=bool(add_special_tokens))

        def tok_decode(self, tokens: list[int]) -> str:
            return self.tokenizer.decode(tokens, skip_special_tokens=True)

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            self._task_of_row = [r.task_name or "" for r in requests]
            return super().loglikelihood(requests, disable_tqdm=disable_tqdm)

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
            rows = [(context + continuation, len(continuation)) for _, context, continuation in requests]
            scores = continuation_logprobs(self.model, rows, self.batch_size, self.max_length,
                                           on_scalings=self._record)
            return scores

        def _record(self, row: int, scalings: torch.Tensor) -> None:
            self.routing.add(self._task_of_row[row] if row < len(self._task_of_row) else "", scalings)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
            results = []
            for request in requests:
                (text,) = request.args
                windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                    self.tok_encode(text), self.prefix_token_id, self.max_length, 1)]
                self._task_of_row = [request.task_name or ""] * len(windows)
                scores = self._loglikelihood_tokens([(None, ctx, cont) for ctx, cont in windows])
                results.append(sum(score for score, _ in scores))
            return results

        def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
            outputs: list[str | None] = [None] * len(requests)
            groups: dict[str, list[int]] = {}  # rows with the same generation options decode together
            for i, r in enumerate(requests):
                groups.setdefault(json.dumps(r.args[1], sort_keys=True, default=str), []).append(i)
            for indices in groups.values():
                kwargs = dict(requests[indices[0]].args[1])
                until = kwargs.pop("until", None) or []
                until = [until] if isinstance(until, str) else list(until)
                max_new = int(kwargs.pop("max_gen_toks", 256))
                do_sample = bool(kwargs.pop("do_sample", False))
                temperature = float(kwargs.pop("temperature", 0.0) or 0.0)
                sampling = {"top_p": float(kwargs.pop("top_p", 1.0) or 1.0), "top_k": int(kwargs.pop("top_k", 0) or 0)}
                for start in range(0, len(indices), self.batch_size):
                    chunk = indices[start:start + self.batch_size]
                    prompts = [self.tok_encode(requests[i].args[0])[-(self.max_length - max_new):] for i in chunk]
                    texts, scalings = generate_texts(self.model, self.tokenizer, prompts, max_new, until,
                                                     do_sample=do_sample, temperature=temperature,
                                                     **sampling)
                    for i, text, s in zip(chunk, texts, scalings):
                        outputs[i] = text
                        self.routing.add(requests[i].task_name or "", s)
            return outputs

    register_model(MODEL_NAME)(XLoraLM)
    _LM_CLASS = XLoraLM
    return XLoraLM


# ---- the computations the class delegates to ------------------------------------------------------------------
@torch.no_grad()
def continuation_logprobs(model, rows: list[tuple[list[int], int]], batch_size: int, max_length: int,
                          on_scalings=None) -> list[tuple[float, bool]]:
    """rows: (tokens, n): score the last n tokens given the ones before. Returns (sum of log-probabilities,
    every token greedy) per row; one forward pass per batch of right-padded rows (longest first)."""
    results: list[tuple[float, bool] | None] = [None] * len(rows)
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        inputs = [rows[i][0][-(max_length + 1):][:-1] for i in chunk]  # the last token is only predicted
        width = max(len(x) for x in inputs)
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros(len(chunk), width, dtype=torch.long)
        for r, x in enumerate(inputs):
            ids[r, :len(x)], mask[r, :len(x)] = torch.tensor(x), 1
        out = model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device))
        logprobs = F.log_softmax(out.logits.float(), dim=-1)  # (b, t, vocab)
        for r, i in enumerate(chunk):
            tokens, n = rows[i]
            length = len(inputs[r])
            target = torch.tensor(tokens[-n:], device=logprobs.device)  # (n,)
            scores = logprobs[r, length - n:length]  # (n, vocab): position t predicts token t + 1
            results[i] = (float(scores.gather(-1, target[:, None]).sum()), bool((scores.argmax(-1) == target).all()))
            if on_scalings is not None:
                on_scalings(i, out.scalings[r, :length])
    return results


@torch.no_grad()
def generate_texts(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, until: list[str], *,
                   do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
                   top_k: int = 0) -> tuple[list[str], list[torch.Tensor]]:
    """Left-padded batch generation with both KV caches; each text is the text rule's (engine/text.py: decoded
    against its prompt, up to the EOS, cut before its first until-string). Greedy unless `do_sample` with a
    temperature of at least GREEDY_BELOW (SamplingParams.greedy). Also returns each row's scalings over its
    generated tokens (new, n_lora_layers, n_experts)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for r, p in enumerate(prompts):
        ids[r, width - len(p):], mask[r, width - len(p):] = torch.tensor(p), 1
    result = model.generate(ids.to(model.device), mask.to(model.device), max_new_tokens=max_new_tokens,
                            do_sample=do_sample, temperature=temperature, top_p=top_p, top_k=top_k,
                            stop=until, tokenizer=tokenizer, return_scalings=True)
    return result.texts, [result.scalings[r, :n] for r, n in enumerate(result.n_new_tokens)]


class RoutingTotals:
    """Sums of the gate's scalings per task: the mean routing is sums / tokens, (n_lora_layers, n_experts)."""

    def __init__(self, n_lora_layers: int, n_experts: int) -> None:
        self.shape = (n_lora_layers, n_experts)
        self.sums: dict[str, torch.Tensor] = {}
        self.tokens: dict[str, int] = {}

    def add(self, task: str, scalings: torch.Tensor) -> None:
        """scalings: (t, n_lora_layers, n_experts) of one row's real tokens."""
        total = self.sums.setdefault(task, torch.zeros(self.shape, dtype=torch.float64))
        total += scalings.double().sum(0).cpu()
        self.tokens[task] = self.tokens.get(task, 0) + scalings.shape[0]

    def mean(self, task: str) -> torch.Tensor:
        return (self.sums[task] / max(self.tokens[task], 1)).float()


# ---- tasks, checked before any model is loaded ------------------------------------------------------------------
@dataclass(frozen=True)
class EvalTasks:
    """lm-eval tasks named, checked and built: `objects` are lm-eval's Task and Group objects, ready to run."""

    names: tuple[str, ...]
    manager: Any  # lm-eval's TaskManager over the indexed folders
    objects: tuple[Any, ...]


def load_tasks(tasks: list[str] | str, *, include_path: str | None = None, builtin_tasks: bool = True) -> EvalTasks:
    """Check every name in `tasks` against lm-eval's index (its own tasks unless `builtin_tasks=False`, and those
    in `include_path`), then build each (its YAML read, its dataset loaded): cheap next to a model, so a misspelt
    name or a bad task option fails here, in one ValueError naming the task, with close names suggested."""
    lm_class()  # a clear ImportError when lm-eval is missing
    from lm_eval.tasks import TaskManager

    names = [t.strip() for t in tasks.split(",")] if isinstance(tasks, str) else [str(t).strip() for t in tasks]
    names = [n for n in names if n]
    if not names:
        raise ValueError("tasks: no task name given")
    if include_path is not None and not os.path.isdir(include_path):
        raise FileNotFoundError(f"include_path: {include_path} is not a folder of task YAMLs")
    if include_path is None and not builtin_tasks:
        raise ValueError("tasks: lm-eval's own tasks are left out (builtin_tasks=False) and no include_path is given")
    manager = TaskManager(include_path=include_path, include_defaults=builtin_tasks)
    searched = " and ".join(["lm-eval's own tasks"] * builtin_tasks + [repr(include_path)] * bool(include_path))
    for name in names:
        if name not in manager.all_tasks and not (name.endswith((".yaml", ".yml")) and os.path.isfile(name)):
            close = difflib.get_close_matches(name, manager.all_tasks, n=3, cutoff=0.75)
            hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else ""
            left_out = "" if builtin_tasks else " (lm-eval's own tasks were left out)"
            raise ValueError(f"tasks: {name!r} is not a task, group or tag in {searched}{left_out}{hint}")
    objects = []
    for name in names:
        try:
            loaded = manager.load([name])
        except Exception as err:  # lm-eval raises KeyError, TypeError, ValueError, ... for a bad task YAML
            raise ValueError(f"task {name!r}: {_one_line(err)}") from err
        children = {c for kids in loaded["group_map"].values() for c in kids}
        objects += [g for n, g in loaded["groups"].items() if n not in children]
        objects += [t for n, t in loaded["tasks"].items() if n not in children]
    return EvalTasks(tuple(names), manager, tuple(objects))


def _one_line(err: BaseException) -> str:
    text = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
    first = (text.strip().splitlines() or [""])[0][:300]
    return f"{type(err).__name__}: {first}" if first else type(err).__name__


def _failing_task(err: BaseException) -> str | None:
    """The lm-eval task whose code raised `err`: the innermost frame of a Task method, or of lm-eval's loop over
    tasks (`task_name`)."""
    from lm_eval.api.task import Task

    name = None
    for frame, _ in traceback.walk_tb(err.__traceback__):
        owner = frame.f_locals.get("self")
        if isinstance(owner, Task):
            name = owner.task_name
        elif frame.f_globals.get("__name__", "").startswith("lm_eval") and isinstance(
                frame.f_locals.get("task_name"), str):
            name = frame.f_locals["task_name"]
    return name


# ---- entry point -----------------------------------------------------------------------------------------------
def evaluate(model, tokenizer, tasks: list[str] | str | EvalTasks, *, include_path: str | None = None,
             limit: float | None = None, batch_size: int = 8, output: str | None = None, log_samples: bool = False,
             num_fewshot: int | None = None, builtin_tasks: bool = True) -> dict[str, Any]:
    """Run lm-eval `tasks` on an XLoraModel in process. Returns lm-eval's results dict plus "routing": {task:
    {expert: mean weight}}. With `output`, writes results.json, routing.csv and routing.png there.
    `tasks`: names (checked and built by `load_tasks` with `include_path` and `builtin_tasks`; the latter False
    skips indexing lm-eval's own task YAMLs, 20 s) or `load_tasks`' answer.

    A failure while the tasks run is one ValueError naming the task where it can tell; with `output`, what was
    computed before it is saved there first (results.json with the error and the routing so far,
    responses.jsonl with every answer the model gave)."""
    import lm_eval

    if not isinstance(tasks, EvalTasks):
        tasks = load_tasks(tasks, include_path=include_path, builtin_tasks=builtin_tasks)
    lm = lm_class()(model, tokenizer, batch_size=batch_size)
    try:
        results = lm_eval.simple_evaluate(model=lm, tasks=list(tasks.objects), task_manager=tasks.manager,
                                          limit=limit, batch_size=batch_size, log_samples=log_samples,
                                          num_fewshot=num_fewshot, bootstrap_iters=0)
    except Exception as err:  # lm-eval's own errors come raw (KeyError, TypeError, ...): one line instead
        task = _failing_task(err)
        line = f"task {task!r}: {_one_line(err)}" if task else _one_line(err)
        if output is None:
            raise ValueError(f"lm-eval stopped: {line} (nothing saved: no output folder)") from err
        write_partial(tasks.objects, _with_routing({"error": line}, model, lm), output)
        raise ValueError(f"lm-eval stopped: {line}; what was computed is in {os.path.join(output, 'results.json')} "
                         f"and responses.jsonl") from err
    results = _with_routing(dict(results), model, lm)
    if output is not None:
        write_outputs(results, output)
        stale = os.path.join(output, "responses.jsonl")  # an earlier failed run's, no longer what results.json says
        if os.path.exists(stale):
            os.remove(stale)
    return results


def _with_routing(results: dict[str, Any], model, lm) -> dict[str, Any]:
    results["routing"] = {task: dict(zip(model.expert_names, lm.routing.mean(task).mean(0).tolist()))
                          for task in sorted(lm.routing.sums)}
    results["routing_tokens"] = dict(sorted(lm.routing.tokens.items()))
    return results


def write_partial(objects, partial: dict[str, Any], folder: str) -> None:
    """After a failure: responses.jsonl (each request the model answered: task, document, request type,
    arguments, answers), then results.json with the error and the routing so far, routing.csv and routing.png."""
    from lm_eval.api.group import Group

    leaves = [t for o in objects for t in (o.get_all_tasks() if isinstance(o, Group) else [o])]
    lines = []
    for task in leaves:
        for inst in task.instances or []:
            if inst.resps:
                lines.append(json.dumps({"task": task.task_name, "doc_id": inst.doc_id, "idx": inst.idx,
                                         "request_type": inst.request_type, "arguments": inst.args,
                                         "resps": inst.resps}, default=str) + "\n")
    os.makedirs(folder, exist_ok=True)
    atomic_write_text(os.path.join(folder, "responses.jsonl"), "".join(lines))
    partial["responses"] = len(lines)
    write_outputs(partial, folder)


def write_outputs(results: dict[str, Any], folder: str) -> None:
    """results.json (lm-eval's results, samples left out), routing.csv and routing.png."""
    os.makedirs(folder, exist_ok=True)
    kept = {k: v for k, v in results.items() if k != "samples"}
    atomic_write_text(os.path.join(folder, "results.json"), json.dumps(kept, indent=2, default=str) + "\n")
    routing = results["routing"]
    experts = list(next(iter(routing.values()))) if routing else []

    def write_csv(path: str) -> None:
        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["task", "tokens", *experts])
            for task, weights in routing.items():
                writer.writerow([task, results["routing_tokens"][task], *(f"{weights[e]:.6f}" for e in experts)])

    atomic_write(os.path.join(folder, "routing.csv"), write_csv)
    if routing:
        plot_routing(routing, os.path.join(folder, "routing.png"))


def plot_routing(routing: dict[str, dict[str, float]], path: str) -> None:
    """Grouped bars: per task, the mean weight of each expert."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(routing)
    experts = list(routing[tasks[0]])
    fig, ax = plt.subplots(figsize=(1.5 + 1.2 * len(tasks) * max(1, len(experts) / 3), 3.5))
    width = 0.8 / len(experts)
    for e, expert in enumerate(experts):
        ax.bar([t + e * width for t in range(len(tasks))], [routing[task][expert] for task in tasks], width,
               label=expert)
    ax.set_xticks([t + 0.4 - width / 2 for t in range(len(tasks))], tasks)
    ax.set_ylabel("mean expert weight")
    ax.set_title("routing per task")
    ax.legend(fontsize="small")
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, dpi=120), suffix=".png")
    plt.close(fig)
