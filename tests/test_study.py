"""The optimizer-grade study: its statistics (t-intervals, paired differences, the verdict rule) by
hand, the compute budgets, the learning-rate and attack-rate rules on scripted runs, the
strongest point of an attack curve, the findings on hand-made results (verdicts in both
directions and unresolved, collapsed arms left out, the Retrain control), the evaluation subset,
bad settings, a whole study on a small model, and `zounlearn study --quick` end to end. The
machinery is tested, never the papers' conclusion."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys

import pytest
from tiny import SMALL_EMBEDDED

from zounlearn.cli import main
from zounlearn.cli.study import MODEL_SIZES as CLI_MODEL_SIZES
from zounlearn.robustness import study as study_module
from zounlearn.robustness.stats import NOT_RESOLVED, interval, paired, verdict
from zounlearn.robustness.study import (
    MODEL_SIZES,
    Arm,
    StudySettings,
    _Context,
    calibrate_attack_lr,
    evaluation_data,
    run_study,
    search_lr,
    step_cost,
)
from zounlearn.robustness.study_report import findings, summarize, summarize_attacks, table, write_study
from zounlearn.unlearning import synthetic_data, synthetic_people
from zounlearn.unlearning.callbacks import Diverged

F, R = "forget/qa_accuracy", "retain/qa_accuracy"


# --- statistics


def test_interval_and_paired_differences_by_hand():
    estimate = interval([1.0, 2.0, 3.0])  # mean 2, s = 1, t(0.975, 2) = 4.302653
    half = 4.302653 / math.sqrt(3)
    assert (estimate.mean, estimate.n) == (2.0, 3)
    assert estimate.low == pytest.approx(2 - half, rel=1e-6) and estimate.high == pytest.approx(2 + half, rel=1e-6)
    single = interval([0.4])
    assert single.mean == 0.4 and math.isnan(single.low) and str(single) == "+0.40"
    difference = paired([0.5, 0.6, 0.7], [0.1, 0.3, 0.2])  # differences 0.4, 0.3, 0.5
    assert difference.mean == pytest.approx(0.4) and difference.low > 0
    assert math.isnan(interval([math.nan]).mean) and paired([1.0, math.nan], [0.0, 2.0]).n == 1
    with pytest.raises(ValueError, match="one value of each arm per seed"):
        paired([1.0], [1.0, 2.0])


def test_verdict_only_where_the_interval_excludes_zero():
    below, above, across = interval([-0.3, -0.2, -0.25]), interval([0.2, 0.3, 0.25]), interval([-0.2, 0.1, 0.3])
    assert verdict(below, claim_negative=True) == "agrees" and verdict(above, claim_negative=True) == "disagrees"
    assert verdict(above, claim_negative=False) == "agrees" and verdict(below, claim_negative=False) == "disagrees"
    assert verdict(across, claim_negative=True) == NOT_RESOLVED
    assert verdict(interval([-0.5]), claim_negative=True) == NOT_RESOLVED  # one seed: no interval, no verdict
    # Two equal differences (a discrete accuracy) give a zero-width interval: fewer than 3 pairs, no verdict.
    assert verdict(interval([0.025, 0.025]), claim_negative=False) == NOT_RESOLVED


# --- budgets and rules


def test_compute_matched_budgets():
    assert step_cost("adamw") == step_cost("signsgd") == 3.0 and step_cost("zo_sgd") == 2.0
    assert step_cost("zo_sgd", queries=4) == 8.0 and step_cost("hybrid") == 2.5 and step_cost("sophia") == 3.15
    settings = StudySettings()
    steps = {a.name(10): settings.steps(a) for a in settings.arms()}
    assert steps["adamw"] == 120 and steps["zo_sgd"] == steps["adazo"] == 180 and steps["hybrid"] == 144
    assert steps["sophia"] == 114 and steps["zo_sgd x10"] == steps["adazo x10"] == 1800
    assert [a.name(10) for a in settings.arms()][-2:] == ["zo_sgd x10", "adazo x10"]
    assert settings.seeds == (0, 1, 2)


def _context(settings: StudySettings, original=None) -> _Context:
    return _Context(original, None, None, None, settings, {}, lambda text: None, collapse=0.4)


def test_learning_rate_by_utility_parity(monkeypatch):
    outcomes = {1e-4: {F: 0.5, R: 0.9, "model_utility": 0.9},   # forgets too little
                3e-4: {F: 0.2, R: 0.85, "model_utility": 0.6},  # reaches the target
                1e-3: {F: 0.1, R: 0.8, "model_utility": 0.7},   # reaches it with more utility: kept
                3e-3: {F: 0.0, R: 0.3, "model_utility": 0.2}}   # collapses
    runs = []
    monkeypatch.setattr(study_module, "_run", lambda context, arm, objective, lr, seed: runs.append((lr, seed))
                        or (f"model {lr}", outcomes[lr]))
    settings = StudySettings(lr_grid={**study_module.LR_GRID, "adamw": tuple(outcomes)})
    search = search_lr(_context(settings), Arm("adamw"), "npo")
    assert search["lr"] == 1e-3 and search["reached"] and search["model"] == "model 0.001"
    assert runs == [(lr, 0) for lr in outcomes]  # every rate of the grid, seed 0
    assert [t["collapsed"] for t in search["tried"]] == [False, False, False, True]
    settings = StudySettings(lr_grid={**study_module.LR_GRID, "adamw": (1e-4, 3e-4)}, target=0.1)
    search = search_lr(_context(settings), Arm("adamw"), "npo")  # none reaches 0.1: the lowest forget accuracy
    assert search["lr"] == 3e-4 and not search["reached"]


def test_a_diverging_rate_is_recorded_and_never_kept(monkeypatch):
    outcomes = {1e-3: {F: 0.2, R: 0.9, "model_utility": 0.6}, 3e-3: {F: 0.1, R: 0.8, "model_utility": 0.5}}

    def run(context, arm, objective, lr, seed):
        if lr == 1e-2:
            raise Diverged("the loss was not finite")
        return f"model {lr}", outcomes[lr]

    monkeypatch.setattr(study_module, "_run", run)
    settings = StudySettings(lr_grid={**study_module.LR_GRID, "sgd": (1e-3, 3e-3, 1e-2)}, target=0.05)
    search = search_lr(_context(settings), Arm("sgd"), "npo")  # none reaches 0.05: the lowest forget of the finished
    assert search["lr"] == 3e-3 and not search["reached"]
    assert search["tried"][2] == {"lr": 1e-2, "diverged": True, "reached": False, "collapsed": True}
    settings = StudySettings(lr_grid={**study_module.LR_GRID, "sgd": (1e-2,)})
    with pytest.raises(Diverged, match="every learning rate of its grid diverged"):
        search_lr(_context(settings), Arm("sgd"), "npo")


def _curve(steps, forget, retain):
    return [{F: f, R: r} for f, r in zip(forget, retain)]


def test_attack_rate_is_the_largest_that_spares_the_original(monkeypatch):
    drops = {1e-4: 0.0, 3e-4: 0.05, 1e-3: 0.3, 3e-3: 0.6}
    seen = []

    def curves(context, network, seed, lr):
        seen.append((network, seed))
        return {"relearning": {"heldout": _curve(None, (0.9, 0.9, 0.9 - drops[lr]), (1.0, 1.0, 1.0))},
                "retain_finetune": {"whole": _curve(None, (0.9, 0.95, 0.9), (1.0, 1.0 - drops[lr] / 2, 1.0))}}

    monkeypatch.setattr(study_module, "_fine_tuning", curves)
    lr, tried = calibrate_attack_lr(_context(StudySettings(attack_damage=0.1), original="the original"))
    assert lr == 3e-4 and [t["largest_drop"] for t in tried] == pytest.approx(list(drops.values()))
    assert set(seen) == {("the original", 0)}  # the Original alone, seed 0: no unlearned model is looked at
    lr, _ = calibrate_attack_lr(_context(StudySettings(attack_damage=0.01), original="the original"))
    assert lr == 1e-4  # 0.0 only
    drops[3e-4] = 0.9 - 0.8  # 0.09999999999999998 or 0.10000000000000009 by rounding: exactly the tolerance
    drops[1e-3] = 0.1 + 1e-12
    lr, _ = calibrate_attack_lr(_context(StudySettings(attack_damage=0.1), original="the original"))
    assert lr == 1e-3


# --- summaries and findings on hand-made results


def _attacked(relearn: tuple[float, ...], finetune: tuple[float, ...], quantized: float, forget: float) -> dict:
    metrics = lambda f: {F: f, R: 0.8, "forget_Q_A_Prob": f / 2, "forget_Q_A_ROUGE": f,  # noqa: E731
                         "model_utility": 0.5, "forget_quality": 0.01}
    return {"relearning": {"steps": [0, 5, 10, 50][:len(relearn)], "heldout": [metrics(f) for f in relearn]},
            "retain_finetune": {"steps": [0, 10, 50][:len(finetune)], "whole": [metrics(f) for f in finetune]},
            "quantization": {"int8": metrics(forget), "int8-g64": metrics(0.99), "int4-g64": metrics(quantized),
                             "nf4-g64": metrics(forget)}}


def _result(arm: str, grade: str, seed: int, relearn: tuple[float, ...], *, reached: bool = True,
            collapsed: bool = False, barrier_ref: float = 0.0, objective: str = "npo") -> dict:
    return {"arm": arm, "optimizer": arm.split()[0], "grade": grade, "budget": "matched", "steps": 120,
            "compute": 360.0, "objective": objective, "seed": seed, "lr": 1e-3, "reached": reached,
            "collapsed": collapsed, "unlearned": {F: 0.1, R: 0.8, "model_utility": 0.5, "forget_quality": 0.2},
            **_attacked(relearn, (0.1, 0.15), 0.2, 0.1), "distance": {"relative": 0.1},
            "connectivity": {"barrier": {"forget/loss": 0.5, "retain/loss": 0.1}},
            "connectivity_to_reference": {"barrier": {"forget/loss": barrier_ref, "retain/loss": 0.0}}}


def test_the_strongest_point_and_the_curves_end():
    row = summarize(_result("adamw", "first-order", 0, (0.1, 0.5, 0.5, 0.2)))
    assert row["relearn_step"] == 5 and row["relearn_after"] == 0.5  # the first of the tied maxima
    assert row["relearn_recovery"] == pytest.approx(0.4) and row["relearn_end_recovery"] == pytest.approx(0.1)
    assert row["relearn_prob"] == 0.25 and row["relearn_fq"] == 0.01
    assert row["retain_ft_recovery"] == pytest.approx(0.05)
    # The worst 4-bit scheme: int8-g64 has a 4 in its name but 8 bits; it is not one.
    assert row["quant_scheme"] == "int4-g64" and row["quant_recovery"] == pytest.approx(0.1)
    assert row["barrier"] == 0.5 and row["barrier_ref"] == 0.0 and row["fq"] == 0.2


def test_findings_give_verdicts_only_where_the_interval_excludes_zero():
    rows, retrain = [], []
    for seed, jitter in enumerate((0.0, 0.02, -0.02)):
        rows.append(_result("adamw", "first-order", seed, (0.1, 0.6 + jitter)))
        rows.append(_result("signsgd", "compressed first-order", seed, (0.1, 0.2 + jitter)))  # regains less
        rows.append(_result("signadam", "compressed first-order", seed, (0.1, 0.3 + jitter)))
        rows.append(_result("hybrid", "hybrid", seed, (0.1, 0.9 - jitter)))  # regains more
        rows.append(_result("sgd", "first-order", seed, (0.1, 0.6 + 3 * jitter * seed)))
        rows.append(_result("zo_sgd", "zeroth-order", seed, (0.0, 0.9), collapsed=True))
        rows.append(_result("adazo x10", "zeroth-order", seed, (0.1, 0.6 + 10 * jitter), barrier_ref=0.3 + jitter))
        retrain.append({"arm": "retrain", "seed": seed, **summarize_attacks(_attacked((0.0, 0.05), (0.0, 0.0), 0.0,
                                                                                     0.0), {F: 0.0})})
    summaries = [summarize(r) for r in rows]
    lines = findings(summaries, {"retrain": retrain}, "npo")
    text = "\n".join(lines)
    assert "- zo_sgd (zeroth-order" in text and "collapsed" in text and "left out of the comparisons" in text
    assert "- adazo x10 (zeroth-order" in text and "forgets without collapsing and is compared below" in text
    first = next(x for x in lines if x.startswith("- Downgraded optimizers resist relearning"))
    start = lines.index(first) + 1
    end = next(i for i in range(start, len(lines)) if lines[i].startswith("- "))  # the claim's own lines
    arm_lines = {line.split(" (")[0].strip(" -"): line for line in lines[start:end]}
    assert arm_lines["signsgd"].endswith(": agrees")  # regains less than AdamW, on every seed
    assert arm_lines["hybrid"].endswith(": disagrees")
    assert arm_lines["sgd"].endswith("no claim about this grade")
    assert arm_lines["adazo x10"].endswith(NOT_RESOLVED)
    assert "zo_sgd" not in arm_lines  # collapsed: not compared
    assert arm_lines["signadam"].endswith(": agrees")
    assert arm_lines["the compressed first-order grade's mean"].endswith(": agrees")
    assert "- Unlearning hides knowledge that relearning a few facts brings back" in text
    basin = lines[lines.index(next(x for x in lines if x.startswith("- Zeroth-order unlearning"))) + 1:]
    assert any(line.startswith("  - adazo x10 (zeroth-order): +0.30") and line.endswith(": agrees") for line in basin)
    controls = {"original": retrain, "retrain": retrain}
    lines = table(summaries, controls, "npo", (("relearn_recovery", "recovery"),), arm_details=True).splitlines()
    assert lines[2].startswith("| Original |") and lines[3].startswith("| Retrain |")
    assert any(line.startswith("| zo_sgd | zeroth-order | 0.001 (collapsed) |") for line in lines)
    assert any(line.startswith("| signsgd |") and "0.10 ± 0." in line for line in lines)


# --- data and settings


def test_evaluation_subset_keeps_whole_people_and_no_choices():
    data = synthetic_data(0, n_people=30)
    cut = evaluation_data(data, retain_people=4)
    assert cut.forget.train == data.forget.train and cut.forget.qa == data.forget.qa and cut.holdout.qa
    assert not cut.forget.choice and not cut.retain.choice and not cut.holdout.choice
    assert cut.retain.qa == data.retain.qa[:20] and len(cut.retain.train) == 4 * len(data.retain.train) // 27
    people = synthetic_people(0, n_people=30).retain
    texts = " ".join(e.prompt + " " + e.answer for e in (*cut.retain.train, *cut.retain.qa))
    assert all(p.name in texts for p in people[:4]) and not any(p.name in texts for p in people[4:])
    odd = dataclasses.replace(data, retain=dataclasses.replace(data.retain, qa=data.retain.qa[:-1]))
    with pytest.raises(ValueError, match="synthetic data set's layout"):
        evaluation_data(odd, retain_people=4)


@pytest.mark.parametrize("changes, match", [
    ({"optimizers": ("adamw", "zo_adam")}, "no learning-rate grid for zo_adam"),
    ({"optimizers": ("sgd",)}, "keep it in the optimizers"),
    ({"objectives": ("npo", "gd")}, "unknown objective 'gd'"),
    ({"model_size": "huge"}, "unknown model size 'huge'"),
    ({"schemes": ("int3",)}, "unknown quantization scheme 'int3'"),
])
def test_bad_settings(changes, match):
    with pytest.raises(ValueError, match=match):
        StudySettings(**changes)


def test_model_sizes_the_cli_offers_are_the_studys():
    assert CLI_MODEL_SIZES == tuple(MODEL_SIZES)
    assert MODEL_SIZES["small"] == type(MODEL_SIZES["small"])()  # the default embedded model


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


# --- whole studies


def test_a_whole_study_on_a_small_model(tmp_path, small_files):
    """Every part of the protocol, small: two arms and a long ZO arm, two seeds, the small embedded model."""
    from zounlearn.unlearning import embedded_model, retrain_model

    model, tokenizer, data = embedded_model(0, config=SMALL_EMBEDDED, cache_dir=small_files["cache"])
    retrain, _ = retrain_model(0, config=SMALL_EMBEDDED, cache_dir=small_files["cache"])
    settings = StudySettings(optimizers=("adamw", "zo_sgd"), objectives=("npo",), seeds=(0, 1), budget=15,
                             zo_budget_factor=2, retain_people=2, relearn_k=3, relearn_steps=(0, 2),
                             retain_finetune_steps=(0, 2), attack_lr_grid=(1e-3,), schemes=("int4-g64",),
                             noise_stds=(0.1,), noise_draws=1, ts=(0.0, 0.5, 1.0),
                             lr_grid={"adamw": (1e-3,), "zo_sgd": (1e-4,), "zo_sgd x2": (1e-4, 2e-4)})
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = run_study(model, retrain, tokenizer, data, settings, log=lambda text: None)
    assert all((before[k] == v).all() for k, v in model.state_dict().items())  # each run unlearned a copy
    assert [(r["arm"], r["seed"]) for r in result["results"]] == [
        (arm, seed) for seed in (0, 1) for arm in ("adamw", "zo_sgd", "zo_sgd x2")]
    assert [(s["arm"], len(s["tried"])) for s in result["lr_search"]] == [("adamw", 1), ("zo_sgd", 1),
                                                                          ("zo_sgd x2", 2)]
    assert result["attack_lr"]["chosen"] == 1e-3 and set(result["controls"]) == {"original", "retrain"}
    assert result["models"]["retrain"]["forget_quality"] == 1.0 and result["models"]["retrain"]["privleak"] == 0.0
    for r in result["results"]:
        assert r["steps"] == {"adamw": 5, "zo_sgd": 8, "zo_sgd x2": 15}[r["arm"]]  # 15 and 30 forward passes
        assert "forget_quality" in r["unlearned"] and "forget_quality" in r["relearning"]["heldout"][1]
        assert ("connectivity_to_reference" in r) == (r["arm"] != "adamw")
    paths = write_study(result, tmp_path / "out", "zounlearn study (test)", "load average 1.0")
    markdown = paths["markdown"].read_text()
    for title in ("Unlearned (before any attack)", "Relearning at its strongest point", "Weight space", "Findings"):
        assert title in markdown
    assert "| Retrain |" in markdown and "| zo_sgd x2 |" in markdown and "load average 1.0" in markdown
    saved = json.loads(paths["json"].read_text())
    assert len(saved["summary"]) == 6 and set(saved["control_summary"]) == {"original", "retrain"}
    for name in ("relearning", "quantization", "connectivity"):
        assert paths[name].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_study_quick_writes_its_tables_and_plots(tmp_path, embedded_cache):
    env = {**os.environ, "ZOUNLEARN_CACHE": str(embedded_cache)}
    out = subprocess.run([sys.executable, "-m", "zounlearn", "study", "--quick", "--output", str(tmp_path / "s")],
                         capture_output=True, text=True, timeout=900, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    study = tmp_path / "s"
    markdown = (study / "study.md").read_text()
    assert "| adamw | first-order |" in markdown and "### Findings" in markdown and "| Retrain |" in markdown
    assert "`zounlearn study --quick --output" in markdown
    result = json.loads((study / "study.json").read_text())
    assert [r["arm"] for r in result["results"]] == ["adamw", "signadam", "zo_sgd", "hybrid", "zo_sgd x4"] * 2
    for r in result["results"]:
        assert r["relearning"]["steps"] == [0, 10, 30] and set(r["quantization"]) == {"int8", "int4-g64"}
        assert r["connectivity"]["t"] == [0.0, 0.5, 1.0]
    for name in ("relearning", "quantization", "connectivity"):
        assert (study / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
