"""Release tracking and minimum image age with the daemon on a real engine and registry."""

from __future__ import annotations

import json
import secrets
from pathlib import Path

import pytest

from testbed import images
from testbed.compose import ComposeProject
from testbed.engine import DockerEngine
from testbed.guard import GuardProcess, GuardSettings, event_field, is_event, write_config
from testbed.registry import Registry
from testbed.scenario import wait_until_serving
from tests.testbed_fixtures import StandinImages

pytestmark = pytest.mark.testbed


def guard_with(
    extra_target: str,
    registry: Registry,
    engine: DockerEngine,
    project: ComposeProject,
    folder: Path,
    repository: str,
) -> GuardProcess:
    project.run(engine, "up", "--detach", "synapse")
    wait_until_serving(project.url("/health"), timeout=60)
    config = write_config(
        folder / "config.toml",
        engine=engine,
        registry=registry,
        project=project,
        state_directory=folder / "state",
        settings=GuardSettings(interval="1h"),
    )
    text = config.read_text().replace("/matrix-construct/tuwunel", f"/{repository}")
    config.write_text(text.replace("\n[deployment]\n", f"{extra_target}\n[deployment]\n", 1))
    guard = GuardProcess(config, folder / "guard.log")
    guard.start()
    return guard


def test_versions_pick_highest_release_in_range(
    registry: Registry,
    standin_images: StandinImages,
    engine26: DockerEngine,
    compose_project: ComposeProject,
    tmp_path: Path,
) -> None:
    """With versions '>=1.9,<2' the guard switches to v1.9.2, not v2.0.0, an rc or main."""
    repository = f"tracking/tuwunel{secrets.token_hex(3)}"
    published = {}
    for tag in ("v1.8.0", "v1.9.0", "v1.9.2", "v1.9.3-rc.1", "v2.0.0", "main", "latest"):
        archive = images.build_standin_archive("tuwunel", tmp_path / f"{tag}.tar")
        published[tag] = images.publish(archive, registry, repository, tag, fmt="oci-zstd")

    guard = guard_with(
        'versions = ">=1.9,<2"', registry, engine26, compose_project, tmp_path, repository
    )
    try:
        _, picked = guard.wait_for(lambda line: is_event(line, "release_picked"), 60, "pick")
        _, committed = guard.wait_for(lambda line: is_event(line, "switch_committed"), 90, "switch")
    finally:
        assert guard.stop() == 0

    assert event_field(picked, "tag") == "v1.9.2"
    assert event_field(picked, "tags_seen") == "7"
    assert event_field(committed, "manifest_digest") == published["v1.9.2"].manifest_digest
    served = wait_until_serving(compose_project.url("/_testbed/token"), timeout=5)
    assert served.decode().strip() == published["v1.9.2"].token


def test_min_age_holds_a_fresh_image(
    registry: Registry,
    standin_images: StandinImages,
    engine26: DockerEngine,
    compose_project: ComposeProject,
    tmp_path: Path,
) -> None:
    """An image created moments ago waits for min_age; Synapse keeps serving."""
    guard = guard_with(
        'min_age = "1d"', registry, engine26, compose_project, tmp_path, "matrix-construct/tuwunel"
    )
    try:
        _, decision = guard.wait_for(lambda line: is_event(line, "decision_made"), 60, "decision")
    finally:
        assert guard.stop() == 0

    reason = event_field(decision, "reason") or ""
    assert event_field(decision, "decision") == "stay-on-synapse"
    assert "younger than [target] min_age; it is adopted in 86" in reason
    assert wait_until_serving(compose_project.url("/health"), timeout=5) == b"OK"
    state = json.loads((tmp_path / "state" / "state.json").read_text())
    assert state["deployed"] == "synapse"
