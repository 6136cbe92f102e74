"""Checkpoints that are corrupt, incomplete, renamed or made under other conditions: resume refuses
each with one line that names it, before the caller's model is touched (bytes flipped and files
cut or deleted for real); through the installed command too."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
from commands import assert_one_line_error, environment, run
from tiny import SMALL_EMBEDDED, assert_unchanged, data_flags, snapshot

from zounlearn.unlearning import embedded_model, rundir
from zounlearn.unlearning.checkpoint import MANIFEST, MODEL_FILE, STATE_FILE, CheckpointError, checkpoint_steps
from zounlearn.unlearning.loop import LoopConfig, unlearn

CONFIG = LoopConfig(optimizer="adamw", lr=1e-3, steps=4, checkpoint_every=2)


@pytest.fixture(scope="module")
def small(small_files):
    torch.set_num_threads(1)
    return embedded_model(0, config=SMALL_EMBEDDED, cache_dir=small_files["cache"])


@pytest.fixture(scope="module")
def unfinished(small, tmp_path_factory):
    """A run directory whose newest checkpoint is step 2 and that is not finished (its report removed)."""
    run_dir = tmp_path_factory.mktemp("unfinished") / "run"
    unlearn(copy.deepcopy(small[0]), small[1], small[2], CONFIG, run_dir, progress=False)
    (run_dir / "report.json").unlink()
    return run_dir


def _flip(path, count: int = 16) -> None:
    """Invert `count` bytes at the end of the file (tensor data, past the safetensors header)."""
    data = bytearray(path.read_bytes())
    for i in range(len(data) - count, len(data)):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def _cut(path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


STEP = "checkpoints/step-00000002"
DAMAGE = {  # what is done to the checkpoint, and what the refusal names
    "model bytes flipped": (lambda d: _flip(d / STEP / MODEL_FILE), f"{MODEL_FILE} does not match its checksum"),
    "state bytes flipped": (lambda d: _flip(d / STEP / STATE_FILE), f"{STATE_FILE} does not match its checksum"),
    "model file cut short": (lambda d: _cut(d / STEP / MODEL_FILE), f"{MODEL_FILE} does not match its checksum"),
    "state file cut short": (lambda d: _cut(d / STEP / STATE_FILE), f"{STATE_FILE} does not match its checksum"),
    "state file deleted": (lambda d: (d / STEP / STATE_FILE).unlink(), f"incomplete: {STATE_FILE} is missing"),
    "manifest deleted": (lambda d: (d / STEP / MANIFEST).unlink(), f"incomplete: it has no {MANIFEST}"),
    "manifest garbled": (lambda d: _flip(d / STEP / MANIFEST, 40), f"corrupt: {MANIFEST} does not parse"),
    "directory renamed": (lambda d: (d / STEP).rename(d / "checkpoints/step-00000003"),
                          "holds step 2, not 3 (a renamed directory?)"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_checkpoint_is_refused_before_the_model_is_touched(small, unfinished, tmp_path, damage):
    run_dir = tmp_path / "run"
    shutil.copytree(unfinished, run_dir)
    act, message = DAMAGE[damage]
    act(run_dir)
    model = copy.deepcopy(small[0])
    before = snapshot(model)
    with pytest.raises(CheckpointError, match=message.replace("(", r"\(").replace(")", r"\)").replace("?", r"\?")):
        unlearn(model, small[1], small[2], CONFIG, run_dir, resume=True, progress=False)
    assert_unchanged(model, before)
    assert not (run_dir / "report.json").exists()


def test_resume_refuses_other_conditions_naming_them(small, unfinished, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    shutil.copytree(unfinished, run_dir)
    model = copy.deepcopy(small[0])
    before = snapshot(model)
    torch.set_num_threads(2)
    try:
        with pytest.raises(ValueError, match="threads: 1 then, 2 now"):
            unlearn(model, small[1], small[2], CONFIG, run_dir, resume=True, progress=False)
    finally:
        torch.set_num_threads(1)
    data = small[2]
    edited = type(data)(data.forget, type(data.retain)(data.retain.name, data.retain.train[1:], data.retain.qa,
                                                       data.retain.choice), data.holdout)
    with pytest.raises(ValueError, match="the retain data changed"):
        unlearn(model, small[1], edited, CONFIG, run_dir, resume=True, progress=False)
    monkeypatch.setattr(rundir, "__version__", "9.9.9")
    with pytest.raises(ValueError, match="zounlearn: '0.1.0' then, '9.9.9' now"):
        unlearn(model, small[1], small[2], CONFIG, run_dir, resume=True, progress=False)
    monkeypatch.undo()
    assert_unchanged(model, before)
    # A checkpoint made under other conditions than its run's (copied in from another run) is refused too.
    manifest = run_dir / STEP / MANIFEST
    record = json.loads(manifest.read_text())
    record["fingerprints"]["threads"] = 4
    manifest.write_text(json.dumps(record))
    with pytest.raises(CheckpointError, match="other conditions: threads: 4 then, 1 now"):
        unlearn(model, small[1], small[2], CONFIG, run_dir, resume=True, progress=False)
    assert_unchanged(model, before)


def test_an_undamaged_checkpoint_resumes(small, unfinished, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(unfinished, run_dir)
    straight = copy.deepcopy(small[0])
    unlearn(straight, small[1], small[2], CONFIG, progress=False)
    resumed = copy.deepcopy(small[0])
    unlearn(resumed, small[1], small[2], CONFIG, run_dir, resume=True, progress=False)
    for key, value in straight.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key
    assert checkpoint_steps(run_dir) == [2] and (run_dir / "report.json").is_file()


def test_flipped_bytes_through_the_installed_command(small_files, tmp_path):
    args = ["unlearn", "--model", small_files["model"], *data_flags(small_files, ("forget", "retain")), "--optimizer",
            "adamw", "--steps", "4", "--checkpoint-every", "2", "--no-progress", "--threads", "1", "-o",
            str(tmp_path / "run")]
    env = environment(small_files["cache"])
    assert run(args, tmp_path, env).returncode == 0
    (tmp_path / "run" / "report.json").unlink()
    _flip(tmp_path / "run" / STEP / MODEL_FILE)
    outcome = run([*args, "--resume"], tmp_path, env)
    assert_one_line_error(outcome, "step-00000002 is corrupt", f"{MODEL_FILE} does not match its checksum")
