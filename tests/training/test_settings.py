"""The training verbs' settings: each refuses a bad value by its field's name; LoRA target modules normalised."""

from __future__ import annotations

import pytest

from loramix.training.settings import LoraSettings, TrainingArgs


@pytest.mark.parametrize("field, value, message", [
    ("rank", 0, "rank: must be at least 1, got 0"),
    ("rank", 2.0, "rank: must be at least 1, got 2.0"),
    ("rank", True, "rank: must be at least 1, got True"),
    ("alpha", 0, "alpha: must be a positive number, got 0"),
    ("alpha", float("nan"), "alpha: must be a positive number, got nan"),
    ("dropout", 1.0, r"dropout: must be in \[0, 1\), got 1.0"),
    ("dropout", -0.1, r"dropout: must be in \[0, 1\), got -0.1"),
    ("target_modules", "", "target_modules: no module name in ''"),
    ("target_modules", " , ", "target_modules: no module name in ' , '"),
    ("target_modules", ["q_proj", 3], "target_modules: 'all-linear' or module names"),
])
def test_lora_settings_refuse_bad_values_by_name(field, value, message):
    with pytest.raises(ValueError, match=message):
        LoraSettings(**{field: value})


def test_lora_target_modules_as_peft_takes_them():
    assert LoraSettings().peft_target_modules == "all-linear"
    comma = LoraSettings(target_modules="q_proj, v_proj,")
    assert comma.target_modules == ("q_proj", "v_proj") and comma.peft_target_modules == ["q_proj", "v_proj"]
    assert LoraSettings(target_modules=["q_proj", "v_proj"]) == comma  # one value, however it was written


@pytest.mark.parametrize("field, value", [("resume", 1), ("progress", "no"), ("gradient_checkpointing", None),
                                          ("mixed_precision", "fp8"), ("lr_scheduler", "step")])
def test_training_args_refuse_bad_switches_by_name(field, value):
    with pytest.raises(ValueError, match=f"^{field}: "):
        TrainingArgs(**{field: value})
    assert TrainingArgs().lr is None  # each verb sets its own learning rate (settings.EXPERT_LR, GATE_LR)
