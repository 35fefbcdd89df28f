"""A tiny recipe for the build tests: the tests' tiny Llama, two synthetic tasks, two held-out sets."""

from __future__ import annotations

import pytest
from helpers import CHAT_TEMPLATE, save_tiny_model, synthetic_task, write_jsonl

RECIPE = """\
name: tiny
base: base
chat_template: chat.jinja
threads: 1
experts:
  - name: rev
    datasets: [rev.jsonl]
    lora: &lora {rank: 2, alpha: 4, dropout: 0.0, target_modules: [q_proj, v_proj]}
    training: &train {max_steps: 3, batch_size: 8, logging_steps: 1}
  - name: sum
    datasets: [{path: sum.csv, prompt_template: "s {a}+{b}=", completion_template: "{c}"}]
    lora: *lora
    training: *train
gate:
  xlora: {xlora_depth: 1, xlora_size: 8, layerwise_scalings: true}
  training: {max_steps: 3, batch_size: 8}
  compare_ce_only: true
evaluation:
  sets:
    - {name: rev, path: rev_test.jsonl, metric: choice}
    - {name: sum, path: sum_test.jsonl, metric: numeric}
  baselines: [base, experts, static_merge_cat, xlora, xlora_topk, xlora_ce_only]
  max_new_tokens: 3
  bootstrap: 50
"""


@pytest.fixture
def tiny_recipe(tmp_path):
    """The folder of a tiny two-expert recipe (recipe.yaml, a base, data files); returns the recipe's path."""
    save_tiny_model(tmp_path / "base")
    (tmp_path / "chat.jinja").write_text(CHAT_TEMPLATE)
    write_jsonl(tmp_path / "rev.jsonl", synthetic_task("rev", 16, 0))
    lines = ["a,b,c"] + [f"{r['prompt'][2:4]},{r['prompt'][5:7]},{r['completion']}"
                         for r in synthetic_task("sum", 16, 0)]
    (tmp_path / "sum.csv").write_text("\n".join(lines) + "\n")
    rev = synthetic_task("rev", 6, 1)
    write_jsonl(tmp_path / "rev_test.jsonl", [{**r, "choices": [r["completion"], r["completion"][::-1] + "x"],
                                               "answer": 0} for r in rev])
    write_jsonl(tmp_path / "sum_test.jsonl", [{**r, "target": float(r["completion"])}
                                              for r in synthetic_task("sum", 6, 1)])
    (tmp_path / "recipe.yaml").write_text(RECIPE)
    return tmp_path / "recipe.yaml"
