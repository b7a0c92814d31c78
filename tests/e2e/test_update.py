"""Updating a serving Tuwunel when its tag gets a new digest, on a real engine: a good image is
adopted through the same steps and gate; a bad one is rolled back to the previous Tuwunel image,
not to Synapse."""

from __future__ import annotations

import json
import secrets
from pathlib import Path

import docker
import pytest

from testbed import images
from testbed.compose import ComposeProject
from testbed.engine import DockerEngine
from testbed.guard import GuardProcess, GuardSettings, event_field, is_event, write_config
from testbed.registry import Registry
from testbed.scenario import fetch_json, serve_synapse, wait_until_serving
from tests.testbed_fixtures import StandinImages

pytestmark = pytest.mark.testbed

REPOSITORY = "matrix-construct/tuwunel"


def publish(kind: str, registry: Registry, tag: str, folder: Path) -> images.PublishedImage:
    archive = images.build_standin_archive(kind, folder / f"{kind}-{secrets.token_hex(4)}.tar")  # type: ignore[arg-type]
    return images.publish(archive, registry, REPOSITORY, tag, fmt="oci-zstd")


def test_update_adopts_new_digest_and_rolls_back_bad_one(
    registry: Registry,
    standin_images: StandinImages,
    engine26: DockerEngine,
    compose_project: ComposeProject,
    tmp_path: Path,
) -> None:
    """New digest: Tuwunel is updated; a broken one: the previous Tuwunel image serves again."""
    tag = f"update-{secrets.token_hex(4)}"
    first = publish("tuwunel", registry, tag, tmp_path)
    serve_synapse(compose_project, engine26)
    config = write_config(
        tmp_path / "config.toml",
        engine=engine26,
        registry=registry,
        project=compose_project,
        state_directory=tmp_path / "state",
        settings=GuardSettings(
            tag=tag, interval="2s", health_timeout="5s", min_switch_interval="0s"
        ),
    )
    guard = GuardProcess(config, tmp_path / "guard.log")
    guard.start()
    try:
        index, _ = guard.wait_for(
            lambda line: is_event(line, "switch_committed", from_side="synapse"), 90, "switch"
        )

        second = publish("tuwunel", registry, tag, tmp_path)
        index, updated = guard.wait_for(
            lambda line: is_event(line, "switch_committed", from_side="tuwunel"),
            90,
            "update to the second image",
            start=index + 1,
        )
        assert event_field(updated, "manifest_digest") == second.manifest_digest
        served = wait_until_serving(compose_project.url("/_testbed/token"), timeout=5)
        assert served.decode().strip() == second.token

        broken = publish("synapse", registry, tag, tmp_path)
        _, rollback = guard.wait_for(
            lambda line: is_event(line, "rollback_completed"), 90, "rollback", start=index + 1
        )
    finally:
        assert guard.stop() == 0

    assert event_field(rollback, "manifest_digest") == broken.manifest_digest
    assert event_field(rollback, "to_side") == "tuwunel"
    assert event_field(rollback, "restored_image") == second.pinned_reference
    assert fetch_json(compose_project.url("/_tuwunel/server_version"))["name"] == "Tuwunel"

    state = json.loads((tmp_path / "state" / "state.json").read_text())
    assert state["deployed"] == "tuwunel"
    assert state["manifest_digest"] == second.manifest_digest
    assert state["pinned_image"] == second.pinned_reference
    assert state["failed_manifest_digests"] == [broken.manifest_digest]

    client = docker.DockerClient(base_url=engine26.base_url, version="auto")
    try:
        running = client.containers.get("standin-tuwunel-1")
        assert running.status == "running"
        assert running.attrs["Config"]["Image"] == second.pinned_reference
        assert client.containers.get("standin-synapse-1").status == "exited"
        assert client.images.get(first.pinned_reference).id == first.config_digest
    finally:
        client.close()
