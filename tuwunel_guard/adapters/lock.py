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

    file_name = LOCK_FILE_NAME
    busy_message = (
        "another tuwunel-guard process holds {path} (PID {pid}); "
        "try again when its switch has ended"
    )

    def __init__(self, directory: Path) -> None:
        self.path = directory / self.file_name

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
                        self.busy_message.format(path=self.path, pid=self._holder())
                    ) from None
                time.sleep(poll)

    def _holder(self) -> str:
        try:
            return self.path.read_text().strip() or "unknown"
        except OSError:
            return "unknown"


class DaemonLock(ActionLock):
    """Held for the daemon's whole life, so two daemons never share one state directory."""

    file_name = "daemon.lock"
    busy_message = (
        "another tuwunel-guard daemon (PID {pid}) uses this state directory ({path}); "
        "stop it first, or give this one its own [state] directory"
    )
