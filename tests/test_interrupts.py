"""Interrupts, kills and divergence on the small embedded model: SIGINT and SIGTERM, raised for
real at each named moment of a run (the evaluation before, a step, a periodic evaluation, the
final evaluation, the final save, the report), leave a checkpoint of the last completed step
also with checkpoint_every 0, and a resume finishes bit-identically to a run never stopped; a
second signal stops at once; SIGTERM to the installed command exits 143 and resumes; a
SIGKILL during a checkpoint write leaves a temporary that the next start removes; an emptied
metrics.jsonl is rebuilt from the checkpoint; a diverging run stops."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings

import pytest
import torch
from commands import ZOUNLEARN, environment, finish, run
from tiny import SMALL_EMBEDDED, data_flags

from zounlearn.unlearning import embedded_model
from zounlearn.unlearning import loop as loop_module
from zounlearn.unlearning.checkpoint import checkpoint_steps
from zounlearn.unlearning.loop import Diverged, Interrupted, LoopConfig, unlearn
from zounlearn.unlearning.report import read_metrics

CONFIG = LoopConfig(optimizer="adamw", lr=1e-3, steps=6, eval_every=3, retain_batch_size=16)


@pytest.fixture(scope="module")
def small(small_files):
    torch.set_num_threads(1)
    return embedded_model(0, config=SMALL_EMBEDDED, cache_dir=small_files["cache"])


@pytest.fixture(scope="module")
def straight(small, tmp_path_factory):
    """The run never stopped: its weights and its metrics (without times)."""
    model = copy.deepcopy(small[0])
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    unlearn(model, small[1], small[2], CONFIG, run_dir, progress=False)
    return model.state_dict(), _records(run_dir)


@pytest.fixture
def terminal_signals(request):
    """SIGINT as in a terminal (a background job, CI's perhaps, inherits it ignored) and SIGTERM's default."""
    previous = {s: signal.signal(s, h) for s, h in ((signal.SIGINT, signal.default_int_handler),
                                                    (signal.SIGTERM, signal.SIG_DFL))}
    yield
    for signum, handler in previous.items():
        signal.signal(signum, handler)


def _records(run_dir):
    return [{k: v for k, v in r.items() if k != "elapsed"} for r in read_metrics(run_dir / "metrics.jsonl")]


def _at_call(monkeypatch, name: str, at: int, action) -> None:
    """Run action() at the start of the at-th call of loop_module.<name>."""
    real, calls = getattr(loop_module, name), []

    def wrapper(*args, **kwargs):
        calls.append(1)
        if len(calls) == at:
            action()
        return real(*args, **kwargs)

    monkeypatch.setattr(loop_module, name, wrapper)


def _same_weights(model, state_dict) -> None:
    for key, value in state_dict.items():
        assert torch.equal(model.state_dict()[key], value), key


# (function, which call, the checkpoint the stop leaves): evaluations at steps 0, 3 and 6; step 3's optimizer step.
MOMENTS = {
    "the evaluation before": ("evaluate", 1, []),  # nothing done yet: resume starts again
    "a step": ("_step", 3, [3]),                   # the step finishes first
    "a periodic evaluation": ("evaluate", 2, [3]),
    "the final evaluation": ("evaluate", 3, [6]),
    "the final save": ("_save_model", 1, [6]),
    "the report": ("write_report", 1, [6]),
}


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("moment", MOMENTS)
def test_a_signal_at_any_moment_leaves_a_resumable_run(small, straight, tmp_path, monkeypatch, terminal_signals,
                                                       moment, signum):
    name, at, kept = MOMENTS[moment]
    run_dir = tmp_path / "run"
    _at_call(monkeypatch, name, at, lambda: signal.raise_signal(signum))
    with pytest.raises(Interrupted) as stopped:
        unlearn(copy.deepcopy(small[0]), small[1], small[2], CONFIG, run_dir, progress=False)
    monkeypatch.undo()
    assert stopped.value.signum == signum and signal.Signals(signum).name in str(stopped.value)
    assert checkpoint_steps(run_dir) == kept and not (run_dir / "report.json").exists()
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == \
        (signal.default_int_handler, signal.SIG_DFL)  # put back
    resumed = copy.deepcopy(small[0])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        unlearn(resumed, small[1], small[2], CONFIG, run_dir, resume=True, progress=False)
    assert any("no checkpoint" in str(w.message) for w in caught) == (not kept)
    _same_weights(resumed, straight[0])
    assert _records(run_dir) == straight[1]
    assert json.loads((run_dir / "report.json").read_text())["before"] == straight[1][0]["metrics"]


def test_a_second_signal_during_a_step_stops_at_once_and_keeps_the_checkpoint_before(small, straight, tmp_path,
                                                                                    monkeypatch, terminal_signals):
    config = LoopConfig(**{**CONFIG.__dict__, "checkpoint_every": 2})
    run_dir = tmp_path / "run"
    _at_call(monkeypatch, "_step", 3, lambda: [signal.raise_signal(signal.SIGINT) for _ in range(2)])
    with pytest.raises(Interrupted, match="resume continues from step 2"):
        unlearn(copy.deepcopy(small[0]), small[1], small[2], config, run_dir, progress=False)
    monkeypatch.undo()
    assert checkpoint_steps(run_dir) == [2]  # step 3 never completed: nothing of it is kept
    resumed = copy.deepcopy(small[0])
    unlearn(resumed, small[1], small[2], config, run_dir, resume=True, progress=False)
    _same_weights(resumed, straight[0])


def test_an_emptied_metrics_file_is_rebuilt_from_the_checkpoint(small, straight, tmp_path, monkeypatch,
                                                                terminal_signals):
    run_dir = tmp_path / "run"
    _at_call(monkeypatch, "_step", 4, lambda: signal.raise_signal(signal.SIGINT))
    with pytest.raises(Interrupted):
        unlearn(copy.deepcopy(small[0]), small[1], small[2], CONFIG, run_dir, progress=False)
    monkeypatch.undo()
    (run_dir / "metrics.jsonl").write_text("")
    result = unlearn(copy.deepcopy(small[0]), small[1], small[2], CONFIG, run_dir, resume=True, progress=False)
    assert result.before == straight[1][0]["metrics"] != result.after
    assert _records(run_dir) == straight[1]


def test_sigterm_to_the_installed_command_checkpoints_and_the_run_resumes(small_files, tmp_path):
    args = ["unlearn", "--model", small_files["model"], *data_flags(small_files, ("forget", "retain")), "--optimizer",
            "adamw", "--lr", "1e-3", "--steps", "100", "--no-progress", "--threads", "1", "-o", str(tmp_path / "run")]
    env = environment(small_files["cache"])
    process = subprocess.Popen([ZOUNLEARN, *args], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    metrics, deadline = tmp_path / "run" / "metrics.jsonl", time.monotonic() + 300
    while process.poll() is None and time.monotonic() < deadline:  # until the steps have begun
        if metrics.is_file() and sum(1 for r in read_metrics(metrics) if r["type"] == "train") >= 2:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    stopped = finish(process)
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-3000:]
    (line,) = stopped.lines("interrupted")
    step = checkpoint_steps(tmp_path / "run")
    assert len(step) == 1 and 2 <= step[0] < 100 and f"resume continues from step {step[0]}" in line
    assert run([*args, "--resume"], tmp_path, env).returncode == 0
    assert json.loads((tmp_path / "run" / "report.json").read_text())["summary"]["steps"] == 100


def test_a_kill_during_a_checkpoint_write_leaves_a_temporary_that_the_next_start_removes(small, small_files,
                                                                                          tmp_path):
    run_dir = tmp_path / "run"
    script = textwrap.dedent(f"""
        import os, signal, sys, torch
        sys.path.insert(0, {str(os.path.dirname(__file__))!r})
        from tiny import SMALL_EMBEDDED
        from zounlearn.unlearning import checkpoint, embedded_model
        from zounlearn.unlearning.loop import LoopConfig, unlearn
        torch.set_num_threads(1)
        model, tokenizer, data = embedded_model(0, config=SMALL_EMBEDDED, cache_dir={str(small_files["cache"])!r})
        def killed(*args, **kwargs):  # the model file is written, the state file never is
            os.kill(os.getpid(), signal.SIGKILL)
        checkpoint.save_file = killed
        config = LoopConfig(optimizer="adamw", lr=1e-3, steps=6, eval_every=3, retain_batch_size=16,
                            checkpoint_every=2)
        unlearn(model, tokenizer, data, config, {str(run_dir)!r}, progress=False)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert done.returncode == -signal.SIGKILL, done.stderr[-3000:]
    leftovers = [p.name for p in (run_dir / "checkpoints").iterdir()]
    assert len(leftovers) == 1 and leftovers[0].startswith(".step-00000002.") and leftovers[0].endswith(".tmp")
    assert checkpoint_steps(run_dir) == []
    config = LoopConfig(**{**CONFIG.__dict__, "checkpoint_every": 2})
    with pytest.warns(UserWarning, match="no checkpoint"):
        unlearn(copy.deepcopy(small[0]), small[1], small[2], config, run_dir, resume=True, progress=False)
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["step-00000004"]


def test_a_diverging_run_stops_and_writes_nothing_after(small, tmp_path):
    model = copy.deepcopy(small[0])
    config = LoopConfig(optimizer="adamw", lr=1e30, steps=10, checkpoint_every=1)
    with pytest.raises(Diverged, match="not finite for 3 steps in a row.*newest checkpoint, step 3, is kept"):
        unlearn(model, small[1], small[2], config, tmp_path / "run", progress=False)
    assert checkpoint_steps(tmp_path / "run") == [3]
    assert not (tmp_path / "run" / "report.json").exists() and not (tmp_path / "run" / "model").exists()
    # Non-finite weights are caught before anything is written, whatever the loss says.
    nan_model = copy.deepcopy(small[0])
    with torch.no_grad():
        nan_model.transformer.h[0].mlp.c_fc.weight[0, 0] = float("nan")
    with pytest.raises(Diverged, match="a trained weight is not finite after step 1"):
        unlearn(nan_model, small[1], small[2], LoopConfig(optimizer="signsgd", lr=0.0, steps=1), tmp_path / "nan",
                progress=False)
    assert not (tmp_path / "nan" / "report.json").exists() and not (tmp_path / "nan" / "model").exists()
