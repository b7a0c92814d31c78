"""Each strategy on the real Docker 20.10.24 engine with the zstd OCI Tuwunel stand-in: convert,
podman and build end with Tuwunel serving; auto and synapse keep Synapse."""

from __future__ import annotations

import json
import shutil
import subprocess
import tarfile
import tempfile
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


def start_guard(
    strategy: str,
    registry: Registry,
    engine: DockerEngine,
    project: ComposeProject,
    folder: Path,
    state: Path | None = None,
    extra_config: str = "",
) -> GuardProcess:
    serve_synapse(project, engine)
    config = write_config(
        folder / "config.toml",
        engine=engine,
        registry=registry,
        project=project,
        state_directory=state or folder / "state",
        settings=GuardSettings(strategy=strategy, interval="1h"),
    )
    if extra_config:
        config.write_text(config.read_text() + extra_config)
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
    progress = [n for n in guard.notifications if n.startswith("STATUS=convert route: ")]
    assert progress, guard.notifications
    assert " MiB (" in progress[0]
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


def test_podman_switches_on_docker_20_10(
    registry: Registry,
    standin_images: StandinImages,
    engine20: DockerEngine,
    compose_project: ComposeProject,
    tmp_path: Path,
) -> None:
    """Strategy podman gets the zstd image onto 20.10 through Podman; Tuwunel serves."""
    # podman 4.3 rejects a --runroot longer than 50 characters, so the state folder is short.
    state = Path(tempfile.mkdtemp(prefix="tgs", dir="/tmp"))
    try:
        guard = start_guard("podman", registry, engine20, compose_project, tmp_path, state)
        try:
            _, committed = guard.wait_for(
                lambda line: is_event(line, "switch_committed"), 240, "switch through podman"
            )
        finally:
            assert guard.stop() == 0
        saved = json.loads((state / "state.json").read_text())
    finally:
        shutil.rmtree(state, ignore_errors=True)

    assert event_field(committed, "route") == "podman"
    assert fetch_json(compose_project.url("/_tuwunel/server_version"))["name"] == "Tuwunel"
    assert saved["deployed"] == "tuwunel"
    assert saved["pinned_image"].startswith("tuwunel-guard/tuwunel:podman-")


def test_build_switches_on_docker_20_10(
    registry: Registry,
    standin_images: StandinImages,
    engine20: DockerEngine,
    compose_project: ComposeProject,
    tmp_path: Path,
) -> None:
    """Strategy build builds a local git repository on 20.10; the built Tuwunel serves."""
    repository = make_standin_repository(tmp_path / "source", standin_images, tmp_path)
    build_table = (
        f'\n[build]\nrepository = "file://{repository}"\nref = "main"\ndockerfile = "Dockerfile"\n'
    )
    guard = start_guard(
        "build", registry, engine20, compose_project, tmp_path, extra_config=build_table
    )
    try:
        _, committed = guard.wait_for(
            lambda line: is_event(line, "switch_committed"), 240, "switch through build"
        )
    finally:
        assert guard.stop() == 0

    assert event_field(committed, "route") == "build"
    assert fetch_json(compose_project.url("/_tuwunel/server_version"))["name"] == "Tuwunel"
    served = wait_until_serving(compose_project.url("/built-from-source"), timeout=5)
    assert served.decode().strip() == "yes"
    saved = json.loads((tmp_path / "state" / "state.json").read_text())
    assert saved["pinned_image"].startswith("tuwunel-guard/tuwunel:build-")


def make_standin_repository(folder: Path, standin_images: StandinImages, scratch: Path) -> Path:
    """Create a git repository whose Dockerfile rebuilds the Tuwunel stand-in from its files."""
    archive = images.build_standin_archive("tuwunel", scratch / "for-build.tar")
    with tarfile.open(archive.path) as outer:
        manifest = json.loads(outer.extractfile("manifest.json").read())  # type: ignore[union-attr]
        layer = outer.extractfile(manifest[0]["Layers"][0]).read()  # type: ignore[union-attr]
    folder.mkdir(parents=True)
    (folder / "rootfs.tar").write_bytes(layer)
    (folder / "Dockerfile").write_text(
        "FROM scratch\n"
        "ADD rootfs.tar /\n"
        'RUN ["/bin/sh", "-c", "echo yes > /www/built-from-source"]\n'
        "ENV PATH=/bin STANDIN_KIND=tuwunel STANDIN_PORT=8008 STANDIN_ADDRESS=127.0.0.1 "
        "STANDIN_DATA_DIR=/var/lib/tuwunel\n"
        'ENTRYPOINT ["/bin/sh", "/standin-entrypoint"]\n'
    )
    git = ["git", "-C", str(folder), "-c", "user.name=test", "-c", "user.email=test@localhost"]
    subprocess.run([*git[:3], "init", "--quiet", "--initial-branch=main"], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "--quiet", "-m", "stand-in"], check=True)
    return folder


def test_convert_of_corrupt_layer_leaves_synapse(
    registry: Registry,
    standin_images: StandinImages,
    engine20: DockerEngine,
    compose_project: ComposeProject,
    tmp_path: Path,
) -> None:
    """A layer whose bytes no longer match its digest stops convert before Synapse stops."""
    tag = "corrupt"
    image = images.publish(
        images.build_standin_archive("tuwunel", tmp_path / "corrupt.tar"),
        registry,
        "matrix-construct/tuwunel",
        tag,
        fmt="oci-zstd",
    )
    digest = image.layer_digests[0].removeprefix("sha256:")
    blob = registry.storage / "docker/registry/v2/blobs/sha256" / digest[:2] / digest / "data"
    content = bytearray(blob.read_bytes())
    content[len(content) // 2] ^= 0xFF
    blob.write_bytes(bytes(content))

    serve_synapse(compose_project, engine20)
    config = write_config(
        tmp_path / "config.toml",
        engine=engine20,
        registry=registry,
        project=compose_project,
        state_directory=tmp_path / "state",
        settings=GuardSettings(strategy="convert", interval="1h", tag=tag),
    )
    guard = GuardProcess(config, tmp_path / "guard.log")
    guard.start()
    try:
        _, refused = guard.wait_for(lambda line: is_event(line, "switch_refused"), 120, "refusal")
    finally:
        assert guard.stop() == 0

    error = event_field(refused, "error") or ""
    assert image.layer_digests[0] in error
    assert not any(
        is_event(line, "switch_step_completed", step="synapse_stopped") for line in guard.lines()
    )
    assert wait_until_serving(compose_project.url("/health"), timeout=5) == b"OK"
    assert not list((tmp_path / "state").glob("convert-*"))
