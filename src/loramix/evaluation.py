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

The options mean what `lm-eval run`'s do: `num_fewshot`, `gen_kwargs` (merged into each generation task's own),
`apply_chat_template` with `system_instruction` and `fewshot_as_multiturn`, `log_samples`, `predict_only`, and the
four seeds (`EvalSeeds`, `--seed` as lm-eval reads it). With an output folder the results (and samples) are also
written in lm-eval's own layout by its own `EvaluationTracker` (`write_lm_eval_files`), so its tooling reads them.
The class is also lm-eval's model "loramix" (`simple_evaluate(model="loramix", model_args={"pretrained": ...})`)
once `lm_class()` has registered it.

lm-eval is imported only when used: `pip install lm-eval` (tested with 0.4.13).
"""

from __future__ import annotations

import ast
import copy
import csv
import difflib
import json
import os
import shutil
import tempfile
import traceback
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .files import atomic_write, atomic_write_text

MODEL_NAME = "loramix"
_LM_CLASS = None
DEFAULT_SEEDS = (0, 1234, 1234, 1234)  # lm-eval's: Python's random, NumPy, torch, the few-shot sampler
GEN_KWARGS = ("until", "max_gen_toks", "do_sample", "temperature", "top_p", "top_k")  # what generate_until reads
MODEL_ARGS = ("pretrained", "base", "chat_template", "batch_size", "max_batch_size", "device")


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

        @classmethod
        def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None):
            """lm-eval's own way in (`simple_evaluate(model="loramix", model_args=...)`, `lm-eval run --model
            loramix` in a process that registered the class): `pretrained` (checkpoint folder or hub id), `base`,
            `chat_template` (a Jinja file) loaded as `loramix eval` loads them; `batch_size` and `device` from
            lm-eval's own options."""
            args = {**arg_dict, **{k: v for k, v in (additional_config or {}).items() if v is not None}}
            unknown = sorted(set(args) - set(MODEL_ARGS))
            if unknown or "pretrained" not in args:
                raise ValueError(f"model_args: {'unknown ' + repr(unknown) if unknown else 'pretrained is missing'}"
                                 f"; loramix takes {', '.join(MODEL_ARGS)}")
            batch = str(args.get("batch_size", 8))
            if not batch.isdigit() or int(batch) < 1:
                raise ValueError(f"batch_size: a positive integer, got {batch!r} (loramix has no 'auto')")
            from .loading import load_tokenizer
            from .model import XLoraModel

            device = args.get("device")
            if device is not None and str(device).startswith("cuda") and not torch.cuda.is_available():
                device = None  # lm-eval's CLI asks for cuda:0 unless told; its own HF model falls back too
            with torch.random.fork_rng(devices=[]):  # loading draws no random numbers from the seeded stream
                model = XLoraModel.from_pretrained(str(args["pretrained"]), base=args.get("base"), device=device)
            tokenizer = load_tokenizer(str(args["pretrained"]), args.get("base") or model.base_model_id,
                                       chat_template_file=args.get("chat_template"))
            return cls(model, tokenizer, batch_size=int(batch))

        @classmethod
        def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
            from lm_eval.utils import simple_parse_args_string

            return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

        @property
        def eot_token_id(self) -> int:
            return self.tokenizer.eos_token_id

        @property
        def tokenizer_name(self) -> str:
            return str(getattr(self.tokenizer, "name_or_path", "") or MODEL_NAME).replace("/", "__")

        def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
            """The conversation rendered by the tokenizer's chat template (as lm-eval's HF model does); a prefilled
            answer (`add_generation_prompt` False) is continued, not closed."""
            if getattr(self.tokenizer, "chat_template", None) is None:
                raise ValueError("apply_chat_template: this model's tokenizer has no chat template "
                                 "(give one with --chat-template FILE)")
            return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                      add_generation_prompt=add_generation_prompt,
                                                      continue_final_message=not add_generation_prompt)

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
                check_gen_kwargs(kwargs, f"task {requests[indices[0]].task_name!r}: generation_kwargs")
                until = kwargs.pop("until", None) or []
                until = [until] if isinstance(until, str) else list(until)
                max_new = int(kwargs.pop("max_gen_toks", 256))
                do_sample = bool(kwargs.pop("do_sample", False))
                temperature = float(kwargs.pop("temperature", 0.0) or 0.0)
                sampling = {"top_p": float(kwargs.pop("top_p", 1.0) or 1.0), "top_k": int(kwargs.pop("top_k", 0) or 0)}
                for start in range(0, len(indices), self.batch_size):
                    chunk = indices[start:start + self.batch_size]
                    prompts = [self.tok_encode(requests[i].args[0])[-(self.max_length - max_new):] for i in chunk]
                    # each batch's sampling seed drawn from torch's global stream, which lm-eval seeds (--seed's
                    # third value): sampled answers are reproducible
                    seed = int(torch.randint(0, 1 << 62, ())) if do_sample else None
                    texts, scalings = generate_texts(self.model, self.tokenizer, prompts, max_new, until,
                                                     do_sample=do_sample, temperature=temperature, seed=seed,
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
                   do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                   seed: int | None = None) -> tuple[list[str], list[torch.Tensor]]:
    """Left-padded batch generation with both KV caches; each text is the text rule's (engine/text.py: decoded
    against its prompt, up to the EOS, cut before its first until-string). Greedy unless `do_sample` with a
    temperature of at least GREEDY_BELOW (SamplingParams.greedy); row r samples with `seed` + r (unseeded: from
    the OS). Also returns each row's scalings over its generated tokens (new, n_lora_layers, n_experts)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for r, p in enumerate(prompts):
        ids[r, width - len(p):], mask[r, width - len(p):] = torch.tensor(p), 1
    result = model.generate(ids.to(model.device), mask.to(model.device), max_new_tokens=max_new_tokens,
                            do_sample=do_sample, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
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


# ---- lm-eval's run options, checked before any model is loaded ---------------------------------------------------
@dataclass(frozen=True)
class EvalSeeds:
    """lm-eval's four seeds: Python's `random`, NumPy, torch (sampled generation) and the few-shot sampler (which
    examples each document gets); None leaves that one unseeded. The defaults are lm-eval's."""

    python: int | None = DEFAULT_SEEDS[0]
    numpy: int | None = DEFAULT_SEEDS[1]
    torch: int | None = DEFAULT_SEEDS[2]
    fewshot: int | None = DEFAULT_SEEDS[3]

    @classmethod
    def parse(cls, text: str) -> "EvalSeeds":
        """`--seed` as lm-eval reads it: one integer for all four, or 3 or 4 comma-separated integers or None
        (python, numpy, torch, fewshot; a missing fourth is lm-eval's default)."""
        items = [item.strip() for item in str(text).split(",")]
        if len(items) == 1:
            items *= 4
        elif len(items) == 3:
            items.append(str(DEFAULT_SEEDS[3]))
        elif len(items) != 4:
            raise ValueError(f"seed: one integer, or 3-4 comma-separated integers or None (python,numpy,torch,"
                             f"fewshot), got {text!r}")
        values = []
        for item in items:
            if item.lower() == "none":
                values.append(None)
                continue
            try:
                values.append(int(item))
            except ValueError:
                raise ValueError(f"seed: {item!r} is not an integer or None (in {text!r})") from None
        return cls(*values)


def parse_gen_kwargs(values: str | list[str] | dict | None) -> dict[str, Any] | None:
    """`--gen-kwargs` as lm-eval reads it: a JSON object, or `key=value` items (several arguments, or one with
    commas between items; a value is a Python literal, `true`/`false`/`none`, or else a string), checked by
    `check_gen_kwargs`. None or nothing: None."""
    if values is None or isinstance(values, dict):
        parsed = values
    else:
        values = [values] if isinstance(values, str) else list(values)
        parsed = {}
        if values and values[0].lstrip().startswith("{"):
            try:
                parsed = json.loads(values[0])
            except ValueError as err:
                raise ValueError(f"gen_kwargs: not a JSON object ({err})") from None
            if not isinstance(parsed, dict):
                raise ValueError("gen_kwargs: not a JSON object")
        else:
            for item in (part for value in values for part in _top_level_items(value)):
                key, sep, value = item.partition("=")
                if not sep or not key.strip():
                    raise ValueError(f"gen_kwargs: expected key=value, got {item!r}")
                parsed[key.strip()] = _literal(value)
    if not parsed:
        return None
    check_gen_kwargs(parsed, "gen_kwargs")
    return parsed


def _top_level_items(text: str) -> list[str]:
    """`text` split at the commas outside brackets and quotes: 'until=["a","b"],max_gen_toks=5' -> two items."""
    items, depth, quote, start = [], 0, None, 0
    for i, ch in enumerate(text):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        elif ch == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    items.append(text[start:])
    return [item.strip() for item in items if item.strip()]


def _literal(text: str) -> Any:
    text = text.strip()
    lowered = text.lower()
    if lowered in ("true", "false", "none"):
        return {"true": True, "false": False, "none": None}[lowered]
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def check_gen_kwargs(kwargs: dict[str, Any], where: str) -> None:
    """Generation options are those `generate_until` reads (GEN_KWARGS); any other is a ValueError naming it
    (with a close name suggested) rather than silently ignored."""
    for key in kwargs:
        if key not in GEN_KWARGS:
            close = difflib.get_close_matches(key, GEN_KWARGS, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ValueError(f"{where}: {key!r} is not a generation option loramix takes; {hint}"
                             f"it takes {', '.join(GEN_KWARGS)}")


# ---- tasks, checked before any model is loaded ------------------------------------------------------------------
@dataclass(frozen=True)
class EvalTasks:
    """lm-eval tasks named, checked and built: `objects` are lm-eval's Task and Group objects, ready to run."""

    names: tuple[str, ...]
    manager: Any  # lm-eval's TaskManager over the indexed folders
    objects: tuple[Any, ...]


def load_tasks(tasks: list[str] | str, *, include_path: str | None = None, builtin_tasks: bool = True,
               metadata: dict[str, Any] | None = None) -> EvalTasks:
    """Check every name in `tasks` against lm-eval's index (its own tasks unless `builtin_tasks=False`, and those
    in `include_path`), then build each (its YAML read, its dataset loaded): cheap next to a model, so a misspelt
    name or a bad task option fails here, in one ValueError naming the task, with close names suggested.
    `metadata` goes to every task, as lm-eval's CLI gives them its model arguments."""
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
    manager = TaskManager(include_path=include_path, include_defaults=builtin_tasks, metadata=metadata or {})
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
             num_fewshot: int | None = None, builtin_tasks: bool = True,
             gen_kwargs: str | list[str] | dict | None = None, apply_chat_template: bool | str = False,
             system_instruction: str | None = None, fewshot_as_multiturn: bool | None = None,
             predict_only: bool = False, seeds: EvalSeeds | None = None, bootstrap_iters: int = 100000,
             model_args: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run lm-eval `tasks` on an XLoraModel in process. Returns lm-eval's results dict plus "routing": {task:
    {expert: mean weight}}. With `output`, writes results.json, routing.csv and routing.png there, and lm-eval's
    own layout (`write_lm_eval_files`: results_<date>.json, with `log_samples` samples_<task>_<date>.jsonl).
    `tasks`: names (checked and built by `load_tasks` with `include_path` and `builtin_tasks`; the latter False
    skips indexing lm-eval's own task YAMLs, 20 s) or `load_tasks`' answer.

    The other options are `lm_eval.simple_evaluate`'s, with its defaults: `gen_kwargs` (`parse_gen_kwargs`),
    `apply_chat_template` (True, or a template's name), `fewshot_as_multiturn` (None: as `apply_chat_template`),
    `seeds` (default `EvalSeeds()`), `bootstrap_iters`. `model_args` is what lm-eval records as the model's
    arguments; its "pretrained" names the output's model folder (default {"pretrained": "loramix"}).

    A failure while the tasks run is one ValueError naming the task where it can tell; with `output`, what was
    computed before it is saved there first (results.json with the error and the routing so far,
    responses.jsonl with every answer the model gave)."""
    import lm_eval
    from lm_eval.loggers import EvaluationTracker

    gen_kwargs = parse_gen_kwargs(gen_kwargs)
    if fewshot_as_multiturn is None:
        fewshot_as_multiturn = bool(apply_chat_template)
    elif fewshot_as_multiturn and not apply_chat_template:
        raise ValueError("fewshot_as_multiturn: needs apply_chat_template (lm-eval's rule)")
    if apply_chat_template and getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("apply_chat_template: this model's tokenizer has no chat template "
                         "(give one with --chat-template FILE)")
    seeds = seeds or EvalSeeds()
    if not isinstance(tasks, EvalTasks):
        tasks = load_tasks(tasks, include_path=include_path, builtin_tasks=builtin_tasks)
    lm = lm_class()(model, tokenizer, batch_size=batch_size)
    tracker = EvaluationTracker()  # records the run's options; writes files only when given a folder
    try:
        results = lm_eval.simple_evaluate(
            model=lm, model_args=model_args or {"pretrained": MODEL_NAME}, tasks=list(tasks.objects),
            task_manager=tasks.manager, limit=limit, batch_size=batch_size, log_samples=log_samples,
            num_fewshot=num_fewshot, bootstrap_iters=bootstrap_iters, gen_kwargs=gen_kwargs,
            apply_chat_template=apply_chat_template, system_instruction=system_instruction,
            fewshot_as_multiturn=fewshot_as_multiturn, predict_only=predict_only, evaluation_tracker=tracker,
            random_seed=seeds.python, numpy_random_seed=seeds.numpy, torch_random_seed=seeds.torch,
            fewshot_random_seed=seeds.fewshot)
    except Exception as err:  # lm-eval's own errors come raw (KeyError, TypeError, ...): one line instead
        task = _failing_task(err)
        line = f"task {task!r}: {_one_line(err)}" if task else _one_line(err)
        if output is None:
            raise ValueError(f"lm-eval stopped: {line} (nothing saved: no output folder)") from err
        write_partial(tasks.objects, _with_routing({"error": line}, model, lm), output)
        raise ValueError(f"lm-eval stopped: {line}; what was computed is in {os.path.join(output, 'results.json')} "
                         f"and responses.jsonl") from err
    # as lm-eval records a model it built from its registry name ("CUSTOM" and the class name otherwise)
    results["config"]["model"] = tracker.general_config_tracker.model_source = MODEL_NAME
    results = _with_routing(dict(results), model, lm)
    if output is not None:
        write_outputs(results, output)
        results["lm_eval_files"] = write_lm_eval_files(results, tracker, output)
        stale = os.path.join(output, "responses.jsonl")  # an earlier failed run's, no longer what results.json says
        if os.path.exists(stale):
            os.remove(stale)
    return results


def write_lm_eval_files(results: dict[str, Any], tracker, folder: str) -> list[str]:
    """lm-eval's own output layout, written by its own `EvaluationTracker` (the one `simple_evaluate` recorded the
    run's options in): <folder>/<model name, sanitized>/results_<date>.json and, when `results` holds samples,
    samples_<task>_<date>.jsonl per task, as `lm-eval run --output_path folder` writes them. The tracker writes
    into a staging folder inside `folder`, and each file is then renamed into place; the tracker only logs a
    failure, so a file missing afterwards is an OSError here. Returns the paths written."""
    kept = {k: v for k, v in results.items() if k not in ("samples", "lm_eval_files")}
    samples = copy.deepcopy(results.get("samples"))  # the tracker rewrites each sample's fields in place
    os.makedirs(folder, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".lm-eval-", dir=folder)
    try:
        tracker.output_path = staging
        tracker.save_results_aggregated(results=kept, samples=samples)
        for task in kept["configs"] if samples else []:
            tracker.save_results_samples(task_name=task, samples=samples[task])
        model_folder = str(tracker.general_config_tracker.model_name_sanitized)
        written = os.path.join(staging, model_folder)
        names = sorted(os.listdir(written)) if os.path.isdir(written) else []
        expected = 1 + (len(kept["configs"]) if samples else 0)
        if len(names) != expected or not any(n.startswith("results_") for n in names):
            raise OSError(f"lm-eval's EvaluationTracker wrote {names or 'nothing'} under {staging}, not the results "
                          f"and {expected - 1} samples files (see lm-eval's log above)")
        target = os.path.join(folder, model_folder)
        os.makedirs(target, exist_ok=True)
        for name in names:
            os.replace(os.path.join(written, name), os.path.join(target, name))
        return [os.path.join(target, name) for name in names]
    finally:
        shutil.rmtree(staging, ignore_errors=True)


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
