"""The metric registry: one entry per key evaluate can report, each with a known group and kind, in
the order tables list them; formatting by kind; unregistered keys kept after their group."""

from __future__ import annotations

import math

from zounlearn.unlearning.metrics import GROUPS, METRICS, format_metric, is_fraction, metric, ordered


def test_every_entry_is_consistent():
    assert len(METRICS) == len(set(METRICS))
    for key, entry in METRICS.items():
        assert entry.key == key and entry.group in GROUPS and entry.kind in ("fraction", "pvalue", "number")
        assert entry.is_fraction == (entry.kind != "number")
    # open-unlearning's names where they mean the same
    for key in ("forget_quality", "forget_truth_ratio", "forget_Q_A_Prob", "forget_Q_A_ROUGE", "model_utility",
                "retain_Truth_Ratio", "privleak", "extraction_strength", "exact_memorization", "mia_min_k"):
        assert key in METRICS
    assert [m.key for m in METRICS.values() if m.needs_retain_model] == ["forget_quality", "privleak"]
    assert metric("forget_quality").higher_is_better and metric("forget/qa_accuracy").higher_is_better is False
    assert metric("privleak").goal == 0.0 and metric("no/such") is None


def test_table_order_groups_and_unregistered_keys():
    keys = ["holdout/loss", "zzz", "privleak", "retain/qa_accuracy", "forget/loss", "forget/qa_accuracy",
            "forget_custom", "retain/foo"]
    assert ordered(keys) == ["forget/qa_accuracy", "forget/loss", "retain/qa_accuracy", "privleak", "holdout/loss",
                             "forget_custom", "retain/foo", "zzz"]
    order = list(METRICS)
    assert order.index("forget_quality") < order.index("retain/qa_accuracy") < order.index("mia_min_k") \
        < order.index("holdout/qa_accuracy")


def test_formatting_by_kind():
    assert format_metric(0.5, "forget/qa_accuracy") == "0.500" and is_fraction("forget/qa_accuracy")
    assert format_metric(3.2e-9, "forget_quality") == "3.20e-09" and format_metric(0.25, "forget_quality") == "0.250"
    assert format_metric(-99.41, "privleak") == "-99.41" and not is_fraction("privleak")
    assert format_metric(12345.0, "forget/perplexity") == "1.234e+04"
    assert format_metric(0.1, "unregistered", signed=True) == "+0.1000" and not is_fraction("unregistered")
    assert format_metric(math.nan, "forget_quality", signed=True) == "nan"
    assert format_metric(-math.inf, "forget/loss") == "-inf"
