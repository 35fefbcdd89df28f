"""`loramix build` on a tiny recipe: the stages' outputs against the library run by hand, results.json in the
demo's layout, a rerun that reuses every stage, and a damaged stage made again with what depends on it."""

from __future__ import annotations

import json
import os

import torch

from loramix.recipe.build import build


def _quiet(*_):
    pass


def test_build_runs_reuses_and_remakes_damaged_stages(tiny_recipe, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from loramix.loading import load_tokenizer
    from loramix.recipe.evaluate import eval_rows
    from loramix.recipe.schema import load_recipe
    from loramix.science.scoring import score_rows
    from loramix.training.loop import train_expert

    out = tmp_path / "out"
    results = build(str(tiny_recipe), str(out), progress=False, log=_quiet)
    for path in ("experts/rev/adapter_model.safetensors", "experts/sum/adapter_config.json", "xlora",
                 "xlora_ce_only", "report.md", "results.json", "figures/history.png"):
        assert os.path.exists(out / path), path
    # the expert is what train_expert makes by hand with the recipe's settings (the CSV read with its template)
    recipe = load_recipe(str(tiny_recipe))
    spec = recipe.experts[1]
    train_expert(str(tmp_path / "base"), spec.datasets, str(tmp_path / "by_hand"), lora=spec.lora,
                 args=spec.training, tokenizer=load_tokenizer(str(tmp_path / "base")), log=_quiet)
    from safetensors.torch import load_file

    ours, theirs = (load_file(f"{d}/adapter_model.safetensors") for d in (out / "experts/sum", tmp_path / "by_hand"))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    # the demo's layout; an expert's score is score_rows on the PEFT model by hand
    row = results["domains"]["rev"]
    assert set(row) >= {"base", "experts", "static_merge", "xlora", "xlora_topk", "xlora_ce_only", "intervals"}
    tok = load_tokenizer(str(tmp_path / "base"))
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tmp_path / "base")),
                                      str(out / "experts/rev"))
    scores = score_rows(model, tok, eval_rows(recipe.evaluation.sets[0].source), "choice")
    assert row["experts"]["rev"] == round(sum(scores) / len(scores), 4)
    low, high = row["intervals"]["expert:rev"][1:]
    assert low <= row["experts"]["rev"] <= high
    assert set(results["routing"]["rev"]) == {"rev", "sum"}
    assert abs(sum(results["routing"]["rev"].values()) - 1) < 1e-3
    assert json.loads((out / "results.json").read_text())["domains"] == results["domains"]
    # a rerun reuses every stage and gives the same scores
    again = build(str(tiny_recipe), str(out), progress=False, log=_quiet)
    assert again["stages_run"] == [] and again["domains"] == results["domains"]
    # a damaged expert is made again, and the stages that depend on it, not the other expert
    os.remove(out / "experts/sum/adapter_model.safetensors")
    third = build(str(tiny_recipe), str(out), progress=False, log=_quiet)
    assert "experts/rev" in third["stages_reused"]
    assert {"experts/sum", "xlora", "xlora_ce_only", "evaluation/expert_sum", "evaluation/xlora",
            "figures"} <= set(third["stages_run"])
    assert "evaluation/expert_rev" not in third["stages_run"]  # its expert was reused
    assert third["domains"] == results["domains"]  # seeded: the same expert again
    # an unfinished stage (no record: the run stopped inside it) is made again
    os.remove(out / "xlora" / ".stage.json")
    fourth = build(str(tiny_recipe), str(out), progress=False, log=_quiet)
    assert "xlora" in fourth["stages_run"] and "experts/sum" in fourth["stages_reused"]
