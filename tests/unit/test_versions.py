"""Tests of release tag parsing, release ranges, the release pick and image age."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tuwunel_guard.core.versions import (
    config_created,
    old_enough,
    parse_created,
    parse_release_range,
    parse_release_tag,
    pick_release,
)

# Tags as Tuwunel's registries list them, plus odd ones seen elsewhere.
TUWUNEL_TAGS = [
    "main",
    "preview",
    "latest",
    "v1.8.2",
    "v1.9.0",
    "v1.9.0-release-all-x86_64-v1-linux-gnu",
    "v1.9.0-release-all-x86_64-v3-linux-gnu",
    "v1.9.0-release-all-aarch64-v8-linux-gnu",
    "v1.10.0-rc.1",
    "v1.10.0-rc.2",
    "v1.10.0-rc.10",
    "v1.10.0-release-all-x86_64-v1-linux-gnu",
    "2.0.0-beta.1",
]


@pytest.mark.parametrize(
    ("tag", "core", "prerelease"),
    [
        ("v1.9.0", (1, 9, 0), ()),
        ("1.9.0", (1, 9, 0), ()),
        ("v1.10.0-rc.1", (1, 10, 0), ("rc", 1)),
        ("v1.10.0-rc1", (1, 10, 0), ("rc", 1)),
        ("v1.10.0-rc-3", (1, 10, 0), ("rc", 3)),
        ("v1.10.0-beta.2.1", (1, 10, 0), ("beta", 2, 1)),
        ("v2.0.0-alpha", (2, 0, 0), ("alpha",)),
        ("0.0.0", (0, 0, 0), ()),
    ],
)
def test_release_tag_parsed(
    tag: str, core: tuple[int, int, int], prerelease: tuple[object]
) -> None:
    """Release tags with and without v and with pre-release suffixes parse."""
    release = parse_release_tag(tag)

    assert release is not None
    assert release.core == core
    assert release.prerelease == prerelease
    assert release.is_prerelease == bool(prerelease)
    assert release.text == tag


@pytest.mark.parametrize(
    "tag",
    [
        "latest",
        "main",
        "preview",
        "v1.9",
        "1",
        "v1.9.0-release-all-x86_64-v1-linux-gnu",
        "v1.9.0-release-all-aarch64-v8-linux-gnu",
        "v1.9.0-x86_64",
        "v1.9.0-rc.1-x86_64-v3-linux-gnu",
        "v1.9.0-dev",
        "v01.9.0",
        "V1.9.0",
        "vv1.9.0",
        "1.9.0.1",
        "sha-0123abc",
        "",
    ],
)
def test_non_release_tag_ignored(tag: str) -> None:
    """Rolling tags, per-platform build tags and unknown suffixes are not releases."""
    assert parse_release_tag(tag) is None


@pytest.mark.parametrize(
    ("lower", "higher"),
    [
        ("v1.9.0", "v1.10.0"),
        ("v1.10.0-rc.1", "v1.10.0"),
        ("v1.10.0-rc.2", "v1.10.0-rc.10"),
        ("v1.10.0-rc", "v1.10.0-rc.1"),
        ("v1.10.0-alpha.9", "v1.10.0-beta.1"),
        ("v1.10.0-beta.9", "v1.10.0-rc.1"),
        ("v1.9.9", "v1.10.0-alpha"),
        ("v1.10.0-rc.1", "v1.10.0-rc.1.1"),
    ],
)
def test_release_order(lower: str, higher: str) -> None:
    """Releases order numerically, with pre-releases before their release."""
    low, high = parse_release_tag(lower), parse_release_tag(higher)

    assert low is not None
    assert high is not None
    assert low.key < high.key


@pytest.mark.parametrize(
    ("release_range", "prereleases", "expected"),
    [
        (">=1.9,<2", False, "v1.9.0"),
        (">=1.9,<2", True, "v1.10.0-rc.10"),
        (">=1.9, <2", True, "v1.10.0-rc.10"),
        (">=0", True, "2.0.0-beta.1"),
        (">=0", False, "v1.9.0"),
        ("<1.9", False, "v1.8.2"),
        ("<=1.9.0", False, "v1.9.0"),
        (">1.9.0", False, None),
        (">1.9.0", True, "2.0.0-beta.1"),
        ("==1.8", False, "v1.8.2"),
        ("==1.8.2", False, "v1.8.2"),
        ("==1.10.0-rc.2", True, "v1.10.0-rc.2"),
        ("!=1.9,<2", False, "v1.8.2"),
        ("~=1.8", False, "v1.9.0"),
        ("~=1.8.0", False, "v1.8.2"),
        ("~=1.10", True, None),
        ("<2", True, "v1.10.0-rc.10"),
        ("<2.0.0-beta.2", True, "2.0.0-beta.1"),
        ("<2.0.0-beta.1", True, "v1.10.0-rc.10"),
        (">=3", True, None),
    ],
)
def test_pick_release(release_range: str, prereleases: bool, expected: str | None) -> None:
    """The highest release tag in range wins; other tags and pre-releases are skipped."""
    assert pick_release(TUWUNEL_TAGS, release_range, prereleases=prereleases) == expected


def test_pick_release_prefers_release() -> None:
    """A release beats its own pre-releases when both are allowed."""
    tags = ["v1.10.0-rc.1", "v1.10.0", "v1.10.0-rc.2"]

    assert pick_release(tags, ">=1", prereleases=True) == "v1.10.0"


def test_pick_release_spelling_tie() -> None:
    """Two spellings of one release give the same pick in either order."""
    assert pick_release(["1.9.0", "v1.9.0"], ">=1", prereleases=False) == "v1.9.0"
    assert pick_release(["v1.9.0", "1.9.0"], ">=1", prereleases=False) == "v1.9.0"


def test_pick_release_empty() -> None:
    """No tags, or only rolling tags, give None."""
    assert pick_release([], ">=1", prereleases=True) is None
    assert pick_release(["latest", "main"], ">=0", prereleases=True) is None


def test_pick_release_takes_parsed_range() -> None:
    """A range parsed once can be used for many picks."""
    parsed = parse_release_range(">=1.9,<2")

    assert pick_release(TUWUNEL_TAGS, parsed, prereleases=False) == "v1.9.0"
    assert str(parsed) == ">=1.9,<2"


@pytest.mark.parametrize(
    ("release_range", "problem"),
    [
        ("", "it is empty"),
        ("   ", "it is empty"),
        ("1.9", "'1.9' does not start with an operator"),
        (">=1.9;<2", "'1.9;<2' is not a version"),
        (">=1.9,,<2", "empty comparison between commas"),
        (">=1.9,", "empty comparison between commas"),
        ("=>1.9", "'=>1.9' does not start with an operator"),
        (">=latest", "'latest' is not a version"),
        (">=1.9.0.1", "'1.9.0.1' is not a version"),
        (">=1.9-rc.1", "'1.9-rc.1' is not a version"),
        ("~=1", "'~=' needs at least MAJOR.MINOR"),
        (">= 1.9 2", "'>= 1.9 2' does not start with an operator"),
    ],
)
def test_invalid_range_message(release_range: str, problem: str) -> None:
    """An invalid range is rejected with the range, the problem and a valid example."""
    with pytest.raises(ValueError, match="invalid release range") as caught:
        parse_release_range(release_range)

    message = str(caught.value)
    assert repr(release_range) in message
    assert problem in message
    assert "'>=1.9,<2'" in message


def test_pick_release_invalid_range() -> None:
    """pick_release raises for a range string that does not parse."""
    with pytest.raises(ValueError, match=re.escape("invalid release range '>1.9 <2'")):
        pick_release(TUWUNEL_TAGS, ">1.9 <2", prereleases=False)


# --- Properties ------------------------------------------------------------------------------

_numbers = st.integers(min_value=0, max_value=12)
_release_tags = st.builds(
    lambda prefix, major, minor, patch, suffix: f"{prefix}{major}.{minor}.{patch}{suffix}",
    st.sampled_from(["", "v"]),
    _numbers,
    _numbers,
    _numbers,
    st.sampled_from(["", "", "-rc.1", "-rc.2", "-rc10", "-beta.1", "-alpha"]),
)
_other_tags = st.sampled_from(
    ["latest", "main", "preview", "v1.9", "v1.9.0-release-all-x86_64-v3-linux-gnu"]
)
_tag_lists = st.lists(st.one_of(_release_tags, _other_tags), max_size=40)
_ranges = st.builds(
    lambda low, high: f">={low[0]}.{low[1]},<{high[0]}.{high[1]}",
    st.tuples(_numbers, _numbers),
    st.tuples(_numbers, _numbers),
) | st.builds(
    lambda operator, major, minor: f"{operator}{major}.{minor}",
    st.sampled_from([">=", ">", "<=", "<", "==", "!=", "~="]),
    _numbers,
    _numbers,
)


@given(tags=_tag_lists, release_range=_ranges, prereleases=st.booleans())
def test_pick_is_in_range(tags: list[str], release_range: str, prereleases: bool) -> None:
    """The pick is a release tag from the list, in range, and a pre-release only if allowed."""
    picked = pick_release(tags, release_range, prereleases=prereleases)
    if picked is None:
        return

    release = parse_release_tag(picked)
    assert picked in tags
    assert release is not None
    assert parse_release_range(release_range).contains(release)
    assert prereleases or not release.is_prerelease


@given(tags=_tag_lists, release_range=_ranges, prereleases=st.booleans())
def test_no_higher_tag_in_range(tags: list[str], release_range: str, prereleases: bool) -> None:
    """No allowed tag in range is higher than the pick, and None means none is in range."""
    picked = pick_release(tags, release_range, prereleases=prereleases)
    parsed_range = parse_release_range(release_range)
    allowed = [
        release
        for release in map(parse_release_tag, tags)
        if release is not None
        and (prereleases or not release.is_prerelease)
        and parsed_range.contains(release)
    ]

    if picked is None:
        assert allowed == []
        return
    best = parse_release_tag(picked)
    assert best is not None
    assert all(release.key <= best.key for release in allowed)


@given(
    tags=_tag_lists,
    release_range=_ranges,
    prereleases=st.booleans(),
    data=st.data(),
)
def test_pick_ignores_tag_order(
    tags: list[str], release_range: str, prereleases: bool, data: st.DataObject
) -> None:
    """Any permutation of the tag list gives the same pick."""
    shuffled = data.draw(st.permutations(tags))

    assert pick_release(shuffled, release_range, prereleases=prereleases) == pick_release(
        tags, release_range, prereleases=prereleases
    )


# --- Image age -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "2025-10-01T12:34:56.123456789Z",
            datetime(2025, 10, 1, 12, 34, 56, 123456, tzinfo=UTC),
        ),
        ("2025-10-01T12:34:56Z", datetime(2025, 10, 1, 12, 34, 56, tzinfo=UTC)),
        ("2025-10-01t12:34:56.5z", datetime(2025, 10, 1, 12, 34, 56, 500000, tzinfo=UTC)),
        ("2025-10-01 12:34:56+02:00", datetime(2025, 10, 1, 10, 34, 56, tzinfo=UTC)),
        ("2025-10-01T00:30:00-01:30", datetime(2025, 10, 1, 2, 0, 0, tzinfo=UTC)),
        ("2016-12-31T23:59:60Z", datetime(2016, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)),
        ("1970-01-01T00:00:00Z", datetime(1970, 1, 1, tzinfo=UTC)),
    ],
)
def test_parse_created(text: str, expected: datetime) -> None:
    """RFC 3339 timestamps with nanoseconds and offsets become UTC datetimes."""
    parsed = parse_created(text)

    assert parsed == expected
    assert parsed.tzinfo is UTC


@pytest.mark.parametrize(
    "text",
    [
        "2025-10-01T12:34:56",
        "2025-10-01",
        "2025-10-01T12:34Z",
        "2025-13-01T12:34:56Z",
        "2025-02-30T12:34:56Z",
        "2025-10-01T24:00:00Z",
        "2025-10-01T12:34:56+0200",
        "2025-10-01T12:34:56+24:00",
        "2025-10-01T12:34:56+02:60",
        "2025-10-01T12:34:56.Z",
        "yesterday",
    ],
)
def test_parse_created_invalid(text: str) -> None:
    """Timestamps without an offset or with invalid fields are rejected with the value."""
    with pytest.raises(ValueError, match="invalid timestamp") as caught:
        parse_created(text)

    assert repr(text) in str(caught.value)


def test_config_created() -> None:
    """An image config's created field is parsed; a missing one gives None."""
    assert config_created({"created": "2025-10-01T12:34:56.1Z"}) == datetime(
        2025, 10, 1, 12, 34, 56, 100000, tzinfo=UTC
    )
    assert config_created({"architecture": "amd64"}) is None
    with pytest.raises(ValueError, match="'created' is 5, not a string"):
        config_created({"created": 5})


CREATED = datetime(2025, 10, 1, 12, 0, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("age", "min_age", "expected"),
    [
        (timedelta(days=3), 3 * 86400, True),
        (timedelta(days=3) - timedelta(microseconds=1), 3 * 86400, False),
        (timedelta(0), 0, True),
        (timedelta(seconds=-60), 0, True),
        (timedelta(seconds=-60), 1, False),
        (timedelta(hours=1), 3599.5, True),
    ],
)
def test_old_enough(age: timedelta, min_age: float, expected: bool) -> None:
    """The image is old enough once now minus created reaches the minimum age."""
    assert old_enough(CREATED, CREATED + age, min_age) is expected


def test_old_enough_other_zone() -> None:
    """Datetimes in different time zones compare by instant."""
    now = (CREATED + timedelta(hours=2)).astimezone(timezone(timedelta(hours=-7)))

    assert old_enough(CREATED, now, 7200)
    assert not old_enough(CREATED, now, 7201)


def test_old_enough_rejects_naive_and_negative() -> None:
    """Naive datetimes and negative ages raise ValueError."""
    with pytest.raises(ValueError, match="time-zone-aware"):
        old_enough(CREATED.replace(tzinfo=None), CREATED, 1)
    with pytest.raises(ValueError, match="invalid minimum age -1 s"):
        old_enough(CREATED, CREATED, -1)
