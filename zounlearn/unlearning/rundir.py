"""The run directory of an unlearning run: created fresh, or checked for a resume.

config.json records the loop's configuration, the description of the model and data, and the
fingerprints of what the result depends on besides them (`run_fingerprints`). A resume must
match all of it; the directory is then cleared of interrupted writes' temporaries and its
newest checkpoint verified (checkpoint.read_checkpoint), all before the model is touched.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..atomic import remove_temporaries, write_json
from ..errors import UsageError
from .batches import model_device
from .checkpoint import checkpoint_steps, differences, read_checkpoint
from .data import Split, UnlearningData

CONFIG, METRICS, REPORT = "config.json", "metrics.jsonl", "report.json"


def open_run_dir(run_dir: str | os.PathLike, record: dict[str, Any], resume: bool, model: torch.nn.Module
                 ) -> tuple[Path, tuple[int, dict[str, Any]] | None]:
    """A fresh run directory with config.json; or, resuming, the run's directory after checking that it ran
    this configuration, cleared of interrupted writes, and its newest checkpoint, verified (None: there is none)."""
    directory = Path(run_dir)
    saved = directory / CONFIG
    if not resume:
        if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
            raise UsageError(f"the run directory {directory} exists and is not empty; choose a new one, or pass "
                             f"resume to continue the run in it")
        directory.mkdir(parents=True, exist_ok=True)
        write_json(saved, record)
        return directory, None
    if not saved.is_file():
        raise UsageError(f"cannot resume: {saved} does not exist; start the run without resume")
    if (directory / REPORT).exists():
        raise UsageError(f"{directory} holds a finished run (report.json); choose a new run directory")
    try:
        previous = json.loads(saved.read_text())
    except (ValueError, UnicodeDecodeError):
        raise UsageError(f"cannot resume: {saved} does not parse as JSON; start a new run") from None
    current = json.loads(json.dumps(record))
    if not isinstance(previous, dict) or previous.get("fingerprints") != current["fingerprints"]:
        old = previous.get("fingerprints") if isinstance(previous, dict) else None
        raise UsageError(f"cannot resume {directory}: it ran under other conditions ("
                         f"{differences(old if isinstance(old, dict) else {}, current['fingerprints'])}); resume "
                         f"with the run's starting model, data, thread count, device and versions")
    if previous != current:
        changed = sorted(k for k in current if previous.get(k) != current[k])
        raise UsageError(f"cannot resume {directory}: it ran another configuration (differs in "
                         f"{', '.join(changed)}); resume with the same settings and starting model")
    for place in (directory, directory / "checkpoints"):
        remove_temporaries(place)
    if not checkpoint_steps(directory):
        warnings.warn(f"{directory} has no checkpoint (the run stopped before its first one): it starts again from "
                      f"step 0", UserWarning, stacklevel=3)
        return directory, None
    return directory, read_checkpoint(directory, model, fingerprints=record["fingerprints"])


def run_fingerprints(model: torch.nn.Module, data: UnlearningData, eval_data: UnlearningData | None
                     ) -> dict[str, Any]:
    """What a run's result depends on besides its configuration: the starting model, the data's contents,
    the thread count (CPU kernels' results depend on it), the device type and the library versions."""
    prints: dict[str, Any] = {"starting model": fingerprint(model)}
    for name, split in (("forget", data.forget), ("retain", data.retain), ("holdout", data.holdout)):
        prints[f"{name} data"] = _digest(split)
    if eval_data is not None:
        prints["evaluation data"] = _digest(eval_data.forget, eval_data.retain, eval_data.holdout)
    return {**prints, "threads": torch.get_num_threads(), "device": model_device(model).type,
            "zounlearn": __version__, "torch": torch.__version__}


def _digest(*splits: Split | None) -> str | None:
    if all(split is None for split in splits):
        return None
    rows = [[[e.prompt, e.answer, list(e.choices), e.correct] for e in (*s.train, *s.qa, *s.choice)] if s else None
            for s in splits]
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:16]


def fingerprint(model: torch.nn.Module) -> str:
    """A cheap digest of the parameters (names, shapes, dtypes and float64 sums): resume's sanity check."""
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, p in model.named_parameters():
            total = p.double().sum().item() if p.numel() else 0.0
            digest.update(f"{name}:{tuple(p.shape)}:{p.dtype}:{total!r};".encode())
    return digest.hexdigest()[:16]
