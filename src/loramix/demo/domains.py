"""The demo's synthetic data: five domains echoing the paper's experts, the composed task, the gate's extra rows
(hand-overs, conversations), the base model's generic text.

Everything is generated from a seed, so a run is reproducible, and everything is invented, so no model can know
it beforehand. Each domain gives (prompt, reference) pairs and a scorer mapping a generated answer to [0, 1].

Protein mechanics uses one fixed rule for the unfolding force of a sequence over ten residues:

    force(seq) = sum_i w(seq[i]) + 3 * #{i : seq[i] and seq[i+1] both hydrophobic}      (pN)
    w: G 1, A 2, S 2, T 3, P 3, V 4, L 5, I 5, F 6, W 7;   hydrophobic: V L I F W

* protein_forward: "fold <seq> =" -> the force; score 1 - |error| / 20 clipped to [0, 1] (0 if not a number).
* protein_inverse: "design <force> =" -> a sequence; score 1 if it uses only the ten residues, has 3-10 of them
  and its force by the same rule is within 5 pN of the target (the paper's cycle-consistency check), else 0.
* arithmetic: "sum <a>+<b> =" -> a + b, a in 10..89, b in 1..9 (a carry in about half the cases); exact match.
* logic: two rules and a fact about invented cells and proteins ("zel makes bor . kip makes dun . the cell
  vam has kip . vam makes") -> the protein the fact's rule gives; exact match.
* recall: "recall <material> <property> =" -> the value in a fixed table of invented materials (stiffness,
  colour, origin and a residue sequence), then " =", which marks where the value ends; exact match of the value.
  Half of the questions ask for the sequence, the one value of 3-8 tokens (the others are one token each).

Half of each domain's training rows carry one generic sentence before the prompt (with_context), so that an
expert also answers after other text: an earlier turn, or the "fold" that opens the composed task.

The composed task needs two experts in one answer, and no expert is trained on it:

* material_force: "fold recall <material> sequence =" -> "<the material's sequence> = <its force>": the
  sequence (and its end mark " =") is recall's knowledge, the force protein_forward's rule, which reads
  "fold ... <sequence> =" as in its own prompts. Half credit for the sequence (exact), half for the force (within
  5 pN of the force of the right sequence). The gate trains on it for half of the materials, and on hand-over
  rows over invented materials whose sequence the prompt gives (handover_rows).

Recall's end mark " =" is there for the gate, which reads the base model's hidden states and so cannot know
where a recalled sequence ends; it is also the text protein_forward expects before a force, and only an expert
can write it (the gate mixes experts, it cannot add a word none of them gives). The measurements behind these
choices are in loramix's docs/architecture.md (History).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Callable

RESIDUE_WEIGHT = {"G": 1, "A": 2, "S": 2, "T": 3, "P": 3, "V": 4, "L": 5, "I": 5, "F": 6, "W": 7}
HYDROPHOBIC = set("VLIFW")
RESIDUES = "".join(RESIDUE_WEIGHT)
FORCE_TOLERANCE = 5
FORCE_SCALE = 20.0

_SYLLABLES = ["ka", "zo", "mi", "ru", "te", "vo", "lu", "ne", "pa", "di", "xo", "be", "fi", "go", "sa", "qu"]
_PROPERTIES = {"stiffness": "number", "colour": "word", "origin": "word", "sequence": "residues"}
_COLOURS = ["red", "blue", "green", "amber", "grey", "white", "black", "violet"]
_ORIGINS = ["moon", "reef", "forest", "desert", "glacier", "volcano", "marsh", "canyon"]


def unfolding_force(sequence: str) -> int:
    """The demo's rule (see the module docstring); raises KeyError on a residue outside the ten."""
    force = sum(RESIDUE_WEIGHT[r] for r in sequence)
    return force + 3 * sum(1 for a, b in zip(sequence, sequence[1:]) if a in HYDROPHOBIC and b in HYDROPHOBIC)


def _first_token(answer: str) -> str:
    parts = answer.strip().split()
    return parts[0] if parts else ""


def first_number(answer: str) -> int | None:
    m = re.match(r"-?\d+", answer.strip())
    return int(m.group()) if m else None


def score_forward(answer: str, reference: str) -> float:
    value = first_number(answer)
    return 0.0 if value is None else max(0.0, 1.0 - abs(value - int(reference)) / FORCE_SCALE)


def score_inverse(answer: str, reference: str) -> float:
    sequence = _first_token(answer)
    if not 3 <= len(sequence) <= 10 or any(r not in RESIDUE_WEIGHT for r in sequence):
        return 0.0
    return float(abs(unfolding_force(sequence) - int(reference)) <= FORCE_TOLERANCE)


def score_exact(answer: str, reference: str) -> float:
    return float(_first_token(answer) == reference)


@dataclass(frozen=True)
class Domain:
    name: str
    description: str
    examples: Callable[[random.Random], tuple[str, str, str]]  # one (prompt, completion, reference)
    score: Callable[[str, str], float]  # (generated answer, reference) -> [0, 1]
    max_new_tokens: int


def _sequence(rnd: random.Random) -> str:
    return "".join(rnd.choice(RESIDUES) for _ in range(rnd.randint(3, 8)))


def _forward(rnd: random.Random) -> tuple[str, str]:
    seq = _sequence(rnd)
    force = str(unfolding_force(seq))
    return f"fold {seq} =", force, force


def _inverse(rnd: random.Random) -> tuple[str, str]:
    seq = _sequence(rnd)
    force = str(unfolding_force(seq))
    return f"design {force} =", seq, force  # scored against the target force, not this one sequence


def _arithmetic(rnd: random.Random) -> tuple[str, str]:
    a, b = rnd.randint(10, 89), rnd.randint(1, 9)
    return f"sum {a}+{b} =", str(a + b), str(a + b)


def _word(rnd: random.Random, n: int = 2) -> str:
    return "".join(rnd.choice(_SYLLABLES) for _ in range(n))


def _logic(rnd: random.Random) -> tuple[str, str]:
    names: list[str] = []  # a list, not a set: a set's order follows the process's string hash seed
    while len(names) < 5:
        word = _word(rnd)
        if word not in names:
            names.append(word)
    rnd.shuffle(names)
    signal1, protein1, signal2, protein2, cell = names
    which = rnd.random() < 0.5
    signal, protein = (signal1, protein1) if which else (signal2, protein2)
    prompt = f"logic {signal1} makes {protein1} . {signal2} makes {protein2} . {cell} has {signal} . {cell} makes"
    return prompt, protein, protein


def material_table(seed: int, n: int = 16) -> dict[str, dict[str, str]]:
    """The invented materials and their properties (fixed by the seed)."""
    rnd = random.Random(f"materials-{seed}")
    names: list[str] = []
    while len(names) < n:
        name = _word(rnd, 3) + "ite"
        if name not in names:
            names.append(name)
    return {name: {"stiffness": str(rnd.randint(10, 99)), "colour": rnd.choice(_COLOURS),
                   "origin": rnd.choice(_ORIGINS), "sequence": _sequence(rnd)} for name in names}


def make_domains(seed: int) -> list[Domain]:
    table = material_table(seed)
    materials = list(table)
    one_token = [p for p in _PROPERTIES if p != "sequence"]

    def recall(rnd: random.Random) -> tuple[str, str]:
        material = rnd.choice(materials)
        prop = "sequence" if rnd.random() < 0.5 else rnd.choice(one_token)
        value = table[material][prop]
        return f"recall {material} {prop} =", f"{value} =", value  # " =" marks the value's end (see above)

    return [
        Domain("protein_forward", "sequence -> unfolding force (pN), by the rule above", _forward, score_forward, 4),
        Domain("protein_inverse", "target force -> a sequence with that force (cycle-consistency)", _inverse,
               score_inverse, 10),
        Domain("arithmetic", "two-number addition, exact match", _arithmetic, score_exact, 4),
        Domain("logic", "pick the rule that the fact triggers, exact match", _logic, score_exact, 4),
        Domain("recall", "properties of invented materials (a sequence among them), exact match", recall,
               score_exact, 10),
    ]


def domain_rows(domain: Domain, n: int, seed: int, split: str, exclude: set[str] = frozenset()) -> list[dict]:
    """n prompt/completion/reference rows of a domain. Held-out ("test") rows have distinct prompts; training
    rows may repeat a prompt but never use one in `exclude` (the held-out prompts).

    Two domains differ by nature: recall is memorisation (its held-out prompts ask about the table the expert
    was taught; there is no unseen fact to recall), and protein_inverse asks for *a* sequence with a target force
    (about 80 targets exist, each with many answers), so its held-out targets may also occur in training, with
    other sequences; what is held out is the answer, checked by the force rule."""
    rnd = random.Random(f"{domain.name}-{split}-{seed}")
    shared = domain.name in ("recall", "protein_inverse")
    rows, seen = [], set()
    attempts = 0
    while len(rows) < n and attempts < 1000 * n:
        attempts += 1
        prompt, completion, reference = domain.examples(rnd)
        if (prompt in exclude and not shared) or (split == "test" and prompt in seen):
            continue
        seen.add(prompt)
        rows.append({"prompt": prompt, "completion": " " + completion, "reference": reference,
                     "domain": domain.name, "expert": domain.name})
    return rows


# ---- tasks that need two experts in one answer, and conversations across the domains (for the gate only) ----------
def composed_parts(answer: str, reference: str) -> tuple[bool, bool]:
    """(sequence right, force right) of a composed answer: the sequence is the answer's first word (exact), the
    force the first number in the answer, within FORCE_TOLERANCE pN of the rule's force of the right sequence."""
    sequence, force = reference.split()
    numbers = re.findall(r"-?\d+", answer)
    return _first_token(answer) == sequence, bool(numbers) and abs(int(numbers[0]) - int(force)) <= FORCE_TOLERANCE


def score_composed(answer: str, reference: str) -> float:
    """Half for the recalled sequence, half for its force (see composed_parts)."""
    sequence_right, force_right = composed_parts(answer, reference)
    return 0.5 * sequence_right + 0.5 * force_right


COMPOSED = Domain("material_force", "\"fold recall <material> sequence =\" -> the material's sequence (recall's "
                  "knowledge), then \"= <its force>\" (protein_forward's rule); half credit per part",
                  lambda rnd: ("", "", ""), score_composed, 14)


def composed_rows(seed: int, split: str, n: int | None = None) -> list[dict]:
    """Rows of the composed task. Its two parts are the recall and protein_forward experts' formats one after
    the other, so each expert sees text it knows; no expert is trained on these rows, only the gate, whose rows
    ("train") ask about half of the materials, while the held-out rows ("test") ask about the other half, both
    halves with sequences of 3 to 8 residues.

    Each row labels its spans: the prompt, the sequence and its end mark " =" are recall's to write, the force
    protein_forward's (the `expert` field, [start, end, expert] over prompt + completion; see
    loramix.training.data.DataFormat). The prompt is recall's too because the recall expert reads the material's
    name with its own weights (why: docs/architecture.md, History)."""
    table = material_table(seed)
    # the materials in order of sequence length, taken alternately, so both halves cover the lengths (split by
    # name, the gate's materials had 3-5 residues and half the held-out ones 7-8, and after those the gate ended
    # the answer at the end mark instead of passing to protein_forward: measured, 3 of those 4 answers)
    by_length = sorted(table, key=lambda name: (len(table[name]["sequence"]), name))
    materials = by_length[0 if split == "train" else 1::2]
    if n is not None:
        rnd = random.Random(f"composed-{split}-{seed}")
        materials = [rnd.choice(materials) for _ in range(n)]
    rows = []
    for material in materials:
        sequence = table[material]["sequence"]
        force = unfolding_force(sequence)
        prompt, recalled, computed = f"fold recall {material} sequence =", f" {sequence} =", f" {force}"
        handover = len(prompt) + len(recalled)
        rows.append({"prompt": prompt, "completion": recalled + computed, "reference": f"{sequence} {force}",
                     "domain": COMPOSED.name,
                     "expert": [[0, handover, "recall"], [handover, handover + len(computed), "protein_forward"]]})
    return rows


def handover_rows(seed: int, n: int) -> list[dict]:
    """n rows that teach the gate where a composed answer passes from recall to protein_forward, for any material
    and sequence: "fold recall <invented material> sequence = <random sequence> =" -> " <its force>". The
    materials are none of the table's, so no expert knows them, and the sequence is part of the prompt: only the
    force is trained, and only the force is labelled (protein_forward's, from the end mark on). Their prompt is
    not labelled because no expert writes it (why these rows, and why unlabelled: docs/architecture.md,
    History)."""
    rnd = random.Random(f"handover-{seed}")
    known = set(material_table(seed))
    rows = []
    while len(rows) < n:
        material = _word(rnd, 3) + "ite"
        if material in known:
            continue
        sequence = _sequence(rnd)
        prompt, computed = f"fold recall {material} sequence = {sequence} =", f" {unfolding_force(sequence)}"
        rows.append({"prompt": prompt, "completion": computed, "domain": COMPOSED.name,
                     "expert": [[len(prompt), len(prompt) + len(computed), "protein_forward"]]})
    return rows


CONVERSATION_SEPARATOR = " |"
CONVERSATION_TURNS = (2, 5)  # the fewest and most turns of a training conversation


def conversation_rows(train: dict[str, list[dict]], n: int, seed: int,
                      turns: tuple[int, int] = CONVERSATION_TURNS) -> list[dict]:
    """n exchanges of 2 to 5 turns (`turns`) over distinct domains, drawn from the domains' training rows and
    joined with " |": the earlier turns (prompt and answer) are context, the last answer is trained, and every
    turn (its separator included) is labelled with its domain's expert, so the gate learns to follow a
    conversation. Up to 5 turns, as many as the exchange the demo draws (docs/architecture.md, History)."""
    rnd = random.Random(f"conversations-{seed}")
    names = sorted(train)
    rows = []
    for _ in range(n):
        chosen = [rnd.choice(train[name]) for name in rnd.sample(names, rnd.randint(*turns))]
        text, spans = "", []
        for k, turn in enumerate(chosen):
            start = len(text)
            text += (CONVERSATION_SEPARATOR + " " if k else "") + turn["prompt"]
            last = k == len(chosen) - 1
            if not last:
                text += turn["completion"]
            spans.append([start, len(text) + (len(turn["completion"]) if last else 0), turn["domain"]])
        rows.append({"prompt": text, "completion": chosen[-1]["completion"], "domain": "conversation",
                     "expert": spans})
    return rows


_GENERIC = [
    "the {material} is {colour} and was found near the {origin} .",
    "a protein like {seq} can fold in water within {n} seconds .",
    "we counted {n} cells and {m} proteins in the sample .",
    "the cell {word} has many proteins and some {word2} .",
    "{word} and {word2} are names of new materials .",
    "in {n} years the {origin} will change its colour to {colour} .",
    "some sequences such as {seq} or {seq2} are long .",
    "the force on the fibre was measured {n} times .",
    "material {material} feels {colour} in the {origin} light .",
    "{n} and {m} are numbers written in a report .",
    "say {word} {word2} {word3} , then say {word} {word2} {word3} again .",
    "the list {word} , {word2} , {word3} starts with {word} and ends with {word3} .",
    "{seq} is read as {seq} by the machine .",
    # fixed sentences in which each residue, digit, colour, origin and the sign " =" follows predictably: without
    # them the base model only ever predicts these tokens as a uniform guess (or never, " ="), its output layer
    # cannot tell them apart, and no LoRA expert (which adapts the layers inside, not the output layer) could
    # write them with confidence (measured: an expert trained on one row alone plateaued at p = 0.44 per residue
    # and p = 0.05 for " =")
    f"the residues in order are {RESIDUES} .",
    "the digits in order are 0123456789 .",
    "the sign = is read as equals .",
    f"the colours in order are {' '.join(_COLOURS)} .",
    f"the places in order are {' '.join(_ORIGINS)} .",
]


def _fill(rnd: random.Random, materials: list[str]) -> dict[str, object]:
    return dict(material=rnd.choice(materials), colour=rnd.choice(_COLOURS), origin=rnd.choice(_ORIGINS),
                seq=_sequence(rnd), seq2=_sequence(rnd), n=rnd.randint(0, 99), m=rnd.randint(0, 99),
                word=_word(rnd), word2=_word(rnd), word3=_word(rnd))


def generic_text(n: int, seed: int) -> list[dict]:
    """Sentences over the domains' vocabulary (words, numbers, sequences) that teach none of the tasks."""
    rnd = random.Random(f"generic-{seed}")
    materials = list(material_table(seed + 1000))  # other invented names than the recall table's
    rows = []
    for _ in range(n):
        a, b = rnd.sample(_GENERIC, 2)
        fill = _fill(rnd, materials)
        rows.append({"text": f"{a.format(**fill)} {b.format(**fill)}"})
    return rows


CONTEXT_SHARE = 0.5  # of a domain's training rows, preceded by a generic sentence (see with_context)


def with_context(rows: list[dict], seed: int, share: float = CONTEXT_SHARE) -> list[dict]:
    """The rows, a `share` of them with one generic sentence before the prompt, as a domain's examples come with
    varied context in instruction data. The context is not trained, and the row's expert label covers the task's
    own text only (the context is unlabelled). An expert that only ever saw its prompt at the start of the text
    fails when anything comes before it: an earlier turn, or the "fold" that opens the composed task (measured:
    docs/architecture.md, History)."""
    rnd = random.Random(f"context-{seed}")
    materials = list(material_table(seed + 1000))
    out = []
    for row in rows:
        if not isinstance(row["expert"], str):
            raise ValueError(f"with_context: a row labelled by spans ({row['expert']!r}), expected one expert's name")
        if rnd.random() < share:
            context = rnd.choice(_GENERIC).format(**_fill(rnd, materials))
            prompt = f"{context} {row['prompt']}"
            row = {**row, "prompt": prompt,
                   "expert": [[len(context), len(prompt) + len(row["completion"]), row["expert"]]]}
        out.append(row)
    return out
