from __future__ import annotations

import json
import os

from loramix.cli import main


def test_quickstart_builds_saves_and_reloads(tmp_path, capsys):
    assert main(["quickstart", "--out", str(tmp_path / "qs")]) == 0
    printed = capsys.readouterr().out
    assert "identical logits" in printed
    saved = tmp_path / "qs" / "xlora"
    config = json.load(open(saved / "xlora_config.json"))
    assert config["adapters"] == ["expert_0", "expert_1", "expert_2"]
    assert sorted(os.listdir(saved / "expert_1")) == ["adapter_config.json", "adapter_model.safetensors"]
