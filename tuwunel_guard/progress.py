"""Progress of the work under way, which decides whether the daemon may send ``WATCHDOG=1``.

Long work (a pull, a conversion, a compose call, a health wait) calls :meth:`Progress.beat` as it
goes. The daemon pets systemd's watchdog only while no work runs or the last beat is recent, so
a step that hangs stops the pets and systemd restarts the service.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

_T = TypeVar("_T")


class Progress:
    """Thread-safe record of the current work and its last sign of life."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._work = ""
        self._last_beat = clock()

    def beat(self, what: str = "") -> None:
        """Record that the current work made progress."""
        with self._lock:
            self._last_beat = self._clock()
            if what:
                self._work = what

    @contextmanager
    def working(self, what: str) -> Iterator[None]:
        """Mark the ``with`` block as work that must keep beating."""
        with self._lock:
            previous = self._work
            self._work = what
            self._last_beat = self._clock()
        try:
            yield
        finally:
            with self._lock:
                self._work = previous
                self._last_beat = self._clock()

    def alive(self, max_silence: float) -> bool:
        """Tell whether no work runs, or the work beat within ``max_silence`` seconds."""
        with self._lock:
            return not self._work or self._clock() - self._last_beat <= max_silence

    @property
    def work(self) -> str:
        """Return the name of the work under way, or an empty string."""
        with self._lock:
            return self._work


NO_PROGRESS = Progress()
"""A tracker that no watchdog reads, for callers outside the daemon (``check``, ``switch``)."""


def run_with_beats(
    progress: Progress, what: str, function: Callable[[], _T], timeout: float, beat: float = 1.0
) -> _T:
    """Run ``function`` in a worker thread, beating ``progress`` while it runs.

    For blocking work with no progress hook of its own (an archive of a volume). Raises
    ``TimeoutError`` after ``timeout`` seconds; the worker thread is then left to finish alone.
    """
    outcome: dict[str, Any] = {}

    def work() -> None:
        try:
            outcome["value"] = function()
        except BaseException as error:  # handed to the caller below
            outcome["error"] = error

    worker = threading.Thread(target=work, name=what, daemon=True)
    deadline = time.monotonic() + timeout
    with progress.working(what):
        worker.start()
        while worker.is_alive():
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{what} did not finish within {timeout:.0f}s")
            worker.join(beat)
            progress.beat()

    if "error" in outcome:
        raise outcome["error"]
    result: _T = outcome["value"]
    return result
