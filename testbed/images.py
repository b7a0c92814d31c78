"""Stand-in Synapse and Tuwunel images, built without an engine and published with skopeo.

A stand-in image is one layer: Debian 12's static busybox, a small sh entrypoint and a /www
tree that busybox httpd serves, with the same paths and JSON documents as the real homeservers'
health and version endpoints. Every build carries a random token, so no two builds share a blob
and no blob cache can substitute an earlier one.

Run-time settings (environment variables of the image):
  STANDIN_PORT      port of the HTTP listener (default 8008)
  STANDIN_ADDRESS   listen address (default 127.0.0.1, for network_mode: host)
  STANDIN_DATA_DIR  folder where the entrypoint writes standin-started (default /data for
                    Synapse, /var/lib/tuwunel for Tuwunel, the real images' data folders)
With arguments, the entrypoint runs them in place of httpd (`docker run IMAGE cat FILE`).
busybox httpd sends files without an extension as application/octet-stream, so clients must
not rely on the Content-Type header of the JSON documents.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import platform
import secrets
import shutil
import subprocess
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import requests

from testbed import paths
from testbed.registry import Registry

Kind = Literal["synapse", "tuwunel"]
PublishFormat = Literal["oci-zstd", "oci-gzip", "v2s2"]

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
MANIFEST_ACCEPT = ", ".join(
    [
        OCI_MANIFEST,
        DOCKER_MANIFEST,
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
    ]
)

# UID and GID of "nobody" on Debian, which runs skopeo when the tests run as root.
NOBODY = 65534

ZSTD_MAGIC = bytes.fromhex("28b52ffd")
GZIP_MAGIC = bytes.fromhex("1f8b")


@dataclass(frozen=True)
class FormatSpec:
    """Skopeo options for one publish format, and the media types and magic bytes it produces."""

    skopeo_args: tuple[str, ...]
    manifest_media_type: str
    config_media_type: str
    layer_media_type: str
    layer_magic: bytes


FORMATS: dict[str, FormatSpec] = {
    "oci-zstd": FormatSpec(
        ("--format", "oci", "--dest-compress", "--dest-compress-format", "zstd"),
        OCI_MANIFEST,
        OCI_CONFIG,
        OCI_LAYER_ZSTD,
        ZSTD_MAGIC,
    ),
    "oci-gzip": FormatSpec(
        ("--format", "oci", "--dest-compress", "--dest-compress-format", "gzip"),
        OCI_MANIFEST,
        OCI_CONFIG,
        OCI_LAYER_GZIP,
        GZIP_MAGIC,
    ),
    "v2s2": FormatSpec(
        ("--format", "v2s2", "--dest-compress", "--dest-compress-format", "gzip"),
        DOCKER_MANIFEST,
        DOCKER_CONFIG,
        DOCKER_LAYER_GZIP,
        GZIP_MAGIC,
    ),
}

ENTRYPOINT = """\
#!/bin/sh
# Stand-in homeserver: serve the static files under /www with busybox httpd.
set -e
if [ "$#" -gt 0 ]; then
    exec "$@"
fi
if [ -d "$STANDIN_DATA_DIR" ]; then
    echo "$STANDIN_KIND $STANDIN_PORT" > "$STANDIN_DATA_DIR/standin-started"
fi
exec /bin/httpd -f -p "$STANDIN_ADDRESS:$STANDIN_PORT" -h /www
"""

APPLETS = ("sh", "httpd", "cat", "sleep", "wget", "touch")
CLIENT_VERSIONS = {"versions": ["v1.1", "v1.2", "v1.3", "v1.4", "v1.5", "v1.6", "v1.11"]}
TUWUNEL_VERSION = "1.9.0-standin"
SYNAPSE_VERSION = "standin"


class ImagePublishError(RuntimeError):
    """Raised when skopeo fails or the registry does not contain what publish() requested."""


@dataclass(frozen=True)
class StandinArchive:
    """A docker-archive tar (the `docker save` layout) of one stand-in image."""

    path: Path
    kind: Kind
    repo_tag: str
    token: str
    config_digest: str
    diff_id: str


@dataclass(frozen=True)
class PublishedImage:
    """An image as the registry stores it after publish() checked it."""

    registry: str
    repository: str
    tag: str
    format: PublishFormat
    tag_digest: str
    manifest_digest: str
    config_digest: str
    manifest_media_type: str
    layer_media_types: tuple[str, ...]
    layer_digests: tuple[str, ...]
    diff_ids: tuple[str, ...]
    token: str = field(default="")

    @property
    def reference(self) -> str:
        """Tag reference, for example 127.0.0.1:5000/matrix-construct/tuwunel:latest."""
        return f"{self.registry}/{self.repository}:{self.tag}"

    @property
    def pinned_reference(self) -> str:
        """Digest reference REGISTRY/REPOSITORY@sha256:..., immune to later tag moves."""
        return f"{self.registry}/{self.repository}@{self.manifest_digest}"


def www_files(kind: Kind, token: str) -> dict[str, bytes]:
    """Return the files that httpd serves, keyed by URL path without the leading slash."""
    server_name = "Synapse" if kind == "synapse" else "Tuwunel"
    server_version = SYNAPSE_VERSION if kind == "synapse" else TUWUNEL_VERSION
    files = {
        "_matrix/client/versions": _json_bytes(CLIENT_VERSIONS),
        "_matrix/federation/v1/version": _json_bytes(
            {"server": {"name": server_name, "version": server_version}}
        ),
        "_testbed/token": token.encode(),
    }
    if kind == "synapse":
        files["health"] = b"OK"
    else:
        files["_tuwunel/server_version"] = _json_bytes(
            {"name": "Tuwunel", "version": TUWUNEL_VERSION}
        )
    return files


def build_standin_archive(
    kind: Kind, destination: Path, repo_tag: str | None = None, token: str | None = None
) -> StandinArchive:
    """Write a docker-archive of the stand-in `kind` to `destination`.

    `token` (random by default) goes into /etc/standin-token, /www/_testbed/token and the
    label org.tuwunel-guard.testbed.token, which makes the layer and config unique per call.
    """
    if kind not in ("synapse", "tuwunel"):
        raise ValueError(f"unknown stand-in kind {kind!r}; expected 'synapse' or 'tuwunel'")
    paths.require_installed()
    token = token or secrets.token_hex(16)
    repo_tag = repo_tag or f"standin/{kind}:latest"
    data_dir = "/data" if kind == "synapse" else "/var/lib/tuwunel"

    layer = _build_layer(kind, token, data_dir)
    diff_id = "sha256:" + hashlib.sha256(layer).hexdigest()
    config = _image_config(kind, token, data_dir, diff_id)
    config_digest_hex = hashlib.sha256(config).hexdigest()
    layer_path = f"{diff_id.removeprefix('sha256:')}/layer.tar"
    manifest = [
        {"Config": f"{config_digest_hex}.json", "RepoTags": [repo_tag], "Layers": [layer_path]}
    ]

    destination.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(destination, "w", format=tarfile.PAX_FORMAT) as archive:
        _add_bytes(archive, f"{config_digest_hex}.json", config)
        _add_bytes(archive, layer_path, layer)
        _add_bytes(archive, "manifest.json", _json_bytes(manifest))
    return StandinArchive(
        destination, kind, repo_tag, token, f"sha256:{config_digest_hex}", diff_id
    )


def _build_layer(kind: Kind, token: str, data_dir: str) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as layer:
        for folder in ("bin", "etc", "tmp", "www", data_dir.lstrip("/")):
            _add_parents_and_dir(layer, folder)
        layer.add(str(paths.BUSYBOX), arcname="bin/busybox", recursive=False, filter=_root_owned)
        for applet in APPLETS:
            link = tarfile.TarInfo(f"bin/{applet}")
            link.type = tarfile.SYMTYPE
            link.linkname = "busybox"
            link.mtime = int(time.time())
            layer.addfile(link)
        _add_bytes(layer, "standin-entrypoint", ENTRYPOINT.encode(), mode=0o755)
        _add_bytes(layer, "etc/standin-token", f"{token}\n".encode())
        _add_bytes(layer, "etc/passwd", b"root:x:0:0:root:/:/bin/sh\n")
        _add_bytes(layer, "etc/group", b"root:x:0:\n")
        for url_path, content in sorted(www_files(kind, token).items()):
            parent = str(Path("www", url_path).parent)
            _add_parents_and_dir(layer, parent)
            _add_bytes(layer, f"www/{url_path}", content)
    return buffer.getvalue()


def _image_config(kind: Kind, token: str, data_dir: str, diff_id: str) -> bytes:
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    config: dict[str, Any] = {
        "architecture": _oci_architecture(),
        "os": "linux",
        "created": created,
        "config": {
            "Env": [
                "PATH=/bin",
                f"STANDIN_KIND={kind}",
                "STANDIN_PORT=8008",
                "STANDIN_ADDRESS=127.0.0.1",
                f"STANDIN_DATA_DIR={data_dir}",
            ],
            "Entrypoint": ["/bin/sh", "/standin-entrypoint"],
            "Cmd": [],
            "WorkingDir": "/",
            "Labels": {
                "org.tuwunel-guard.testbed.kind": kind,
                "org.tuwunel-guard.testbed.token": token,
            },
            "Volumes": {data_dir: {}},
        },
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "history": [{"created": created, "created_by": f"testbed.images stand-in {kind}"}],
    }
    return _json_bytes(config)


def _oci_architecture() -> str:
    machine = platform.machine()
    return {"x86_64": "amd64", "aarch64": "arm64"}.get(machine, machine)


def _json_bytes(document: object) -> bytes:
    return json.dumps(document, separators=(",", ":"), sort_keys=True).encode()


def _root_owned(info: tarfile.TarInfo) -> tarfile.TarInfo:
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    return info


def _add_bytes(archive: tarfile.TarFile, name: str, content: bytes, mode: int = 0o644) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(content)
    info.mode = mode
    info.mtime = int(time.time())
    archive.addfile(info, io.BytesIO(content))


def _add_parents_and_dir(archive: tarfile.TarFile, folder: str) -> None:
    parts = Path(folder).parts
    for depth in range(1, len(parts) + 1):
        name = "/".join(parts[:depth])
        try:
            archive.getmember(name)
        except KeyError:
            info = tarfile.TarInfo(name)
            info.type = tarfile.DIRTYPE
            info.mode = 0o1777 if name == "tmp" else 0o755
            info.mtime = int(time.time())
            archive.addfile(info)


def publish(
    archive: StandinArchive | Path,
    registry: Registry | str,
    name: str,
    tag: str,
    fmt: PublishFormat = "oci-zstd",
) -> PublishedImage:
    """Copy a docker-archive to REGISTRY/NAME:TAG with skopeo, then check what the registry holds.

    The check reads the manifest, the config blob and every layer blob back: media types must be
    the ones `fmt` requests, each layer must start with the zstd or gzip magic bytes (first
    fetched alone with a Range request, as an engine's decompressor reads them) and decompress
    to the diff_id in the config. Raises ImagePublishError otherwise.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {sorted(FORMATS)}")
    spec = FORMATS[fmt]
    host = registry.host if isinstance(registry, Registry) else registry
    archive_path = archive.path if isinstance(archive, StandinArchive) else archive
    token = archive.token if isinstance(archive, StandinArchive) else ""

    _run_skopeo(archive_path, f"docker://{host}/{name}:{tag}", spec)
    published = verify(host, name, tag, fmt)
    if isinstance(archive, StandinArchive) and published.diff_ids != (archive.diff_id,):
        raise ImagePublishError(
            f"{host}/{name}:{tag} has diff_ids {published.diff_ids}, "
            f"expected ({archive.diff_id},) from {archive_path}"
        )
    return PublishedImage(**{**published.__dict__, "token": token})


def _run_skopeo(archive_path: Path, destination: str, spec: FormatSpec) -> None:
    # Run as root, skopeo keeps a blob cache in /var/lib/containers/cache and may reuse an
    # earlier gzip blob of the same layer when zstd is requested. An unprivileged user with a
    # fresh HOME and XDG_DATA_HOME starts with an empty cache on every call.
    drop_privileges = os.geteuid() == 0
    with tempfile.TemporaryDirectory(prefix="tgskopeo") as home_name:
        home = Path(home_name)
        source = home / "image.tar"
        shutil.copyfile(archive_path, source)
        policy = home / "policy.json"
        policy.write_text('{"default": [{"type": "insecureAcceptAnything"}]}\n')
        folders = [home / name for name in ("data", "config", "runtime", "tmp")]
        for folder in folders:
            folder.mkdir(mode=0o700)
        if drop_privileges:
            for path in (home, source, policy, *folders):
                os.chown(path, NOBODY, NOBODY)
        environment = {
            "PATH": "/usr/bin:/bin",
            "HOME": str(home),
            "XDG_DATA_HOME": str(home / "data"),
            "XDG_CONFIG_HOME": str(home / "config"),
            "XDG_RUNTIME_DIR": str(home / "runtime"),
            "TMPDIR": str(home / "tmp"),
        }
        command = [
            str(paths.SKOPEO),
            "--policy",
            str(policy),
            "copy",
            "--quiet",
            "--dest-tls-verify=false",
            *spec.skopeo_args,
            f"docker-archive:{source}",
            destination,
        ]
        privilege: dict[str, Any] = (
            {"user": NOBODY, "group": NOBODY, "extra_groups": []} if drop_privileges else {}
        )
        result = subprocess.run(
            command, capture_output=True, text=True, env=environment, check=False, **privilege
        )
    if result.returncode != 0:
        raise ImagePublishError(
            f"skopeo copy to {destination} failed with status {result.returncode}: "
            f"{result.stderr.strip() or result.stdout.strip()}"
        )


def verify(registry: Registry | str, name: str, tag: str, fmt: PublishFormat) -> PublishedImage:
    """Read NAME:TAG back from the registry and check it is a `fmt` image, as publish() does.

    Raises ImagePublishError listing every mismatch.
    """
    spec = FORMATS[fmt]
    host = registry.host if isinstance(registry, Registry) else registry
    base = f"http://{host}/v2/{name}"
    reference = f"{host}/{name}:{tag}"
    response = requests.get(
        f"{base}/manifests/{tag}", headers={"Accept": MANIFEST_ACCEPT}, timeout=10
    )
    if response.status_code != 200:
        raise ImagePublishError(
            f"GET manifest {reference} failed with status {response.status_code}"
        )
    body = response.content
    manifest = json.loads(body)
    content_type = response.headers.get("Content-Type", "")
    tag_digest = response.headers.get("Docker-Content-Digest", "")
    manifest_digest = "sha256:" + hashlib.sha256(body).hexdigest()

    problems = []
    if content_type != spec.manifest_media_type:
        problems.append(
            f"manifest Content-Type {content_type!r}, expected {spec.manifest_media_type!r}"
        )
    if manifest.get("mediaType") != spec.manifest_media_type:
        problems.append(f"manifest mediaType {manifest.get('mediaType')!r}")
    if tag_digest != manifest_digest:
        problems.append(
            f"Docker-Content-Digest {tag_digest} differs from the body's {manifest_digest}"
        )
    config_descriptor = manifest["config"]
    if config_descriptor["mediaType"] != spec.config_media_type:
        problems.append(
            f"config mediaType {config_descriptor['mediaType']!r}, "
            f"expected {spec.config_media_type!r}"
        )
    config_bytes = _get_blob(base, config_descriptor["digest"])
    config = json.loads(config_bytes)
    diff_ids = tuple(config["rootfs"]["diff_ids"])

    layers = manifest["layers"]
    if len(layers) != len(diff_ids):
        problems.append(f"{len(layers)} layers but {len(diff_ids)} diff_ids")
    for layer, diff_id in zip(layers, diff_ids, strict=False):
        problems.extend(_check_layer(base, layer, diff_id, spec))
    if problems:
        raise ImagePublishError(
            f"{reference} is not the requested {fmt} image: " + "; ".join(problems)
        )
    return PublishedImage(
        registry=host,
        repository=name,
        tag=tag,
        format=fmt,
        tag_digest=tag_digest,
        manifest_digest=manifest_digest,
        config_digest=config_descriptor["digest"],
        manifest_media_type=content_type,
        layer_media_types=tuple(layer["mediaType"] for layer in layers),
        layer_digests=tuple(layer["digest"] for layer in layers),
        diff_ids=diff_ids,
    )


def _check_layer(base: str, layer: dict[str, Any], diff_id: str, spec: FormatSpec) -> list[str]:
    digest = layer["digest"]
    problems = []
    if layer["mediaType"] != spec.layer_media_type:
        problems.append(
            f"layer {digest} mediaType {layer['mediaType']!r}, expected {spec.layer_media_type!r}"
        )
    head = requests.get(f"{base}/blobs/{digest}", headers={"Range": "bytes=0-3"}, timeout=10)
    if head.status_code != 206 or len(head.content) != 4:
        problems.append(
            f"Range GET on layer {digest} returned status {head.status_code} "
            f"with {len(head.content)} bytes"
        )
    elif not head.content.startswith(spec.layer_magic):
        problems.append(
            f"layer {digest} starts with {head.content.hex(' ')}, "
            f"expected {spec.layer_magic.hex(' ')}"
        )
    blob = _get_blob(base, digest)
    try:
        uncompressed = _decompress(blob)
    except (OSError, ValueError, subprocess.CalledProcessError) as error:
        return [*problems, f"layer {digest} does not decompress: {error}"]
    uncompressed_digest = "sha256:" + hashlib.sha256(uncompressed).hexdigest()
    if uncompressed_digest != diff_id:
        problems.append(
            f"layer {digest} decompresses to {uncompressed_digest}, config says {diff_id}"
        )
    return problems


def _get_blob(base: str, digest: str) -> bytes:
    response = requests.get(f"{base}/blobs/{digest}", timeout=30)
    if response.status_code != 200:
        raise ImagePublishError(f"GET blob {digest} failed with status {response.status_code}")
    actual = "sha256:" + hashlib.sha256(response.content).hexdigest()
    if actual != digest:
        raise ImagePublishError(f"blob {digest} has content digest {actual}")
    return response.content


def _decompress(blob: bytes) -> bytes:
    if blob.startswith(GZIP_MAGIC):
        return gzip.decompress(blob)
    if blob.startswith(ZSTD_MAGIC):
        # Python 3.11 has no zstd module. The zstd command is from the Debian package of
        # that name, which testbed/install.sh installs.
        result = subprocess.run(
            [str(paths.ZSTD), "-dc"], input=blob, capture_output=True, check=True
        )
        return result.stdout
    return blob
