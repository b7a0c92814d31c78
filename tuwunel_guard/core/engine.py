"""Engine versions and the table of what each engine version can do.

Each capability row names its source, because the facts come from two places: Docker's release
notes, and measurements of Docker 20.10.24 and 26.1.5 (Debian's packages, classic image store,
Distribution 2.8.2 registry). Where only those two releases were measured, the row requires the
newer measured release: the release in between that changed the behaviour is not known.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

from tuwunel_guard.core.image import Platform, Requirement

# Leading zeros occur in real releases (17.06.0-ce, 18.09.1, 22.06.0-beta.0), so they are allowed.
_VERSION = re.compile(
    r"^v?(?P<major>\d+)\.(?P<minor>\d+)(?:\.(?P<patch>\d+))?"
    r"(?:-(?P<pre>[0-9A-Za-z.-]+))?(?:\+(?P<build>[0-9A-Za-z.~-]+))?$"
)


@dataclass(frozen=True)
class EngineVersion:
    """A Docker engine release, ordered by release.

    ``prerelease`` sorts before the release it precedes (``23.0.0-rc.1`` < ``23.0.0``); the
    build part (``+dfsg1`` in Debian's packages) is kept for display only.
    """

    major: int
    minor: int
    patch: int
    is_release: bool = True
    prerelease: str = ""
    text: str = ""

    @classmethod
    def parse(cls, text: str) -> EngineVersion:
        """Parse a version as engines report it; raise ``ValueError`` for other forms."""
        match = _VERSION.match(text.strip())
        if match is None:
            raise ValueError(
                f"invalid engine version {text!r}: expected MAJOR.MINOR[.PATCH] with an optional "
                "-prerelease and +build part, such as 20.10.24+dfsg1 or 23.0.0-rc.1"
            )

        prerelease = match["pre"] or ""
        return cls(
            major=int(match["major"]),
            minor=int(match["minor"]),
            patch=int(match["patch"] or 0),
            is_release=not prerelease,
            prerelease=prerelease,
            text=text.strip(),
        )

    @property
    def key(self) -> tuple[int, int, int, bool]:
        """Sort key: release order, with a pre-release before its release."""
        return (self.major, self.minor, self.patch, self.is_release)

    def __str__(self) -> str:
        return self.text or f"{self.major}.{self.minor}.{self.patch}"


def _release(text: str) -> EngineVersion:
    return EngineVersion.parse(text)


@dataclass(frozen=True)
class ApiVersion:
    """A Docker Engine API version such as ``1.41``, ordered numerically."""

    major: int
    minor: int

    @classmethod
    def parse(cls, text: str) -> ApiVersion:
        """Parse ``MAJOR.MINOR``; raise ``ValueError`` for other forms."""
        match = re.fullmatch(r"(\d+)\.(\d+)", text.strip())
        if match is None:
            raise ValueError(f"invalid engine API version {text!r}: expected MAJOR.MINOR, as 1.41")
        return cls(int(match[1]), int(match[2]))

    def __lt__(self, other: ApiVersion) -> bool:
        return (self.major, self.minor) < (other.major, other.minor)

    def __le__(self, other: ApiVersion) -> bool:
        return (self.major, self.minor) <= (other.major, other.minor)

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}"


@dataclass(frozen=True)
class EngineFacts:
    """The engine's report about itself, from ``/version`` and ``/info``."""

    version: EngineVersion
    api_version: ApiVersion
    min_api_version: ApiVersion
    platform: Platform
    image_store: str = "classic"
    """``classic`` when image IDs are config digests, ``containerd`` when they are manifest or
    index digests (the containerd image store, an option from Docker 24)."""


class Capability(enum.Enum):
    """An engine capability, named after the image requirement it satisfies."""

    ZSTD_LAYERS = Requirement.ZSTD_LAYERS
    PLATFORMLESS_INDEX_ENTRY = Requirement.PLATFORMLESS_INDEX_ENTRY
    NESTED_INDEX_FIRST = Requirement.NESTED_INDEX_FIRST
    X86_64_VARIANT = Requirement.X86_64_VARIANT


@dataclass(frozen=True)
class CapabilityRow:
    """One row of the capability table: from which release an engine has a capability."""

    capability: Capability
    since: EngineVersion
    what: str
    source: str


CAPABILITIES: tuple[CapabilityRow, ...] = (
    CapabilityRow(
        Capability.ZSTD_LAYERS,
        _release("23.0.0"),
        "unpack zstd-compressed layers",
        "Docker Engine 23.0.0 release notes (moby#41759, moby#42862)",
    ),
    CapabilityRow(
        Capability.PLATFORMLESS_INDEX_ENTRY,
        _release("26.1.5"),
        "pull through an index entry that has no platform field",
        "measured: 20.10.24 fails with 'no matching manifest', 26.1.5 works",
    ),
    CapabilityRow(
        Capability.NESTED_INDEX_FIRST,
        _release("26.1.5"),
        "pull through an index whose first entry is a nested index",
        "measured: 20.10.24 fails with 'unsupported manifest format', 26.1.5 works",
    ),
    CapabilityRow(
        Capability.X86_64_VARIANT,
        _release("26.1.5"),
        "pull a linux/amd64 entry whose variant is above v1",
        "measured: 20.10.24 matches only no variant or v1, 26.1.5 picks the host's level",
    ),
)

MINIMUM_API_VERSION = ApiVersion(1, 24)
"""Oldest engine API the guard talks to: the oldest that docker SDK 7 supports."""

COMPOSE_V1_MAX_API_VERSION = ApiVersion(1, 43)
"""Newest API compose v1 may be pinned to: on 1.44 and later a recreate fails with
``KeyError: 'ContainerConfig'`` (measured with docker-compose 1.29.2 against Docker 26.1.5),
and engines from Docker 29 refuse older APIs, so compose v1 cannot drive them at all."""


def capability_row(capability: Capability) -> CapabilityRow:
    """Return the table row of ``capability``."""
    for row in CAPABILITIES:
        if row.capability is capability:
            return row
    raise KeyError(capability)  # pragma: no cover - every member has a row, a test checks it


def capabilities_of(version: EngineVersion) -> frozenset[Capability]:
    """Return the capabilities an engine of ``version`` has, by the table."""
    return frozenset(row.capability for row in CAPABILITIES if _at_least(version, row.since))


def _at_least(version: EngineVersion, since: EngineVersion) -> bool:
    # A pre-release of the first release with a capability counts as lacking it, because the
    # table's sources describe releases only.
    return version.key >= since.key
