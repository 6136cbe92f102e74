"""The unlearning loop on the small embedded model: end-to-end runs with ZO-SGD, AdamW and the
hybrid (forget accuracy falls, retain accuracy stays within a stated bound), the run
directory's files, determinism, bit-identical resume after a crash and after Ctrl-C, the
checkpoint format, the optimizer registry and bad input."""

from __future__ import annotations

import copy
import json
import signal

import pytest
import torch
from tiny import SMALL_EMBEDDED, assert_unchanged, snapshot

from zounlearn.optim.registry import OPTIMIZERS, make_optimizer, optimizer_options
from zounlearn.unlearning import embedded_model, load_model
from zounlearn.unlearning import loop as loop_module
from zounlearn.unlearning.checkpoint import checkpoint_steps, load_checkpoint, save_checkpoint
from zounlearn.unlearning.loop import LoopConfig, trainable, unlearn
from zounlearn.unlearning.report import read_metrics


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    torch.set_num_threads(1)  # this model's weights after training depend on the thread count
    return embedded_model(0, config=SMALL_EMBEDDED, cache_dir=tmp_path_factory.mktemp("models"))


def _fresh(small):
    return copy.deepcopy(small[0])


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name


def _without_time(records):
    return [{k: v for k, v in r.items() if k != "elapsed"} for r in records]


# The demo's recipe (16 retain examples per step, retain weight 8) on the small model. Forget
# accuracy must fall to at most FORGET_AT_MOST; retain accuracy (1.0 before) must stay at least
# RETAIN_AT_LEAST for AdamW and the hybrid (measured: 0.93 and 0.69). ZO-SGD cannot be that
# selective: each step moves every weight along one random direction, and that diffusion costs
# retain facts too (lr 2e-4 for 80 steps forgets everything and leaves 9% retain accuracy). Its
# slow, long run is held to a relative bound instead: retain accuracy stays ZO_MARGIN above
# forget accuracy (measured 0.49 vs 0.0), and the retain loss rises less than half as much as
# the forget loss.
FORGET_AT_MOST, RETAIN_AT_LEAST, ZO_MARGIN = 0.2, 0.6, 0.25
RECIPE = {"retain_batch_size": 16, "objective_options": {"retain_weight": 8.0}}
END_TO_END = {
    "zo_sgd": LoopConfig(optimizer="zo_sgd", lr=5e-5, steps=1500, **RECIPE),
    "adamw": LoopConfig(optimizer="adamw", lr=1e-3, steps=20, **RECIPE),
    "hybrid": LoopConfig(optimizer="hybrid", lr=1e-3, steps=20, optimizer_options={"zo_lr": 1e-4, "block": 5},
                         **RECIPE),
}


@pytest.mark.parametrize("name", [pytest.param("zo_sgd", marks=pytest.mark.slow), "adamw", "hybrid"])
def test_unlearning_lowers_forget_accuracy_and_keeps_retain(small, tmp_path, name):
    model, tokenizer, data = _fresh(small), small[1], small[2]
    config = END_TO_END[name]
    result = unlearn(model, tokenizer, data, config, tmp_path / "run", progress=False)
    before, after = result.before, result.after
    assert before["forget/qa_accuracy"] == 1.0 and before["retain/qa_accuracy"] >= 0.9
    assert after["forget/qa_accuracy"] <= FORGET_AT_MOST, after
    assert after["forget/loss"] > before["forget/loss"] + 0.5
    if name == "zo_sgd":
        assert after["retain/qa_accuracy"] >= after["forget/qa_accuracy"] + ZO_MARGIN, after
        assert after["retain/loss"] - before["retain/loss"] < 0.5 * (after["forget/loss"] - before["forget/loss"])
    else:
        assert after["retain/qa_accuracy"] >= RETAIN_AT_LEAST, after

    run = tmp_path / "run"
    for file in ("config.json", "metrics.jsonl", "report.json", "report.md", "loss.png", "metrics.png"):
        assert (run / file).is_file(), file
    records = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in records if r["type"] == "train"] == list(range(1, config.steps + 1))
    assert [r["step"] for r in records if r["type"] == "eval"] == [0, config.steps]
    assert json.loads((run / "report.json").read_text())["after"]["forget/qa_accuracy"] == after["forget/qa_accuracy"]
    if name == "hybrid":
        assert {r["phase"] for r in records if r["type"] == "train"} == {"fo", "zo"}
        assert records[-2]["phase"] == "zo"  # the schedule ends on a ZO block
    # The saved model is the unlearned one.
    saved, _ = load_model(run / "model")
    _assert_same_weights(saved, model)


def test_same_seed_same_run_and_another_seed_differs(small):
    config = LoopConfig(optimizer="hybrid", lr=1e-3, steps=6, optimizer_options={"block": 2})
    a, b, c = _fresh(small), _fresh(small), _fresh(small)
    for model, cfg in ((a, config), (b, config), (c, LoopConfig(**{**config.__dict__, "seed": 1}))):
        unlearn(model, small[1], small[2], cfg, progress=False)
    _assert_same_weights(a, b)
    assert not torch.equal(a.transformer.h[0].mlp.c_fc.weight, c.transformer.h[0].mlp.c_fc.weight)


def test_periodic_evaluation_and_epochs(small, tmp_path):
    config = LoopConfig(optimizer="signsgd", lr=1e-4, epochs=1.5, batch_size=8, eval_every=3)
    result = unlearn(_fresh(small), small[1], small[2], config, tmp_path, progress=False)
    steps = -(-3 * len(trainable(small[2].forget)) // (2 * 8))  # ceil(1.5 epochs x batches per epoch)
    assert result.steps == steps
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records if r["type"] == "eval"] == [*range(0, steps, 3), steps]
    assert records[-2]["epoch"] == pytest.approx(steps / -(-len(trainable(small[2].forget)) // 8), abs=1e-4)


# --- resume


RESUMABLE = {
    "hybrid": LoopConfig(optimizer="hybrid", lr=1e-3, steps=9, checkpoint_every=3, eval_every=4,
                         optimizer_options={"block": 2, "zo_lr": 1e-4}),
    "adamw": LoopConfig(optimizer="adamw", lr=1e-3, steps=9, checkpoint_every=3, eval_every=4, train_mode=True),
    "sophia": LoopConfig(optimizer="sophia", lr=1e-3, steps=9, checkpoint_every=3,
                         optimizer_options={"update_period": 2}),
    "zo_sgd": LoopConfig(optimizer="zo_sgd", lr=1e-4, steps=9, checkpoint_every=3, objective="simnpo"),
}


def _before_step(monkeypatch, at: int, action) -> None:
    """Make the loop run action() just before its at-th optimizer step."""
    real_step, calls = loop_module._step, []

    def step(*args):
        calls.append(1)
        if len(calls) == at:
            action()
        return real_step(*args)

    monkeypatch.setattr(loop_module, "_step", step)


@pytest.mark.parametrize("name", RESUMABLE)
def test_resume_after_a_crash_is_bit_identical(small, tmp_path, monkeypatch, name):
    config = RESUMABLE[name]
    straight = _fresh(small)
    unlearn(straight, small[1], small[2], config, tmp_path / "straight", progress=False)

    def crash():
        raise RuntimeError("simulated crash")

    _before_step(monkeypatch, 7, crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        unlearn(_fresh(small), small[1], small[2], config, tmp_path / "resumed", progress=False)
    monkeypatch.undo()
    assert checkpoint_steps(tmp_path / "resumed") == [6]
    assert not (tmp_path / "resumed" / "report.json").exists()  # unfinished runs do not look finished

    resumed = _fresh(small)  # the starting model, as the first call got it
    unlearn(resumed, small[1], small[2], config, tmp_path / "resumed", resume=True, progress=False)
    _assert_same_weights(resumed, straight)
    assert _without_time(read_metrics(tmp_path / "resumed" / "metrics.jsonl")) == \
        _without_time(read_metrics(tmp_path / "straight" / "metrics.jsonl"))


def test_ctrl_c_checkpoints_the_current_step_and_resume_continues(small, tmp_path, monkeypatch, request):
    config = RESUMABLE["hybrid"]
    straight = _fresh(small)
    unlearn(straight, small[1], small[2], config, progress=False)
    # As in a terminal (a background job, CI's perhaps, inherits SIGINT ignored, which the loop respects).
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    request.addfinalizer(lambda: signal.signal(signal.SIGINT, previous))
    # SIGINT is handled: the loop finishes the step first.
    _before_step(monkeypatch, 5, lambda: signal.raise_signal(signal.SIGINT))
    with pytest.raises(KeyboardInterrupt, match="after step 5"):
        unlearn(_fresh(small), small[1], small[2], config, tmp_path / "run", progress=False)
    monkeypatch.undo()
    assert checkpoint_steps(tmp_path / "run") == [5]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back
    resumed = _fresh(small)
    unlearn(resumed, small[1], small[2], config, tmp_path / "run", resume=True, progress=False)
    _assert_same_weights(resumed, straight)


def test_resume_refuses_another_configuration_model_or_a_finished_run(small, tmp_path, monkeypatch):
    config = LoopConfig(optimizer="adamw", lr=1e-3, steps=4, checkpoint_every=2)
    unlearn(_fresh(small), small[1], small[2], config, tmp_path / "done", progress=False)
    with pytest.raises(ValueError, match="finished run"):
        unlearn(_fresh(small), small[1], small[2], config, tmp_path / "done", resume=True, progress=False)
    (tmp_path / "done" / "report.json").unlink()
    with pytest.raises(ValueError, match="differs in loop"):
        unlearn(_fresh(small), small[1], small[2], LoopConfig(**{**config.__dict__, "lr": 2e-3}),
                tmp_path / "done", resume=True, progress=False)
    other = _fresh(small)
    with torch.no_grad():
        other.lm_head.weight[0, 0] += 1.0
    with pytest.raises(ValueError, match="the starting model changed"):
        unlearn(other, small[1], small[2], config, tmp_path / "done", resume=True, progress=False)
    with pytest.raises(ValueError, match="does not exist"):
        unlearn(_fresh(small), small[1], small[2], config, tmp_path / "never", resume=True, progress=False)


# --- the checkpoint format


def test_checkpoint_round_trips_nested_state_and_keeps_only_the_newest(small, tmp_path):
    model = _fresh(small)
    state = {"optimizer": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(4, 3)}},
                           "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "params": [0], "nan": float("nan")}]},
             "rng_cpu": torch.get_rng_state(), "step": 7, "none": None, "name": "x"}
    save_checkpoint(tmp_path, 5, model, state)
    save_checkpoint(tmp_path, 7, model, state)
    assert checkpoint_steps(tmp_path) == [7]
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")]
    target = _fresh(small)
    with torch.no_grad():
        for p in target.parameters():
            p.zero_()
    step, loaded = load_checkpoint(tmp_path, target)
    assert step == 7
    _assert_same_weights(target, model)
    assert target.lm_head.weight.data_ptr() == target.transformer.wte.weight.data_ptr()  # still tied
    inner = loaded["optimizer"]
    assert set(inner["state"]) == {0} and torch.equal(inner["state"][0]["exp_avg"], state["optimizer"]["state"][0]
                                                      ["exp_avg"])
    group = inner["param_groups"][0]
    assert group["betas"] == (0.9, 0.999) and group["lr"] == 1e-3 and group["nan"] != group["nan"]
    assert torch.equal(loaded["rng_cpu"], state["rng_cpu"]) and loaded["step"] == 7 and loaded["none"] is None
    with pytest.raises(TypeError, match="cannot checkpoint a object"):
        save_checkpoint(tmp_path, 8, model, {"x": object()})
    assert checkpoint_steps(tmp_path) == [7]


# --- the optimizer registry


def test_registry_builds_every_optimizer_and_rejects_unknown_options():
    params = [torch.nn.Parameter(torch.zeros(3))]
    for name, spec in OPTIMIZERS.items():
        optimizer = make_optimizer(name, params)
        assert isinstance(optimizer, spec.cls)
        lr = optimizer.param_groups[0]["lr"] if name != "hybrid" else optimizer.zo.param_groups[0]["lr"]
        assert lr == spec.lr
    hybrid = make_optimizer("hybrid", params, lr=1e-3, fo_optimizer="signadam", block=3, zo_block=2, zo_mu=1e-2,
                            total_steps=10)
    assert type(hybrid.fo).__name__ == "SignAdam" and hybrid.fo.param_groups[0]["lr"] == 1e-3
    assert (hybrid.fo_steps, hybrid.zo_steps, hybrid.zo.defaults["mu"]) == (3, 2, 1e-2)
    assert "zo_mu" in optimizer_options("hybrid") and "momentum" in optimizer_options("zo_sgd")
    with pytest.raises(ValueError, match="unknown optimizer 'adam'.*adamw"):
        make_optimizer("adam", params)
    with pytest.raises(ValueError, match="no option momentum.*betas"):
        make_optimizer("adazo", params, momentum=0.9)
    with pytest.raises(ValueError, match="first-order"):
        make_optimizer("hybrid", params, fo_optimizer="zo_sgd")


# --- bad input


@pytest.mark.parametrize("kwargs, message", [
    ({"optimizer": "adma"}, "unknown optimizer 'adma'"),
    ({"objective": "npx"}, "unknown objective 'npx'"),
    ({"objective_options": {"betta": 1}}, "no hyperparameter betta"),
    ({"steps": 0}, "steps must be an integer >= 1"),
    ({"steps": 3, "epochs": 1.0}, "steps or epochs"),
    ({"epochs": -1.0}, "epochs must be a positive number"),
    ({"lr": float("nan")}, "lr must be a number"),
    ({"batch_size": 2.5}, "batch_size must be an integer"),
])
def test_bad_config_fails_clearly(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LoopConfig(**kwargs)


def test_bad_run_fails_before_touching_the_model_or_the_directory(small, tmp_path):
    model = _fresh(small)
    before = snapshot(model)
    with pytest.raises(ValueError, match="no option momentum"):
        unlearn(model, small[1], small[2], LoopConfig(optimizer="adazo", optimizer_options={"momentum": 0.9}),
                tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="exists and is not empty"):
        unlearn(model, small[1], small[2], LoopConfig(steps=1), tmp_path / "busy", progress=False)
    assert [p.name for p in (tmp_path / "busy").iterdir()] == ["keep.txt"]
    assert_unchanged(model, before)


def test_any_torch_optimizer_through_a_factory(small, tmp_path):
    config = LoopConfig(optimizer="custom", steps=3, checkpoint_every=2)
    model = _fresh(small)
    unlearn(model, small[1], small[2], config, tmp_path / "run", progress=False,
            optimizer_factory=lambda ps: torch.optim.RMSprop(ps, lr=1e-3))
    assert json.loads((tmp_path / "run" / "report.json").read_text())["summary"]["optimizer"] == "RMSprop"
    assert not torch.equal(model.lm_head.weight, small[0].lm_head.weight)
    with pytest.raises(ValueError, match="optimizer_factory exactly"):
        unlearn(_fresh(small), small[1], small[2], config, progress=False)
    with pytest.raises(ValueError, match="optimizer_factory exactly"):
        unlearn(_fresh(small), small[1], small[2], LoopConfig(steps=1), progress=False,
                optimizer_factory=lambda ps: torch.optim.SGD(ps, lr=1.0))


def test_an_ignored_sigint_stays_ignored(small, monkeypatch, request):
    """A background job inherits SIGINT ignored: the loop installs no handler and the signal changes nothing."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    request.addfinalizer(lambda: signal.signal(signal.SIGINT, previous))
    _before_step(monkeypatch, 2, lambda: signal.raise_signal(signal.SIGINT))
    result = unlearn(_fresh(small), small[1], small[2], LoopConfig(optimizer="adamw", steps=3), progress=False)
    assert result.steps == 3 and signal.getsignal(signal.SIGINT) is signal.SIG_IGN


@pytest.mark.parametrize("optimizer", ["zo_sgd", "hybrid"])
def test_bfloat16_run_at_lr_zero_changes_nothing(small, tmp_path, optimizer):
    """The issue's run that must change nothing: the loop gives the model to the optimizer, whose
    zeroth-order steps are then exact in bfloat16, and the report says how it rounded and perturbed."""
    model = _fresh(small).to(torch.bfloat16)
    before = copy.deepcopy(model)
    options = {"zo_lr": 0.0, "block": 2} if optimizer == "hybrid" else {}
    config = LoopConfig(optimizer=optimizer, lr=0.0, steps=12, optimizer_options=options, **RECIPE)
    unlearn(model, small[1], small[2], config, tmp_path / "run", progress=False, save_model=False)
    _assert_same_weights(model, before)
    precision = json.loads((tmp_path / "run" / "report.json").read_text())["summary"]["precision"]
    zo = "ZOSGD" if optimizer == "zo_sgd" else "AdaZO"
    assert precision["dtypes"] == ["bfloat16"] and precision[f"{zo} perturbation"] == "exact"
    assert precision[f"{zo} rounding"] == ["stochastic"]
