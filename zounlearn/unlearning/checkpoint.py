"""Checkpoints of an unlearning run in safetensors, written atomically and verified before use.

A checkpoint is a directory `checkpoints/step-NNNNNNNN/` with three files:

- `model.safetensors`: the model's state dict (`safetensors.torch.save_model`, which
  stores tied weights such as GPT-2's embedding and LM head once);
- `state.safetensors`: everything else a bit-identical resume needs (the optimizer's state
  dict, torch's CPU and CUDA random states, the loop's step and metrics history), its
  tensors under numbered keys and the nested structure around them as JSON in the file's
  metadata;
- `checkpoint.json`, the manifest: the step, each file's size and SHA-256, and the
  fingerprints of what the checkpoint depends on (the loop passes the starting model's,
  the data's, the thread count and the library versions).

The directory is written under a temporary name and renamed, so `checkpoints/` only ever
holds complete checkpoints; older ones are deleted after the new one is in place.
`read_checkpoint` checks everything before anything is loaded: the manifest, the step in
the directory's name, every checksum, the fingerprints, and that the weights fit the
model; any difference is a one-line CheckpointError that names it. Only then does
`load_weights` write into the model.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_model, save_file, save_model

from ..atomic import atomic_dir
from ..errors import ZounlearnError

STEP_DIR = re.compile(r"step-(\d{8})")
DIGEST = re.compile(r"[0-9a-f]{16}")  # the loop's fingerprints of the model and the data
MODEL_FILE, STATE_FILE, MANIFEST = "model.safetensors", "state.safetensors", "checkpoint.json"
FORMAT = 1


class CheckpointError(ZounlearnError, ValueError):
    """A checkpoint that is incomplete, corrupt, or made under other conditions than the resume's."""


def _encode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """JSON-able form of value; tensors move into `tensors` and are referred to by key.

    Tags keep what JSON would lose: int dict keys (optimizer state is keyed by index),
    tuples (betas), and non-finite floats.
    """
    if isinstance(value, torch.Tensor):
        key = str(len(tensors))
        tensors[key] = value.detach().contiguous().clone() if value.device.type == "cpu" else value.detach().cpu()
        return {"tensor": key}
    if isinstance(value, dict):
        return {"dict": [[_encode(k, tensors), _encode(v, tensors)] for k, v in value.items()]}
    if isinstance(value, (list, tuple)):
        return {"tuple" if isinstance(value, tuple) else "list": [_encode(v, tensors) for v in value]}
    if isinstance(value, float) and (value != value or value in (float("inf"), float("-inf"))):
        return {"float": repr(value)}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot checkpoint a {type(value).__name__} ({value!r}); optimizer state may hold tensors, "
                    f"numbers, strings, lists, tuples and dicts")


def _decode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if not isinstance(value, dict):
        return value
    (tag, body), = value.items()
    if tag == "tensor":
        return tensors[body]
    if tag == "dict":
        return {_decode(k, tensors): _decode(v, tensors) for k, v in body}
    if tag == "float":
        return float(body)
    items = [_decode(v, tensors) for v in body]
    return tuple(items) if tag == "tuple" else items


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def step_path(directory: str | os.PathLike, step: int) -> Path:
    return Path(directory) / "checkpoints" / f"step-{step:08d}"


def save_checkpoint(directory: str | os.PathLike, step: int, model: torch.nn.Module, state: dict[str, Any], *,
                    fingerprints: Mapping[str, Any] | None = None, keep: int = 1) -> Path:
    """Write checkpoint `step` under directory/checkpoints and keep only the newest `keep`."""
    final = step_path(directory, step)
    tensors: dict[str, torch.Tensor] = {}
    structure = _encode(state, tensors)  # before any file: an unsupported value leaves nothing behind
    with atomic_dir(final) as work:  # the same step written again (a resumed run) replaces it
        save_model(model, str(work / MODEL_FILE))
        save_file(tensors, str(work / STATE_FILE), metadata={"structure": json.dumps(structure)})
        files = {name: {"bytes": (work / name).stat().st_size, "sha256": _sha256(work / name)}
                 for name in (MODEL_FILE, STATE_FILE)}
        manifest = {"format": FORMAT, "step": step, "files": files, "fingerprints": dict(fingerprints or {})}
        (work / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    for old in checkpoint_steps(directory)[:-keep]:
        shutil.rmtree(step_path(directory, old), ignore_errors=True)
    return final


def checkpoint_steps(directory: str | os.PathLike) -> list[int]:
    """The steps of the checkpoint directories under directory/checkpoints, oldest first (complete or not:
    `read_checkpoint` says which is which)."""
    root = Path(directory) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(int(m.group(1)) for p in root.iterdir() if (m := STEP_DIR.fullmatch(p.name)) and p.is_dir())


def read_checkpoint(directory: str | os.PathLike, model: torch.nn.Module, step: int | None = None, *,
                    fingerprints: Mapping[str, Any] | None = None) -> tuple[int, dict[str, Any]]:
    """Verify the newest (or the given) checkpoint for model and return (step, state); the model is not touched.

    fingerprints: what the checkpoint must have been made with (None: not checked).
    """
    steps = checkpoint_steps(directory)
    if not steps:
        raise CheckpointError(f"no checkpoint under {Path(directory) / 'checkpoints'}; start the run without resume")
    step = steps[-1] if step is None else step
    path = step_path(directory, step)
    manifest = _verified_manifest(path, step)
    if fingerprints is not None and manifest["fingerprints"] != dict(fingerprints):
        raise CheckpointError(f"checkpoint {path} was made under other conditions: "
                              f"{differences(manifest['fingerprints'], fingerprints)}; resume under the run's own")
    _check_fits(model, path / MODEL_FILE)
    try:
        with safe_open(str(path / STATE_FILE), framework="pt") as f:
            tensors = {key: f.get_tensor(key) for key in f.keys()}
            state = _decode(json.loads(f.metadata()["structure"]), tensors)
    except (SafetensorError, KeyError, ValueError, TypeError) as e:  # checksummed, so only a foreign writer
        raise CheckpointError(f"checkpoint {path}: {STATE_FILE} is not a zounlearn state file ({e})") from None
    recorded = state.get("step") if isinstance(state, dict) else None
    if recorded != step:
        raise CheckpointError(f"checkpoint {path}: its state is of step {recorded}, not {step}; delete the checkpoint "
                              f"or start a new run")
    return step, state


def load_weights(directory: str | os.PathLike, step: int, model: torch.nn.Module) -> None:
    """Copy a checkpoint's weights into model (after `read_checkpoint` verified them)."""
    load_model(model, str(step_path(directory, step) / MODEL_FILE), strict=False,
               device=str(next(model.parameters()).device))


def load_checkpoint(directory: str | os.PathLike, model: torch.nn.Module, step: int | None = None, *,
                    fingerprints: Mapping[str, Any] | None = None) -> tuple[int, dict[str, Any]]:
    """`read_checkpoint`, then `load_weights`: the verified weights into model; returns (step, state)."""
    step, state = read_checkpoint(directory, model, step, fingerprints=fingerprints)
    load_weights(directory, step, model)
    return step, state


def _verified_manifest(path: Path, step: int) -> dict[str, Any]:
    """The manifest of the checkpoint at path, after checking the step and every file against it."""
    fix = "delete it to resume from the one before, if any, or start a new run"
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        files, recorded = manifest["files"], manifest["step"]
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} is incomplete: it has no {MANIFEST}; {fix}") from None
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise CheckpointError(f"checkpoint {path} is corrupt: {MANIFEST} does not parse; {fix}") from None
    if recorded != step:
        raise CheckpointError(f"checkpoint {path} holds step {recorded}, not {step} (a renamed directory?); "
                              f"rename it back or {fix}")
    for name in (MODEL_FILE, STATE_FILE):
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"checkpoint {path} is incomplete: {name} is missing; {fix}")
        expected = files.get(name, {})
        if file.stat().st_size != expected.get("bytes") or _sha256(file) != expected.get("sha256"):
            raise CheckpointError(f"checkpoint {path} is corrupt: {name} does not match its checksum in {MANIFEST} "
                                  f"(truncated or changed on disk); {fix}")
    return manifest


def _check_fits(model: torch.nn.Module, file: Path) -> None:
    """Every weight of the file has a place of its shape in the model, and every model weight is in the file or
    shares storage with one that is (a tied weight, stored once)."""
    with safe_open(str(file), framework="pt") as f:
        shapes = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    own = model.state_dict()
    stored = {own[key].data_ptr() for key in shapes if key in own}
    unexpected = sorted(key for key in shapes if key not in own)
    missing = sorted(key for key, value in own.items() if key not in shapes and value.data_ptr() not in stored)
    wrong = sorted(key for key in shapes if key in own and tuple(own[key].shape) != shapes[key])
    if unexpected or missing or wrong:
        raise CheckpointError(f"checkpoint {file.parent} does not fit this model (missing {missing[:3]}, unexpected "
                              f"{unexpected[:3]}, other shapes {wrong[:3]}); resume with the model the run started "
                              f"from")


def differences(recorded: Mapping[str, Any], current: Mapping[str, Any]) -> str:
    """Which fingerprints differ, in one line: 'the forget data changed; threads: 1 then, 2 now'."""
    out = []
    for name in sorted(set(recorded) | set(current), key=str):
        then, now = recorded.get(name), current.get(name)
        if then != now:
            digests = all(isinstance(v, str) and DIGEST.fullmatch(v) for v in (then, now))
            out.append(f"the {name} changed" if digests else f"{name}: {then!r} then, {now!r} now")
    return "; ".join(out) or "nothing recorded"
