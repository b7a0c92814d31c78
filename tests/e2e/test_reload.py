"""SIGHUP re-reads the config: a valid file takes effect and is logged with the old and new
strategy; an invalid one is rejected with all its errors while the old config stays."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from testbed.compose import ComposeProject
from testbed.engine import DockerEngine
from testbed.guard import GuardProcess, GuardSettings, event_field, is_event, write_config
from testbed.registry import Registry
from tests.testbed_fixtures import StandinImages

pytestmark = pytest.mark.testbed


def test_reload_applies_strategy_and_rejects_broken_file(
    registry: Registry,
    standin_images: StandinImages,
    engine20: DockerEngine,
    compose_project: ComposeProject,
    tmp_path: Path,
) -> None:
    """synapse -> auto on reload; then a broken file keeps auto and lists its errors."""
    config = write_config(
        tmp_path / "config.toml",
        engine=engine20,
        registry=registry,
        project=compose_project,
        state_directory=tmp_path / "state",
        settings=GuardSettings(strategy="synapse", interval="1h"),
    )
    guard = GuardProcess(config, tmp_path / "guard.log")
    guard.start()
    try:
        guard.wait_for(lambda line: is_event(line, "decision_made"), 60, "first decision")
        assert guard.process is not None

        config.write_text(config.read_text().replace('strategy = "synapse"', 'strategy = "auto"'))
        mark = len(guard.lines())
        os.kill(guard.process.pid, signal.SIGHUP)
        _, reloaded = guard.wait_for(
            lambda line: is_event(line, "config_reloaded"), 30, "config_reloaded", start=mark
        )
        _, decision = guard.wait_for(
            lambda line: is_event(line, "decision_made"), 60, "decision after reload", start=mark
        )
        assert event_field(reloaded, "old_strategy") == "synapse"
        assert event_field(reloaded, "strategy") == "auto"
        assert "waiting for an engine" in (event_field(decision, "reason") or "")

        config.write_text(config.read_text() + "\n[bogus]\nkey = 1\n[schedule2]\n")
        mark = len(guard.lines())
        os.kill(guard.process.pid, signal.SIGHUP)
        _, rejected = guard.wait_for(
            lambda line: is_event(line, "config_rejected"), 30, "config_rejected", start=mark
        )
        problems = event_field(rejected, "problems") or ""
        assert "bogus: unknown key" in problems
        assert "schedule2: unknown key" in problems
        assert event_field(rejected, "kept") == "old"
        assert not any(is_event(line, "config_reloaded") for line in guard.lines()[mark:])

        reloading = [n for n in guard.notifications if n.startswith(("RELOADING=1", "READY=1"))]
        assert reloading == ["READY=1", "RELOADING=1", "READY=1", "RELOADING=1", "READY=1"]
    finally:
        assert guard.stop() == 0
