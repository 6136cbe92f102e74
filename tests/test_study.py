"""The optimizer-grade study: its summary numbers, table and findings on hand-made results
(recoveries, collapse, rank correlation, the verdict's direction), the evaluation subset,
and `zounlearn study --quick` end to end (table and plots). The machinery is tested, never
the papers' conclusion."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys

import pytest

from zounlearn.cli import main
from zounlearn.robustness.study import StudySettings, evaluation_data
from zounlearn.robustness.study_report import _spearman, findings, summarize, table
from zounlearn.unlearning import synthetic_data, synthetic_people

F, R = "forget/qa_accuracy", "retain/qa_accuracy"


def _result(optimizer: str, grade: str, forget: float, retain: float, heldout: tuple[float, float],
            quantized: float, finetuned: float, l2: float, seed: int = 0) -> dict:
    metrics = lambda f: {F: f, R: retain, "forget/loss": 1.0}  # noqa: E731
    return {
        "optimizer": optimizer, "grade": grade, "objective": "npo", "seed": seed, "lr": 1e-3, "reached": True,
        "unlearned": {F: forget, R: retain},
        "relearning": {"steps": [0, 10], "heldout": [metrics(heldout[0]), metrics(heldout[1])],
                       "whole": [metrics(forget), metrics(heldout[1])]},
        "retain_finetune": {"steps": [0, 10], "whole": [metrics(forget), metrics(finetuned)]},
        "quantization": {"int8": metrics(forget), "int4-g64": metrics(quantized), "nf4-g64": metrics(forget)},
        "noise": {"0.1": {"mean": metrics(forget), "std": metrics(0.0)}},
        "distance": {"relative": l2}, "connectivity": {"barrier": {"forget/loss": 0.5, "retain/loss": 0.1}},
    }


ORIGINAL = {F: 1.0, R: 0.9}


def test_summary_numbers_are_the_recoveries():
    row = summarize(_result("adamw", "first-order", 0.1, 0.8, (0.05, 0.45), 0.3, 0.2, 0.07), ORIGINAL)
    assert row["relearn_recovery"] == pytest.approx(0.40)  # held-out: 0.05 -> 0.45
    assert row["quant_recovery"] == pytest.approx(0.20)  # worst 4-bit scheme 0.3 vs 0.1 (int8 is not 4-bit)
    assert row["retain_ft_recovery"] == pytest.approx(0.10)
    assert row["l2"] == 0.07 and row["retain_barrier"] == 0.1 and not row["collapsed"]
    assert summarize(_result("zo_sgd", "zeroth-order", 0.0, 0.44, (0, 0), 0, 0, 1.0), ORIGINAL)["collapsed"]


def test_findings_compare_grades_and_leave_out_collapsed_results():
    rows = [summarize(r, ORIGINAL) for r in (
        _result("adamw", "first-order", 0.1, 0.8, (0.1, 0.6), 0.1, 0.1, 0.05),
        _result("adamw", "first-order", 0.1, 0.8, (0.1, 0.4), 0.1, 0.1, 0.06, seed=1),
        _result("signsgd", "compressed first-order", 0.1, 0.8, (0.1, 0.2), 0.1, 0.1, 0.2),
        _result("zo_sgd", "zeroth-order", 0.0, 0.1, (0.0, 0.9), 0.0, 0.0, 2.0))]
    text = "\n".join(findings(rows))
    assert "collapsed" in text and "zo_sgd/npo" in text
    # first order regained 0.4 on average, the downgraded (sign) 0.1; zo_sgd (collapsed, +0.9) is not counted
    assert "regained +0.10 on average against +0.40 for first order: this agrees" in text
    assert "correlation between relative L2 distance and relearning recovery is -1.00" in text
    flipped = [dict(r, relearn_recovery=-r["relearn_recovery"]) for r in rows]
    assert "this disagrees" in "\n".join(findings(flipped))
    lines = table(rows).splitlines()
    assert len(lines) == 2 + 3 and "0.50 ± 0.10" in lines[2] and "(collapsed)" in lines[4]


def test_spearman_by_hand():
    assert _spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert _spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ties share their mean rank: ranks x = (0, 1.5, 1.5, 3), y = (0, 1, 2, 3)
    assert _spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.9486833, abs=1e-6)
    assert math.isnan(_spearman([1, 2], [1, 2]))


def test_evaluation_subset_keeps_whole_people():
    data = synthetic_data(0, n_people=30)
    cut = evaluation_data(data, retain_people=4)
    assert cut.forget == data.forget and cut.holdout == data.holdout
    assert cut.retain.qa == data.retain.qa[:20] and len(cut.retain.train) == 4 * len(data.retain.train) // 27
    people = synthetic_people(0, n_people=30).retain
    texts = " ".join(e.prompt + " " + e.answer for e in (*cut.retain.train, *cut.retain.qa, *cut.retain.choice))
    assert all(p.name in texts for p in people[:4]) and not any(p.name in texts for p in people[4:])


def test_evaluation_subset_refuses_other_layouts():
    data = synthetic_data(0, n_people=30)
    odd = dataclasses.replace(data, retain=dataclasses.replace(data.retain, qa=data.retain.qa[:-1]))
    with pytest.raises(ValueError, match="synthetic data set's layout"):
        evaluation_data(odd, retain_people=4)


def test_settings_reject_unknown_optimizers():
    with pytest.raises(ValueError, match="no learning-rate grid for zo_adam"):
        StudySettings(optimizers=("adamw", "zo_adam"))


def test_settings_reject_unknown_objectives():
    with pytest.raises(ValueError, match="unknown objective 'gd'"):
        StudySettings(objectives=("npo", "gd"))


@pytest.mark.parametrize("flags, match", [
    (["--seeds", "0,a"], "--seeds takes a comma-separated list of integers"),
    (["--seeds", "0,,1"], "--seeds takes a comma-separated list"),
    (["--seeds", "-1"], "--seeds must be >= 0"),
    (["--optimizers", "adamw,foo"], "no learning-rate grid for foo"),
    (["--objectives", "npo,"], "--objectives takes a comma-separated list"),
    (["--objectives", "foo"], "unknown objective 'foo'"),
    (["--output", "FULL"], "exists and is not empty"),
])
def test_study_bad_input_is_one_line_exit_2_before_any_work(tmp_path, capsys, monkeypatch, flags, match):
    import zounlearn.unlearning as unlearning

    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("")
    monkeypatch.setattr(unlearning, "embedded_model", lambda *a, **k: pytest.fail("loaded the model"))
    argv = ["study", "--output", str(tmp_path / "out"), *[str(full) if f == "FULL" else f for f in flags]]
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and match in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_study_quick_writes_its_table_and_plots(tmp_path, embedded_cache):
    env = {**os.environ, "ZOUNLEARN_CACHE": str(embedded_cache)}
    out = subprocess.run([sys.executable, "-m", "zounlearn", "study", "--quick", "--output", str(tmp_path / "s")],
                         capture_output=True, text=True, timeout=900, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    study = tmp_path / "s"
    markdown = (study / "study.md").read_text()
    assert "| npo | adamw | first-order |" in markdown and "## Findings" in markdown
    assert "`zounlearn study --quick --output" in markdown
    result = json.loads((study / "study.json").read_text())
    assert [r["optimizer"] for r in result["results"]] == ["adamw", "signadam", "zo_sgd", "hybrid"]
    for r in result["results"]:
        assert r["relearning"]["steps"] == [0, 10, 30] and set(r["quantization"]) == {"int8", "int4-g64", "nf4-g64"}
        assert r["connectivity"]["t"] == [0.0, 0.5, 1.0]
    for name in ("relearning", "quantization", "connectivity"):
        assert (study / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
