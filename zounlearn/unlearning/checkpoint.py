"""Checkpoints of an unlearning run in safetensors, written atomically.

A checkpoint is a directory `checkpoints/step-NNNNNNNN/` with two files:

- `model.safetensors`: the model's state dict (`safetensors.torch.save_model`, which
  stores tied weights such as GPT-2's embedding and LM head once);
- `state.safetensors`: everything else a bit-identical resume needs (the optimizer's state
  dict, torch's CPU and CUDA random states, the loop's step), its tensors under numbered
  keys and the nested structure around them as JSON in the file's metadata.

The directory is written under a temporary name and renamed, so `checkpoints/` only ever
holds complete checkpoints; older ones are deleted after the new one is in place.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_model, save_file, save_model

from ..atomic import atomic_dir

STEP_DIR = re.compile(r"step-(\d{8})")
MODEL_FILE, STATE_FILE = "model.safetensors", "state.safetensors"


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


def save_checkpoint(directory: str | os.PathLike, step: int, model: torch.nn.Module, state: dict[str, Any],
                    keep: int = 1) -> Path:
    """Write checkpoint `step` under directory/checkpoints and keep only the newest `keep`."""
    root = Path(directory) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    with atomic_dir(final) as work:  # the same step written again (a resumed run) replaces it
        save_model(model, str(work / MODEL_FILE))
        tensors: dict[str, torch.Tensor] = {}
        structure = _encode(state, tensors)
        save_file(tensors, str(work / STATE_FILE), metadata={"structure": json.dumps(structure)})
        for name in (MODEL_FILE, STATE_FILE):
            with open(work / name, "rb+") as f:
                os.fsync(f.fileno())
    for old in checkpoint_steps(directory)[:-keep]:
        shutil.rmtree(root / f"step-{old:08d}", ignore_errors=True)
    return final


def checkpoint_steps(directory: str | os.PathLike) -> list[int]:
    """The steps of the complete checkpoints under directory/checkpoints, oldest first."""
    root = Path(directory) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(int(m.group(1)) for p in root.iterdir() if (m := STEP_DIR.fullmatch(p.name))
                  and (p / MODEL_FILE).is_file() and (p / STATE_FILE).is_file())


def load_checkpoint(directory: str | os.PathLike, model: torch.nn.Module, step: int | None = None
                    ) -> tuple[int, dict[str, Any]]:
    """Load the newest (or the given) checkpoint's weights into model; returns (step, state)."""
    steps = checkpoint_steps(directory)
    if not steps:
        raise FileNotFoundError(f"no checkpoint under {Path(directory) / 'checkpoints'}; start the run without "
                                f"resume")
    step = steps[-1] if step is None else step
    path = Path(directory) / "checkpoints" / f"step-{step:08d}"
    device = next(model.parameters()).device
    missing, unexpected = load_model(model, str(path / MODEL_FILE), strict=False, device=str(device))
    if missing or unexpected:
        raise ValueError(f"checkpoint {path} does not fit this model (missing {sorted(missing)[:3]}, unexpected "
                         f"{sorted(unexpected)[:3]}); resume with the model the run started from")
    with safe_open(str(path / STATE_FILE), framework="pt") as f:
        tensors = {key: f.get_tensor(key) for key in f.keys()}
        structure = json.loads(f.metadata()["structure"])
    return step, _decode(structure, tensors)
