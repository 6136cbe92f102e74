"""Atomic file output: write next to the target, flush to disk, then rename over it
(`atomic_dir` does the same for a directory of files).

A reader (or a run resumed after a crash or Ctrl-C) sees either the old file or the new
one, never half of one. Every file zounlearn writes into a run directory goes through here.
The temporaries are named `.NAME.XXXXXXXX.tmp` beside the target: one that a kill left
behind (SIGKILL, a power cut: no `finally` runs) is removed by `remove_temporaries`, which a
resumed run calls on its directory.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

TEMPORARY = re.compile(r"\..+\.[A-Za-z0-9_]{8}\.tmp")  # what tempfile makes from prefix ".NAME." and suffix ".tmp"


def _fsync(path: Path) -> None:
    """Flush a file, or a directory's entries (a rename is durable once its directory is), to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary path in the target's directory; renamed onto `path` when the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        _fsync(tmp_path)  # the data must reach the disk before the rename does
        os.replace(tmp_path, path)
        _fsync(path.parent)
    finally:
        tmp_path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary directory beside `path`; when the block succeeds its files are flushed to disk and it
    takes `path`'s place (a directory already there is removed first: a rename cannot land on a non-empty one)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield work
        for file in work.rglob("*"):
            _fsync(file)
        _fsync(work)
        if path.exists():
            shutil.rmtree(path)
        os.replace(work, path)
        _fsync(path.parent)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def remove_temporaries(directory: str | os.PathLike) -> list[Path]:
    """Delete the temporaries that interrupted atomic writes left in directory; returns what was removed."""
    removed = []
    directory = Path(directory)
    if directory.is_dir():
        for entry in directory.iterdir():
            if TEMPORARY.fullmatch(entry.name):
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)
                removed.append(entry)
    return removed


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode())


def write_json(path: str | os.PathLike, value: Any) -> None:
    """Indented JSON with a final newline; NaN and infinities are refused (they are not JSON)."""
    write_text(path, json.dumps(value, indent=2, allow_nan=False) + "\n")
