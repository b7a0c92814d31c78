"""A lock file that keeps the daemon and a manual ``tuwunel-guard switch`` from acting at once."""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tuwunel_guard.errors import GuardError

LOCK_FILE_NAME = "lock"


class LockBusy(GuardError):
    """Another tuwunel-guard process holds the lock."""


class ActionLock:
    """An exclusive ``flock`` on ``lock`` in the state directory, released when the holder ends,
    also when it is killed."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / LOCK_FILE_NAME

    @contextmanager
    def hold(self, wait: float = 0.0, poll: float = 0.2) -> Iterator[None]:
        """Hold the lock for the ``with`` block; raise ``LockBusy`` after ``wait`` seconds."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            self._acquire(descriptor, wait, poll)
            os.ftruncate(descriptor, 0)
            os.write(descriptor, f"{os.getpid()}\n".encode())
            yield
        finally:
            os.close(descriptor)

    def _acquire(self, descriptor: int, wait: float, poll: float) -> None:
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise LockBusy(
                        f"another tuwunel-guard process holds {self.path} "
                        f"(PID {self._holder()}); try again when its switch has ended"
                    ) from None
                time.sleep(poll)

    def _holder(self) -> str:
        try:
            return self.path.read_text().strip() or "unknown"
        except OSError:
            return "unknown"
