"""Checks that the test bed behaves like the real engines and registry it stands for."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import docker
import docker.errors
import pytest
import requests

from testbed import images, paths
from testbed.compose import ComposeProject
from testbed.engine import DockerEngine, EngineError
from testbed.registry import Registry
from tests.testbed_fixtures import StandinImages

pytestmark = pytest.mark.testbed


@contextlib.contextmanager
def docker_client(engine: DockerEngine) -> Iterator[docker.DockerClient]:
    client = docker.DockerClient(base_url=engine.base_url)
    try:
        yield client
    finally:
        client.close()


def run_and_read(client: docker.DockerClient, image: str, *command: str) -> str:
    output: bytes = client.containers.run(image, list(command), remove=True, network_mode="none")
    return output.decode().strip()


def wait_for_text(url: str, timeout: float = 30.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return requests.get(url, timeout=2).text
        except requests.ConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_engine_versions(engine20: DockerEngine, engine26: DockerEngine) -> None:
    assert engine20.version_info()["Version"] == "20.10.24+dfsg1"
    assert engine20.version_info()["ApiVersion"] == "1.41"
    assert engine26.version_info()["Version"] == "26.1.5+dfsg1"
    assert engine26.version_info()["ApiVersion"] == "1.45"


def test_published_formats(standin_images: StandinImages) -> None:
    synapse = standin_images.synapse
    zstd = standin_images.tuwunel_zstd
    gzip = standin_images.tuwunel_gzip

    assert synapse.manifest_media_type == images.DOCKER_MANIFEST
    assert synapse.layer_media_types == (images.DOCKER_LAYER_GZIP,)
    assert zstd.manifest_media_type == images.OCI_MANIFEST
    assert zstd.layer_media_types == (images.OCI_LAYER_ZSTD,)
    assert gzip.manifest_media_type == images.OCI_MANIFEST
    assert gzip.layer_media_types == (images.OCI_LAYER_GZIP,)
    assert zstd.tag_digest == zstd.manifest_digest
    assert zstd.config_digest != gzip.config_digest


def test_verify_rejects_other_format(registry: Registry, standin_images: StandinImages) -> None:
    gzip = standin_images.tuwunel_gzip
    with pytest.raises(
        images.ImagePublishError, match=r"starts with 1f 8b .*, expected 28 b5 2f fd"
    ):
        images.verify(registry, gzip.repository, gzip.tag, "oci-zstd")
    with pytest.raises(images.ImagePublishError, match="manifest Content-Type"):
        images.verify(registry, gzip.repository, gzip.tag, "v2s2")


def pull_errors(client: docker.DockerClient, reference: str) -> list[str]:
    """Pull through the low-level API and return the "error" texts of the progress stream."""
    repository, tag = reference.rsplit(":", 1)
    messages = client.api.pull(repository, tag=tag, stream=True, decode=True)
    return [message["error"] for message in messages if "error" in message]


def test_zstd_pull_fails_on_20_10(engine20: DockerEngine, standin_images: StandinImages) -> None:
    zstd = standin_images.tuwunel_zstd
    with docker_client(engine20) as client:
        errors = pull_errors(client, zstd.reference)
        assert len(errors) == 1
        assert errors[0].startswith("failed to register layer")
        assert errors[0].endswith("archive/tar: invalid tar header")
        with pytest.raises(docker.errors.ImageNotFound):
            client.images.get(zstd.config_digest)
        # The high-level pull() reads the stream without raising its error, then fails to
        # find the image, so callers see ImageNotFound instead of the layer error.
        with pytest.raises(docker.errors.ImageNotFound):
            client.images.pull(zstd.reference)


def test_zstd_pull_works_on_26_1(engine26: DockerEngine, standin_images: StandinImages) -> None:
    zstd = standin_images.tuwunel_zstd
    with docker_client(engine26) as client:
        image = client.images.pull(zstd.reference)
        assert image.id == zstd.config_digest
        assert (
            f"{zstd.registry}/{zstd.repository}@{zstd.manifest_digest}"
            in image.attrs["RepoDigests"]
        )
        assert run_and_read(client, zstd.reference, "cat", "/etc/standin-token") == zstd.token


def test_gzip_pull_works_on_20_10(engine20: DockerEngine, standin_images: StandinImages) -> None:
    gzip = standin_images.tuwunel_gzip
    with docker_client(engine20) as client:
        image = client.images.pull(gzip.reference)
        assert image.id == gzip.config_digest
        assert run_and_read(client, gzip.reference, "cat", "/etc/standin-token") == gzip.token


def test_upgrade_keeps_data_root(
    engine20: DockerEngine, standin_images: StandinImages, compose_project: ComposeProject
) -> None:
    gzip = standin_images.tuwunel_gzip
    zstd = standin_images.tuwunel_zstd
    with docker_client(engine20) as client:
        client.images.pull(gzip.reference)
    compose_project.run(engine20, "up", "-d", "--wait", "synapse")
    data_root = engine20.data_root

    seconds = engine20.upgrade_to("26.1")

    assert engine20.version_info()["Version"] == "26.1.5+dfsg1"
    assert engine20.data_root == data_root
    assert seconds < 30
    with docker_client(engine20) as client:
        assert client.images.get(gzip.config_digest).id == gzip.config_digest
        # The synapse service has restart: unless-stopped, so the new engine starts it again.
        synapse = client.containers.get("standin-synapse-1")
        assert synapse.status == "running"
        assert wait_for_text(compose_project.url("/health")) == "OK"
        assert client.images.pull(zstd.reference).id == zstd.config_digest


@pytest.mark.parametrize("engine_fixture", ["engine20", "engine26"])
def test_compose_starts_synapse(
    engine_fixture: str, compose_project: ComposeProject, request: pytest.FixtureRequest
) -> None:
    engine: DockerEngine = request.getfixturevalue(engine_fixture)

    compose_project.run(engine, "up", "-d", "--wait")

    assert requests.get(compose_project.url("/health"), timeout=5).text == "OK"
    version = requests.get(compose_project.url("/_matrix/federation/v1/version"), timeout=5).json()
    assert version["server"]["name"] == "Synapse"
    services = compose_project.run(engine, "ps", "--services").stdout.split()
    assert services == ["synapse"]


def test_compose_switches_to_tuwunel(
    engine26: DockerEngine, compose_project: ComposeProject
) -> None:
    compose_project.run(engine26, "up", "-d", "--wait", "synapse")
    compose_project.run(engine26, "stop", "synapse")

    compose_project.run(engine26, "up", "-d", "--wait", "tuwunel")

    server = requests.get(compose_project.url("/_tuwunel/server_version"), timeout=5).json()
    assert server == {"name": "Tuwunel", "version": images.TUWUNEL_VERSION}
    services = compose_project.run(engine26, "ps", "--services").stdout.split()
    assert services == ["tuwunel"]


def test_missing_program_names_install_script(monkeypatch: pytest.MonkeyPatch) -> None:
    absent = paths.PREFIX / "no-such-program"
    monkeypatch.setattr(paths, "REQUIRED_EXECUTABLES", (*paths.REQUIRED_EXECUTABLES, absent))

    with pytest.raises(paths.TestbedNotInstalledError) as raised:
        paths.require_installed()

    assert str(absent) in str(raised.value)
    assert "testbed/install.sh" in str(raised.value)


def test_engine_start_failure_shows_log() -> None:
    engine = DockerEngine("20.10")
    # dockerd rejects an unknown storage driver at once and logs why.
    engine.command = lambda: [  # type: ignore[method-assign]
        str(paths.DOCKERD20),
        f"--host={engine.base_url}",
        f"--data-root={engine.data_root}",
        f"--exec-root={engine.exec_root}",
        f"--pidfile={engine.pidfile}",
        f"--config-file={engine.config_file}",
        "--storage-driver=no-such-driver",
    ]
    try:
        with pytest.raises(EngineError) as raised:
            engine.start(timeout=30)
    finally:
        engine.remove()

    assert "exited with status 1" in str(raised.value)
    assert "no-such-driver" in str(raised.value)
    assert engine.process is None or engine.process.poll() is not None
