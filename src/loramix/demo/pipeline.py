"""`loramix demo`: the paper's experiment at a size that runs on two CPU cores, offline, end to end.

Stages (each one skipped on a rerun when its folder records the same settings, unless --fresh):
  data       five synthetic domains (demo/domains.py), the composed task and conversations across the domains (for the
             gate only), and generic text; train / held-out splits, as JSONL
  base       a byte-pair tokenizer built with `tokenizers`, and a tiny Llama pre-trained on the generic text
  experts    one LoRA expert per domain, trained on that domain only (loramix.train_expert)
  xlora      the X-LoRA gate over the frozen experts, trained on the mix (loramix.train_xlora)
  evaluate   held-out scores of the base, each expert, the static merge and X-LoRA (demo/evaluation.py)
  report     figures as in the paper (analysis.py), results.json and report.md (demo/report.py)
"""

from __future__ import annotations

import json
import os
import shutil
import string
import time
from typing import Callable

import torch

from .._version import installed_versions
from ..files import atomic_write_text, write_jsonl
from .domains import (
    COMPOSED,
    CONVERSATION_SEPARATOR,
    Domain,
    composed_rows,
    conversation_rows,
    domain_rows,
    generic_text,
    handover_rows,
    make_domains,
    with_context,
)
from .evaluation import evaluate, evaluate_xlora, read_jsonl
from .report import summary_table, write_report

# sizes: "full" is the README's main job (<= 10 minutes on 2 cores), "quick" the CI run (<= 2 minutes).
# The full gate takes 1000 steps: measured while building, with the data of that time, 500 steps followed the
# five-turn exchange in 2 of 5 turns and 1000 steps in 4 of 5, with the same composed score.
# composed_rows: the gate's composed rows, and as many hand-over rows (domains.handover_rows). In the full run as
# many as one domain's: the end mark " =" ends recall's own answers too, so the gate must learn from these rows that
# after "fold recall ..." it passes to protein_forward there (measured, full run, composed rows alone: composed
# score 0.44 with a quarter as many rows and 500 gate steps, 0.75 with as many and 1000 steps). The quick run's
# gate, 150 steps, gets a quarter of a domain's: with as many, its "fold" prompts went to recall (protein_forward's
# prompts 0.38 recall, 0.25 protein_forward).
SCALES = {
    "full": dict(generic_rows=4000, base_steps=800, train_rows=3000, expert_steps=700, gate_steps=1000,
                 composed_rows=3000, conversation_rows=1500, test_prompts=50),
    "quick": dict(generic_rows=1500, base_steps=300, train_rows=800, expert_steps=200, gate_steps=150,
                  composed_rows=200, conversation_rows=400, test_prompts=20),
}
MODEL = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=4, max_position_embeddings=512)
VOCAB_SIZE = 384
DEMO_REVISION = 10  # bump when the data or a stage changes, so reruns rebuild instead of reusing
# The experts adapt every linear layer but k_proj and v_proj. In X-LoRA's single mixed pass a token's keys and
# values are written with the weights the gate chose for that token, and later tokens read them: in the composed
# task protein_forward sums residues that recall wrote. With k_proj and v_proj adapted, an expert is tuned to the
# keys and values its own weights write, and reads another's badly (measured, both with the same context
# prefixes, sequence given, recall's weights up to the end mark then protein_forward's: the force within 5 pN for
# 15 of 40 random sequences with all linear layers adapted, 31 of 40 without k_proj and v_proj; the experts' own
# scores moved by at most 0.06: arithmetic 1.00 -> 0.96, protein_inverse 0.72 -> 0.78, logic 0.28 -> 0.32).
EXPERT = dict(rank=16, alpha=32, dropout=0.0, lr=3e-3, batch_size=32,
              target_modules=["q_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
GATE = dict(xlora_depth=2, xlora_size=64, layerwise_scalings=True, lr=1e-2, batch_size=32)
# The gate's objective: the paper's next-token cross-entropy plus loramix's supervised routing term, whose labels
# are per token (a domain row names its expert; a composed row and a conversation label each span), annealed
# linearly to zero over the first ROUTING_ANNEAL of the steps: a warm start, then the paper's objective alone, so
# the gate may mix experts where mixing lowers the loss. The full run also trains a gate on cross-entropy alone
# (the paper's objective from the start) and reports it beside, so the effect of the term is measured.
ROUTING_ANNEAL = 0.6
HISTORY_ORDER = ["recall", "arithmetic", "protein_forward", "logic", "protein_inverse"]
_STAGE_FILE = ".stage.json"
_OUTPUTS = ["data", "base", "experts", "xlora", "xlora_ce_only", "figures", "report.md", "results.json",
            "ablation.json"]


def _routing(scale: dict) -> dict:
    return dict(expert_field="expert", routing_weight=1.0,
                routing_anneal_steps=max(1, round(ROUTING_ANNEAL * scale["gate_steps"])))


def run_demo(out: str = "loramix-demo", quick: bool = False, fresh: bool = False, seed: int = 0,
             log: Callable[[str], None] = print, progress: bool = True) -> dict:
    """Run (or finish) the demo in `out`; returns the content of results.json.

    The demo runs on one intra-op thread (restored afterwards): its matrices are too small to gain from more,
    a run's numbers then do not depend on the machine's core count, and on a busy machine threads that wait for
    each other at every operation made training ten times slower (measured: 10 steps of the base model took
    79 s on two threads against 8 s on one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run_demo(out, quick, fresh, seed, log, progress)
    finally:
        torch.set_num_threads(threads)


def _run_demo(out: str, quick: bool, fresh: bool, seed: int, log: Callable[[str], None], progress: bool) -> dict:
    start, cpu_start = time.perf_counter(), time.process_time()
    out = os.path.abspath(out)
    scale = SCALES["quick" if quick else "full"]
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out {out}: exists and is not a folder")
    if fresh:
        for name in _OUTPUTS:
            path = os.path.join(out, name)
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.exists(path):
                os.remove(path)
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(seed)
    domains = make_domains(seed)
    settings = {"seed": seed, "quick": quick, "revision": DEMO_REVISION, **scale}
    timings: dict[str, float] = {}

    def stage(name: str, build: Callable[[str], None]) -> str:
        folder = os.path.join(out, name)
        marker = os.path.join(folder, _STAGE_FILE)
        if os.path.isfile(marker) and json.load(open(marker, encoding="utf-8")) == settings:
            log(f"[{name}] reusing {folder}")
            timings[name] = 0.0
            return folder
        if os.path.isdir(folder):
            shutil.rmtree(folder)
        t0 = time.perf_counter()
        log(f"[{name}] ...")
        build(folder)
        _write_json(marker, settings)
        timings[name] = time.perf_counter() - t0
        log(f"[{name}] done in {timings[name]:.1f}s")
        return folder

    data = stage("data", lambda f: _make_data(f, domains, scale, seed))
    base = stage("base", lambda f: _make_base(f, data, scale, seed, log, progress))
    experts = stage("experts", lambda f: _make_experts(f, base, data, domains, scale, seed, log, progress))
    xlora = stage("xlora", lambda f: _make_gate(f, base, experts, data, domains, scale, seed, log, progress,
                                                  _routing(scale)))
    ablation = None
    if not quick:
        paper_gate = stage("xlora_ce_only", lambda f: _make_gate(f, base, experts, data, domains, scale, seed, log,
                                                                 progress, {}))
    t0 = time.perf_counter()
    results, examples = evaluate(base, experts, xlora, data, domains, log)
    if not quick:
        log("  the gate trained on cross-entropy alone:")
        ablation = evaluate_xlora(base, paper_gate, data, domains)
        ablation = {k: ablation[k] for k in ("scores", "routing", "mixing")}
        log("  " + ", ".join(f"{task} {value:.2f}" for task, value in ablation["scores"].items()))
        _write_json(os.path.join(out, "ablation.json"), ablation)
    timings["evaluate"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    figures = make_figures(out, base, xlora, data, domains, examples)
    timings["figures"] = time.perf_counter() - t0
    results["history"] = {"own_top_turns": sum(turn == top for turn, _, top in figures["history_dominant"]),
                          "turns": len(figures["history_dominant"])}
    results["composed_figure"] = figures["composed_checks"]
    results.update({"seconds": round(time.perf_counter() - start, 1),
                    "cpu_seconds": round(time.process_time() - cpu_start, 1), "cpus": os.cpu_count(),
                    "quick": quick, "seed": seed, "versions": installed_versions()})
    _write_json(os.path.join(out, "results.json"), results)
    report = write_report(out, results, figures, domains, timings, settings, examples, ablation,
                          dict(model=MODEL, expert=EXPERT, gate=GATE, routing=_routing(scale),
                               history_order=HISTORY_ORDER))
    log(summary_table(results))
    log(f"report: {report}")
    return results


# ---- stages ---------------------------------------------------------------------------------------------------------
def _make_data(folder: str, domains: list[Domain], scale: dict, seed: int) -> None:
    os.makedirs(folder)
    trains: dict[str, list[dict]] = {}
    for domain in domains:
        test = domain_rows(domain, scale["test_prompts"], seed, "test")
        held_out = {r["prompt"] for r in test}
        train = domain_rows(domain, scale["train_rows"], seed, "train", exclude=held_out)
        write_jsonl(os.path.join(folder, f"{domain.name}_train.jsonl"), with_context(train, seed))
        write_jsonl(os.path.join(folder, f"{domain.name}_test.jsonl"), test)
        trains[domain.name] = train
    # for the gate only: the composed task on half of the materials, hand-over rows, conversations over the domains
    write_jsonl(os.path.join(folder, f"{COMPOSED.name}_train.jsonl"),
                composed_rows(seed, "train", scale["composed_rows"]))
    write_jsonl(os.path.join(folder, f"{COMPOSED.name}_test.jsonl"), composed_rows(seed, "test"))
    write_jsonl(os.path.join(folder, f"{COMPOSED.name}_handover_train.jsonl"),
                handover_rows(seed, scale["composed_rows"]))
    write_jsonl(os.path.join(folder, "conversations_train.jsonl"),
                conversation_rows(trains, scale["conversation_rows"], seed))
    write_jsonl(os.path.join(folder, "generic.jsonl"), generic_text(scale["generic_rows"], seed))


def build_tokenizer(texts: list[str], vocab_size: int = VOCAB_SIZE):
    """A byte-pair tokenizer for `texts`, built with the `tokenizers` library: words merge, while every digit
    and capital letter (amino-acid residue) stays its own token, so numbers and sequences are spelled out.

    The merges are learned here rather than by `tokenizers`' trainer, whose choice among pairs of equal count can
    differ from one process to the next; here ties go to the alphabetically first pair, so a seed gives one
    tokenizer."""
    from collections import Counter

    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    pre = pre_tokenizers.Sequence([pre_tokenizers.Metaspace(),
                                   pre_tokenizers.Split(Regex("[A-Z0-9]"), behavior="isolated")])
    pieces = Counter(piece for text in texts for piece, _ in pre.pre_tokenize_str(text))
    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    alphabet = sorted(set(string.printable.strip()) | {"▁"} | {c for piece in pieces for c in piece})
    words = {piece: list(piece) for piece in pieces}
    merges: list[tuple[str, str]] = []
    while len(specials) + len(alphabet) + len(merges) < vocab_size:
        pairs: Counter = Counter()
        for piece, symbols in words.items():
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] += pieces[piece]
        if not pairs:
            break
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append(best)
        for symbols in words.values():
            i = 0
            while i < len(symbols) - 1:
                if (symbols[i], symbols[i + 1]) == best:
                    symbols[i:i + 2] = [symbols[i] + symbols[i + 1]]
                i += 1
    vocab = {token: i for i, token in enumerate(specials + alphabet + ["".join(m) for m in merges])}
    tok = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>"))
    tok.pre_tokenizer = pre
    tok.decoder = decoders.Metaspace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def _make_base(folder: str, data: str, scale: dict, seed: int, log, progress: bool) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from ..training.data import DataFormat
    from ..training.loop import train_base
    from ..training.settings import TrainingArgs

    texts = [json.loads(line)["text"] for line in open(os.path.join(data, "generic.jsonl"), encoding="utf-8")]
    domain_names = {d.name for d in make_domains(seed)}
    for name in sorted(os.listdir(data)):  # the tokenizer sees the domains' text (the base model does not)
        if name.endswith("_train.jsonl") and name[:-len("_train.jsonl")] in domain_names:
            texts += [(lambda r: r["prompt"] + r["completion"])(json.loads(line))
                      for line in open(os.path.join(data, name), encoding="utf-8")]
    tokenizer = build_tokenizer(texts)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **MODEL)
    model = LlamaForCausalLM(config)
    args = TrainingArgs(max_steps=scale["base_steps"], lr=3e-3, batch_size=32, warmup_steps=50, lr_scheduler="cosine",
                        seed=seed, progress=progress, logging_steps=50)
    train_base(model, tokenizer, os.path.join(data, "generic.jsonl"), folder, args=args,
               data_format=DataFormat(text_field="text", max_length=128), log=log)


def _make_experts(folder: str, base: str, data: str, domains: list[Domain], scale: dict, seed: int, log,
                  progress: bool) -> None:
    from ..training.loop import train_expert
    from ..training.settings import LoraSettings, TrainingArgs

    lora = LoraSettings(rank=EXPERT["rank"], alpha=EXPERT["alpha"], dropout=EXPERT["dropout"],
                        target_modules=EXPERT["target_modules"])
    args = TrainingArgs(max_steps=scale["expert_steps"], lr=EXPERT["lr"], batch_size=EXPERT["batch_size"], seed=seed,
                        warmup_steps=20, progress=progress, logging_steps=50)
    os.makedirs(folder)
    for domain in domains:
        log(f"  expert {domain.name}")
        train_expert(base, os.path.join(data, f"{domain.name}_train.jsonl"), os.path.join(folder, domain.name),
                     lora=lora, args=args, log=log)


def _make_gate(folder: str, base: str, experts: str, data: str, domains: list[Domain], scale: dict, seed: int,
               log, progress: bool, routing: dict) -> None:
    from ..config import XLoraConfig
    from ..losses import RoutingLosses
    from ..training.data import DataFormat
    from ..training.loop import train_xlora
    from ..training.settings import TrainingArgs

    adapters = {d.name: os.path.join(experts, d.name) for d in domains}
    files = [os.path.join(data, f"{name}_train.jsonl")
             for name in [*adapters, COMPOSED.name, "conversations", f"{COMPOSED.name}_handover"]]
    config = XLoraConfig(adapters=adapters, xlora_depth=GATE["xlora_depth"], xlora_size=GATE["xlora_size"],
                         layerwise_scalings=GATE["layerwise_scalings"])
    args = TrainingArgs(max_steps=scale["gate_steps"], lr=GATE["lr"], batch_size=GATE["batch_size"], seed=seed,
                        warmup_steps=20, progress=progress, logging_steps=50)
    losses = RoutingLosses(routing_weight=routing.get("routing_weight", 0.0),
                           routing_anneal_steps=routing.get("routing_anneal_steps", 0))
    data_format = DataFormat(expert_field=routing.get("expert_field"))
    train_xlora(base, config, files, folder, args=args, data_format=data_format, routing=losses, log=log)


# ---- figures and report -----------------------------------------------------------------------------------------
def make_figures(out: str, base: str, xlora: str, data: str, domains: list[Domain], examples: dict) -> dict:
    """Per domain: heatmap + bars for its first held-out prompt; the composed task: the token history and the
    heatmap of one held-out prompt answered by X-LoRA; a multi-turn history across the domains."""
    from ..analysis import plot_history, plot_scalings, scalings_of_ids
    from ..loading import load_tokenizer
    from ..model import XLoraModel

    tokenizer = load_tokenizer(base)
    model = XLoraModel.from_pretrained(xlora, base=base)
    folder = os.path.join(out, "figures")
    os.makedirs(folder, exist_ok=True)
    figures: dict = {"scalings": {}, "history": None}
    for domain in domains:
        ids = tokenizer(examples[domain.name]["prompt"], return_tensors="pt")["input_ids"]
        log = scalings_of_ids(model, tokenizer, ids)
        path = os.path.join(folder, f"scalings_{domain.name}.png")
        plot_scalings(log, path, title=f"{domain.name}: \"{examples[domain.name]['prompt']}\"")
        figures["scalings"][domain.name] = os.path.relpath(path, out)
    figures.update(_composed_figures(out, folder, model, tokenizer, data))
    # a multi-turn exchange that moves between domains, each turn answered by X-LoRA
    by_name = {d.name: d for d in domains}
    ids = torch.zeros((1, 0), dtype=torch.long)
    segments, prompt_spans = [], []
    separator = tokenizer(CONVERSATION_SEPARATOR, add_special_tokens=False, return_tensors="pt")["input_ids"]
    for name in HISTORY_ORDER:
        start = ids.shape[1]
        prompt = tokenizer(examples[name]["prompt"], add_special_tokens=False, return_tensors="pt")["input_ids"]
        ids = torch.cat([ids, separator, prompt] if start else [prompt], dim=1)
        prompt_spans.append((ids.shape[1] - prompt.shape[1], ids.shape[1]))
        ids = torch.cat([ids, _answer_ids(model, tokenizer, ids, by_name[name].max_new_tokens)], dim=1)
        segments.append((start, ids.shape[1], name))
    history = scalings_of_ids(model, tokenizer, ids)
    history.segments = segments
    history.save(os.path.join(folder, "history_scalings.safetensors"))
    path = os.path.join(folder, "history.png")
    plot_history(history, path, title="X-LoRA scalings token by token over a multi-turn exchange")
    figures["history"] = os.path.relpath(path, out)
    per_expert = history.per_expert()  # (t, E)

    def top(start: int, end: int) -> str:
        return history.expert_names[int(per_expert[start:end].mean(0).argmax())]

    # (turn, top expert over its prompt tokens, top expert over the whole turn: separator, prompt and answer)
    figures["history_dominant"] = [(name, top(*span), top(start, end))
                                   for (start, end, name), span in zip(segments, prompt_spans)]
    figures["history_text"] = tokenizer.decode(ids[0])
    return figures


def _answer_ids(model, tokenizer, ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """X-LoRA's greedy answer to ids (1, t), without its end-of-sequence token: (1, n)."""
    new = model.generate(ids, max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id)[0, ids.shape[1]:]
    ends = (new == tokenizer.eos_token_id).nonzero()
    return new[:int(ends[0, 0]) if len(ends) else len(new)][None]


def _composed_figures(out: str, folder: str, model, tokenizer, data: str) -> dict:
    """The composed task's figures for the first held-out prompt whose answer meets the issue's two checks (else
    the first): the token history over prompt and answer, and the heatmap over the positions that wrote the answer.

    Checks per prompt: `mixes`: in some LoRA layer two experts each have a mean scaling >= 0.2 over the answer;
    `hands_over`: over the answer, the top expert (scalings summed over layers) goes from recall to
    protein_forward. A position's scalings are those that wrote the next token, as in generation."""
    from ..analysis import plot_history, plot_scalings, scalings_of_ids

    names = list(model.expert_names)
    checks, chosen = [], None
    for row in read_jsonl(os.path.join(data, f"{COMPOSED.name}_test.jsonl")):
        prompt = tokenizer(row["prompt"], return_tensors="pt")["input_ids"]
        answer = _answer_ids(model, tokenizer, prompt, COMPOSED.max_new_tokens)
        log = scalings_of_ids(model, tokenizer, torch.cat([prompt, answer], dim=1))
        n_prompt, n = prompt.shape[1], prompt.shape[1] + answer.shape[1]
        writing = log.scalings[n_prompt - 1:n - 1]  # (answer tokens, L, E): the positions that wrote the answer
        heat = writing.mean(0)  # (L, E)
        tops = [names[int(e)] for e in log.per_expert()[n_prompt - 1:n - 1].argmax(-1)]
        handover = "recall" in tops and "protein_forward" in tops[tops.index("recall"):]
        check = {"prompt": row["prompt"], "answer": tokenizer.decode(answer[0]).strip(),
                 "reference": row["reference"], "mixes": bool(((heat >= 0.2).sum(-1) >= 2).any()),
                 "hands_over": handover, "top_expert_per_answer_token": tops}
        checks.append(check)
        if chosen is None and check["mixes"] and check["hands_over"]:
            chosen = (check, log, n_prompt, n)
        if chosen is None and len(checks) == 1:
            first = (check, log, n_prompt, n)
    check, log, n_prompt, n = chosen or first
    text = [t for t in log.tokens]
    force_start = next((i for i in range(n_prompt, n) if "=" in text[i]), n)
    log.segments = [(0, n_prompt, "prompt"), (n_prompt, force_start, "recalled sequence"),
                    (force_start, n, "force")]
    history_path = os.path.join(folder, "composed_history.png")
    plot_history(log, history_path, title=f"composed: \"{check['prompt']}\" -> \"{check['answer']}\"")
    answer_log = type(log)(log.scalings[n_prompt - 1:n - 1], log.tokens[n_prompt - 1:n - 1], log.layer_names,
                           log.expert_names)
    heat_path = os.path.join(folder, "composed_scalings.png")
    plot_scalings(answer_log, heat_path, title=f"composed, positions writing \"{check['answer']}\"")
    return {"composed_history": os.path.relpath(history_path, out),
            "composed_scalings": os.path.relpath(heat_path, out), "composed_shown": check,
            "composed_checks": {"prompts": len(checks), "mixes": sum(c["mixes"] for c in checks),
                                "hands_over": sum(c["hands_over"] for c in checks),
                                "both": sum(c["mixes"] and c["hands_over"] for c in checks),
                                "shown": check}}




def _write_json(path: str, value) -> None:
    atomic_write_text(path, json.dumps(value, indent=2) + "\n")
