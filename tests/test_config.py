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
    (dict(adapters=A, global_scaling_weight=float("inf")), "global_scaling_weight"),
    (dict(adapters=A, global_scaling_weight=float("nan")), "global_scaling_weight"),
    (dict(adapters=A, softmax_temperature=float("inf")), "softmax_temperature"),
    (dict(adapters=A, softmax_temperature=10**400), "softmax_temperature"),
    (dict(adapters=A, scaling_pass_value=float("-inf")), "scaling_pass_value"),
    (dict(adapters=A, scaling_pass_value=float("nan")), "scaling_pass_value"),
    (dict(adapters=A, xlora_dropout_p=float("nan")), "xlora_dropout_p"),
    (dict(adapters={"a\n": "x"}), "adapters"),
    (dict(adapters=["a", "b\n"]), "adapters"),
    (dict(adapters={"a": None}), "adapters"),
    (dict(adapters=["a", 3]), "adapters"),
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


def test_setters_reject_non_finite_values(tmp_path):
    from helpers import make_experts, tiny_base

    from loramix import XLoraModel

    base = tiny_base("llama")
    model = XLoraModel.from_base(base, XLoraConfig(adapters=make_experts(base, "llama", tmp_path, n=2)))
    for setter, field in ((model.set_global_scaling_weight, "global_scaling_weight"),
                          (model.set_softmax_temperature, "softmax_temperature"),
                          (model.set_scaling_pass_value, "scaling_pass_value")):
        for bad in (float("inf"), float("-inf"), float("nan")):
            with pytest.raises(ValueError, match=field):
                setter(bad)
    assert model.get_global_scaling_weight() == 1.0 and model.config.softmax_temperature == 1.0


# ---- fuzzing: any JSON value in any field gives a config or a ValueError naming the field -------------------------
FIELDS = ["adapters", "hidden_size", "enable_softmax", "enable_softmax_topk", "softmax_temperature",
          "layerwise_scalings", "top_k_lora", "xlora_depth", "xlora_size", "xlora_dropout_p",
          "enable_relu_and_dropout", "use_bias", "use_trainable_adapters", "scaling_pass_value",
          "global_scaling_weight", "base_model_id", "not_a_field"]


def _json_values():
    from hypothesis import strategies as st

    scalars = (st.none() | st.booleans() | st.integers() | st.integers(-3, 5)
               | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=8)
               | st.sampled_from(["a", "b\n", "../x", "expert_0", ""]))
    return st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                        | st.dictionaries(st.text(max_size=6), inner, max_size=4), max_leaves=8)


def _check_config_or_field_error(data, make):
    try:
        config = make(data)
    except ValueError as err:
        text = str(err)
        assert "\n" not in text, text
        assert any(name in text for name in FIELDS), text
        return
    config = config[0] if isinstance(config, tuple) else config
    assert isinstance(config, XLoraConfig) and config.n_experts >= 1
    assert XLoraConfig.from_dict(config.to_dict()) == config  # what is accepted round-trips


def test_fuzz_from_dict():
    from hypothesis import given, settings
    from hypothesis import strategies as st

    base = st.fixed_dictionaries({"adapters": st.just({"a": "x", "b": "y"})})

    @settings(max_examples=200, deadline=None, derandomize=True)
    @given(base, st.dictionaries(st.sampled_from(FIELDS), _json_values(), max_size=4))
    def run(start, fields):
        _check_config_or_field_error({**start, **fields}, lambda d: XLoraConfig.from_dict(d, source="cfg"))

    run()


def test_fuzz_from_json_file(tmp_path):
    import json

    from hypothesis import given, settings
    from hypothesis import strategies as st

    path = tmp_path / "xlora_config.json"

    def read(data):
        path.write_text(json.dumps(data), encoding="utf-8")
        return XLoraConfig.from_json_file(path)

    @settings(max_examples=200, deadline=None, derandomize=True)
    @given(_json_values() | st.dictionaries(st.sampled_from(FIELDS), _json_values(), max_size=5))
    def run(data):
        try:
            read(data)
        except ValueError as err:
            assert "\n" not in str(err) and str(path) in str(err), str(err)
            return
        _check_config_or_field_error(data, read)

    run()
