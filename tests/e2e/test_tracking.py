"""Release tracking and minimum image age with the daemon on a real engine and registry."""

from __future__ import annotations

import hashlib
import json
import secrets
from pathlib import Path

import pytest
import requests

from testbed import images
from testbed.compose import ComposeProject
from testbed.engine import DockerEngine
from testbed.guard import GuardProcess, GuardSettings, event_field, is_event, write_config
from testbed.registry import Registry
from testbed.scenario import serve_synapse, wait_until_serving
from tests.testbed_fixtures import StandinImages
from tuwunel_guard.core.cpu import cpu_level_from_cpuinfo

pytestmark = pytest.mark.testbed


def guard_with(
    extra_target: str,
    registry: Registry,
    engine: DockerEngine,
    project: ComposeProject,
    folder: Path,
    repository: str,
) -> GuardProcess:
    serve_synapse(project, engine)
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


def put_index(registry: Registry, repository: str, tag: str, entries: list[tuple[str, str]]) -> str:
    """PUT an OCI index at `tag` listing (tag, variant) manifests as linux/amd64 entries."""
    manifests = []
    for source_tag, variant in entries:
        response = requests.get(
            f"{registry.url}/v2/{repository}/manifests/{source_tag}",
            headers={"Accept": "application/vnd.oci.image.manifest.v1+json"},
            timeout=10,
        )
        response.raise_for_status()
        body = response.content
        platform = {"architecture": "amd64", "os": "linux"}
        if variant:
            platform["variant"] = variant
        manifests.append(
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": "sha256:" + hashlib.sha256(body).hexdigest(),
                "size": len(body),
                "platform": platform,
            }
        )
    index = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": manifests,
        }
    ).encode()
    response = requests.put(
        f"{registry.url}/v2/{repository}/manifests/{tag}",
        data=index,
        headers={"Content-Type": "application/vnd.oci.image.index.v1+json"},
        timeout=10,
    )
    response.raise_for_status()
    return "sha256:" + hashlib.sha256(index).hexdigest()


def expected_level() -> int:
    """The x86-64 level the guard should pick here: this CPU's, at most the v3 on offer."""
    return min(3, cpu_level_from_cpuinfo(Path("/proc/cpuinfo").read_text()).level)


def test_index_variant_for_this_cpu_runs_on_20_10(
    registry: Registry,
    standin_images: StandinImages,
    engine20: DockerEngine,
    compose_project: ComposeProject,
    tmp_path: Path,
) -> None:
    """An index with v1 and v3 amd64 entries: the guard picks this CPU's level and pins it by
    digest, so Docker 20.10 (which takes only v1 by tag) runs the v3 build."""
    repository = f"variants/tuwunel{secrets.token_hex(3)}"
    builds = {}
    for level in (1, 3):
        archive = images.build_standin_archive("tuwunel", tmp_path / f"v{level}.tar")
        builds[level] = images.publish(archive, registry, repository, f"v{level}", fmt="oci-gzip")
    put_index(registry, repository, "latest", [("v1", ""), ("v3", "v3")])

    guard = guard_with("", registry, engine20, compose_project, tmp_path, repository)
    try:
        _, cycle = guard.wait_for(lambda line: is_event(line, "cycle_completed"), 60, "cycle")
        _, committed = guard.wait_for(lambda line: is_event(line, "switch_committed"), 90, "switch")
    finally:
        assert guard.stop() == 0

    chosen = builds[expected_level()]
    assert event_field(committed, "manifest_digest") == chosen.manifest_digest
    served = wait_until_serving(compose_project.url("/_testbed/token"), timeout=5)
    assert served.decode().strip() == chosen.token
    if expected_level() == 3:
        assert event_field(cycle, "requirements") == "x86-64-variant"
        assert "never reads the index" in (event_field(cycle, "reason") or "")


def test_per_variant_tags_follow_this_cpu(
    registry: Registry,
    standin_images: StandinImages,
    engine26: DockerEngine,
    compose_project: ComposeProject,
    tmp_path: Path,
) -> None:
    """With per-variant tags beside a release, the guard takes the one for this CPU's level."""
    repository = f"variants/tuwunel{secrets.token_hex(3)}"
    published = {}
    for tag in (
        "v1.9.0",
        "v1.9.0-release-all-x86_64-v1-linux-gnu",
        "v1.9.0-release-all-x86_64-v3-linux-gnu",
    ):
        archive = images.build_standin_archive("tuwunel", tmp_path / f"{tag}.tar")
        published[tag] = images.publish(archive, registry, repository, tag, fmt="oci-zstd")

    guard = guard_with(
        'versions = ">=1.9"', registry, engine26, compose_project, tmp_path, repository
    )
    try:
        _, picked = guard.wait_for(lambda line: is_event(line, "variant_picked"), 60, "variant")
        _, committed = guard.wait_for(lambda line: is_event(line, "switch_committed"), 90, "switch")
    finally:
        assert guard.stop() == 0

    tag = f"v1.9.0-release-all-x86_64-v{expected_level()}-linux-gnu"
    assert event_field(picked, "tag") == tag
    assert f"picked x86-64-v{expected_level()}" in (event_field(picked, "reason") or "")
    assert event_field(committed, "manifest_digest") == published[tag].manifest_digest
