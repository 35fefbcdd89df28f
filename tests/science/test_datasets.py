"""science/datasets.py: splits that share no item and repeat exactly, the row formats, the licenses as the
installed packages declare them. Skipped where the data packages are not installed."""

from __future__ import annotations

import importlib.util
from importlib import metadata

import pytest

from loramix.science.datasets import DOMAINS, LICENSES, NAMES, SOURCES, licenses, load_rows, split_of

INSTALLED = [name for name in NAMES if importlib.util.find_spec(SOURCES[name][0]) is not None]


@pytest.mark.parametrize("name", INSTALLED)
def test_splits_share_no_item_and_repeat(name):
    splits = {split: load_rows(name, split) for split in ("train", "dev", "test")}
    keys = {split: {row["key"] for row in rows} for split, rows in splits.items()}
    assert not keys["train"] & keys["test"] and not keys["train"] & keys["dev"] and not keys["dev"] & keys["test"]
    assert all(split_of(row["key"]) == split for split, rows in splits.items() for row in rows)
    assert min(len(rows) for rows in splits.values()) >= 20
    assert load_rows(name, "test") == splits["test"]  # deterministic
    assert {r["key"] for r in load_rows(name, "test", seed=1)} != keys["test"]  # the seed moves items
    small = load_rows(name, "test", max_rows=10)
    assert len(small) == 10 and all(row in splits["test"] for row in small)
    assert all(row in small for row in load_rows(name, "test", max_rows=5))  # a smaller subset is inside


@pytest.mark.parametrize("name", INSTALLED)
def test_row_formats(name):
    for row in load_rows(name, "dev"):
        assert isinstance(row["prompt"], str) and row["prompt"] and isinstance(row["completion"], str)
        assert row["domain"] == DOMAINS[name]
        assert row["messages"] == [{"role": "user", "content": row["prompt"]},
                                   {"role": "assistant", "content": row["completion"]}]
        if "choices" in row:
            assert row["choices"][row["answer"]] == row["completion"] and len(set(row["choices"])) > 1
        else:
            assert float(row["completion"]) == pytest.approx(row["target"], abs=0.51)


def test_licenses_recorded_from_the_installed_metadata():
    recorded = licenses()
    assert set(recorded) == set(NAMES) == set(LICENSES)
    for name in INSTALLED:
        entry = recorded[name]
        assert entry["license"] == LICENSES[name], name
        assert entry["version"] == metadata.version(entry["package"]) and entry["provenance"]


def test_bad_names_are_refused():
    with pytest.raises(ValueError, match="data 'x/y': unknown"):
        load_rows("x/y", "train")
    with pytest.raises(ValueError, match="split 'valid'"):
        load_rows(NAMES[0], "valid")
