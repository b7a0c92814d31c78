"""Each strategy on the real Docker 20.10.24 engine with the zstd OCI Tuwunel stand-in: convert,
podman and build end with Tuwunel serving; auto and synapse keep Synapse."""

from __future__ import annotations

import json
from pathlib import Path

import docker
import pytest

from testbed.compose import ComposeProject
from testbed.engine import DockerEngine
from testbed.guard import GuardProcess, GuardSettings, event_field, is_event, write_config
from testbed.registry import Registry
from testbed.scenario import fetch_json, wait_until_serving
from tests.testbed_fixtures import StandinImages

pytestmark = pytest.mark.testbed


def start_guard(
    strategy: str,
    registry: Registry,
    engine: DockerEngine,
    project: ComposeProject,
    folder: Path,
) -> GuardProcess:
    project.run(engine, "up", "--detach", "synapse")
    wait_until_serving(project.url("/health"), timeout=60)
    config = write_config(
        folder / "config.toml",
        engine=engine,
        registry=registry,
        project=project,
        state_directory=folder / "state",
        settings=GuardSettings(strategy=strategy, interval="1h"),
    )
    guard = GuardProcess(config, folder / "guard.log")
    guard.start()
    return guard


def test_convert_switches_on_docker_20_10(
    registry: Registry,
    standin_images: StandinImages,
    engine20: DockerEngine,
    compose_project: ComposeProject,
    tmp_path: Path,
) -> None:
    """Strategy convert loads the zstd image into 20.10 and Tuwunel serves from it."""
    guard = start_guard("convert", registry, engine20, compose_project, tmp_path)
    try:
        _, committed = guard.wait_for(
            lambda line: is_event(line, "switch_committed"), 120, "switch through convert"
        )
    finally:
        assert guard.stop() == 0

    image = standin_images.tuwunel_zstd
    assert event_field(committed, "route") == "convert"
    assert event_field(committed, "image_id") == image.config_digest
    assert fetch_json(compose_project.url("/_tuwunel/server_version"))["name"] == "Tuwunel"
    state = json.loads((tmp_path / "state" / "state.json").read_text())
    assert state["deployed"] == "tuwunel"
    assert state["image_id"] == image.config_digest
    assert not list((tmp_path / "state").glob("convert-*"))

    client = docker.DockerClient(base_url=engine20.base_url, version="auto")
    try:
        running = client.containers.get("standin-tuwunel-1")
        assert running.attrs["Image"] == image.config_digest
        assert running.attrs["Config"]["Image"] == state["pinned_image"]
        assert state["pinned_image"].startswith("tuwunel-guard/tuwunel:")
    finally:
        client.close()


@pytest.mark.parametrize("strategy", ["auto", "synapse"])
def test_waiting_strategies_keep_synapse(
    strategy: str,
    registry: Registry,
    standin_images: StandinImages,
    engine20: DockerEngine,
    compose_project: ComposeProject,
    tmp_path: Path,
) -> None:
    """auto waits for a newer engine and synapse never switches: Synapse keeps serving."""
    guard = start_guard(strategy, registry, engine20, compose_project, tmp_path)
    try:
        _, decision = guard.wait_for(
            lambda line: is_event(line, "decision_made"), 60, "the first decision"
        )
    finally:
        assert guard.stop() == 0

    assert event_field(decision, "decision") == "stay-on-synapse"
    expected = "waiting for an engine" if strategy == "auto" else "strategy 'synapse' keeps"
    assert expected in (event_field(decision, "reason") or "")
    assert wait_until_serving(compose_project.url("/health"), timeout=5) == b"OK"
