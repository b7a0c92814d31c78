"""The upgrade scenario: the guard keeps Synapse on Docker 20.10, the engine is upgraded in place
to 26.1, and the guard switches to Tuwunel. Used by the demo and by the end-to-end test."""

from __future__ import annotations

import json
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from testbed.compose import ComposeProject
from testbed.engine import DockerEngine
from testbed.guard import GuardProcess, GuardSettings, event_field, is_event, write_config
from testbed.registry import Registry


@dataclass(frozen=True)
class ScenarioResult:
    """The scenario's measurements and the log line of each milestone."""

    waiting_line: str
    committed_line: str
    upgrade_seconds: float
    switch_seconds: float
    detection_seconds: float
    window_seconds: float
    peak_memory_kib: int
    guard_exit_status: int
    state: dict[str, object]
    tuwunel_answer: dict[str, object]
    log_path: Path


def fetch_json(url: str, timeout: float = 5.0) -> dict[str, object]:
    """GET `url` on loopback and decode its JSON body."""
    with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - loopback URL
        document: dict[str, object] = json.loads(response.read())
    return document


def wait_until_serving(url: str, timeout: float) -> bytes:
    """Wait until `url` answers 200 and return the body."""
    deadline = time.monotonic() + timeout
    last_error = ""
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:  # noqa: S310 - loopback URL
                body: bytes = response.read()
                return body
        except OSError as error:
            last_error = str(error)
        time.sleep(0.2)
    raise AssertionError(f"{url} did not answer within {timeout:.0f}s: {last_error}")


def serve_synapse(project: ComposeProject, engine: DockerEngine) -> None:
    """Start the project's Synapse stand-in on `engine` and wait until it answers."""
    project.run(engine, "up", "--detach", "synapse")
    wait_until_serving(project.url("/health"), timeout=60)


def run_upgrade_scenario(
    *,
    registry: Registry,
    engine: DockerEngine,
    project: ComposeProject,
    workdir: Path,
    echo: TextIO | None = None,
) -> ScenarioResult:
    """Run the scenario on a running Docker 20.10 `engine` and return what it measured."""
    serve_synapse(project, engine)

    config = write_config(
        workdir / "config.toml",
        engine=engine,
        registry=registry,
        project=project,
        state_directory=workdir / "state",
        # An hour between scheduled cycles: the switch after the upgrade must come from the
        # guard noticing the engine restart, not from the schedule.
        settings=GuardSettings(interval="1h"),
    )
    guard = GuardProcess(config, workdir / "guard.log", echo=echo)
    guard.start()
    try:
        return _observe(guard, engine, project, workdir)
    finally:
        guard.stop()


def _observe(
    guard: GuardProcess, engine: DockerEngine, project: ComposeProject, workdir: Path
) -> ScenarioResult:
    guard.wait_for_notification("READY=1", timeout=60)
    index, waiting = guard.wait_for(
        lambda line: is_event(line, "cycle_completed", verdict="incompatible"),
        timeout=120,
        what="incompatible verdict on Docker 20.10",
    )
    wait_until_serving(project.url("/health"), timeout=5)

    upgrade_seconds = engine.upgrade_to("26.1")
    upgraded_at = time.monotonic()
    guard.wait_for(
        lambda line: is_event(line, "switch_started"),
        timeout=60,
        what="switch_started after the upgrade",
        start=index,
    )
    detection_seconds = time.monotonic() - upgraded_at
    _, committed = guard.wait_for(
        lambda line: is_event(line, "switch_committed"),
        timeout=240,
        what="switch_committed after the upgrade",
        start=index,
    )
    switch_seconds = time.monotonic() - upgraded_at

    answer = fetch_json(project.url("/_tuwunel/server_version"))
    peak = guard.peak_memory_kib()
    status = guard.stop()
    state = json.loads((workdir / "state" / "state.json").read_text())
    return ScenarioResult(
        waiting_line=waiting,
        committed_line=committed,
        upgrade_seconds=upgrade_seconds,
        switch_seconds=switch_seconds,
        detection_seconds=detection_seconds,
        window_seconds=float(event_field(committed, "window_seconds") or "nan"),
        peak_memory_kib=peak,
        guard_exit_status=status,
        state=state,
        tuwunel_answer=answer,
        log_path=guard.log_path,
    )
