"""Tests of platform choice and image requirement detection."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tuwunel_guard.core.image import Platform, Requirement
from tuwunel_guard.core.platforms import (
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    OCI_INDEX,
    OCI_MANIFEST,
    choose_entry,
    compression_of,
    config_digest,
    find_requirements,
    normalize_platform,
    parse_index,
    parse_layers,
    resolve,
    variant_rank,
)
from tuwunel_guard.errors import RegistryError

AMD64 = Platform("linux", "amd64")
AMD64_V2 = Platform("linux", "amd64", "v2")
AMD64_V3 = Platform("linux", "amd64", "v3")
ARM64 = Platform("linux", "arm64")

GZIP_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
ZSTD_LAYER = "application/vnd.oci.image.layer.v1.tar+zstd"
TAR_LAYER = "application/vnd.oci.image.layer.v1.tar"
DOCKER_GZIP_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"

ZSTD_HEAD = b"\x28\xb5\x2f\xfd"
GZIP_HEAD = b"\x1f\x8b\x08\x00"
TAR_HEAD = b"etc/"


def digest(label: str) -> str:
    """Make a valid sha256 digest whose hex starts with ``label`` (hex digits only)."""
    return "sha256:" + (label + "0" * 64)[:64]


def entry(
    label: str,
    platform: str | None,
    media_type: str = OCI_MANIFEST,
    annotations: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Build one index descriptor; ``platform`` is ``os/arch[/variant]`` or ``None``."""
    descriptor: dict[str, Any] = {"mediaType": media_type, "digest": digest(label), "size": 1}
    if platform is not None:
        parts = platform.split("/")
        descriptor["platform"] = {"os": parts[0], "architecture": parts[1]}
        if len(parts) == 3:
            descriptor["platform"]["variant"] = parts[2]
    if annotations:
        descriptor["annotations"] = annotations
    return descriptor


def index(*entries: dict[str, Any], media_type: str = OCI_INDEX) -> dict[str, Any]:
    """Build an index document."""
    return {"schemaVersion": 2, "mediaType": media_type, "manifests": list(entries)}


def manifest(*layers: tuple[str, str]) -> dict[str, Any]:
    """Build an image manifest from ``(digest label, media type)`` pairs."""
    return {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": digest("c0"),
            "size": 2,
        },
        "layers": [
            {"mediaType": media_type, "digest": digest(label), "size": 3}
            for label, media_type in layers
        ],
    }


GZIP_MANIFEST = manifest(("a1", GZIP_LAYER))


@pytest.mark.parametrize(
    ("head", "expected"),
    [
        (ZSTD_HEAD, "zstd"),
        (ZSTD_HEAD + b"more", "zstd"),
        (b"\x50\x2a\x4d\x18", "zstd"),
        (b"\x5f\x2a\x4d\x18", "zstd"),
        (b"\x60\x2a\x4d\x18", "none"),
        (GZIP_HEAD, "gzip"),
        (b"\x1f\x8b", "gzip"),
        (b"\x1f", "none"),
        (b"", "none"),
        (TAR_HEAD, "none"),
        (b"\x28\xb5\x2f", "none"),
        (b"BZh9", "none"),
    ],
)
def test_compression_of_magic(head: bytes, expected: str) -> None:
    """compression_of reads the magic bytes, not a media type."""
    assert compression_of(head) == expected


@given(st.binary(max_size=8))
def test_compression_of_total(head: bytes) -> None:
    """compression_of names one of three kinds for any bytes."""
    assert compression_of(head) in {"zstd", "gzip", "none"}


@pytest.mark.parametrize(
    ("entry_platform", "host", "rank"),
    [
        (AMD64, AMD64, 0),
        (Platform("linux", "amd64", "v1"), AMD64, 0),
        (AMD64_V2, AMD64, None),
        (AMD64_V3, AMD64_V3, 2),
        (AMD64_V2, AMD64_V3, 1),
        (Platform("linux", "amd64", "v4"), AMD64_V3, None),
        (AMD64, Platform("linux", "x86_64"), 0),
        (Platform("linux", "x86_64", "v3"), AMD64_V3, 2),
        (ARM64, Platform("linux", "aarch64"), 0),
        (Platform("linux", "arm64", "v8"), ARM64, 0),
        (Platform("linux", "arm", "v6"), Platform("linux", "arm", "v7"), 1),
        (Platform("linux", "arm", "v7"), Platform("linux", "arm", "v6"), None),
        (ARM64, AMD64, None),
        (Platform("windows", "amd64"), AMD64, None),
        (Platform("linux", "riscv64"), Platform("linux", "riscv64"), 1),
        (Platform("linux", "riscv64"), Platform("linux", "riscv64", "rva22"), 0),
        (Platform("linux", "riscv64", "rva22"), Platform("linux", "riscv64"), None),
    ],
)
def test_variant_rank_cases(entry_platform: Platform, host: Platform, rank: int | None) -> None:
    """variant_rank matches OS and architecture, then variant levels."""
    assert variant_rank(entry_platform, host) == rank


def test_normalize_platform_defaults() -> None:
    """normalize_platform fills default variants and OCI architecture names."""
    assert normalize_platform(Platform("linux", "x86_64")) == Platform("linux", "amd64", "v1")
    assert normalize_platform(Platform("linux", "aarch64")) == Platform("linux", "arm64", "v8")
    assert normalize_platform(Platform("linux", "s390x")) == Platform("linux", "s390x")


@pytest.mark.parametrize(
    ("entries", "host", "chosen"),
    [
        # Plain multi-arch index.
        ([entry("a1", "linux/arm64"), entry("b1", "linux/amd64")], AMD64, "b1"),
        # Attestation entries are skipped by platform and by annotation.
        ([entry("a1", "unknown/unknown"), entry("b1", "linux/amd64")], AMD64, "b1"),
        (
            [
                entry(
                    "a1",
                    "linux/amd64",
                    annotations={"vnd.docker.reference.type": "attestation-manifest"},
                ),
                entry("b1", "linux/amd64"),
            ],
            AMD64,
            "b1",
        ),
        # A platformless entry loses against a matching entry, wherever it is listed.
        ([entry("a1", None), entry("b1", "linux/amd64")], AMD64, "b1"),
        ([entry("b1", "linux/amd64"), entry("a1", None)], AMD64, "b1"),
        # A platformless entry serves when nothing else matches; the first one wins.
        ([entry("c1", "linux/arm64"), entry("a1", None), entry("a2", None)], AMD64, "a1"),
        # Ties go to the first listed entry.
        ([entry("a1", "linux/amd64"), entry("a2", "linux/amd64")], AMD64, "a1"),
        ([entry("a1", "linux/amd64/v1"), entry("a2", "linux/amd64")], AMD64, "a1"),
        # The highest variant at or below the host's level wins, whatever the order.
        ([entry("a1", "linux/amd64/v3"), entry("a2", "linux/amd64")], AMD64_V3, "a1"),
        ([entry("a2", "linux/amd64"), entry("a1", "linux/amd64/v3")], AMD64_V3, "a1"),
        ([entry("a2", "linux/amd64"), entry("a1", "linux/amd64/v3")], AMD64_V2, "a2"),
        ([entry("a2", "linux/amd64/v2"), entry("a1", "linux/amd64/v3")], AMD64_V3, "a1"),
        # Nested indexes are entries like any other.
        ([entry("d1", "linux/amd64", OCI_INDEX), entry("b1", "linux/amd64")], AMD64, "d1"),
        ([entry("b1", "linux/amd64"), entry("d1", "linux/amd64", OCI_INDEX)], AMD64, "b1"),
        # Unknown media types (artifacts) never serve.
        (
            [
                entry("e1", "linux/amd64", "application/vnd.example+json"),
                entry("b1", "linux/amd64"),
            ],
            AMD64,
            "b1",
        ),
        # Docker media types.
        ([entry("b1", "linux/amd64", DOCKER_MANIFEST)], AMD64, "b1"),
    ],
)
def test_choose_entry_cases(entries: list[dict[str, Any]], host: Platform, chosen: str) -> None:
    """choose_entry picks the entry Docker 26.1.5 pulls."""
    result = choose_entry(parse_index(index(*entries)), host)

    assert result.digest == digest(chosen)


@pytest.mark.parametrize(
    ("entries", "host", "fragment"),
    [
        (
            [entry("a1", "linux/arm64")],
            AMD64,
            "no index entry serves platform linux/amd64: the index lists linux/arm64",
        ),
        (
            [entry("a1", "linux/amd64/v2"), entry("a2", "linux/amd64/v3")],
            AMD64,
            "the index lists linux/amd64/v2, linux/amd64/v3",
        ),
        ([entry("a1", "unknown/unknown")], AMD64, "unknown/unknown (attestation)"),
        ([], AMD64, "the index lists no platform at all"),
        (
            [entry("e1", "linux/amd64", "application/vnd.example+json")],
            AMD64,
            "entries of unsupported media types: application/vnd.example+json",
        ),
    ],
)
def test_choose_entry_no_match(
    entries: list[dict[str, Any]], host: Platform, fragment: str
) -> None:
    """choose_entry names the platforms present when none serves the host."""
    with pytest.raises(RegistryError) as caught:
        choose_entry(parse_index(index(*entries)), host)

    assert fragment in str(caught.value)


@pytest.mark.parametrize(
    ("document", "fragment"),
    [
        ({"schemaVersion": 2}, "no 'manifests' list"),
        ({"manifests": "x"}, "no 'manifests' list"),
        ({"manifests": [1]}, "index entry 1 of 1 from the registry: it is not an object"),
        ({"manifests": [{"mediaType": OCI_MANIFEST}]}, "digest is None"),
        ({"manifests": [{"mediaType": OCI_MANIFEST, "digest": "md5:abc"}]}, "md5"),
        (
            {"manifests": [{"mediaType": OCI_MANIFEST, "digest": "sha512:" + "a" * 128}]},
            "unsupported digest algorithm 'sha512'",
        ),
        ({"manifests": [{"mediaType": 3, "digest": digest("a")}]}, "mediaType is 3"),
        (
            {"manifests": [{"mediaType": OCI_MANIFEST, "digest": digest("a"), "platform": "x"}]},
            "platform is 'x'",
        ),
        (
            {
                "manifests": [
                    {
                        "mediaType": OCI_MANIFEST,
                        "digest": digest("a"),
                        "platform": {"os": "linux", "architecture": 5},
                    }
                ]
            },
            "not a string",
        ),
    ],
)
def test_parse_index_invalid(document: dict[str, Any], fragment: str) -> None:
    """Malformed indexes raise RegistryError with the entry's position."""
    with pytest.raises(RegistryError) as caught:
        parse_index(document)

    assert fragment in str(caught.value)


def test_parse_index_empty_platform_is_platformless() -> None:
    """A platform object without os and architecture counts as no platform."""
    entries = parse_index(
        {"manifests": [{"mediaType": OCI_MANIFEST, "digest": digest("a"), "platform": {}}]}
    )

    assert entries[0].platform is None


def test_parse_layers_and_config() -> None:
    """parse_layers keeps order and positions; config_digest reads the config."""
    layers = parse_layers(manifest(("a1", GZIP_LAYER), ("a2", ZSTD_LAYER)))

    assert [layer.digest for layer in layers] == [digest("a1"), digest("a2")]
    assert [(layer.position, layer.count) for layer in layers] == [(1, 2), (2, 2)]
    assert config_digest(GZIP_MANIFEST) == digest("c0")


@pytest.mark.parametrize(
    ("document", "fragment"),
    [
        ({}, "no 'layers' list"),
        ({"layers": [None]}, "layer 1 of 1 from the registry: it is not an object"),
        ({"layers": [{"digest": "sha256:xyz"}]}, "64 lowercase hex digits"),
    ],
)
def test_parse_layers_invalid(document: dict[str, Any], fragment: str) -> None:
    """Malformed manifests raise RegistryError."""
    with pytest.raises(RegistryError) as caught:
        parse_layers(document)

    assert fragment in str(caught.value)


def test_config_digest_missing() -> None:
    """A manifest without config raises RegistryError."""
    with pytest.raises(RegistryError, match="no 'config' object"):
        config_digest({"layers": []})


def test_resolve_manifest_tag() -> None:
    """A tag that points at a manifest needs no index step."""
    resolution = resolve(GZIP_MANIFEST, OCI_MANIFEST, AMD64, {})

    assert resolution.steps == ()
    assert resolution.pending is None
    assert resolution.manifest_entry is None


def test_resolve_nested_pending_then_done() -> None:
    """resolve names a nested index it still needs, then walks into it."""
    top = index(entry("d1", "linux/amd64", OCI_INDEX), entry("b1", "linux/amd64"))
    nested = index(entry("f1", "linux/arm64"), entry("f2", "linux/amd64"))

    first = resolve(top, OCI_INDEX, AMD64, {})
    second = resolve(top, OCI_INDEX, AMD64, {digest("d1"): nested})

    assert first.pending is not None
    assert first.pending.digest == digest("d1")
    assert first.manifest_entry is None
    assert second.pending is None
    assert second.manifest_entry is not None
    assert second.manifest_entry.digest == digest("f2")
    assert [step.digest for step in second.steps] == [digest("d1"), digest("f2")]


def test_resolve_rejects_deep_nesting() -> None:
    """Indexes nested beyond the limit are invalid content."""
    nested = {
        digest(f"d{i}"): index(entry(f"d{i + 1}", "linux/amd64", OCI_INDEX)) for i in range(1, 10)
    }
    top = index(entry("d1", "linux/amd64", OCI_INDEX))

    with pytest.raises(RegistryError, match="nest deeper than 4 levels"):
        resolve(top, OCI_INDEX, AMD64, nested)


def test_resolve_detects_index_without_media_type() -> None:
    """A document with 'manifests' and a JSON content type is read as an index."""
    top = index(entry("b1", "linux/amd64"))

    resolution = resolve(top, "application/json", AMD64, {})

    assert resolution.manifest_entry is not None


def requirements_of(
    tag_document: dict[str, Any],
    host: Platform = AMD64,
    nested: dict[str, dict[str, Any]] | None = None,
    image_manifest: dict[str, Any] = GZIP_MANIFEST,
    heads: list[bytes] | None = None,
) -> dict[Requirement, str]:
    """Run find_requirements and map each requirement to its evidence."""
    media_type = str(tag_document.get("mediaType", OCI_MANIFEST))
    found = find_requirements(
        tag_document,
        media_type,
        host,
        nested_indexes=nested or {},
        manifest=image_manifest,
        layer_heads=heads if heads is not None else [GZIP_HEAD],
    )
    result = {item.requirement: item.evidence for item in found}
    assert len(result) == len(found), "each requirement appears once"
    return result


def test_requirements_gzip_manifest_none() -> None:
    """A gzip single-manifest image needs nothing."""
    assert requirements_of(GZIP_MANIFEST) == {}


def test_requirements_uncompressed_none() -> None:
    """Uncompressed layers need nothing."""
    image = manifest(("a1", TAR_LAYER))

    assert requirements_of(image, image_manifest=image, heads=[TAR_HEAD]) == {}


def test_requirements_zstd_declared() -> None:
    """A zstd layer that says so is reported without a media type remark."""
    image = manifest(("a1", ZSTD_LAYER))

    found = requirements_of(image, image_manifest=image, heads=[ZSTD_HEAD])

    assert found == {
        Requirement.ZSTD_LAYERS: "layer 1 of 1 (sha256:a10000000000…) starts with 28 b5 2f fd "
        "(zstd)"
    }


def test_requirements_zstd_disguised_as_gzip() -> None:
    """zstd bytes behind a gzip media type are reported with both facts."""
    image = manifest(("a1", GZIP_LAYER), ("a2", DOCKER_GZIP_LAYER), ("a3", TAR_LAYER))

    found = requirements_of(image, image_manifest=image, heads=[GZIP_HEAD, ZSTD_HEAD, ZSTD_HEAD])

    assert found == {
        Requirement.ZSTD_LAYERS: "layer 2 of 3 (sha256:a20000000000…) starts with 28 b5 2f fd "
        "(zstd) although its media type says gzip; layer 3 of 3 (sha256:a30000000000…) starts "
        "with 28 b5 2f fd (zstd) although its media type says uncompressed"
    }


def test_requirements_zstd_media_type_but_gzip_bytes() -> None:
    """A zstd media type on gzip bytes needs no zstd support: engines read the bytes."""
    image = manifest(("a1", ZSTD_LAYER))

    assert requirements_of(image, image_manifest=image, heads=[GZIP_HEAD]) == {}


def test_requirements_layer_count_mismatch() -> None:
    """find_requirements needs the first bytes of every layer."""
    with pytest.raises(ValueError, match="1 layers"):
        requirements_of(GZIP_MANIFEST, heads=[])


def test_requirements_attestation_index_none() -> None:
    """An index with an attestation entry beside linux/amd64 needs nothing."""
    top = index(entry("b1", "linux/amd64"), entry("a1", "unknown/unknown"))

    assert requirements_of(top) == {}


def test_requirements_platformless_only() -> None:
    """A platformless entry that alone serves the host is a requirement."""
    top = index(entry("c1", "linux/arm64"), entry("a1", None))

    assert requirements_of(top) == {
        Requirement.PLATFORMLESS_INDEX_ENTRY: "entry 2 of 2 (sha256:a10000000000…, no platform) "
        "is the only index entry that can serve linux/amd64"
    }


def test_requirements_platformless_beside_amd64() -> None:
    """A platformless entry beside a linux/amd64 entry is no requirement."""
    top = index(entry("a1", None), entry("b1", "linux/amd64"))

    assert requirements_of(top) == {}


def test_requirements_nested_first() -> None:
    """A nested index chosen for the host is a requirement."""
    top = index(entry("d1", "linux/amd64", OCI_INDEX), entry("b1", "linux/amd64"))
    nested = {digest("d1"): index(entry("f1", "linux/amd64"))}

    assert requirements_of(top, nested=nested) == {
        Requirement.NESTED_INDEX_FIRST: "entry 1 of 2 (sha256:d10000000000…, linux/amd64) is a "
        "nested index (application/vnd.oci.image.index.v1+json), and it is the entry chosen for "
        "linux/amd64"
    }


def test_requirements_nested_after_normal_none() -> None:
    """A nested index after a linux/amd64 manifest is no requirement."""
    top = index(entry("b1", "linux/amd64"), entry("d1", "linux/amd64", OCI_INDEX))

    assert requirements_of(top) == {}


def test_requirements_nested_for_other_platform_none() -> None:
    """A nested index for another platform, listed first, is no requirement."""
    top = index(entry("d1", "linux/arm64", OCI_INDEX), entry("b1", "linux/amd64"))

    assert requirements_of(top) == {}


def test_requirements_platformless_nested() -> None:
    """A platformless nested index that alone serves the host needs both features."""
    top = index(entry("c1", "linux/arm64"), entry("d1", None, OCI_INDEX))
    nested = {digest("d1"): index(entry("f1", "linux/amd64"))}

    found = requirements_of(top, nested=nested)

    assert set(found) == {Requirement.PLATFORMLESS_INDEX_ENTRY}


def test_requirements_missing_nested() -> None:
    """find_requirements needs every nested index on the path."""
    top = index(entry("d1", "linux/amd64", OCI_INDEX))

    with pytest.raises(ValueError, match="nested index"):
        requirements_of(top)


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        (AMD64, {}),
        (AMD64_V2, {}),
        (
            AMD64_V3,
            {
                Requirement.X86_64_VARIANT: "entry 2 of 2 (sha256:a30000000000…, linux/amd64/v3), "
                "chosen for this host, names variant 'v3', not v1"
            },
        ),
    ],
)
def test_requirements_x86_64_variants(host: Platform, expected: dict[Requirement, str]) -> None:
    """Only a chosen variant above v1 is a requirement."""
    top = index(entry("a1", "linux/amd64/v1"), entry("a3", "linux/amd64/v3"))

    assert requirements_of(top, host=host) == expected


def test_requirements_all_at_once() -> None:
    """zstd layers, a nested index and a variant add up."""
    top = index(entry("d1", "linux/amd64/v3", DOCKER_MANIFEST_LIST), entry("c1", "linux/arm64"))
    nested = {digest("d1"): index(entry("f3", "linux/amd64/v3"), media_type=DOCKER_MANIFEST_LIST)}
    image = manifest(("a1", ZSTD_LAYER))

    found = requirements_of(
        top, host=AMD64_V3, nested=nested, image_manifest=image, heads=[ZSTD_HEAD]
    )

    assert set(found) == {
        Requirement.ZSTD_LAYERS,
        Requirement.NESTED_INDEX_FIRST,
        Requirement.X86_64_VARIANT,
    }


_PLATFORMS = st.sampled_from(
    [
        "linux/amd64",
        "linux/amd64/v1",
        "linux/amd64/v2",
        "linux/amd64/v3",
        "linux/amd64/v4",
        "linux/arm64",
        "linux/arm/v7",
        "unknown/unknown",
        None,
    ]
)
_HOSTS = st.sampled_from([AMD64, AMD64_V2, AMD64_V3, Platform("linux", "amd64", "v4"), ARM64])


@given(st.lists(_PLATFORMS, max_size=8), _HOSTS)
def test_choice_properties(platforms: list[str | None], host: Platform) -> None:
    """The chosen entry serves the host and no other entry serves it better."""
    entries = parse_index(index(*(entry(f"{i:x}", p) for i, p in enumerate(platforms))))
    try:
        chosen = choose_entry(entries, host)
    except RegistryError:
        usable = [e for e in entries if not e.attestation]
        assert all(
            e.platform is not None and variant_rank(e.platform, host) is None for e in usable
        )
        return

    assert not chosen.attestation
    ranks = [variant_rank(e.platform, host) for e in entries if e.platform and not e.attestation]
    matched = [rank for rank in ranks if rank is not None]
    if chosen.platform is None:
        assert matched == []
        return
    chosen_rank = variant_rank(chosen.platform, host)
    assert chosen_rank is not None
    assert chosen_rank == max(matched)
    earlier = entries[: chosen.position - 1]
    assert all(
        e.platform is None or e.attestation or variant_rank(e.platform, host) != chosen_rank
        for e in earlier
    )


@given(st.lists(st.sampled_from([ZSTD_HEAD, GZIP_HEAD, TAR_HEAD]), min_size=1, max_size=6))
def test_zstd_requirement_iff_zstd_bytes(heads: list[bytes]) -> None:
    """ZSTD_LAYERS appears exactly when some layer's bytes are zstd."""
    image = manifest(*((f"{i + 1:x}", GZIP_LAYER) for i in range(len(heads))))

    found = requirements_of(image, image_manifest=image, heads=heads)

    assert (Requirement.ZSTD_LAYERS in found) == (ZSTD_HEAD in heads)
    if ZSTD_HEAD in heads:
        assert found[Requirement.ZSTD_LAYERS].count("(zstd)") == heads.count(ZSTD_HEAD)
