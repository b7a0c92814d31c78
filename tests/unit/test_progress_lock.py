"""The progress tracker behind the watchdog, and the action lock."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tuwunel_guard.adapters.lock import ActionLock, DaemonLock, LockBusy
from tuwunel_guard.progress import Progress, run_with_beats


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_progress_idle_is_alive() -> None:
    """With no work under way the watchdog may be petted, however long ago the last beat was."""
    clock = FakeClock()
    progress = Progress(clock)
    clock.now += 10_000
    assert progress.alive(max_silence=1)


def test_progress_silent_work_is_not_alive() -> None:
    """Work that stops beating for longer than max_silence withholds the watchdog."""
    clock = FakeClock()
    progress = Progress(clock)
    with progress.working("compose up"):
        clock.now += 5
        assert not progress.alive(max_silence=4)
        progress.beat()
        assert progress.alive(max_silence=4)
        assert progress.work == "compose up"
    assert progress.work == ""


def test_run_with_beats_keeps_work_alive() -> None:
    """A blocking function that takes longer than max_silence still looks alive, because the
    caller beats while it runs; its result comes back."""
    progress = Progress()

    def slow() -> tuple[str, bool]:
        time.sleep(0.5)
        return progress.work, progress.alive(max_silence=0.2)

    work, alive = run_with_beats(progress, "volume backup", slow, timeout=5, beat=0.05)

    assert work == "volume backup"
    assert alive
    assert progress.work == ""


def test_run_with_beats_passes_errors_and_times_out() -> None:
    """An error in the function reaches the caller; a function past its timeout raises."""
    progress = Progress()

    def fail() -> None:
        raise ValueError("broken volume")

    with pytest.raises(ValueError, match="broken volume"):
        run_with_beats(progress, "fail", fail, timeout=5)
    with pytest.raises(TimeoutError, match="slow did not finish within 0s"):
        run_with_beats(progress, "slow", lambda: time.sleep(1), timeout=0.2, beat=0.05)


def test_lock_excludes_other_process(tmp_path: Path) -> None:
    """While another process holds the lock, hold() waits and then names that PID."""
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path;"
            "from tuwunel_guard.adapters.lock import ActionLock;"
            "lock = ActionLock(Path(sys.argv[1]));"
            "ctx = lock.hold(); ctx.__enter__(); print('held', flush=True); time.sleep(30)",
            str(tmp_path),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "held"
        with (
            pytest.raises(LockBusy, match=f"PID {holder.pid}"),
            ActionLock(tmp_path).hold(wait=0.3),
        ):
            pass
    finally:
        holder.kill()
        holder.wait()

    with ActionLock(tmp_path).hold(wait=1):
        assert (tmp_path / "lock").read_text().strip() == str(os.getpid())


def test_daemon_lock_names_the_running_daemon(tmp_path: Path) -> None:
    """A second daemon on the same state directory is told which PID uses it."""
    with DaemonLock(tmp_path).hold():
        holder = subprocess.run(
            [
                sys.executable,
                "-c",
                "import sys; from pathlib import Path;"
                "from tuwunel_guard.adapters.lock import DaemonLock, LockBusy\n"
                "try:\n"
                "    with DaemonLock(Path(sys.argv[1])).hold(): print('held')\n"
                "except LockBusy as error: print(error)",
                str(tmp_path),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
    assert f"another tuwunel-guard daemon (PID {os.getpid()}) uses this state directory" in (
        holder.stdout
    )
