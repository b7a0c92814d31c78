"""Pieces of a docker-archive (the ``docker save`` layout) and the descriptors it is built from.

Everything here is pure. The convert route downloads an image from the registry and streams it
to the engine as this archive::

    <config hex>.json            the image config, byte for byte as the registry stored it
    <diff_id hex>/layer.tar      each layer, uncompressed, once per distinct diff_id
    manifest.json                [{"Config": ..., "RepoTags": [...], "Layers": [...]}]

Docker 20.10 loads this layout, which is what ``docker save`` writes without the legacy
``VERSION`` and ``json`` files per layer. The image ID it reports is the config digest.
"""

from __future__ import annotations

import json
import tarfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tuwunel_guard.core.platforms import short_digest
from tuwunel_guard.core.reference import ImageReference, validate_digest
from tuwunel_guard.errors import InvalidReference, RegistryError

# Media types of layers that the convert route cannot turn into a plain tar.
_UNREADABLE_LAYER_SUFFIXES = ("+encrypted",)
# The config and manifest declare no uncompressed sizes, so free space is checked against the
# compressed sizes times this factor, an estimate: zstd and gzip layers of typical images
# (binaries, libraries, text) expand 2 to 4 times. An image that expands more fails with "no
# space left" while a layer is written, and its files are removed.
EXPANSION_FACTOR = 4
# Room for tar headers and the small files, beyond the layers.
ARCHIVE_OVERHEAD = 1024 * 1024
TAR_TRAILER = bytes(2 * tarfile.BLOCKSIZE)
"""Two zero blocks, which end a tar archive."""


@dataclass(frozen=True)
class Descriptor:
    """A content descriptor of an image manifest: the config or one layer.

    ``position`` counts layers from 1 and is 0 for the config.
    """

    digest: str
    size: int
    media_type: str
    position: int = 0
    count: int = 0

    def describe(self) -> str:
        """Name the descriptor for log events and error messages."""
        if self.position == 0:
            return f"config {short_digest(self.digest)}"
        return f"layer {self.position} of {self.count} ({short_digest(self.digest)})"


def _content_error(subject: str, detail: str) -> RegistryError:
    return RegistryError(f"invalid {subject} from the registry: {detail}")


def _parse_descriptor(raw: object, subject: str, position: int, count: int) -> Descriptor:
    if not isinstance(raw, Mapping):
        raise _content_error(subject, "it is not an object")
    digest, size, media_type = raw.get("digest"), raw.get("size"), raw.get("mediaType", "")
    if not isinstance(digest, str):
        raise _content_error(subject, f"digest is {digest!r}, not a string")
    try:
        validate_digest(digest)
    except InvalidReference as error:
        raise _content_error(subject, str(error)) from None
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise _content_error(subject, f"size is {size!r}, not a non-negative integer")
    if not isinstance(media_type, str):
        raise _content_error(subject, f"mediaType is {media_type!r}, not a string")
    return Descriptor(digest, size, media_type, position, count)


def manifest_descriptors(manifest: Mapping[str, Any]) -> tuple[Descriptor, tuple[Descriptor, ...]]:
    """Return the config descriptor and the layer descriptors of an image manifest.

    Raises:
        RegistryError: when a descriptor is malformed, the manifest has no layers, or a layer's
            media type marks it as encrypted.
    """
    config = _parse_descriptor(manifest.get("config"), "image manifest config", 0, 0)
    raw_layers = manifest.get("layers")
    if not isinstance(raw_layers, list) or not raw_layers:
        raise _content_error("image manifest", "it has no 'layers' list, or the list is empty")
    count = len(raw_layers)
    layers = tuple(
        _parse_descriptor(raw, f"layer {position} of {count}", position, count)
        for position, raw in enumerate(raw_layers, 1)
    )
    for layer in layers:
        if layer.media_type.endswith(_UNREADABLE_LAYER_SUFFIXES):
            raise RegistryError(
                f"{layer.describe()} has media type {layer.media_type}, which the convert "
                "route cannot decrypt: use an unencrypted image"
            )
    return config, layers


def parse_diff_ids(config: Mapping[str, Any], layer_count: int) -> tuple[str, ...]:
    """Return the ``rootfs.diff_ids`` of an image config, one per layer.

    Raises:
        RegistryError: when the list is missing, contains an invalid digest, or its length differs
            from ``layer_count``.
    """
    rootfs = config.get("rootfs")
    diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, Mapping) else None
    if not isinstance(diff_ids, list):
        raise _content_error("image config", "it has no 'rootfs.diff_ids' list")
    for index, diff_id in enumerate(diff_ids, 1):
        if not isinstance(diff_id, str):
            raise _content_error("image config", f"diff_id {index} is {diff_id!r}")
        try:
            validate_digest(diff_id)
        except InvalidReference as error:
            raise _content_error("image config", f"diff_id {index}: {error}") from None
    if len(diff_ids) != layer_count:
        raise _content_error(
            "image config",
            f"it lists {len(diff_ids)} diff_ids for a manifest of {layer_count} layers",
        )
    return tuple(diff_ids)


def scratch_estimate(layers: Sequence[Descriptor]) -> int:
    """Estimate the disk space, in bytes, that the uncompressed layers of distinct blobs take."""
    distinct = {layer.digest: layer.size for layer in layers}
    return sum(distinct.values()) * EXPANSION_FACTOR + ARCHIVE_OVERHEAD


def local_reference(repository: str, manifest_digest: str) -> str:
    """Name the converted image ``REPOSITORY:<first 12 hex digits of the manifest digest>``.

    Raises:
        InvalidReference: when ``repository`` is not a valid image name, or has a registry host
            (the converted image exists only on the engine, and compose must not pull it).
    """
    tag = validate_digest(manifest_digest).removeprefix("sha256:")[:12]
    parsed = ImageReference.parse(repository, tag)
    if parsed.domain != "docker.io" or repository.startswith("docker.io/"):
        raise InvalidReference(
            f"invalid local repository {repository!r} for converted images: use a name without "
            "a registry host, such as tuwunel-guard/tuwunel"
        )
    return f"{repository}:{tag}"


def layer_path(diff_id: str) -> str:
    """Return the archive path of the layer with ``diff_id``: ``<hex>/layer.tar``."""
    return f"{diff_id.removeprefix('sha256:')}/layer.tar"


def config_path(config_digest: str) -> str:
    """Return the archive path of the config: ``<hex>.json``."""
    return f"{config_digest.removeprefix('sha256:')}.json"


def archive_manifest(config_digest: str, diff_ids: Sequence[str]) -> bytes:
    """Build ``manifest.json`` for one untagged image.

    ``RepoTags`` stays empty so that the engine tags nothing while loading; the caller tags the
    image after it has checked the loaded image ID.
    """
    document = [
        {
            "Config": config_path(config_digest),
            "RepoTags": [],
            "Layers": [layer_path(diff_id) for diff_id in diff_ids],
        }
    ]
    return json.dumps(document, separators=(",", ":")).encode()


def tar_header(name: str, size: int) -> bytes:
    """Build the header blocks of a regular file member, root-owned, mode 0644, mtime 0.

    The PAX format stores sizes of 8 GiB and more, which the plain ustar header cannot.
    """
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = 0o644
    info.mtime = 0
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "strict")


def tar_padding(size: int) -> bytes:
    """Return the zero bytes that fill a member of ``size`` bytes up to a whole block."""
    return bytes(-size % tarfile.BLOCKSIZE)


def archive_size(members: Sequence[tuple[str, int]]) -> int:
    """Return the exact size of an archive of ``(name, size)`` members, trailer included."""
    total = len(TAR_TRAILER)
    for name, size in members:
        total += len(tar_header(name, size)) + size + len(tar_padding(size))
    return total
