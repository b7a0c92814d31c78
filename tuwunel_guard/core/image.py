"""What the target image needs from an engine, as found in the registry.

Vocabulary used across the guard:

* *tag digest*: the digest the tag points to, an index (manifest list) or a single manifest.
* *manifest digest*: the digest of the manifest chosen for the host platform.
* *config digest*: the digest of that manifest's image config. Engines with the classic image
  store report it as the *image ID*.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class Requirement(enum.StrEnum):
    """A feature the image needs from the engine that pulls it."""

    ZSTD_LAYERS = "zstd-layers"
    """At least one layer blob starts with the zstd magic bytes ``28 b5 2f fd``."""

    PLATFORMLESS_INDEX_ENTRY = "platformless-index-entry"
    """The index entry that serves the host platform has no ``platform`` field."""

    NESTED_INDEX_FIRST = "nested-index-first"
    """The index lists a nested index first, and that nested index serves the host platform."""

    X86_64_VARIANT = "x86-64-variant"
    """The chosen ``linux/amd64`` entry names a ``platform.variant`` other than ``v1``."""

    @property
    def index_level(self) -> bool:
        """Tell whether only a pull through the tag's index needs this.

        The guard pulls the chosen manifest by its digest, so the engine never reads the index
        and these requirements do not limit what the guard can run.
        """
        return self is not Requirement.ZSTD_LAYERS


@dataclass(frozen=True)
class Platform:
    """An OS, architecture and optional variant, as written in OCI indexes."""

    os: str
    architecture: str
    variant: str = ""

    def __str__(self) -> str:
        parts = [self.os, self.architecture] + ([self.variant] if self.variant else [])
        return "/".join(parts)

    @classmethod
    def parse(cls, text: str) -> Platform:
        """Parse ``os/arch`` or ``os/arch/variant``; raise ``ValueError`` for other forms."""
        parts = text.split("/")
        if len(parts) not in (2, 3) or not all(parts):
            raise ValueError(f"invalid platform {text!r}: expected os/arch or os/arch/variant")
        return cls(*parts)


@dataclass(frozen=True)
class ImageRequirement:
    """One requirement with the evidence that shows it, in words a person can check."""

    requirement: Requirement
    evidence: str


@dataclass(frozen=True)
class ImageFacts:
    """What the registry told about the target image for one platform.

    ``layer_compressions`` lists each layer's compression as its first bytes show it
    (``zstd``, ``gzip`` or ``none``), in manifest order.
    """

    reference: str
    tag_digest: str
    tag_media_type: str
    manifest_digest: str
    manifest_media_type: str
    config_digest: str
    platform: Platform
    layer_compressions: tuple[str, ...] = ()
    requirements: tuple[ImageRequirement, ...] = field(default=())

    def needs(self, requirement: Requirement) -> bool:
        """Tell whether the image has ``requirement``."""
        return any(item.requirement is requirement for item in self.requirements)


def image_facts_to_dict(facts: ImageFacts) -> dict[str, object]:
    """Turn ``facts`` into plain JSON data, for the state file."""
    return {
        "reference": facts.reference,
        "tag_digest": facts.tag_digest,
        "tag_media_type": facts.tag_media_type,
        "manifest_digest": facts.manifest_digest,
        "manifest_media_type": facts.manifest_media_type,
        "config_digest": facts.config_digest,
        "platform": str(facts.platform),
        "layer_compressions": list(facts.layer_compressions),
        "requirements": [
            {"requirement": item.requirement.value, "evidence": item.evidence}
            for item in facts.requirements
        ],
    }


def image_facts_from_dict(data: dict[str, object]) -> ImageFacts:
    """Rebuild ``ImageFacts`` from what ``image_facts_to_dict`` wrote.

    Raises ``ValueError`` when a key is missing or has the wrong type.
    """
    try:
        requirements = tuple(
            ImageRequirement(Requirement(item["requirement"]), str(item["evidence"]))
            for item in data["requirements"]  # type: ignore[attr-defined]
        )
        return ImageFacts(
            reference=str(data["reference"]),
            tag_digest=str(data["tag_digest"]),
            tag_media_type=str(data["tag_media_type"]),
            manifest_digest=str(data["manifest_digest"]),
            manifest_media_type=str(data["manifest_media_type"]),
            config_digest=str(data["config_digest"]),
            platform=Platform.parse(str(data["platform"])),
            layer_compressions=tuple(str(item) for item in data["layer_compressions"]),  # type: ignore[attr-defined]
            requirements=requirements,
        )
    except (KeyError, TypeError) as error:
        raise ValueError(f"invalid stored image facts: {error}") from error
