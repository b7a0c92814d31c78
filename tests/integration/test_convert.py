"""Tests of the convert route against a real registry and a real Docker 20.10 engine.

Every image is a stand-in built by ``testbed.images`` (busybox and a random token), pushed
through the registry API in the shape each test needs. A converted image counts as working only
when a container from it prints the token. Broken blobs are made by editing the registry's
storage on disk, because the registry rejects uploads that do not match their digest.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import platform
import subprocess
import tarfile
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docker
import docker.errors
import pytest
import requests
import zstandard

from testbed import images
from testbed.engine import DockerEngine
from testbed.registry import Registry
from tests.testbed_fixtures import StandinImages
from tuwunel_guard.adapters.acquire import AcquiredImage
from tuwunel_guard.adapters.convert import ConvertAcquirer
from tuwunel_guard.adapters.registry import RegistryClient, probe_image
from tuwunel_guard.core.image import ImageFacts, Platform
from tuwunel_guard.core.platforms import DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST
from tuwunel_guard.core.reference import ImageReference
from tuwunel_guard.errors import ConvertError, DigestMismatch, GuardError, RegistryError

pytestmark = pytest.mark.testbed

HOST = Platform("linux", {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), "amd64"))
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_TAR = "application/vnd.oci.image.layer.v1.tar"
OCI_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"


def sha256(data: bytes) -> str:
    """Return the sha256 digest string of ``data``."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def zstd(data: bytes) -> bytes:
    """Compress ``data`` as one zstd frame, as buildx and skopeo write layers."""
    return zstandard.ZstdCompressor(level=3).compress(data)


# --- Building and pushing images ---------------------------------------------------------------


@dataclass(frozen=True)
class Standin:
    """The uncompressed layer and the config of a stand-in image, and its token."""

    token: str
    layer: bytes
    config: dict[str, Any]


def build_standin(folder: Path) -> Standin:
    """Build a stand-in Tuwunel image and take its layer and config apart."""
    built = images.build_standin_archive("tuwunel", folder / f"{uuid.uuid4().hex}.tar")
    with tarfile.open(built.path) as archive:
        entry = json.loads(_member(archive, "manifest.json"))[0]
        config = json.loads(_member(archive, entry["Config"]))
        layer = _member(archive, entry["Layers"][0])
    return Standin(built.token, layer, config)


def _member(archive: tarfile.TarFile, name: str) -> bytes:
    file = archive.extractfile(name)
    assert file is not None, name
    return file.read()


def file_layer(path: str, content: bytes) -> bytes:
    """Build an uncompressed layer tar holding one file."""
    folder = Path("/tmp") / f"tgconvert-{uuid.uuid4().hex}"
    folder.mkdir()
    try:
        source = folder / "content"
        source.write_bytes(content)
        with tarfile.open(folder / "layer.tar", "w", format=tarfile.PAX_FORMAT) as archive:
            archive.add(source, arcname=path)
        return (folder / "layer.tar").read_bytes()
    finally:
        subprocess.run(["/bin/rm", "-rf", str(folder)], check=True)


@dataclass
class Pusher:
    """Push blobs, manifests and indexes to the registry through its HTTP API."""

    registry: Registry
    repository: str

    def blob(self, data: bytes) -> str:
        """Upload ``data`` with a monolithic POST and PUT; return its digest."""
        digest = sha256(data)
        base = f"{self.registry.url}/v2/{self.repository}/blobs/uploads/"
        started = requests.post(base, timeout=30)
        assert started.status_code == 202, started.text
        location = requests.compat.urljoin(base, started.headers["Location"])
        separator = "&" if "?" in location else "?"
        finished = requests.put(
            f"{location}{separator}digest={digest}",
            data=data,
            headers={"Content-Type": "application/octet-stream"},
            timeout=30,
        )
        assert finished.status_code == 201, finished.text
        return digest

    def manifest(self, document: dict[str, Any], reference: str | None = None) -> dict[str, Any]:
        """Upload a manifest or index; return the descriptor an index would list for it."""
        body = json.dumps(document, indent=1).encode()
        digest = sha256(body)
        response = requests.put(
            f"{self.registry.url}/v2/{self.repository}/manifests/{reference or digest}",
            data=body,
            headers={"Content-Type": document["mediaType"]},
            timeout=30,
        )
        assert response.status_code == 201, response.text
        return {"mediaType": document["mediaType"], "digest": digest, "size": len(body)}

    def image(
        self,
        config: dict[str, Any],
        layers: list[tuple[bytes, str]],
        *,
        docker_types: bool = False,
        tag: str | None = None,
    ) -> dict[str, Any]:
        """Push an image manifest of ``(blob bytes, media type)`` layers; return its descriptor."""
        config_bytes = json.dumps(config).encode()
        document = {
            "schemaVersion": 2,
            "mediaType": DOCKER_MANIFEST if docker_types else OCI_MANIFEST,
            "config": {
                "mediaType": DOCKER_CONFIG if docker_types else OCI_CONFIG,
                "digest": self.blob(config_bytes),
                "size": len(config_bytes),
            },
            "layers": [
                {"mediaType": media_type, "digest": self.blob(data), "size": len(data)}
                for data, media_type in layers
            ],
        }
        return self.manifest(document, tag)

    def index(self, entries: list[dict[str, Any]], tag: str | None = None) -> dict[str, Any]:
        """Push an OCI index of ``entries``; return its descriptor."""
        document = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}
        return self.manifest(document, tag)


def with_platform(descriptor: dict[str, Any]) -> dict[str, Any]:
    """Return ``descriptor`` with the host platform added, as an index entry."""
    return {**descriptor, "platform": {"os": HOST.os, "architecture": HOST.architecture}}


def attestation_entry(pusher: Pusher, subject: dict[str, Any]) -> dict[str, Any]:
    """Push a buildx-style provenance manifest and return its ``unknown/unknown`` index entry."""
    statement = json.dumps({"_type": "https://in-toto.io/Statement/v0.1"}).encode()
    descriptor = pusher.image(
        {"architecture": "unknown", "os": "unknown", "rootfs": {"type": "layers", "diff_ids": []}},
        [(statement, "application/vnd.in-toto+json")],
    )
    return {
        **descriptor,
        "platform": {"os": "unknown", "architecture": "unknown"},
        "annotations": {
            "vnd.docker.reference.type": "attestation-manifest",
            "vnd.docker.reference.digest": subject["digest"],
        },
    }


def blob_data_path(registry: Registry, digest: str) -> Path:
    """Return where the registry's filesystem storage keeps the bytes of ``digest``."""
    encoded = digest.removeprefix("sha256:")
    return registry.storage / "docker/registry/v2/blobs/sha256" / encoded[:2] / encoded / "data"


# --- Fixtures and helpers ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine() -> Iterator[DockerEngine]:
    """One Docker 20.10.24 engine for the module; every test uses its own images."""
    started = DockerEngine("20.10")
    try:
        started.start()
        yield started
    finally:
        started.remove()


@pytest.fixture
def client(engine: DockerEngine) -> Iterator[docker.DockerClient]:
    """A docker SDK client of the engine."""
    connection = docker.DockerClient(base_url=engine.base_url)
    try:
        yield connection
    finally:
        connection.close()


@pytest.fixture
def repository() -> str:
    """A repository name of its own for each test."""
    return f"convert/{uuid.uuid4().hex[:12]}"


@dataclass
class Conversion:
    """The outcome of one convert run: the probe's facts, the result and the progress calls."""

    facts: ImageFacts
    acquired: AcquiredImage
    progress: list[tuple[int, int]]


def probe(registry: Registry, repository: str, tag: str) -> tuple[ImageReference, ImageFacts]:
    """Probe ``repository:tag`` in the test registry as the guard's cycle does."""
    reference = ImageReference.parse(f"{registry.host}/{repository}", tag)
    with RegistryClient(insecure_registries=[registry.host]) as registry_client:
        return reference, probe_image(registry_client, reference, HOST, None)


def convert(
    registry: Registry, engine: DockerEngine, state: Path, repository: str, tag: str
) -> Conversion:
    """Probe ``repository:tag`` and convert it into the engine."""
    reference, facts = probe(registry, repository, tag)
    calls: list[tuple[int, int]] = []
    with RegistryClient(insecure_registries=[registry.host]) as registry_client:
        acquirer = ConvertAcquirer(
            registry_client, engine_socket=engine.base_url, state_directory=state, platform=HOST
        )
        acquired = acquirer.acquire(
            reference, facts, lambda done, total: calls.append((done, total))
        )
    return Conversion(facts, acquired, calls)


def failing_convert(
    registry: Registry, engine: DockerEngine, state: Path, repository: str, tag: str
) -> GuardError:
    """Probe and convert ``repository:tag``, expecting a GuardError, and return it."""
    reference, facts = probe(registry, repository, tag)
    with RegistryClient(insecure_registries=[registry.host]) as registry_client:
        acquirer = ConvertAcquirer(
            registry_client, engine_socket=engine.base_url, state_directory=state, platform=HOST
        )
        with pytest.raises(GuardError) as caught:
            acquirer.acquire(reference, facts)
    return caught.value


def run_and_read(client: docker.DockerClient, image: str, *command: str) -> str:
    """Run ``command`` in a container of ``image`` and return its output."""
    output: bytes = client.containers.run(image, list(command), remove=True, network_mode="none")
    return output.decode().strip()


def assert_converted(
    conversion: Conversion, client: docker.DockerClient, state: Path, token: str
) -> None:
    """Check the loaded image's name and ID, that it runs, and that no file is left."""
    facts, acquired = conversion.facts, conversion.acquired
    assert acquired.local_reference == f"tuwunel-guard/tuwunel:{facts.manifest_digest[7:19]}"
    assert acquired.image_id == facts.config_digest
    assert client.images.get(acquired.local_reference).id == facts.config_digest
    assert run_and_read(client, acquired.local_reference, "cat", "/etc/standin-token") == token
    assert list(state.iterdir()) == []
    done, total = conversion.progress[-1]
    assert done == total
    assert [call[0] for call in conversion.progress] == sorted(c[0] for c in conversion.progress)


def assert_nothing_loaded(client: docker.DockerClient, state: Path, facts: ImageFacts) -> None:
    """Check that a failed conversion left no file, no image and no tag."""
    assert list(state.iterdir()) == []
    with pytest.raises(docker.errors.ImageNotFound):
        client.images.get(facts.config_digest)
    with pytest.raises(docker.errors.ImageNotFound):
        client.images.get(f"tuwunel-guard/tuwunel:{facts.manifest_digest[7:19]}")


# --- Images that convert -----------------------------------------------------------------------


def test_convert_oci_zstd_image(
    registry: Registry,
    standin_images: StandinImages,
    engine: DockerEngine,
    client: docker.DockerClient,
    tmp_path: Path,
) -> None:
    """The skopeo-published OCI image with zstd layers runs on 20.10 after conversion."""
    published = standin_images.tuwunel_zstd
    conversion = convert(registry, engine, tmp_path, published.repository, published.tag)

    assert conversion.facts.layer_compressions == ("zstd",)
    assert_converted(conversion, client, tmp_path, published.token)


def test_convert_again_skips_download(
    registry: Registry,
    engine: DockerEngine,
    client: docker.DockerClient,
    repository: str,
    tmp_path: Path,
) -> None:
    """A second conversion of an image the engine holds only tags it, without progress."""
    standin = build_standin(tmp_path)
    Pusher(registry, repository).image(standin.config, [(zstd(standin.layer), OCI_ZSTD)], tag="v1")
    state = tmp_path / "state"
    first = convert(registry, engine, state, repository, "v1")
    # A second tag keeps the image when the route's tag is removed.
    client.images.get(first.acquired.image_id).tag("convert/keep", "v1")
    client.images.remove(first.acquired.local_reference)

    second = convert(registry, engine, state, repository, "v1")

    assert second.acquired == first.acquired
    assert second.progress == []
    assert client.images.get(second.acquired.local_reference).id == first.facts.config_digest


def test_convert_index_with_attestation(
    registry: Registry,
    engine: DockerEngine,
    client: docker.DockerClient,
    repository: str,
    tmp_path: Path,
) -> None:
    """An index that lists an unknown/unknown attestation first converts the host's image."""
    standin = build_standin(tmp_path)
    pusher = Pusher(registry, repository)
    image = pusher.image(standin.config, [(zstd(standin.layer), OCI_ZSTD)])
    pusher.index([attestation_entry(pusher, image), with_platform(image)], tag="attested")
    state = tmp_path / "state"

    conversion = convert(registry, engine, state, repository, "attested")

    assert conversion.facts.manifest_digest == image["digest"]
    assert_converted(conversion, client, state, standin.token)


def test_convert_nested_index(
    registry: Registry,
    engine: DockerEngine,
    client: docker.DockerClient,
    repository: str,
    tmp_path: Path,
) -> None:
    """An index whose host entry is another index converts the image inside it."""
    standin = build_standin(tmp_path)
    pusher = Pusher(registry, repository)
    image = pusher.image(standin.config, [(zstd(standin.layer), OCI_ZSTD)])
    inner = pusher.index([with_platform(image)])
    pusher.index([with_platform(inner)], tag="nested")
    state = tmp_path / "state"

    conversion = convert(registry, engine, state, repository, "nested")

    assert conversion.facts.manifest_digest == image["digest"]
    assert_converted(conversion, client, state, standin.token)


def test_convert_entry_without_platform(
    registry: Registry,
    engine: DockerEngine,
    client: docker.DockerClient,
    repository: str,
    tmp_path: Path,
) -> None:
    """An index whose only entry has no platform field converts that entry."""
    standin = build_standin(tmp_path)
    pusher = Pusher(registry, repository)
    image = pusher.image(standin.config, [(zstd(standin.layer), OCI_ZSTD)])
    pusher.index([image], tag="platformless")
    state = tmp_path / "state"

    conversion = convert(registry, engine, state, repository, "platformless")

    assert conversion.facts.manifest_digest == image["digest"]
    assert_converted(conversion, client, state, standin.token)


def test_convert_docker_schema2_gzip(
    registry: Registry,
    engine: DockerEngine,
    client: docker.DockerClient,
    repository: str,
    tmp_path: Path,
) -> None:
    """A Docker schema 2 manifest with a gzip layer converts."""
    standin = build_standin(tmp_path)
    layer = gzip.compress(standin.layer, mtime=0)
    Pusher(registry, repository).image(
        standin.config, [(layer, DOCKER_GZIP)], docker_types=True, tag="schema2"
    )
    state = tmp_path / "state"

    conversion = convert(registry, engine, state, repository, "schema2")

    assert conversion.facts.manifest_media_type == DOCKER_MANIFEST
    assert_converted(conversion, client, state, standin.token)


def test_convert_uncompressed_layers(
    registry: Registry,
    engine: DockerEngine,
    client: docker.DockerClient,
    repository: str,
    tmp_path: Path,
) -> None:
    """Two uncompressed layers convert, in order, and both are in the container."""
    standin = build_standin(tmp_path)
    second = file_layer("etc/second-layer", b"second\n")
    config = json.loads(json.dumps(standin.config))
    config["rootfs"]["diff_ids"].append(sha256(second))
    Pusher(registry, repository).image(
        config, [(standin.layer, OCI_TAR), (second, OCI_TAR)], tag="plain"
    )
    state = tmp_path / "state"

    conversion = convert(registry, engine, state, repository, "plain")

    assert conversion.facts.layer_compressions == ("none", "none")
    assert_converted(conversion, client, state, standin.token)
    local = conversion.acquired.local_reference
    assert run_and_read(client, local, "cat", "/etc/second-layer") == "second"


def test_convert_zstd_labelled_gzip(
    registry: Registry,
    engine: DockerEngine,
    client: docker.DockerClient,
    repository: str,
    tmp_path: Path,
) -> None:
    """A layer of zstd bytes under the gzip media type is decompressed as zstd."""
    standin = build_standin(tmp_path)
    Pusher(registry, repository).image(
        standin.config, [(zstd(standin.layer), OCI_GZIP)], tag="mislabelled"
    )
    state = tmp_path / "state"

    conversion = convert(registry, engine, state, repository, "mislabelled")

    assert conversion.facts.layer_compressions == ("zstd",)
    assert_converted(conversion, client, state, standin.token)


# --- Images that must not convert --------------------------------------------------------------


def push_zstd_image(registry: Registry, repository: str, tmp_path: Path, tag: str) -> str:
    """Push a one-layer zstd stand-in image under ``tag``; return the layer's digest."""
    standin = build_standin(tmp_path)
    layer = zstd(standin.layer)
    Pusher(registry, repository).image(standin.config, [(layer, OCI_ZSTD)], tag=tag)
    return sha256(layer)


def edit_blob(registry: Registry, digest: str, edit: Callable[[bytes], bytes]) -> None:
    """Replace the stored bytes of blob ``digest`` with ``edit(old bytes)``."""
    path = blob_data_path(registry, digest)
    path.write_bytes(edit(path.read_bytes()))


def test_convert_rejects_altered_layer(
    registry: Registry,
    engine: DockerEngine,
    client: docker.DockerClient,
    repository: str,
    tmp_path: Path,
) -> None:
    """A layer whose bytes changed in storage fails with both digests in the message."""
    digest = push_zstd_image(registry, repository, tmp_path, "altered")
    middle = len(blob_data_path(registry, digest).read_bytes()) // 2
    edit_blob(
        registry,
        digest,
        lambda data: data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1 :],
    )
    state = tmp_path / "state"
    _, facts = probe(registry, repository, "altered")

    error = failing_convert(registry, engine, state, repository, "altered")

    assert isinstance(error, DigestMismatch)
    assert "layer 1 of 1" in str(error)
    assert f"not {digest}" in str(error)
    assert "hashes to sha256:" in str(error)
    assert_nothing_loaded(client, state, facts)


def test_convert_rejects_truncated_blob(
    registry: Registry,
    engine: DockerEngine,
    client: docker.DockerClient,
    repository: str,
    tmp_path: Path,
) -> None:
    """A layer blob cut short in storage fails as truncated."""
    digest = push_zstd_image(registry, repository, tmp_path, "truncated")
    size = len(blob_data_path(registry, digest).read_bytes())
    edit_blob(registry, digest, lambda data: data[: size // 2])
    state = tmp_path / "state"
    _, facts = probe(registry, repository, "truncated")

    error = failing_convert(registry, engine, state, repository, "truncated")

    assert isinstance(error, RegistryError)
    assert f"ended after {size // 2} bytes" in str(error)
    assert f"declares {size}" in str(error)
    assert_nothing_loaded(client, state, facts)


def test_convert_rejects_diff_id_mismatch(
    registry: Registry,
    engine: DockerEngine,
    client: docker.DockerClient,
    repository: str,
    tmp_path: Path,
) -> None:
    """A config whose diff_id is not the layer's uncompressed digest fails, naming both."""
    standin = build_standin(tmp_path)
    config = json.loads(json.dumps(standin.config))
    wrong = sha256(b"another layer")
    config["rootfs"]["diff_ids"] = [wrong]
    Pusher(registry, repository).image(config, [(zstd(standin.layer), OCI_ZSTD)], tag="diff")
    state = tmp_path / "state"
    _, facts = probe(registry, repository, "diff")

    error = failing_convert(registry, engine, state, repository, "diff")

    assert isinstance(error, DigestMismatch)
    assert f"to {sha256(standin.layer)}" in str(error)
    assert f"diff_id {wrong}" in str(error)
    assert_nothing_loaded(client, state, facts)


def test_convert_rejects_small_state_directory(
    registry: Registry,
    engine: DockerEngine,
    client: docker.DockerClient,
    repository: str,
    tmp_path: Path,
) -> None:
    """A state directory with less free space than the estimate fails before downloading."""
    push_zstd_image(registry, repository, tmp_path, "big")
    state = tmp_path / "state"
    state.mkdir()
    subprocess.run(
        ["/bin/mount", "-t", "tmpfs", "-o", "size=64k", "tgconvert", str(state)], check=True
    )
    try:
        _, facts = probe(registry, repository, "big")
        error = failing_convert(registry, engine, state, repository, "big")
    finally:
        subprocess.run(["/bin/umount", str(state)], check=True)

    assert isinstance(error, ConvertError)
    assert "free some space" in str(error)
    assert_nothing_loaded(client, state, facts)
