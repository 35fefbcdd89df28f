from __future__ import annotations

import pytest

from loramix import XLoraConfig

A = {"a": "x", "b": "y", "c": "z"}


@pytest.mark.parametrize("kwargs,field", [
    (dict(adapters={}), "adapters"),
    (dict(adapters=["a", "a"]), "adapters"),
    (dict(adapters={"../evil": "x"}), "adapters"),
    (dict(adapters=A, top_k_lora=0), "top_k_lora"),
    (dict(adapters=A, top_k_lora=4), "top_k_lora"),
    (dict(adapters=A, softmax_temperature=0.0), "softmax_temperature"),
    (dict(adapters=A, softmax_temperature=float("nan")), "softmax_temperature"),
    (dict(adapters=A, xlora_depth=0), "xlora_depth"),
    (dict(adapters=A, xlora_size=0), "xlora_size"),
    (dict(adapters=A, xlora_dropout_p=1.0), "xlora_dropout_p"),
    (dict(adapters=A, hidden_size=-1), "hidden_size"),
    (dict(adapters=A, enable_softmax_topk=True, top_k_lora=2), "enable_softmax_topk"),
    (dict(adapters=A, enable_softmax=False, enable_softmax_topk=True), "enable_softmax_topk"),
    (dict(adapters=A, layerwise_scalings="yes"), "layerwise_scalings"),
    (dict(adapters=A, global_scaling_weight=None), "global_scaling_weight"),
])
def test_invalid_values_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        XLoraConfig(**kwargs)


def test_defaults_are_peft_defaults_and_dict_round_trip():
    from peft import XLoraConfig as PeftXLoraConfig

    ours = XLoraConfig(adapters=A, hidden_size=32)
    theirs = PeftXLoraConfig(adapters=A, hidden_size=32)
    for name in ("enable_softmax", "enable_softmax_topk", "softmax_temperature", "layerwise_scalings", "top_k_lora",
                 "xlora_depth", "xlora_size", "xlora_dropout_p", "use_trainable_adapters", "scaling_pass_value",
                 "global_scaling_weight"):
        assert getattr(ours, name) == getattr(theirs, name), name
    assert XLoraConfig.from_dict(ours.to_dict()) == ours
    assert XLoraConfig(adapters=A, scaling_pass_value=None).resolved_scaling_pass_value() == pytest.approx(1 / 3)
