"""A Tuwunel that never proves healthy is rolled back to a serving Synapse, on a real engine."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import docker
import pytest

from testbed import images
from testbed.compose import ComposeProject
from testbed.engine import DockerEngine
from testbed.guard import GuardProcess, GuardSettings, event_field, is_event, write_config
from testbed.registry import Registry
from testbed.scenario import serve_synapse, wait_until_serving
from tests.testbed_fixtures import StandinImages

pytestmark = pytest.mark.testbed


def test_unhealthy_tuwunel_is_rolled_back(
    registry: Registry,
    standin_images: StandinImages,
    engine26: DockerEngine,
    compose_project: ComposeProject,
    tmp_path: Path,
) -> None:
    """An image that never answers as Tuwunel: Synapse serves again, the digest is not retried."""
    # A Synapse stand-in published as the Tuwunel tag never answers /_tuwunel/server_version.
    impostor = images.publish(
        images.build_standin_archive("synapse", tmp_path / "impostor.tar"),
        registry,
        "matrix-construct/tuwunel",
        "impostor",
        fmt="oci-zstd",
    )
    serve_synapse(compose_project, engine26)

    config = write_config(
        tmp_path / "config.toml",
        engine=engine26,
        registry=registry,
        project=compose_project,
        state_directory=tmp_path / "state",
        settings=GuardSettings(tag="impostor", health_timeout="4s", interval="2s"),
    )
    guard = GuardProcess(config, tmp_path / "guard.log")
    guard.start()
    try:
        index, rollback = guard.wait_for(
            lambda line: is_event(line, "rollback_completed"), timeout=120, what="rollback"
        )
        _, refused = guard.wait_for(
            lambda line: is_event(line, "decision_made", decision="stay-on-synapse"),
            timeout=30,
            what="a later cycle that stays on Synapse",
            start=index,
        )
    finally:
        assert guard.stop() == 0

    assert event_field(rollback, "outcome") == "rolled-back"
    assert event_field(rollback, "manifest_digest") == impostor.manifest_digest
    assert "did not answer as tuwunel within 4s" in (event_field(rollback, "cause") or "")
    assert "already failed and was rolled back" in (event_field(refused, "reason") or "")
    assert not any(is_event(line, "switch_committed") for line in guard.lines())

    assert wait_until_serving(compose_project.url("/health"), timeout=5) == b"OK"
    state = json.loads((tmp_path / "state" / "state.json").read_text())
    assert state["deployed"] == "synapse"
    assert state["failed_manifest_digests"] == [impostor.manifest_digest]
    assert state["last_switch"]["outcome"] == "rolled-back"
    assert state["last_switch"]["window_seconds"] > 0

    client = docker.DockerClient(base_url=engine26.base_url, version="auto")
    try:
        assert client.containers.get("standin-synapse-1").status == "running"
        assert client.containers.get("standin-tuwunel-1").status == "exited"
        assert {volume.name for volume in client.volumes.list()} >= {
            "standin_synapse-data",
            "standin_tuwunel-data",
        }
    finally:
        client.close()


def test_failed_preflight_leaves_synapse_untouched(
    registry: Registry,
    standin_images: StandinImages,
    engine26: DockerEngine,
    compose_project: ComposeProject,
    tmp_path: Path,
) -> None:
    """A compose file that compose rejects stops the switch before Synapse is touched."""
    serve_synapse(compose_project, engine26)
    client = docker.DockerClient(base_url=engine26.base_url, version="auto")
    started_at = client.containers.get("standin-synapse-1").attrs["State"]["StartedAt"]

    config = write_config(
        tmp_path / "config.toml",
        engine=engine26,
        registry=registry,
        project=compose_project,
        state_directory=tmp_path / "state",
    )
    text = config.read_text()
    broken = text.replace(
        '[deployment.tuwunel]\ncompose_files = ["compose.yaml"]',
        '[deployment.tuwunel]\ncompose_files = ["compose.yaml", "absent.yaml"]',
    )
    assert broken != text
    config.write_text(broken)

    guard = GuardProcess(config, tmp_path / "guard.log")
    guard.start()
    try:
        _, refused = guard.wait_for(
            lambda line: is_event(line, "switch_refused"), timeout=60, what="switch_refused"
        )
    finally:
        assert guard.stop() == 0

    assert event_field(refused, "step") == "preflight"
    assert "absent.yaml" in (event_field(refused, "error") or "")
    assert not any(
        is_event(line, "switch_step_completed", step="synapse_stopped") for line in guard.lines()
    )
    try:
        synapse = client.containers.get("standin-synapse-1")
        assert synapse.status == "running"
        assert synapse.attrs["State"]["StartedAt"] == started_at
    finally:
        client.close()
    assert wait_until_serving(compose_project.url("/health"), timeout=5) == b"OK"


def test_crash_looping_tuwunel_is_rolled_back(
    registry: Registry,
    standin_images: StandinImages,
    engine26: DockerEngine,
    compose_project: ComposeProject,
    tmp_path: Path,
) -> None:
    """A Tuwunel that answers, then exits every 3 s under its restart policy, is rolled back."""
    override = compose_project.folder / "crash.yaml"
    override.write_text(
        "services:\n"
        "  tuwunel:\n"
        '    command: ["/bin/sh", "-c", '
        f'"/bin/httpd -f -p 127.0.0.1:{compose_project.port} -h /www & sleep 3; exit 1"]\n'
    )
    serve_synapse(compose_project, engine26)

    config = write_config(
        tmp_path / "config.toml",
        engine=engine26,
        registry=registry,
        project=compose_project,
        state_directory=tmp_path / "state",
        settings=GuardSettings(
            health_timeout="30s",
            health_confirmations=12,
            tuwunel_compose_files=("compose.yaml", "crash.yaml"),
        ),
    )
    guard = GuardProcess(config, tmp_path / "guard.log")
    guard.start()
    try:
        _, rollback = guard.wait_for(
            lambda line: is_event(line, "rollback_completed"), timeout=120, what="rollback"
        )
    finally:
        assert guard.stop() == 0

    cause = event_field(rollback, "cause") or ""
    assert "restarted 1 time(s) during the health check" in cause
    assert event_field(rollback, "outcome") == "rolled-back"
    assert any(
        is_event(line, "switch_step_completed", step="tuwunel_started") for line in guard.lines()
    )
    assert wait_until_serving(compose_project.url("/health"), timeout=5) == b"OK"

    state = json.loads((tmp_path / "state" / "state.json").read_text())
    assert state["deployed"] == "synapse"
    assert state["failed_manifest_digests"] == [standin_images.tuwunel_zstd.manifest_digest]

    client = docker.DockerClient(base_url=engine26.base_url, version="auto")
    try:
        assert client.containers.get("standin-synapse-1").status == "running"
        assert client.containers.get("standin-tuwunel-1").status == "exited"
        assert "standin_synapse-data" in {volume.name for volume in client.volumes.list()}
    finally:
        client.close()


def test_port_held_outside_deployment_refuses_switch(
    registry: Registry,
    standin_images: StandinImages,
    engine26: DockerEngine,
    compose_project: ComposeProject,
    tmp_path: Path,
) -> None:
    """A process outside the deployment on Tuwunel's port stops the switch in preflight."""
    outsider = subprocess.Popen(
        [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(compose_project.port)],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until_serving(compose_project.url("/"), timeout=10)
        config = write_config(
            tmp_path / "config.toml",
            engine=engine26,
            registry=registry,
            project=compose_project,
            state_directory=tmp_path / "state",
        )
        guard = GuardProcess(config, tmp_path / "guard.log")
        guard.start()
        try:
            _, refused = guard.wait_for(
                lambda line: is_event(line, "switch_refused"), timeout=60, what="switch_refused"
            )
        finally:
            assert guard.stop() == 0
    finally:
        outsider.terminate()
        outsider.wait(10)

    error = event_field(refused, "error") or ""
    assert f"port {compose_project.port} of" in error
    assert f"held by process {outsider.pid} (python" in error
    assert not any(
        is_event(line, "switch_step_completed", step="synapse_stopped") for line in guard.lines()
    )


def test_backup_archives_synapse_volume_before_stop(
    registry: Registry,
    standin_images: StandinImages,
    engine26: DockerEngine,
    compose_project: ComposeProject,
    tmp_path: Path,
) -> None:
    """With backup_directory set, Synapse's volume is archived before it stops; the archive's
    checksum matches and it holds the volume's files with their contents."""
    serve_synapse(compose_project, engine26)
    backups = tmp_path / "backups"
    config = write_config(
        tmp_path / "config.toml",
        engine=engine26,
        registry=registry,
        project=compose_project,
        state_directory=tmp_path / "state",
        settings=GuardSettings(backup_directory=str(backups)),
    )
    guard = GuardProcess(config, tmp_path / "guard.log")
    guard.start()
    try:
        index, backed_up = guard.wait_for(
            lambda line: is_event(line, "volume_backed_up"), 90, "volume_backed_up"
        )
        guard.wait_for(lambda line: is_event(line, "switch_committed"), 90, "switch", start=index)
    finally:
        assert guard.stop() == 0

    stopped = [i for i, line in enumerate(guard.lines()) if "step=synapse_stopped" in line]
    assert stopped and stopped[0] > index
    assert event_field(backed_up, "volume") == "standin_synapse-data"
    archive = Path(event_field(backed_up, "archive") or "")
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    assert event_field(backed_up, "sha256") == digest
    assert archive.with_name(archive.name + ".sha256").read_text().split()[0] == digest

    client = docker.DockerClient(base_url=engine26.base_url, version="auto")
    try:
        mountpoint = Path(client.volumes.get("standin_synapse-data").attrs["Mountpoint"])
    finally:
        client.close()
    with tarfile.open(archive) as restored:
        members = {
            Path(member.name).name: restored.extractfile(member).read()  # type: ignore[union-attr]
            for member in restored.getmembers()
            if member.isfile()
        }
    on_disk = {path.name: path.read_bytes() for path in mountpoint.rglob("*") if path.is_file()}
    assert on_disk
    assert members == on_disk
