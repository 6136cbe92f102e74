"""The installed `zounlearn` command, run as a user runs it (tests import `from commands import ...`).

Each command starts a Python process that imports torch and transformers (seconds), so the
bad-input tests launch theirs together (`run_all`) and check the outcomes one by one.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ZOUNLEARN = str(Path(sys.executable).with_name("zounlearn"))  # the console script pip installed beside python
AT_ONCE = 4  # commands running together: enough to hide start-up, few enough for a 2-core machine


@dataclass(frozen=True)
class Outcome:
    args: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str

    def lines(self, kind: str) -> list[str]:
        """stderr's lines that start `zounlearn COMMAND: <kind>:` (kind: error, warning, interrupted)."""
        return [line for line in self.stderr.splitlines() if line.split(": ", 2)[1:2] == [kind]]


def environment(cache: Path | None = None, **extra: str) -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1", **extra}
    if cache is not None:
        env["ZOUNLEARN_CACHE"] = str(cache)
    return env


def start(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen([ZOUNLEARN, *args], cwd=cwd, env=env or environment(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen, timeout: float = 600) -> Outcome:
    stdout, stderr = process.communicate(timeout=timeout)
    return Outcome(tuple(process.args[1:]), process.returncode, stdout, stderr)


def run(args: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: float = 600) -> Outcome:
    return finish(start(args, cwd, env), timeout)


def run_all(commands: dict[str, list[str]], cwd: Path, env: dict[str, str] | None = None) -> dict[str, Outcome]:
    """Every command, AT_ONCE at a time; {name: outcome}."""
    waiting, running, done = list(commands.items()), {}, {}
    while waiting or running:
        while waiting and len(running) < AT_ONCE:
            name, args = waiting.pop(0)
            running[name] = start(args, cwd, env)
        for name, process in list(running.items()):
            if process.poll() is not None:
                done[name] = finish(running.pop(name))
        time.sleep(0.05)
    return done


def assert_one_line_error(outcome: Outcome, *fragments: str) -> str:
    """Exit status 2, no traceback, and exactly one error line on stderr that holds every fragment."""
    assert "Traceback" not in outcome.stderr, outcome.stderr[-3000:]
    errors = outcome.lines("error")
    assert outcome.returncode == 2 and len(errors) == 1, (outcome.returncode, outcome.stderr[-3000:])
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]
