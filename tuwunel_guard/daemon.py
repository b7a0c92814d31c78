"""The long-running service: a scheduler that runs a cycle every interval plus jitter.

Signals: SIGTERM and SIGINT stop the daemon after the running cycle ends; SIGHUP re-reads the
config file, and an invalid file is rejected with all its errors while the old config stays.
"""

from __future__ import annotations

import datetime
import logging
import os
import signal
import threading
from pathlib import Path
from types import FrameType

import structlog
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.interval import IntervalTrigger

from tuwunel_guard.adapters.events import EngineWatcher
from tuwunel_guard.adapters.lock import DaemonLock, LockBusy
from tuwunel_guard.adapters.notify import Notifier
from tuwunel_guard.config.load import load_config
from tuwunel_guard.config.models import Config
from tuwunel_guard.cycle import CycleResult, Guard
from tuwunel_guard.errors import ConfigError, GuardError
from tuwunel_guard.progress import Progress

log = structlog.get_logger("tuwunel_guard.daemon")

_CYCLE_JOB = "cycle"
_NOW_JOB = "cycle-now"


class Daemon:
    """Runs cycles on a schedule until a signal stops it."""

    def __init__(self, config_path: Path, config: Config, notifier: Notifier | None = None) -> None:
        self.config_path = config_path
        self.config = config
        self.notifier = notifier or Notifier()
        self.progress = Progress()
        self.guard = self._guard(config)
        self._stop = threading.Event()
        self._withheld = False
        self._reload = threading.Event()
        self._lock = threading.Lock()
        self._scheduler = BackgroundScheduler(timezone=datetime.UTC)

    def run(self) -> int:
        """Run until SIGTERM or SIGINT; return the exit status.

        Raises ``LockBusy`` when another daemon already uses the same state directory.
        """
        with DaemonLock(self.config.state.directory).hold():
            return self._run()

    def _run(self) -> int:
        self._install_signal_handlers()
        # APScheduler logs every job run at INFO, and a run skipped while a long switch runs at
        # WARNING; the guard's own events already say more, and rerun requests are kept below.
        logging.getLogger("apscheduler").setLevel(logging.ERROR)
        log.info(
            "daemon_started",
            config=str(self.config_path),
            strategy=self.config.strategy.value,
            image=str(self.guard.reference),
            interval_seconds=self.config.schedule.interval,
            pid=os.getpid(),
        )

        # READY=1 comes after one probe of the engine, whether it responds or not, and before any
        # switch.
        self.guard.probe_engine()
        self.notifier.ready()
        self.notifier.status("started; the first check is running")

        self._schedule(first_run_now=True)
        self._scheduler.start()
        watcher = self._watcher()
        watcher.start()
        self._wait()

        self.notifier.stopping()
        watcher.stop()
        self._scheduler.shutdown(wait=True)
        self.guard.close()
        log.info("daemon_stopped")
        return 0

    def request_stop(self) -> None:
        """Ask the daemon to stop after the running cycle."""
        self._stop.set()

    def request_reload(self) -> None:
        """Ask the daemon to re-read its config file."""
        self._reload.set()

    def _watcher(self) -> EngineWatcher:
        # A 1 s backoff cap lands a ping in the second between dockerd creating its socket and
        # serving its API, so a restarted engine is seen within milliseconds (bench/detect.py).
        return EngineWatcher(
            self.config.engine.socket,
            on_event=lambda event: None,
            on_engine_back=self._engine_back,
            max_backoff=1.0,
        )

    def _engine_back(self) -> None:
        log.info("engine_returned", socket=self.config.engine.socket)
        self._run_now()

    def _run_now(self) -> None:
        """Run a cycle now, or right after the one under way ends.

        A one-off job of its own, because APScheduler skips a run of the interval job that
        falls due while that job still runs; this one waits for the cycle lock instead.
        """
        self._scheduler.add_job(
            self._run_cycle,
            id=_NOW_JOB,
            replace_existing=True,
            max_instances=2,
            misfire_grace_time=None,
        )

    def _guard(self, config: Config) -> Guard:
        return Guard(config, progress=self.progress, report=self.notifier.status)

    def _wait(self) -> None:
        while not self._stop.wait(timeout=self._pet_interval()):
            self._pet_watchdog()
            if self._reload.is_set():
                self._reload.clear()
                self._apply_reload()

    def _pet_interval(self) -> float:
        period = _watchdog_period()
        return min(1.0, period / 4) if period else 1.0

    def _pet_watchdog(self) -> None:
        """Send WATCHDOG=1 only while the scheduler runs and the work under way makes progress.

        A step that hangs stops beating; systemd then restarts the service after WatchdogSec.
        """
        period = _watchdog_period()
        if not period:
            return
        reason = ""
        if not self._scheduler.running:
            reason = "the scheduler is not running"
        # Three quarters of the period: longer than one registry or engine request may take
        # (30 s by default against systemd's 60 s), shorter than systemd waits.
        elif not self.progress.alive(max_silence=period * 0.75):
            reason = f"no progress in {self.progress.work}"

        if reason:
            # Logged once per stretch without pets, not at every check of the loop.
            if not self._withheld:
                log.error("watchdog_withheld", reason=reason)
            self._withheld = True
            return
        self._withheld = False
        self.notifier.watchdog()

    def _schedule(self, *, first_run_now: bool) -> None:
        schedule = self.config.schedule
        trigger = IntervalTrigger(seconds=schedule.interval, jitter=int(schedule.jitter) or None)
        next_run = datetime.datetime.now(datetime.UTC) if first_run_now else None
        options = {"next_run_time": next_run} if next_run else {}
        self._scheduler.add_job(
            self._run_cycle,
            trigger,
            id=_CYCLE_JOB,
            replace_existing=True,
            max_instances=1,
            coalesce=True,
            misfire_grace_time=None,
            **options,
        )

    def _run_cycle(self) -> None:
        with self._lock:
            try:
                result = self.guard.run_cycle(act=True, next_check_at=self._next_check_at())
            except LockBusy as error:
                log.warning("cycle_skipped", reason=str(error))
                return
            except GuardError as error:
                # An expected failure, such as a damaged state file, whose message is complete.
                log.error("cycle_failed", error=str(error))
                self.notifier.status(f"the last check failed: {error}")
                return
            except Exception as error:  # one failed cycle must not stop the daemon
                log.exception("cycle_failed", error=str(error))
                self.notifier.status(f"the last check failed: {error}")
                return
        self.notifier.status(_status_line(result))

    def _next_check_at(self) -> float:
        job = self._scheduler.get_job(_CYCLE_JOB)
        if job is None or job.next_run_time is None:
            return 0.0
        return float(job.next_run_time.timestamp())

    def _apply_reload(self) -> None:
        self.notifier.reloading()
        try:
            config = load_config(self.config_path)
        except ConfigError as error:
            log.error(
                "config_rejected", config=str(self.config_path), problems=error.problems, kept="old"
            )
            self.notifier.ready()
            return

        # A running cycle holds the lock, a switch perhaps for minutes: keep petting meanwhile.
        while not self._lock.acquire(timeout=self._pet_interval()):
            self._pet_watchdog()
        try:
            old_strategy = self.config.strategy
            self.guard.close()
            self.config = config
            self.guard = self._guard(config)
            self._schedule(first_run_now=False)
        finally:
            self._lock.release()

        log.info(
            "config_reloaded",
            config=str(self.config_path),
            old_strategy=old_strategy.value,
            strategy=config.strategy.value,
            interval_seconds=config.schedule.interval,
        )
        self.notifier.ready()
        self._run_now()

    def _install_signal_handlers(self) -> None:
        def on_stop(signum: int, frame: FrameType | None) -> None:
            log.info("stop_requested", signal=signal.Signals(signum).name)
            self.request_stop()

        def on_reload(signum: int, frame: FrameType | None) -> None:
            log.info("reload_requested", signal=signal.Signals(signum).name)
            self.request_reload()

        signal.signal(signal.SIGTERM, on_stop)
        signal.signal(signal.SIGINT, on_stop)
        signal.signal(signal.SIGHUP, on_reload)


def _status_line(result: CycleResult) -> str:
    if result.decision is None:
        return "no decision"
    verdict = result.verdict.name if result.verdict else "unknown"
    reason = result.verdict.reason if result.verdict else result.problem
    return f"{verdict}, {result.decision.action.value}: {reason}"


def _watchdog_period() -> float:
    """Return the watchdog period that systemd set for this process in seconds, or 0."""
    value = os.environ.get("WATCHDOG_USEC")
    if not value or os.environ.get("WATCHDOG_PID", str(os.getpid())) != str(os.getpid()):
        return 0.0
    try:
        return int(value) / 1_000_000
    except ValueError:
        return 0.0
