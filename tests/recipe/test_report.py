"""The report's mean over sets: accuracies are averaged with accuracies only (a numeric error in kcal/mol, or an
R², has other units and would outweigh them), and the table names the sets it averaged."""

from __future__ import annotations

from loramix.recipe.report import averaged_sets, table


def test_only_proportions_are_averaged_with_each_other():
    assert averaged_sets({"a": "choice", "b": "numeric", "c": "exact_match", "d": "r2"}) == ["a", "c"]
    assert averaged_sets({"a": "numeric", "b": "numeric"}) == ["a", "b"]  # one metric: comparable
    assert averaged_sets({"a": "numeric", "b": "r2"}) == []


def test_the_table_names_the_averaged_sets_and_shows_each_set():
    results = {"domains": {"acc": {"metric": "choice", "intervals": {"base": [0.5, 0.4, 0.6]}},
                           "err": {"metric": "numeric", "intervals": {"base": [-3.0, -4.0, -2.0]}}},
               "mean_over_sets": {"base": [0.5, 0.4, 0.6]}, "mean_over_sets_of": ["acc"]}
    header, _, row = table(results).splitlines()
    assert header == "| system | acc (choice) | err (numeric) | mean over acc |"
    assert row == "| base | 0.500 [0.400, 0.600] | -3.000 [-4.000, -2.000] | 0.500 [0.400, 0.600] |"
    no_mean = table({**results, "mean_over_sets": {}, "mean_over_sets_of": []})
    assert no_mean.splitlines()[0] == "| system | acc (choice) | err (numeric) |"
