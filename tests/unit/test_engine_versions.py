"""Engine version parsing and the capability table."""

from __future__ import annotations

import pytest

from tuwunel_guard.core.engine import (
    CAPABILITIES,
    ApiVersion,
    Capability,
    EngineVersion,
    capabilities_of,
    capability_row,
)
from tuwunel_guard.core.image import Requirement


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("20.10.24+dfsg1", (20, 10, 24, True)),
        ("26.1.5+dfsg1", (26, 1, 5, True)),
        ("23.0.0-rc.1", (23, 0, 0, False)),
        ("28.2.2", (28, 2, 2, True)),
        ("v24.0.7", (24, 0, 7, True)),
        ("25.0", (25, 0, 0, True)),
        (" 27.3.1 ", (27, 3, 1, True)),
        ("17.06.0-ce", (17, 6, 0, False)),
        ("18.09.1", (18, 9, 1, True)),
    ],
)
def test_version_parse_accepts_engine_forms(
    text: str, expected: tuple[int, int, int, bool]
) -> None:
    """Forms engines report parse into release order keys."""
    assert EngineVersion.parse(text).key == expected


@pytest.mark.parametrize(
    "text", ["", "dev", "20", "20.x.1", "1.2.3.4", "20.10.24 beta", "17.06.0 ce"]
)
def test_version_parse_rejects_other_forms(text: str) -> None:
    """Malformed versions raise a ValueError that names the value."""
    with pytest.raises(ValueError, match="invalid engine version"):
        EngineVersion.parse(text)


def test_version_keeps_original_text() -> None:
    """The text is kept for messages, Debian's +dfsg1 included."""
    assert str(EngineVersion.parse("20.10.24+dfsg1")) == "20.10.24+dfsg1"


def test_prerelease_sorts_before_release() -> None:
    """23.0.0-rc.1 comes before 23.0.0 and after 22.06.0."""
    rc = EngineVersion.parse("23.0.0-rc.1").key
    assert rc < EngineVersion.parse("23.0.0").key
    assert rc > EngineVersion.parse("22.6.0").key


def test_every_capability_has_one_row() -> None:
    """The table holds exactly one row per capability, each with a source."""
    capabilities = [row.capability for row in CAPABILITIES]
    assert sorted(c.name for c in capabilities) == sorted(c.name for c in Capability)
    assert all(row.source for row in CAPABILITIES)


def test_every_requirement_has_a_capability() -> None:
    """Each image requirement maps to the capability that satisfies it."""
    for requirement in Requirement:
        assert Capability(requirement).value is requirement


@pytest.mark.parametrize(
    ("version", "zstd", "index_rules"),
    [
        ("20.10.24+dfsg1", False, False),
        ("22.06.0-beta.0", False, False),
        ("23.0.0-rc.1", False, False),
        ("23.0.0", True, False),
        ("24.0.7", True, False),
        ("26.1.4", True, False),
        ("26.1.5+dfsg1", True, True),
        ("28.2.2", True, True),
    ],
)
def test_capabilities_follow_the_table(version: str, zstd: bool, index_rules: bool) -> None:
    """zstd from 23.0.0; the index rules only from the measured 26.1.5."""
    capabilities = capabilities_of(EngineVersion.parse(version))
    assert (Capability.ZSTD_LAYERS in capabilities) is zstd
    for capability in (
        Capability.PLATFORMLESS_INDEX_ENTRY,
        Capability.NESTED_INDEX_FIRST,
        Capability.X86_64_VARIANT,
    ):
        assert (capability in capabilities) is index_rules


def test_capability_row_of_zstd_names_release_notes() -> None:
    """The zstd row cites Docker's release notes and 23.0.0."""
    row = capability_row(Capability.ZSTD_LAYERS)
    assert str(row.since) == "23.0.0"
    assert "release notes" in row.source


@pytest.mark.parametrize(("text", "expected"), [("1.41", (1, 41)), ("1.45", (1, 45))])
def test_api_version_parse(text: str, expected: tuple[int, int]) -> None:
    """API versions parse as MAJOR.MINOR and compare numerically."""
    version = ApiVersion.parse(text)
    assert (version.major, version.minor) == expected
    assert ApiVersion.parse("1.9") < version


@pytest.mark.parametrize("text", ["", "1", "1.x", "v1.41"])
def test_api_version_parse_rejects_other_forms(text: str) -> None:
    """A malformed API version raises a ValueError naming it."""
    with pytest.raises(ValueError, match="invalid engine API version"):
        ApiVersion.parse(text)
