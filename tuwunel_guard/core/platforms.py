"""Choose the manifest for the host platform and find what the image needs from the engine.

Everything here is pure: it reads documents the registry adapter already fetched and decoded.

The choice follows what Docker 26.1.5 does with the classic image store (measured, and the same
rule as containerd's platform matcher):

* entries whose ``platform`` is ``unknown/unknown``, or that carry the buildx annotation
  ``vnd.docker.reference.type: attestation-manifest``, never match;
* an entry matches when its OS and architecture equal the host's and its variant is compatible.
  For ``amd64`` and ``arm`` that is any level at or below the host's, so ``v3`` serves a ``v3`` or
  ``v4`` host. For ``arm64`` an empty variant equals ``v8``. For other architectures the variant
  must be empty or equal;
* among matching entries the highest variant level wins, and the first listed wins a tie;
* an entry without ``platform`` matches too, but only when no entry with a platform does;
* a chosen entry that is itself an index is resolved the same way inside it.

Docker 20.10.24 differs, and each difference is one :class:`Requirement`: it cannot read zstd
layers, ignores entries without platform, rejects a nested index with "unsupported manifest
format", and matches ``linux/amd64`` entries only without a variant or with ``v1``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from tuwunel_guard.core.image import ImageRequirement, Platform, Requirement
from tuwunel_guard.core.reference import validate_digest
from tuwunel_guard.errors import InvalidReference, RegistryError

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
INDEX_MEDIA_TYPES = frozenset({OCI_INDEX, DOCKER_MANIFEST_LIST})
MANIFEST_MEDIA_TYPES = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})

# An index nested deeper than this is treated as invalid content rather than followed.
MAX_INDEX_DEPTH = 4

ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
GZIP_MAGIC = b"\x1f\x8b"
Compression = Literal["zstd", "gzip", "none"]

_ARCHITECTURE_ALIASES = {"x86_64": "amd64", "x86-64": "amd64", "aarch64": "arm64", "armhf": "arm"}
# Variant levels in ascending order. An empty variant means the level that engines assume for it.
_VARIANT_LEVELS = {
    "amd64": ("v1", "v2", "v3", "v4"),
    "arm": ("v5", "v6", "v7", "v8"),
    "arm64": ("v8", "v9"),
}
_DEFAULT_VARIANT = {"amd64": "v1", "arm": "v7", "arm64": "v8"}
_ATTESTATION_ANNOTATION = "vnd.docker.reference.type"


def compression_of(first_bytes: bytes) -> Compression:
    """Name the compression that a layer's first bytes show, as engines detect it.

    A zstd skippable frame (magic ``0x184D2A50`` to ``0x184D2A5F``, little-endian) also counts as
    zstd, because what follows it is a zstd stream.
    """
    if first_bytes.startswith(ZSTD_MAGIC):
        return "zstd"
    if len(first_bytes) >= 4 and first_bytes[1:4] == b"\x2a\x4d\x18" and first_bytes[0] >> 4 == 5:
        return "zstd"
    if first_bytes.startswith(GZIP_MAGIC):
        return "gzip"
    return "none"


def short_digest(digest: str) -> str:
    """Shorten ``sha256:<64 hex>`` to its first 12 hex digits followed by an ellipsis."""
    algorithm, _, encoded = digest.partition(":")
    return f"{algorithm}:{encoded[:12]}…"


@dataclass(frozen=True)
class IndexEntry:
    """One descriptor of an index's ``manifests`` list; ``position`` counts from 1."""

    position: int
    count: int
    digest: str
    media_type: str
    platform: Platform | None
    attestation: bool = False

    @property
    def is_index(self) -> bool:
        """Whether this entry points at another index (a nested index)."""
        return self.media_type in INDEX_MEDIA_TYPES

    def describe(self) -> str:
        """Describe the entry for evidence and error messages."""
        where = f"entry {self.position} of {self.count} ({short_digest(self.digest)}"
        return where + (f", {self.platform})" if self.platform else ", no platform)")


@dataclass(frozen=True)
class Layer:
    """One layer descriptor of an image manifest; ``position`` counts from 1."""

    position: int
    count: int
    digest: str
    media_type: str


@dataclass(frozen=True)
class Resolution:
    """The path from the tag document to the host's manifest.

    ``steps`` lists the entry chosen at each index level, outermost first, and is empty when the
    tag points at a manifest. ``pending`` is a chosen nested index whose document is not known
    yet: fetch it by digest and resolve again.
    """

    steps: tuple[IndexEntry, ...]
    pending: IndexEntry | None = None

    @property
    def manifest_entry(self) -> IndexEntry | None:
        """The entry of the chosen manifest, or ``None`` when the tag points at a manifest."""
        return self.steps[-1] if self.steps and self.pending is None else None


def normalize_platform(platform: Platform) -> Platform:
    """Spell the architecture the OCI way (``x86_64`` becomes ``amd64``) and fill in the
    default variant of ``amd64``, ``arm`` and ``arm64``."""
    architecture = _ARCHITECTURE_ALIASES.get(platform.architecture, platform.architecture)
    variant = platform.variant or _DEFAULT_VARIANT.get(architecture, "")
    return Platform(platform.os, architecture, variant)


def is_index_document(document: Mapping[str, Any], media_type: str) -> bool:
    """Tell whether a manifest document is an index, by its media type or its ``manifests`` key."""
    return media_type in INDEX_MEDIA_TYPES or (
        media_type not in MANIFEST_MEDIA_TYPES and "manifests" in document
    )


def _content_error(subject: str, detail: str) -> RegistryError:
    return RegistryError(f"invalid {subject} from the registry: {detail}")


def _checked_digest(value: object, subject: str) -> str:
    if not isinstance(value, str):
        raise _content_error(subject, f"digest is {value!r}, not a string")
    try:
        return validate_digest(value)
    except InvalidReference as error:
        raise _content_error(subject, str(error)) from None


def _parse_platform(value: object, subject: str) -> Platform | None:
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise _content_error(subject, f"platform is {value!r}, not an object")
    os_name, architecture = value.get("os", ""), value.get("architecture", "")
    variant = value.get("variant", "")
    if not all(isinstance(part, str) for part in (os_name, architecture, variant)):
        raise _content_error(subject, f"platform {dict(value)!r} has a field that is not a string")
    if not os_name and not architecture:
        return None
    return Platform(os_name, architecture, variant)


def _parse_entry(raw: object, position: int, count: int) -> IndexEntry:
    subject = f"index entry {position} of {count}"
    if not isinstance(raw, Mapping):
        raise _content_error(subject, "it is not an object")
    media_type = raw.get("mediaType", "")
    if not isinstance(media_type, str):
        raise _content_error(subject, f"mediaType is {media_type!r}, not a string")
    platform = _parse_platform(raw.get("platform"), subject)
    annotations = raw.get("annotations")
    attestation = isinstance(annotations, Mapping) and (
        annotations.get(_ATTESTATION_ANNOTATION) == "attestation-manifest"
    )
    if platform is not None and platform.os == "unknown" and platform.architecture == "unknown":
        attestation = True
    digest = _checked_digest(raw.get("digest"), subject)
    return IndexEntry(position, count, digest, media_type, platform, attestation)


def parse_index(document: Mapping[str, Any]) -> tuple[IndexEntry, ...]:
    """Parse the ``manifests`` list of an OCI index or Docker manifest list.

    Raises:
        RegistryError: when the list or one of its entries is malformed.
    """
    manifests = document.get("manifests")
    if not isinstance(manifests, list):
        raise _content_error("index", "it has no 'manifests' list")
    return tuple(_parse_entry(raw, i, len(manifests)) for i, raw in enumerate(manifests, 1))


def parse_layers(manifest: Mapping[str, Any]) -> tuple[Layer, ...]:
    """Parse the ``layers`` list of an image manifest.

    Raises:
        RegistryError: when the list or one of its layers is malformed.
    """
    layers = manifest.get("layers")
    if not isinstance(layers, list):
        raise _content_error("image manifest", "it has no 'layers' list")
    parsed = []
    for position, raw in enumerate(layers, 1):
        subject = f"layer {position} of {len(layers)}"
        if not isinstance(raw, Mapping):
            raise _content_error(subject, "it is not an object")
        media_type = raw.get("mediaType", "")
        if not isinstance(media_type, str):
            raise _content_error(subject, f"mediaType is {media_type!r}, not a string")
        digest = _checked_digest(raw.get("digest"), subject)
        parsed.append(Layer(position, len(layers), digest, media_type))
    return tuple(parsed)


def config_digest(manifest: Mapping[str, Any]) -> str:
    """Return the digest of an image manifest's config.

    Raises:
        RegistryError: when the manifest has no valid config descriptor.
    """
    config = manifest.get("config")
    if not isinstance(config, Mapping):
        raise _content_error("image manifest", "it has no 'config' object")
    return _checked_digest(config.get("digest"), "image manifest config")


def _variant_level(architecture: str, variant: str) -> int | None:
    levels = _VARIANT_LEVELS.get(architecture)
    if levels is None or variant not in levels:
        return None
    return levels.index(variant)


def variant_rank(entry: Platform, host: Platform) -> int | None:
    """Rank how well ``entry`` serves ``host``: ``None`` for no match, higher is preferred.

    Both platforms are normalized first, so ``x86_64`` equals ``amd64``.
    """
    entry, host = normalize_platform(entry), normalize_platform(host)
    if (entry.os, entry.architecture) != (host.os, host.architecture):
        return None
    entry_level = _variant_level(entry.architecture, entry.variant)
    host_level = _variant_level(host.architecture, host.variant)
    if entry_level is not None and host_level is not None:
        return entry_level if entry_level <= host_level else None
    if entry.variant == host.variant:
        return 1
    return 0 if not entry.variant else None


def _candidates(entries: Sequence[IndexEntry]) -> list[IndexEntry]:
    usable = INDEX_MEDIA_TYPES | MANIFEST_MEDIA_TYPES
    return [entry for entry in entries if not entry.attestation and entry.media_type in usable]


def choose_entry(entries: Sequence[IndexEntry], host: Platform) -> IndexEntry:
    """Choose the entry that serves ``host``, by the rules in this module's docstring.

    Raises:
        RegistryError: when no entry serves ``host``; the message lists the platforms present.
    """
    candidates = _candidates(entries)
    best: IndexEntry | None = None
    best_rank = -1
    for entry in candidates:
        rank = None if entry.platform is None else variant_rank(entry.platform, host)
        if rank is not None and rank > best_rank:
            best, best_rank = entry, rank
    if best is not None:
        return best
    platformless = [entry for entry in candidates if entry.platform is None]
    if platformless:
        return platformless[0]
    raise RegistryError(
        f"no index entry serves platform {host}: the index lists {_list_platforms(entries)}"
    )


def _list_platforms(entries: Sequence[IndexEntry]) -> str:
    names = [
        str(entry.platform) + (" (attestation)" if entry.attestation else "")
        for entry in entries
        if entry.platform is not None
    ]
    usable = INDEX_MEDIA_TYPES | MANIFEST_MEDIA_TYPES
    unknown_types = sorted({entry.media_type for entry in entries} - usable)
    text = ", ".join(names) if names else "no platform at all"
    if unknown_types:
        text += "; entries of unsupported media types: " + ", ".join(unknown_types)
    return text


def resolve(
    tag_document: Mapping[str, Any],
    tag_media_type: str,
    host: Platform,
    nested_indexes: Mapping[str, Mapping[str, Any]],
) -> Resolution:
    """Walk from the tag document to the manifest for ``host``.

    ``nested_indexes`` maps the digest of each nested index fetched so far to its document.
    When the walk reaches a nested index that is not in it, the result names it as ``pending``.

    Raises:
        RegistryError: when no entry serves ``host``, or indexes nest deeper than
            ``MAX_INDEX_DEPTH``.
    """
    if not is_index_document(tag_document, tag_media_type):
        return Resolution(steps=())
    steps: list[IndexEntry] = []
    document = tag_document
    while True:
        entry = choose_entry(parse_index(document), host)
        steps.append(entry)
        if not entry.is_index:
            return Resolution(steps=tuple(steps))
        if len(steps) >= MAX_INDEX_DEPTH:
            raise _content_error("index", f"indexes nest deeper than {MAX_INDEX_DEPTH} levels")
        nested = nested_indexes.get(entry.digest)
        if nested is None:
            return Resolution(steps=tuple(steps), pending=entry)
        document = nested


def _media_type_compression(media_type: str) -> str:
    if media_type.endswith(("gzip", "+gzip")):
        return "gzip"
    if media_type.endswith(("zstd", "+zstd")):
        return "zstd"
    if media_type.endswith((".tar", "+tar")):
        return "uncompressed"
    return f"'{media_type}'"


def _zstd_evidence(layer: Layer, head: bytes) -> str:
    hex_bytes = " ".join(f"{byte:02x}" for byte in head[:4])
    text = (
        f"layer {layer.position} of {layer.count} ({short_digest(layer.digest)}) "
        f"starts with {hex_bytes} (zstd)"
    )
    declared = _media_type_compression(layer.media_type)
    if declared != "zstd":
        text += f" although its media type says {declared}"
    return text


def _zstd_requirement(
    manifest: Mapping[str, Any], layer_heads: Sequence[bytes]
) -> ImageRequirement | None:
    layers = parse_layers(manifest)
    if len(layers) != len(layer_heads):
        raise ValueError(f"got first bytes of {len(layer_heads)} layers for {len(layers)} layers")
    evidence = [
        _zstd_evidence(layer, head)
        for layer, head in zip(layers, layer_heads, strict=True)
        if compression_of(head) == "zstd"
    ]
    if not evidence:
        return None
    return ImageRequirement(Requirement.ZSTD_LAYERS, "; ".join(evidence))


def _index_requirements(steps: Sequence[IndexEntry], host: Platform) -> list[ImageRequirement]:
    found = []
    top = steps[0]
    if top.platform is None:
        found.append(
            ImageRequirement(
                Requirement.PLATFORMLESS_INDEX_ENTRY,
                f"{top.describe()} is the only index entry that can serve {host}",
            )
        )
    if top.is_index and top.platform is not None:
        found.append(
            ImageRequirement(
                Requirement.NESTED_INDEX_FIRST,
                f"{top.describe()} is a nested index ({top.media_type}), and it is the entry "
                f"chosen for {host}",
            )
        )
    chosen = steps[-1]
    variant_platform = chosen.platform or next(
        (step.platform for step in reversed(steps) if step.platform), None
    )
    if variant_platform is not None:
        normalized = normalize_platform(variant_platform)
        if normalized.architecture == "amd64" and normalized.variant != "v1":
            found.append(
                ImageRequirement(
                    Requirement.X86_64_VARIANT,
                    f"{chosen.describe()}, chosen for this host, names variant "
                    f"{variant_platform.variant!r}, not v1",
                )
            )
    return found


def find_requirements(
    tag_document: Mapping[str, Any],
    tag_media_type: str,
    host: Platform,
    *,
    nested_indexes: Mapping[str, Mapping[str, Any]],
    manifest: Mapping[str, Any],
    layer_heads: Sequence[bytes],
) -> tuple[ImageRequirement, ...]:
    """List what pulling the image for ``host`` needs from the engine, with evidence.

    ``nested_indexes`` maps nested index digests to their documents, as for :func:`resolve`.
    ``manifest`` is the chosen image manifest and ``layer_heads`` the first bytes (at least 4)
    of each of its layers, in manifest order.

    Raises:
        RegistryError: when a document is malformed or no entry serves ``host``.
        ValueError: when ``layer_heads`` does not have one item per layer, or a nested index
            on the path is missing from ``nested_indexes``.
    """
    resolution = resolve(tag_document, tag_media_type, host, nested_indexes)
    if resolution.pending is not None:
        raise ValueError(f"nested index {resolution.pending.digest} is missing")
    found: list[ImageRequirement] = []
    zstd = _zstd_requirement(manifest, layer_heads)
    if zstd is not None:
        found.append(zstd)
    if resolution.steps:
        found.extend(_index_requirements(resolution.steps, host))
    return tuple(found)
