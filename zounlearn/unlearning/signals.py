"""SIGINT and SIGTERM for the unlearning loop: `Interrupts` turns them into `Interrupted`.

Outside `Interrupts.deferred()` a signal raises Interrupted at once (the loop then checkpoints
the last completed step); inside it (an optimizer step) the first one is only recorded, for
the loop to stop after the step, and a second one raises at once. A signal the process ignores
(a background job's SIGINT) stays ignored, and off the main thread none is handled.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Any


class Interrupted(KeyboardInterrupt):
    """The run stopped on SIGINT or SIGTERM (`signum`); the message says where it can be resumed from."""

    def __init__(self, message: str = "", signum: int = signal.SIGINT) -> None:
        super().__init__(message)
        self.signum = signum


class Interrupts:
    """SIGINT and SIGTERM as `Interrupted`: at once, except inside `deferred()` (an optimizer step), where the
    first signal is held for the loop to act on after the step and a second one raises at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __enter__(self) -> Interrupts:
        self.received: list[int] = []
        self.deferring = False
        self.previous: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                if signal.getsignal(signum) is not signal.SIG_IGN:  # a background job's SIGINT stays ignored
                    self.previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        self.received.append(signum)
        if self.deferring and len(self.received) == 1:
            print(f"\n{signal.Signals(signum).name}: stopping after this step (again to stop now)", file=sys.stderr,
                  flush=True)
            return
        raise Interrupted(signum=signum)

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        self.deferring = True
        try:
            yield
        finally:
            self.deferring = False
