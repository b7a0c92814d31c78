"""End to end on real engines: the daemon keeps Synapse on Docker 20.10, the engine is upgraded in
place to 26.1.5, and the daemon switches to Tuwunel."""

from __future__ import annotations

import docker
import pytest

from testbed.compose import ComposeProject
from testbed.engine import DockerEngine
from testbed.registry import Registry
from testbed.scenario import run_upgrade_scenario
from tests.testbed_fixtures import StandinImages

pytestmark = pytest.mark.testbed


def test_upgrade_scenario_switches_to_tuwunel(
    registry: Registry,
    standin_images: StandinImages,
    engine20: DockerEngine,
    compose_project: ComposeProject,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """Synapse stays while the engine lacks zstd; after the upgrade Tuwunel serves by digest."""
    workdir = tmp_path_factory.mktemp("guard")
    result = run_upgrade_scenario(
        registry=registry, engine=engine20, project=compose_project, workdir=workdir
    )

    assert (
        "cannot unpack zstd-compressed layers, which needs 23.0.0 or later" in result.waiting_line
    )
    assert "engine_version=20.10.24+dfsg1" in result.waiting_line
    assert "decision=stay-on-synapse" in result.waiting_line

    assert result.tuwunel_answer["name"] == "Tuwunel"
    assert result.guard_exit_status == 0
    assert 0 < result.window_seconds < 30
    # The interval is an hour: only the engine watcher can have started the switch this soon.
    assert result.detection_seconds < 30

    tuwunel = standin_images.tuwunel_zstd
    assert result.state["deployed"] == "tuwunel"
    assert result.state["manifest_digest"] == tuwunel.manifest_digest
    assert result.state["image_id"] == tuwunel.config_digest
    assert result.state["pinned_image"] == tuwunel.pinned_reference

    client = docker.DockerClient(base_url=engine20.base_url, version="auto")
    try:
        assert client.version()["Version"].startswith("26.1.5")
        synapse = client.containers.get("standin-synapse-1")
        assert synapse.status == "exited"
        running = client.containers.get("standin-tuwunel-1")
        assert running.status == "running"
        assert running.attrs["Config"]["Image"] == tuwunel.pinned_reference
        assert client.volumes.get("standin_synapse-data").name == "standin_synapse-data"
    finally:
        client.close()

    print(
        f"\nupgrade scenario: engine upgrade {result.upgrade_seconds:.1f}s, switch started "
        f"{result.detection_seconds:.2f}s and committed "
        f"{result.switch_seconds:.1f}s after the new engine answered, window "
        f"{result.window_seconds:.2f}s, guard peak memory {result.peak_memory_kib} KiB"
    )
