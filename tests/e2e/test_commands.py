"""`tuwunel-guard status` and `switch` against a real engine, while the daemon runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from testbed.compose import ComposeProject
from testbed.engine import DockerEngine
from testbed.guard import REPOSITORY_ROOT, GuardProcess, GuardSettings, is_event, write_config
from testbed.registry import Registry
from testbed.scenario import fetch_json, serve_synapse, wait_until_serving
from tests.testbed_fixtures import StandinImages

pytestmark = pytest.mark.testbed


def guard_command(config: Path, *arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tuwunel_guard", "--config", str(config), *arguments],
        cwd=REPOSITORY_ROOT,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


def test_status_and_switch_while_daemon_runs(
    registry: Registry,
    standin_images: StandinImages,
    engine26: DockerEngine,
    compose_project: ComposeProject,
    tmp_path: Path,
) -> None:
    """The admin switches to Tuwunel and back by hand; status follows; the daemon keeps out."""
    serve_synapse(compose_project, engine26)
    config = write_config(
        tmp_path / "config.toml",
        engine=engine26,
        registry=registry,
        project=compose_project,
        state_directory=tmp_path / "state",
        settings=GuardSettings(strategy="synapse", interval="1h"),
    )
    daemon = GuardProcess(config, tmp_path / "daemon.log")
    daemon.start()
    try:
        daemon.wait_for_notification("READY=1", timeout=60)
        daemon.wait_for(lambda line: is_event(line, "cycle_completed"), 60, "first cycle")

        status = json.loads(guard_command(config, "status", "--json").stdout)
        assert status["deployed"] == "synapse"
        assert status["last_verdict"] == "compatible"
        assert status["next_check_at"] > time.time() + 3000

        refused = guard_command(config, "switch", "--to", "tuwunel")
        assert refused.returncode == 2
        assert "refusing to switch without --yes" in refused.stderr
        assert "new, empty homeserver" in refused.stdout

        forward = guard_command(config, "switch", "--to", "tuwunel", "--yes")
        assert forward.returncode == 0, forward.stderr
        assert "switched to tuwunel; neither homeserver answered for at most" in forward.stdout
        assert fetch_json(compose_project.url("/_tuwunel/server_version"))["name"] == "Tuwunel"

        text = guard_command(config, "status").stdout
        assert "Deployed:      tuwunel" in text
        assert standin_images.tuwunel_zstd.manifest_digest in text
        assert "Last switch:   synapse -> tuwunel committed" in text

        again = guard_command(config, "switch", "--to", "tuwunel", "--yes")
        assert again.returncode == 2
        assert "tuwunel is deployed already" in again.stderr

        back = guard_command(config, "switch", "--to", "synapse", "--yes")
        assert back.returncode == 0, back.stderr
        assert wait_until_serving(compose_project.url("/health"), timeout=5) == b"OK"
        status = json.loads(guard_command(config, "status", "--json").stdout)
        assert status["deployed"] == "synapse"
        assert status["held_by_admin"] is True
        assert status["manifest_digest"] == standin_images.tuwunel_zstd.manifest_digest

        # A reload runs a cycle at once; the daemon must respect the admin's hold.
        mark = len(daemon.lines())
        assert daemon.process is not None
        os.kill(daemon.process.pid, signal.SIGHUP)
        _, decision = daemon.wait_for(
            lambda line: is_event(line, "decision_made"), 60, "decision after reload", start=mark
        )
        assert "decision=stay-on-synapse" in decision
        assert "strategy 'synapse' keeps Synapse deployed" in decision
    finally:
        assert daemon.stop() == 0


def test_switch_reports_failed_rollback(
    registry: Registry,
    standin_images: StandinImages,
    engine26: DockerEngine,
    compose_project: ComposeProject,
    tmp_path: Path,
) -> None:
    """When neither side can pass a gate too strict to pass, switch says the rollback failed."""
    serve_synapse(compose_project, engine26)
    config = write_config(
        tmp_path / "config.toml",
        engine=engine26,
        registry=registry,
        project=compose_project,
        state_directory=tmp_path / "state",
        settings=GuardSettings(strategy="synapse", health_timeout="1s", health_confirmations=20),
    )

    result = guard_command(config, "switch", "--to", "tuwunel", "--yes")

    assert result.returncode == 1
    assert "the switch failed and so did the rollback" in result.stderr
    assert "may not be serving" in result.stderr
    status = json.loads(guard_command(config, "status", "--json").stdout)
    assert status["last_switch"]["outcome"] == "rollback-failed"
    assert status["deployed"] == "synapse"
