"""Crash recovery on a real engine: the daemon is killed with SIGKILL right after each switch
step in turn, restarted, and must leave exactly one homeserver serving, with nothing removed and
the state file matching what the engine runs."""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path

import docker
import pytest

from testbed.compose import ComposeProject
from testbed.engine import DockerEngine
from testbed.guard import GuardProcess, GuardSettings, is_event, write_config
from testbed.registry import Registry
from testbed.scenario import serve_synapse
from tests.testbed_fixtures import StandinImages
from tuwunel_guard.switch import FAULT_VARIABLE

pytestmark = pytest.mark.testbed

RECOVERY_BOUND_SECONDS = 30.0
"""Time from the restart until exactly one homeserver serves and the state file is settled.
It covers one health gate of each side (3 probes 0.5 s apart) plus compose calls."""

# A switch killed before its health step is undone (and, with the default minimum time between
# automatic switches, not tried again within the hour); one killed after it is finished.
EXPECTED_SIDE = {
    "image_verified": "synapse",
    "synapse_stopped": "synapse",
    "tuwunel_started": "synapse",
    "tuwunel_healthy": "tuwunel",
    "committed": "tuwunel",
}


def serving_name(url: str) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:  # noqa: S310 - loopback
            return str(json.loads(response.read()).get("server", {}).get("name"))
    except OSError:
        return None


def settled(state_path: Path, client: docker.DockerClient, project: ComposeProject) -> str | None:
    """Return the deployed side when state, containers and the port agree, else None."""
    try:
        state = json.loads(state_path.read_text())
    except (OSError, ValueError):
        return None
    if state.get("switch_in_progress") is not None:
        return None

    deployed = state["deployed"]
    other = "synapse" if deployed == "tuwunel" else "tuwunel"
    running = {c.labels.get("com.docker.compose.service") for c in client.containers.list()}
    answering = serving_name(project.url("/_matrix/federation/v1/version"))
    if deployed in running and other not in running and answering == deployed.capitalize():
        return str(deployed)
    return None


@pytest.mark.parametrize("step", list(EXPECTED_SIDE))
def test_sigkill_at_step_recovers(
    step: str,
    registry: Registry,
    standin_images: StandinImages,
    engine26: DockerEngine,
    compose_project: ComposeProject,
    tmp_path: Path,
) -> None:
    """After a SIGKILL at `step` and a restart, one side serves and the state file agrees."""
    serve_synapse(compose_project, engine26)
    config = write_config(
        tmp_path / "config.toml",
        engine=engine26,
        registry=registry,
        project=compose_project,
        state_directory=tmp_path / "state",
        settings=GuardSettings(interval="1h", health_timeout="20s"),
    )

    killed = GuardProcess(config, tmp_path / "killed.log")
    killed.start({FAULT_VARIABLE: step})
    assert killed.wait_exit(timeout=120) == -9
    assert any(is_event(line, "fault_point_reached", step=step) for line in killed.lines())

    restarted_at = time.monotonic()
    guard = GuardProcess(config, tmp_path / "restarted.log")
    guard.start()
    client = docker.DockerClient(base_url=engine26.base_url, version="auto")
    try:
        side = None
        while side is None and time.monotonic() - restarted_at < RECOVERY_BOUND_SECONDS:
            time.sleep(0.2)
            side = settled(tmp_path / "state" / "state.json", client, compose_project)
        recovery_seconds = time.monotonic() - restarted_at
        guard.wait_for_notification("READY=1", timeout=30)
        assert side == EXPECTED_SIDE[step], guard.lines()[-10:]
        assert recovery_seconds < RECOVERY_BOUND_SECONDS

        if step == "committed":
            assert not any(is_event(line, "switch_interrupted") for line in guard.lines())
        else:
            assert any(is_event(line, "switch_interrupted", step=step) for line in guard.lines())

        volumes = {volume.name for volume in client.volumes.list()}
        assert "standin_synapse-data" in volumes
        tuwunel_ran = step not in ("image_verified", "synapse_stopped")
        if tuwunel_ran:
            assert "standin_tuwunel-data" in volumes
            stopped = "standin-synapse-1" if side == "tuwunel" else "standin-tuwunel-1"
            assert client.containers.get(stopped).status == "exited"
        assert client.images.get(standin_images.tuwunel_zstd.pinned_reference).id == (
            standin_images.tuwunel_zstd.config_digest
        )
    finally:
        client.close()
        assert guard.stop() == 0

    print(f"\nSIGKILL after {step}: settled on {side} {recovery_seconds:.1f}s after the restart")
