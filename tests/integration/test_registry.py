"""Tests of the registry client and probe against a real Distribution registry.

The registry is Debian's ``docker-registry`` package (Distribution 2.8), started on a free
loopback port with its storage in a temporary directory. Test images are pushed through the
registry API. Authentication comes from the stand-in token service in ``token_server.py``.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import http.server
import io
import json
import shutil
import socket
import subprocess
import tarfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
from token_server import AuthProxy

from tuwunel_guard.adapters.credentials import (
    CredentialStore,
    RegistryCredential,
    load_docker_config,
)
from tuwunel_guard.adapters.registry import (
    RegistryClient,
    parse_www_authenticate,
    probe_image,
)
from tuwunel_guard.core.image import Platform, Requirement
from tuwunel_guard.core.platforms import (
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    OCI_INDEX,
    OCI_MANIFEST,
)
from tuwunel_guard.core.reference import ImageReference
from tuwunel_guard.errors import (
    ConfigError,
    DigestMismatch,
    InvalidReference,
    RegistryError,
    RegistryUnavailable,
)

REGISTRY_BINARY = "/usr/bin/docker-registry"
# An OAuth2 refresh token as `docker login` stores it in "identitytoken".
REFRESH_VALUE = "refresh-value-1"
AMD64 = Platform("linux", "amd64")
AMD64_V2 = Platform("linux", "amd64", "v2")
AMD64_V3 = Platform("linux", "amd64", "v3")

OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"

# Not a valid zstd stream: the registry stores bytes as they are, and only the magic matters.
ZSTD_BYTES = b"\x28\xb5\x2f\xfd" + b"zstd layer stand-in" * 10


def sha256(data: bytes) -> str:
    """Return the sha256 digest string of ``data``."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def short(digest: str) -> str:
    """Shorten a digest as evidence strings do."""
    return digest[:19] + "…"


def gzip_layer(name: str) -> bytes:
    """Build a gzip-compressed tar with one small file."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        content = name.encode()
        info = tarfile.TarInfo(name)
        info.size = len(content)
        archive.addfile(info, io.BytesIO(content))
    return gzip.compress(buffer.getvalue(), mtime=0)


def free_port() -> int:
    """Return a loopback port that was free a moment ago."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# --- Registry and content ------------------------------------------------------------------


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Start a Distribution registry and yield its ``127.0.0.1:PORT``; stop it by PID."""
    if shutil.which(REGISTRY_BINARY) is None:
        pytest.fail(f"{REGISTRY_BINARY} is missing: run testbed/install.sh", pytrace=False)
    root = tmp_path_factory.mktemp("registry")
    port = free_port()
    config = root / "config.yml"
    config.write_text(
        "version: 0.1\n"
        "log:\n  level: error\n  accesslog:\n    disabled: true\n"
        f"storage:\n  filesystem:\n    rootdirectory: {root / 'data'}\n"
        "  delete:\n    enabled: true\n"
        f"http:\n  addr: 127.0.0.1:{port}\n",
        encoding="utf-8",
    )
    log_file = (root / "registry.log").open("wb")
    process = subprocess.Popen(
        [REGISTRY_BINARY, "serve", str(config)], stdout=log_file, stderr=subprocess.STDOUT
    )
    try:
        _wait_for_registry(f"127.0.0.1:{port}", process)
        yield f"127.0.0.1:{port}"
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
        log_file.close()


def _wait_for_registry(host: str, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"docker-registry exited with status {process.returncode}")
        try:
            if requests.get(f"http://{host}/v2/", timeout=1).status_code == 200:
                return
        except requests.ConnectionError:
            time.sleep(0.1)
    pytest.fail(f"docker-registry did not answer on {host} within 15 s")


@dataclass
class Pusher:
    """Push blobs and manifests straight to the registry, past the proxy."""

    host: str

    def blob(self, repository: str, data: bytes) -> str:
        """Upload ``data`` and return its digest."""
        digest = sha256(data)
        base = f"http://{self.host}/v2/{repository}/blobs/uploads/"
        started = requests.post(base, timeout=10)
        assert started.status_code == 202, started.text
        location = requests.compat.urljoin(base, started.headers["Location"])
        separator = "&" if "?" in location else "?"
        finished = requests.put(
            f"{location}{separator}digest={digest}",
            data=data,
            headers={"Content-Type": "application/octet-stream"},
            timeout=10,
        )
        assert finished.status_code == 201, finished.text
        return digest

    def manifest(self, repository: str, reference: str, document: dict[str, Any]) -> str:
        """Upload a manifest or index under ``reference`` and return its digest."""
        body = json.dumps(document, indent=1).encode()
        response = requests.put(
            f"http://{self.host}/v2/{repository}/manifests/{reference}",
            data=body,
            headers={"Content-Type": document["mediaType"]},
            timeout=10,
        )
        assert response.status_code == 201, response.text
        assert response.headers["Docker-Content-Digest"] == sha256(body)
        return sha256(body)

    def image(
        self,
        repository: str,
        layers: list[tuple[bytes, str]],
        *,
        architecture: str = "amd64",
        docker_types: bool = False,
        tag: str | None = None,
    ) -> tuple[str, dict[str, Any]]:
        """Push an image manifest with ``(bytes, media type)`` layers; return digest and
        the descriptor an index would list for it."""
        config = json.dumps(
            {
                "architecture": architecture,
                "os": "linux",
                "rootfs": {"type": "layers", "diff_ids": []},
            }
        ).encode()
        config_type, manifest_type = (
            (DOCKER_CONFIG, DOCKER_MANIFEST) if docker_types else (OCI_CONFIG, OCI_MANIFEST)
        )
        document = {
            "schemaVersion": 2,
            "mediaType": manifest_type,
            "config": {
                "mediaType": config_type,
                "digest": self.blob(repository, config),
                "size": len(config),
            },
            "layers": [
                {"mediaType": media_type, "digest": self.blob(repository, data), "size": len(data)}
                for data, media_type in layers
            ],
        }
        body = json.dumps(document, indent=1).encode()
        digest = self.manifest(repository, tag or sha256(body), document)
        return digest, {"mediaType": manifest_type, "digest": digest, "size": len(body)}

    def index(
        self,
        repository: str,
        tag: str,
        entries: list[dict[str, Any]],
        media_type: str = OCI_INDEX,
    ) -> tuple[str, dict[str, Any]]:
        """Push an index with ``entries`` under ``tag``; return digest and descriptor."""
        document = {"schemaVersion": 2, "mediaType": media_type, "manifests": entries}
        body = json.dumps(document, indent=1).encode()
        digest = self.manifest(repository, tag, document)
        return digest, {"mediaType": media_type, "digest": digest, "size": len(body)}


def with_platform(descriptor: dict[str, Any], platform: str | None, **extra: Any) -> dict[str, Any]:
    """Copy an index descriptor and add ``platform`` (``os/arch[/variant]``) and ``extra``."""
    result = dict(descriptor) | extra
    if platform is not None:
        parts = platform.split("/")
        result["platform"] = {"os": parts[0], "architecture": parts[1]} | (
            {"variant": parts[2]} if len(parts) == 3 else {}
        )
    return result


@dataclass
class Content:
    """Digests of everything pushed by the ``content`` fixture."""

    digests: dict[str, str]


@pytest.fixture(scope="module")
def content(registry: str) -> Content:
    """Push every test image once; keys of ``digests`` name what each digest is."""
    push = Pusher(registry)
    d: dict[str, str] = {}
    gzip_a, gzip_b = gzip_layer("a"), gzip_layer("b")

    d["gzip"], _ = push.image("test/gzip", [(gzip_a, OCI_GZIP)], tag="latest")
    d["zstd"], _ = push.image(
        "test/zstd", [(gzip_a, OCI_GZIP), (ZSTD_BYTES, OCI_ZSTD)], tag="latest"
    )
    d["disguised"], _ = push.image("test/disguised", [(ZSTD_BYTES, OCI_GZIP)], tag="latest")

    amd64, amd64_desc = push.image("test/attest", [(gzip_a, OCI_GZIP)])
    _, attest_desc = push.image(
        "test/attest", [(b"{}", "application/vnd.in-toto+json")], architecture="unknown"
    )
    d["attest.amd64"] = amd64
    d["attest"], _ = push.index(
        "test/attest",
        "latest",
        [
            with_platform(amd64_desc, "linux/amd64"),
            with_platform(
                attest_desc,
                "unknown/unknown",
                annotations={
                    "vnd.docker.reference.type": "attestation-manifest",
                    "vnd.docker.reference.digest": amd64,
                },
            ),
        ],
    )

    _, arm64_desc = push.image("test/platformless", [(gzip_b, OCI_GZIP)], architecture="arm64")
    bare, bare_desc = push.image("test/platformless", [(gzip_a, OCI_GZIP)])
    normal, normal_desc = push.image("test/platformless", [(gzip_b, OCI_GZIP)])
    d["platformless.bare"], d["platformless.normal"] = bare, normal
    d["platformless"], _ = push.index(
        "test/platformless",
        "only",
        [with_platform(arm64_desc, "linux/arm64"), with_platform(bare_desc, None)],
    )
    d["platformless.mixed"], _ = push.index(
        "test/platformless",
        "mixed",
        [with_platform(bare_desc, None), with_platform(normal_desc, "linux/amd64")],
    )
    d["arm64-only"], _ = push.index(
        "test/platformless", "arm64-only", [with_platform(arm64_desc, "linux/arm64")]
    )

    child, child_desc = push.image("test/nested", [(ZSTD_BYTES, OCI_ZSTD)])
    sibling, sibling_desc = push.image("test/nested", [(gzip_a, OCI_GZIP)])
    inner, inner_desc = push.index(
        "test/nested", "inner", [with_platform(child_desc, "linux/amd64")]
    )
    d["nested.child"], d["nested.sibling"], d["nested.inner"] = child, sibling, inner
    d["nested"], _ = push.index(
        "test/nested",
        "latest",
        [with_platform(inner_desc, "linux/amd64"), with_platform(sibling_desc, "linux/amd64")],
    )

    v1, v1_desc = push.image("test/variants", [(gzip_a, OCI_GZIP)])
    v3, v3_desc = push.image("test/variants", [(gzip_b, OCI_GZIP)])
    d["variants.v1"], d["variants.v3"] = v1, v3
    d["variants"], _ = push.index(
        "test/variants",
        "latest",
        [with_platform(v1_desc, "linux/amd64/v1"), with_platform(v3_desc, "linux/amd64/v3")],
    )

    s_amd64, s_amd64_desc = push.image("test/schema2", [(gzip_a, DOCKER_GZIP)], docker_types=True)
    _, s_arm64_desc = push.image(
        "test/schema2", [(gzip_b, DOCKER_GZIP)], architecture="arm64", docker_types=True
    )
    d["schema2.amd64"] = s_amd64
    d["schema2"], _ = push.index(
        "test/schema2",
        "latest",
        [with_platform(s_arm64_desc, "linux/arm64"), with_platform(s_amd64_desc, "linux/amd64")],
        media_type=DOCKER_MANIFEST_LIST,
    )

    big = b"\x28\xb5\x2f\xfd" + bytes(3 * 1024 * 1024)
    d["big"], _ = push.image("test/big", [(big, OCI_ZSTD)], tag="latest")
    d["big.layer"] = sha256(big)

    for number in range(300):
        push.manifest("test/many", f"t{number:03d}", _empty_manifest(push, "test/many"))
    return Content(d)


_EMPTY_MANIFESTS: dict[str, dict[str, Any]] = {}


def _empty_manifest(push: Pusher, repository: str) -> dict[str, Any]:
    if repository not in _EMPTY_MANIFESTS:
        config = b'{"architecture":"amd64","os":"linux"}'
        _EMPTY_MANIFESTS[repository] = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {
                "mediaType": OCI_CONFIG,
                "digest": push.blob(repository, config),
                "size": len(config),
            },
            "layers": [],
        }
    return _EMPTY_MANIFESTS[repository]


# --- Proxy and client ----------------------------------------------------------------------


@pytest.fixture
def proxy(registry: str) -> Iterator[AuthProxy]:
    """A stand-in token service in front of the registry, anonymous pulls allowed."""
    server = AuthProxy(registry).start()
    try:
        yield server
    finally:
        server.stop()


class FakeClock:
    """A monotonic clock that tests move by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_client(
    proxy: AuthProxy,
    credentials: CredentialStore | None = None,
    clock: FakeClock | None = None,
    timeout: float = 10.0,
) -> RegistryClient:
    """Build a client that may use plain HTTP to the proxy."""
    return RegistryClient(
        insecure_registries=[proxy.host],
        credentials=credentials,
        timeout=timeout,
        user_agent="tuwunel-guard-tests",
        clock=clock or FakeClock(),
    )


def ref(proxy: AuthProxy, repository: str, tag: str = "latest") -> ImageReference:
    """Reference to ``repository`` behind the proxy."""
    return ImageReference.parse(f"{proxy.host}/{repository}", tag)


def requirements(facts: Any) -> dict[Requirement, str]:
    """Map each requirement of ``facts`` to its evidence."""
    return {item.requirement: item.evidence for item in facts.requirements}


# --- Probe: requirements and digests -------------------------------------------------------


def test_probe_gzip_image(proxy: AuthProxy, content: Content) -> None:
    """A gzip single-manifest image needs nothing; digests point at the manifest."""
    with make_client(proxy) as client:
        facts = probe_image(client, ref(proxy, "test/gzip"), AMD64, None)

    assert facts.reference == f"{proxy.host}/test/gzip:latest"
    assert facts.tag_digest == content.digests["gzip"]
    assert facts.manifest_digest == content.digests["gzip"]
    assert facts.tag_media_type == OCI_MANIFEST
    assert facts.manifest_media_type == OCI_MANIFEST
    assert facts.config_digest.startswith("sha256:")
    assert facts.layer_compressions == ("gzip",)
    assert facts.requirements == ()
    assert facts.platform == AMD64


def test_probe_zstd_image(proxy: AuthProxy, content: Content) -> None:
    """A zstd layer gives ZSTD_LAYERS with the layer's position and digest."""
    with make_client(proxy) as client:
        facts = probe_image(client, ref(proxy, "test/zstd"), AMD64, None)

    assert facts.tag_digest == content.digests["zstd"]
    assert facts.layer_compressions == ("gzip", "zstd")
    assert requirements(facts) == {
        Requirement.ZSTD_LAYERS: f"layer 2 of 2 ({short(sha256(ZSTD_BYTES))}) starts with "
        "28 b5 2f fd (zstd)"
    }


def test_probe_zstd_behind_gzip_type(proxy: AuthProxy, content: Content) -> None:
    """zstd bytes under a gzip media type are found by their magic."""
    with make_client(proxy) as client:
        facts = probe_image(client, ref(proxy, "test/disguised"), AMD64, None)

    assert facts.layer_compressions == ("zstd",)
    assert requirements(facts) == {
        Requirement.ZSTD_LAYERS: f"layer 1 of 1 ({short(sha256(ZSTD_BYTES))}) starts with "
        "28 b5 2f fd (zstd) although its media type says gzip"
    }


def test_probe_skips_attestation(proxy: AuthProxy, content: Content) -> None:
    """An unknown/unknown attestation entry is skipped and needs nothing."""
    with make_client(proxy) as client:
        facts = probe_image(client, ref(proxy, "test/attest"), AMD64, None)

    assert facts.tag_digest == content.digests["attest"]
    assert facts.tag_media_type == OCI_INDEX
    assert facts.manifest_digest == content.digests["attest.amd64"]
    assert facts.requirements == ()


def test_probe_platformless_only(proxy: AuthProxy, content: Content) -> None:
    """A platformless entry that alone serves amd64 is a requirement."""
    with make_client(proxy) as client:
        facts = probe_image(client, ref(proxy, "test/platformless", "only"), AMD64, None)

    bare = content.digests["platformless.bare"]
    assert facts.manifest_digest == bare
    assert facts.platform == AMD64
    assert requirements(facts) == {
        Requirement.PLATFORMLESS_INDEX_ENTRY: f"entry 2 of 2 ({short(bare)}, no platform) is "
        "the only index entry that can serve linux/amd64"
    }


def test_probe_platformless_beside_amd64(proxy: AuthProxy, content: Content) -> None:
    """A platformless entry beside linux/amd64 is ignored."""
    with make_client(proxy) as client:
        facts = probe_image(client, ref(proxy, "test/platformless", "mixed"), AMD64, None)

    assert facts.manifest_digest == content.digests["platformless.normal"]
    assert facts.requirements == ()


def test_probe_nested_index_first(proxy: AuthProxy, content: Content) -> None:
    """A nested index listed first is followed by digest and reported."""
    with make_client(proxy) as client:
        facts = probe_image(client, ref(proxy, "test/nested"), AMD64, None)

    inner = content.digests["nested.inner"]
    assert facts.tag_digest == content.digests["nested"]
    assert facts.manifest_digest == content.digests["nested.child"]
    assert requirements(facts) == {
        Requirement.ZSTD_LAYERS: f"layer 1 of 1 ({short(sha256(ZSTD_BYTES))}) starts with "
        "28 b5 2f fd (zstd)",
        Requirement.NESTED_INDEX_FIRST: f"entry 1 of 2 ({short(inner)}, linux/amd64) is a "
        f"nested index ({OCI_INDEX}), and it is the entry chosen for linux/amd64",
    }


@pytest.mark.parametrize(
    ("host", "chosen", "needs_variant"),
    [
        (AMD64, "variants.v1", False),
        (AMD64_V2, "variants.v1", False),
        (AMD64_V3, "variants.v3", True),
    ],
)
def test_probe_amd64_variants(
    proxy: AuthProxy, content: Content, host: Platform, chosen: str, needs_variant: bool
) -> None:
    """The highest variant at or below the host's level is chosen."""
    with make_client(proxy) as client:
        facts = probe_image(client, ref(proxy, "test/variants"), host, None)

    assert facts.manifest_digest == content.digests[chosen]
    assert facts.needs(Requirement.X86_64_VARIANT) is needs_variant
    if needs_variant:
        assert facts.platform == AMD64_V3
        assert requirements(facts)[Requirement.X86_64_VARIANT] == (
            f"entry 2 of 2 ({short(content.digests['variants.v3'])}, linux/amd64/v3), chosen "
            "for this host, names variant 'v3', not v1"
        )


def test_probe_schema2_manifest_list(proxy: AuthProxy, content: Content) -> None:
    """Docker manifest lists and schema2 manifests are read like OCI ones."""
    with make_client(proxy) as client:
        facts = probe_image(client, ref(proxy, "test/schema2"), AMD64, None)

    assert facts.tag_digest == content.digests["schema2"]
    assert facts.tag_media_type == DOCKER_MANIFEST_LIST
    assert facts.manifest_digest == content.digests["schema2.amd64"]
    assert facts.manifest_media_type == DOCKER_MANIFEST
    assert facts.requirements == ()


def test_probe_no_matching_platform(proxy: AuthProxy, content: Content) -> None:
    """An index without the host platform names the platforms it has."""
    with make_client(proxy) as client, pytest.raises(RegistryError) as caught:
        probe_image(client, ref(proxy, "test/platformless", "arm64-only"), AMD64, None)

    assert str(caught.value) == (
        "no index entry serves platform linux/amd64: the index lists linux/arm64"
    )


def test_probe_unknown_tag(proxy: AuthProxy, content: Content) -> None:
    """A missing tag gives RegistryError naming the URL."""
    with make_client(proxy) as client, pytest.raises(RegistryError) as caught:
        probe_image(client, ref(proxy, "test/gzip", "nope"), AMD64, None)

    message = str(caught.value)
    assert f"http://{proxy.host}/v2/test/gzip/manifests/nope" in message
    assert "not found" in message


# --- Probe: request counts -----------------------------------------------------------------


def test_probe_unchanged_sends_only_head(proxy: AuthProxy, registry: str, content: Content) -> None:
    """An unchanged tag costs one HEAD; a moved tag is fetched again."""
    reference = ref(proxy, "test/nested", "moving")
    push = Pusher(registry)
    push.index(
        "test/nested",
        "moving",
        [
            with_platform(
                {
                    "mediaType": OCI_MANIFEST,
                    "digest": content.digests["nested.sibling"],
                    "size": _size(registry, "test/nested", content.digests["nested.sibling"]),
                },
                "linux/amd64",
            )
        ],
    )

    with make_client(proxy) as client:
        first = probe_image(client, reference, AMD64, None)
        proxy.counters.reset()
        second = probe_image(client, reference, AMD64, first)
        requests_after_unchanged = list(proxy.counters.registry_requests)
        push.manifest("test/nested", "moving", _document(registry, "test/nested", "latest"))
        proxy.counters.reset()
        third = probe_image(client, reference, AMD64, first)

    assert second is first
    assert requests_after_unchanged == [("HEAD", "/v2/test/nested/manifests/moving")]
    assert third.tag_digest == content.digests["nested"]
    assert third.manifest_digest == content.digests["nested.child"]
    methods = [method for method, _ in proxy.counters.registry_requests]
    assert methods == ["HEAD", "GET", "GET", "GET", "GET"]
    assert proxy.counters.registry_requests[1] == (
        "GET",
        f"/v2/test/nested/manifests/{content.digests['nested']}",
    )


def _size(registry: str, repository: str, digest: str) -> int:
    response = requests.head(
        f"http://{registry}/v2/{repository}/manifests/{digest}",
        headers={"Accept": OCI_MANIFEST},
        timeout=10,
    )
    return int(response.headers["Content-Length"])


def _document(registry: str, repository: str, tag: str) -> dict[str, Any]:
    response = requests.get(
        f"http://{registry}/v2/{repository}/manifests/{tag}",
        headers={"Accept": f"{OCI_INDEX}, {OCI_MANIFEST}"},
        timeout=10,
    )
    document: dict[str, Any] = response.json()
    return document


def test_probe_counts_one_token(proxy: AuthProxy, content: Content) -> None:
    """A whole probe uses one anonymous token for the repository."""
    with make_client(proxy) as client:
        probe_image(client, ref(proxy, "test/nested"), AMD64, None)

    assert proxy.counters.token_requests == 1
    unauthorized = [r for r in proxy.counters.registry_requests if r[0] == "HEAD"]
    assert len(unauthorized) == 2, "one HEAD without a token, then the same with it"


# --- Token flow ----------------------------------------------------------------------------


def test_token_expiry_honoured(proxy: AuthProxy, content: Content) -> None:
    """A cached token is reused until expires_in runs out."""
    proxy.settings.expires_in = 120
    clock = FakeClock()
    reference = ref(proxy, "test/gzip")
    with make_client(proxy, clock=clock) as client:
        client.head_manifest(reference)
        clock.now += 100
        client.head_manifest(reference)
        tokens_within_lifetime = proxy.counters.token_requests
        clock.now += 30
        client.head_manifest(reference)

    assert tokens_within_lifetime == 1
    assert proxy.counters.token_requests == 2


def test_token_default_lifetime(proxy: AuthProxy, content: Content) -> None:
    """Without expires_in a token lives 60 s."""
    proxy.settings.expires_in = None
    proxy.settings.token_fields = ("access_token",)
    clock = FakeClock()
    reference = ref(proxy, "test/gzip")
    with make_client(proxy, clock=clock) as client:
        client.head_manifest(reference)
        clock.now += 50
        client.head_manifest(reference)
        tokens_within_lifetime = proxy.counters.token_requests
        clock.now += 20
        client.head_manifest(reference)

    assert tokens_within_lifetime == 1
    assert proxy.counters.token_requests == 2


def test_token_per_scope(proxy: AuthProxy, content: Content) -> None:
    """Each repository gets its own token."""
    with make_client(proxy) as client:
        client.head_manifest(ref(proxy, "test/gzip"))
        client.head_manifest(ref(proxy, "test/zstd"))
        client.head_manifest(ref(proxy, "test/gzip"))

    assert proxy.counters.token_requests == 2


def test_revoked_token_refetched_once(proxy: AuthProxy, content: Content) -> None:
    """A cached token that the registry rejects is replaced once."""
    reference = ref(proxy, "test/gzip")
    with make_client(proxy) as client:
        client.head_manifest(reference)
        proxy.revoke_tokens()
        head = client.head_manifest(reference)

    assert head.digest == content.digests["gzip"]
    assert proxy.counters.token_requests == 2


def test_credentialed_token(proxy: AuthProxy, content: Content) -> None:
    """A private repository is read with Basic credentials sent to the token service."""
    proxy.settings.username, proxy.settings.password = "alice", "s3cret:with:colons"
    proxy.settings.allow_anonymous = False
    store = CredentialStore({proxy.host: RegistryCredential("alice", "s3cret:with:colons")})
    with make_client(proxy, credentials=store) as client:
        facts = probe_image(client, ref(proxy, "test/zstd"), AMD64, None)

    assert facts.tag_digest == content.digests["zstd"]
    assert proxy.counters.token_requests == 1


def test_identity_token(proxy: AuthProxy, content: Content) -> None:
    """An identity token is exchanged with the refresh-token grant."""
    proxy.settings.identity_token = REFRESH_VALUE
    proxy.settings.allow_anonymous = False
    proxy.settings.token_fields = ("access_token",)
    store = CredentialStore(
        {proxy.host: RegistryCredential("<token>", identity_token=REFRESH_VALUE)}
    )
    with make_client(proxy, credentials=store) as client:
        head = client.head_manifest(ref(proxy, "test/gzip"))

    assert head.digest == content.digests["gzip"]


def test_anonymous_refused(proxy: AuthProxy, content: Content) -> None:
    """A token service that refuses anonymous tokens gives one clear error."""
    proxy.settings.allow_anonymous = False
    with make_client(proxy) as client, pytest.raises(RegistryError) as caught:
        client.head_manifest(ref(proxy, "test/gzip"))

    assert "rejected an anonymous token request for repository:test/gzip:pull" in str(caught.value)
    assert f"add credentials for {proxy.host}" in str(caught.value)
    assert proxy.counters.token_requests == 1


def test_wrong_password_no_loop(proxy: AuthProxy, content: Content) -> None:
    """Rejected credentials fail once, without retries and without the password."""
    proxy.settings.username, proxy.settings.password = "alice", "right"
    proxy.settings.allow_anonymous = False
    store = CredentialStore(
        {proxy.host: RegistryCredential("alice", "wrong-pass")},
        path="/etc/tuwunel-guard/docker/config.json",
    )
    with make_client(proxy, credentials=store) as client:
        with pytest.raises(RegistryError) as caught:
            probe_image(client, ref(proxy, "test/gzip"), AMD64, None)
        counted = (proxy.counters.token_requests, len(proxy.counters.registry_requests))

    message = str(caught.value)
    assert "rejected the credentials of user 'alice'" in message
    assert "/etc/tuwunel-guard/docker/config.json" in message
    assert "wrong-pass" not in message
    assert counted == (1, 1)


def test_token_rejected_by_registry(proxy: AuthProxy, content: Content) -> None:
    """A 401 with a fresh token is reported as rejected credentials, not retried."""
    proxy.settings.reject_all_tokens = True
    proxy.settings.username, proxy.settings.password = "alice", "pw"
    store = CredentialStore({proxy.host: RegistryCredential("alice", "pw")})
    with make_client(proxy, credentials=store) as client, pytest.raises(RegistryError) as caught:
        client.head_manifest(ref(proxy, "test/gzip"))

    assert "rejected the credentials of user 'alice'" in str(caught.value)
    assert "HTTP 401 right after authenticating" in str(caught.value)
    assert proxy.counters.token_requests == 1
    assert len(proxy.counters.registry_requests) == 2


def test_basic_challenge(proxy: AuthProxy, content: Content) -> None:
    """A Basic challenge is answered with the stored credentials."""
    proxy.settings.mode = "basic"
    proxy.settings.username, proxy.settings.password = "bob", "pw"
    store = CredentialStore({proxy.host: RegistryCredential("bob", "pw")})
    with make_client(proxy, credentials=store) as client:
        head = client.head_manifest(ref(proxy, "test/gzip"))
        client.head_manifest(ref(proxy, "test/gzip"))

    assert head.digest == content.digests["gzip"]
    assert len(proxy.counters.registry_requests) == 3, "one challenge, then Basic up front"
    assert proxy.counters.token_requests == 0


def test_basic_challenge_without_credentials(proxy: AuthProxy, content: Content) -> None:
    """A Basic challenge without stored credentials fails with the fix."""
    proxy.settings.mode = "basic"
    with make_client(proxy) as client, pytest.raises(RegistryError) as caught:
        client.head_manifest(ref(proxy, "test/gzip"))

    assert f"add an entry for {proxy.host} to the credentials file" in str(caught.value)


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (
            'Bearer realm="https://ghcr.io/token",service="ghcr.io",scope="repository:a/b:pull"',
            [
                (
                    "bearer",
                    {
                        "realm": "https://ghcr.io/token",
                        "service": "ghcr.io",
                        "scope": "repository:a/b:pull",
                    },
                )
            ],
        ),
        (
            'Bearer realm="https://x/token",service="a, b",scope="repository:a:pull,push"',
            [
                (
                    "bearer",
                    {
                        "realm": "https://x/token",
                        "service": "a, b",
                        "scope": "repository:a:pull,push",
                    },
                )
            ],
        ),
        (
            'Bearer realm="a\\"b", error="invalid_token"',
            [("bearer", {"realm": 'a"b', "error": "invalid_token"})],
        ),
        (
            'Basic realm="x", Bearer realm="y",service=z',
            [("basic", {"realm": "x"}), ("bearer", {"realm": "y", "service": "z"})],
        ),
        (
            "Negotiate abc==, Basic realm=r",
            [("negotiate", {"token68": "abc=="}), ("basic", {"realm": "r"})],
        ),
        ('bearer REALM="y"', [("bearer", {"realm": "y"})]),
        ("", []),
    ],
)
def test_parse_www_authenticate(header: str, expected: list[tuple[str, dict[str, str]]]) -> None:
    """Challenges parse with quoted commas, escapes and several schemes."""
    parsed = [(challenge.scheme, challenge.params) for challenge in parse_www_authenticate(header)]

    assert parsed == expected


# --- Manifests, blobs and tags -------------------------------------------------------------


def test_head_reports_ratelimit(proxy: AuthProxy, content: Content) -> None:
    """HEAD returns digest, media type and ratelimit-remaining."""
    proxy.settings.extra_headers = {"ratelimit-remaining": "76;w=21600"}
    with make_client(proxy) as client:
        head = client.head_manifest(ref(proxy, "test/attest"))

    assert head.digest == content.digests["attest"]
    assert head.media_type == OCI_INDEX
    assert head.ratelimit_remaining == 76


def test_get_manifest_by_tag_and_digest(proxy: AuthProxy, content: Content) -> None:
    """GET by tag or digest returns the same verified document."""
    reference = ref(proxy, "test/zstd")
    with make_client(proxy) as client:
        by_tag = client.get_manifest(reference, "latest")
        by_digest = client.get_manifest(reference, content.digests["zstd"])

    assert by_tag == by_digest
    assert by_tag.digest == content.digests["zstd"]
    assert by_tag.document["mediaType"] == OCI_MANIFEST


def test_digest_mismatch_by_digest(proxy: AuthProxy, content: Content) -> None:
    """A body altered on the way fails the requested digest."""
    proxy.settings.body_filter = _alter_manifests
    with make_client(proxy) as client, pytest.raises(DigestMismatch) as caught:
        client.get_manifest(ref(proxy, "test/gzip"), content.digests["gzip"])

    assert f"not {content.digests['gzip']}" in str(caught.value)


def test_digest_mismatch_by_tag(proxy: AuthProxy, content: Content) -> None:
    """A body altered on the way fails the Docker-Content-Digest header."""
    proxy.settings.body_filter = _alter_manifests
    with make_client(proxy) as client, pytest.raises(DigestMismatch):
        client.get_manifest(ref(proxy, "test/gzip"), "latest")


def test_digest_mismatch_in_probe(proxy: AuthProxy, content: Content) -> None:
    """The probe stops at an altered manifest."""
    proxy.settings.body_filter = _alter_manifests
    with make_client(proxy) as client, pytest.raises(DigestMismatch):
        probe_image(client, ref(proxy, "test/nested"), AMD64, None)


def _alter_manifests(method: str, path: str, body: bytes) -> bytes:
    return body + b" " if "/manifests/" in path else body


def test_blob_first_bytes_range(proxy: AuthProxy, content: Content) -> None:
    """A ranged blob read returns the first bytes only."""
    with make_client(proxy) as client:
        head = client.blob_first_bytes(ref(proxy, "test/big"), content.digests["big.layer"])
        longer = client.blob_first_bytes(ref(proxy, "test/big"), content.digests["big.layer"], 8)

    assert head == b"\x28\xb5\x2f\xfd"
    assert longer == b"\x28\xb5\x2f\xfd" + bytes(4)
    assert ("GET", f"/v2/test/big/blobs/{content.digests['big.layer']}") in (
        proxy.counters.registry_requests
    )


def test_blob_first_bytes_without_range(proxy: AuthProxy, content: Content) -> None:
    """A registry that ignores Range (200) is read for 4 bytes only."""
    proxy.settings.ignore_range = True
    with make_client(proxy) as client:
        head = client.blob_first_bytes(ref(proxy, "test/big"), content.digests["big.layer"])

    assert head == b"\x28\xb5\x2f\xfd"


def test_blob_missing(proxy: AuthProxy, content: Content) -> None:
    """A missing blob gives RegistryError naming the URL."""
    missing = "sha256:" + "0" * 64
    with make_client(proxy) as client, pytest.raises(RegistryError) as caught:
        client.blob_first_bytes(ref(proxy, "test/gzip"), missing)

    assert f"/v2/test/gzip/blobs/{missing}" in str(caught.value)
    assert "BLOB_UNKNOWN" in str(caught.value)


def test_list_tags_paginates(proxy: AuthProxy, content: Content) -> None:
    """Every Link page is followed, in order, with the server's page size."""
    proxy.settings.tag_page_size = 40
    with make_client(proxy) as client:
        tags = client.list_tags(ref(proxy, "test/many"), page_size=100)

    assert tags == [f"t{number:03d}" for number in range(300)]
    pages = [path for _, path in proxy.counters.registry_requests]
    assert pages[:2] == ["/v2/test/many/tags/list?n=100"] * 2, "401 first, then with a token"
    assert pages[2] == "/v2/test/many/tags/list?n=40&last=t039"
    assert pages[-1] == "/v2/test/many/tags/list?n=40&last=t279"
    assert len(pages) == 1 + 8


def test_list_tags_unpaged(proxy: AuthProxy, content: Content) -> None:
    """A registry that sends every tag at once needs one page."""
    with make_client(proxy) as client:
        tags = client.list_tags(ref(proxy, "test/many"))

    assert sorted(tags) == [f"t{number:03d}" for number in range(300)]
    assert len(proxy.counters.registry_requests) == 2


def test_list_tags_link_loop(proxy: AuthProxy, content: Content) -> None:
    """A next link that repeats a page is an error, not an endless loop."""
    proxy.settings.tag_page_size = 40
    proxy.settings.tag_next_link = "/v2/test/many/tags/list?n=40&last=t039"
    with make_client(proxy) as client, pytest.raises(RegistryError, match="links back"):
        client.list_tags(ref(proxy, "test/many"))


def test_list_tags_link_other_host(proxy: AuthProxy, content: Content) -> None:
    """A next link to another host is not followed."""
    proxy.settings.tag_page_size = 40
    proxy.settings.tag_next_link = "https://elsewhere.invalid/v2/test/many/tags/list?n=40"
    with make_client(proxy) as client, pytest.raises(RegistryError) as caught:
        client.list_tags(ref(proxy, "test/many"))

    assert "links to another host: https://elsewhere.invalid/" in str(caught.value)


# --- Input checks and transport ------------------------------------------------------------


def test_invalid_tag_no_request(proxy: AuthProxy, content: Content) -> None:
    """An invalid tag is rejected before any request is sent."""
    with pytest.raises(InvalidReference, match="invalid tag 'latest;rm'"):
        ImageReference.parse(f"{proxy.host}/test/gzip", "latest;rm")
    with make_client(proxy) as client, pytest.raises(InvalidReference):
        client.get_manifest(ref(proxy, "test/gzip"), "../../v2/_catalog")
    with make_client(proxy) as client, pytest.raises(InvalidReference):
        client.blob_first_bytes(ref(proxy, "test/gzip"), "sha512:" + "a" * 128)

    assert proxy.counters.registry_requests == []
    assert proxy.counters.token_requests == 0


def test_https_by_default(proxy: AuthProxy, content: Content) -> None:
    """A host missing from insecure_registries is spoken to over TLS only."""
    with RegistryClient(timeout=5) as client, pytest.raises(RegistryUnavailable) as caught:
        client.head_manifest(ref(proxy, "test/gzip"))

    assert f"https://{proxy.host}/v2/test/gzip/manifests/latest" in str(caught.value)
    assert "insecure_registries" in str(caught.value)


def test_connection_refused() -> None:
    """A closed port gives RegistryUnavailable."""
    host = f"127.0.0.1:{free_port()}"
    with (
        RegistryClient(insecure_registries=[host], timeout=5) as client,
        pytest.raises(RegistryUnavailable, match=r"cannot connect to http://127\.0\.0\.1"),
    ):
        client.head_manifest(ImageReference.parse(f"{host}/a/b", "latest"))


def test_timeout() -> None:
    """A registry that never answers gives RegistryUnavailable after the timeout."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        host = f"127.0.0.1:{silent.getsockname()[1]}"
        with (
            RegistryClient(insecure_registries=[host], timeout=0.5) as client,
            pytest.raises(RegistryUnavailable, match=r"timed out after 0\.5 s"),
        ):
            client.head_manifest(ImageReference.parse(f"{host}/a/b", "latest"))


def test_invalid_json_manifest() -> None:
    """A manifest body that is not JSON gives RegistryError."""
    body = b"not json"
    server = _StaticServer(
        body, {"Content-Type": OCI_MANIFEST, "Docker-Content-Digest": sha256(body)}
    )
    with (
        server,
        RegistryClient(insecure_registries=[server.host]) as client,
        pytest.raises(RegistryError, match="invalid JSON"),
    ):
        client.get_manifest(ImageReference.parse(f"{server.host}/a/b", "latest"), "latest")


def test_wrong_media_type() -> None:
    """A schema 1 manifest is rejected with its media type named."""
    body = b'{"schemaVersion": 1}'
    server = _StaticServer(
        body, {"Content-Type": "application/vnd.docker.distribution.manifest.v1+prettyjws"}
    )
    with (
        server,
        RegistryClient(insecure_registries=[server.host]) as client,
        pytest.raises(RegistryError, match="Docker schema 1"),
    ):
        client.get_manifest(ImageReference.parse(f"{server.host}/a/b", "latest"), "latest")


class _StaticServer:
    """A loopback HTTP server that answers every GET with one fixed body."""

    def __init__(self, body: bytes, headers: dict[str, str]) -> None:
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.received.append(dict(self.headers.items()))
                self.send_response(200)
                for name, value in outer.headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(outer.body)))
                self.end_headers()
                self.wfile.write(outer.body)

            def log_message(self, format: str, *args: object) -> None:
                """Keep test output quiet."""

        self.body, self.headers = body, headers
        self.received: list[dict[str, str]] = []
        self._server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.host = f"127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> _StaticServer:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._server.shutdown()
        self._server.server_close()


def test_blob_redirect_followed(proxy: AuthProxy, content: Content) -> None:
    """A blob redirect to an allowed host is followed without the Authorization header."""
    cdn = _StaticServer(ZSTD_BYTES, {"Content-Type": "application/octet-stream"})
    proxy.settings.redirect_blobs_to = f"http://{cdn.host}"
    with cdn, RegistryClient(insecure_registries=[proxy.host, cdn.host]) as client:
        head = client.blob_first_bytes(ref(proxy, "test/zstd"), sha256(ZSTD_BYTES))

    assert head == ZSTD_BYTES[:4]
    assert len(cdn.received) == 1
    assert "Authorization" not in cdn.received[0]
    assert cdn.received[0]["Range"] == "bytes=0-3"


def test_blob_redirect_to_plain_http_refused(proxy: AuthProxy, content: Content) -> None:
    """A redirect to plain HTTP on a host not listed as insecure is not followed."""
    cdn = _StaticServer(ZSTD_BYTES, {"Content-Type": "application/octet-stream"})
    proxy.settings.redirect_blobs_to = f"http://{cdn.host}"
    with (
        cdn,
        make_client(proxy) as client,
        pytest.raises(RegistryError, match="only HTTPS is allowed") as caught,
    ):
        client.blob_first_bytes(ref(proxy, "test/zstd"), sha256(ZSTD_BYTES))

    assert f"http://{cdn.host}/v2/test/zstd/blobs/" in str(caught.value)
    assert cdn.received == []


# --- Credentials file ----------------------------------------------------------------------


def _write_config(tmp_path: Path, data: object) -> Path:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def _auth(user: str, password: str) -> str:
    return base64.b64encode(f"{user}:{password}".encode()).decode()


def test_credentials_forms(tmp_path: Path) -> None:
    """auth, username/password and identitytoken entries are read."""
    path = _write_config(
        tmp_path,
        {
            "auths": {
                "https://index.docker.io/v1/": {"auth": _auth("hubuser", "hub:pw")},
                "ghcr.io": {"username": "gh", "password": "ghp_x"},
                "https://registry.example:5000/v2/": {
                    "auth": _auth("idu", ""),
                    "identitytoken": REFRESH_VALUE,
                },
                "empty.example": {},
            }
        },
    )

    store = load_docker_config(path)

    assert store.for_host("registry-1.docker.io") == RegistryCredential("hubuser", "hub:pw")
    assert store.for_host("docker.io") == RegistryCredential("hubuser", "hub:pw")
    assert store.for_host("GHCR.IO") == RegistryCredential("gh", "ghp_x")
    assert store.for_host("registry.example:5000") == RegistryCredential(
        "idu", identity_token=REFRESH_VALUE
    )
    assert store.for_host("empty.example") is None
    assert store.hosts == ("docker.io", "ghcr.io", "registry.example:5000")


def test_credentials_repr_redacts(tmp_path: Path) -> None:
    """repr and str of a credential never show the secret."""
    credential = RegistryCredential("alice", "topsecret")
    token = RegistryCredential("bob", identity_token=REFRESH_VALUE)

    assert repr(credential) == "RegistryCredential(username='alice', password=<redacted>)"
    assert "topsecret" not in str(credential)
    assert REFRESH_VALUE not in repr(token)
    assert "topsecret" not in repr(CredentialStore({"x": credential}))


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        ({"credsStore": "desktop", "auths": {"ghcr.io": {}}}, "credsStore (credential helper"),
        ({"credHelpers": {"ghcr.io": "gh"}}, "remove 'credHelpers' from the file"),
        ({"auths": {"ghcr.io": {"auth": "!!!"}}}, "auths.ghcr.io.auth is not valid base64"),
        (
            {"auths": {"ghcr.io": {"auth": base64.b64encode(b"nocolon").decode()}}},
            "does not decode to 'user:password'",
        ),
        ({"auths": {"ghcr.io": {"password": 5}}}, "auths.ghcr.io.password is not a string"),
        ({"auths": {"ghcr.io": "x"}}, "auths.ghcr.io is not an object"),
        ({"auths": []}, "'auths' is not an object"),
        ([], "does not contain a JSON object"),
    ],
)
def test_credentials_invalid(tmp_path: Path, data: object, fragment: str) -> None:
    """Unsupported or malformed files raise ConfigError naming the file."""
    path = _write_config(tmp_path, data)

    with pytest.raises(ConfigError) as caught:
        load_docker_config(path)

    problem = caught.value.problems[0]
    assert problem.startswith(f"{path}: ")
    assert fragment in problem
    assert caught.value.path == str(path)


def test_credentials_unreadable(tmp_path: Path) -> None:
    """A missing or non-JSON file raises ConfigError."""
    missing = tmp_path / "missing.json"
    broken = tmp_path / "broken.json"
    broken.write_text("{", encoding="utf-8")

    with pytest.raises(ConfigError) as missing_error:
        load_docker_config(missing)
    with pytest.raises(ConfigError) as broken_error:
        load_docker_config(broken)

    assert "cannot read the credentials file" in missing_error.value.problems[0]
    assert "not valid JSON" in broken_error.value.problems[0]


def test_credentials_secret_not_in_error(tmp_path: Path) -> None:
    """Errors about an entry do not quote its secret."""
    encoded = base64.b64encode(b"hunter2").decode()
    path = _write_config(tmp_path, {"auths": {"ghcr.io": {"auth": encoded}}})

    with pytest.raises(ConfigError) as caught:
        load_docker_config(path)

    assert encoded not in caught.value.problems[0]
    assert "hunter2" not in caught.value.problems[0]
