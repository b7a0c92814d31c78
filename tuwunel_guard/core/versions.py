"""Release tags, release ranges and image age: which tag to track, and whether it is old enough.

Everything here is pure.

Tag grammar. A *release tag* is ``MAJOR.MINOR.PATCH``, optionally prefixed with ``v`` and
optionally followed by a pre-release suffix: ``v1.9.0``, ``1.9.0``, ``v1.10.0-rc.1``. Every other
tag is ignored by :func:`pick_release`, in particular:

* rolling tags such as ``latest``, ``preview``, ``main``, and ``v1.9`` or ``1``, which move to
  newer releases;
* per-platform build tags such as ``v1.9.0-release-all-x86_64-v1-linux-gnu``. SemVer would read
  ``-release-all-...`` as a pre-release, so a suffix counts as a pre-release only when its first
  part is one of the labels ``alpha``, ``beta`` or ``rc``, optionally followed by numbers
  (``-rc.1``, ``-rc1``, ``-beta.2.1``, ``-alpha``). Any other suffix makes the tag a build
  variant of a release, not a release.

Order. Releases compare by major, minor and patch. A pre-release comes before its release, and
pre-releases of one version compare by label (``alpha`` < ``beta`` < ``rc``) and then by their
numbers, numerically (``rc.2`` < ``rc.10``). Tags that differ only in spelling (``v1.9.0`` and
``1.9.0``) are the same release, and :func:`pick_release` then returns the greater string, so
that the result never depends on the order of the tag list.

Range grammar: comparisons joined by commas, all of which must hold, such as ``>=1.9,<2``.
The operators are ``>=``, ``>``, ``<=``, ``<``, ``==``, ``!=`` and ``~=``. A version in a
range may omit trailing parts (``2`` means ``2.0.0``) and may carry a pre-release suffix.

* ``==1.9`` and ``!=1.9`` compare only the parts written, so ``==1.9`` matches every 1.9.x.
* ``~=1.9`` means ``>=1.9,==1.*`` and ``~=1.9.2`` means ``>=1.9.2,==1.9.*``, as in PEP 440.
  It needs at least two parts.
* ``<2`` excludes pre-releases of 2.0.0 (PEP 440 does the same), so ``<2`` means "before the
  2.x series" even when pre-releases are allowed. ``<2.0.0-rc.1`` compares plainly.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from typing import Any, Literal

PRERELEASE_LABELS = ("alpha", "beta", "rc")

_NUMBER = r"0|[1-9]\d*"
_PRERELEASE = rf"(?P<label>{'|'.join(PRERELEASE_LABELS)})(?P<numbers>(?:[.-]?\d+)(?:[.-]\d+)*)?"
_RELEASE_TAG = re.compile(
    rf"^v?(?P<major>{_NUMBER})\.(?P<minor>{_NUMBER})\.(?P<patch>{_NUMBER})(?:-{_PRERELEASE})?$"
)
_RANGE_VERSION = re.compile(
    rf"^v?(?P<major>{_NUMBER})(?:\.(?P<minor>{_NUMBER})(?:\.(?P<patch>{_NUMBER})"
    rf"(?:-{_PRERELEASE})?)?)?$"
)
_COMPARISON = re.compile(r"^(?P<operator>~=|==|!=|>=|<=|>|<)\s*(?P<version>\S+)$")
_RANGE_EXAMPLE = "'>=1.9,<2'"

Operator = Literal["~=", "==", "!=", ">=", "<=", ">", "<"]
_ORDERINGS: dict[str, Callable[[Any, Any], bool]] = {
    ">=": operator.ge,
    ">": operator.gt,
    "<=": operator.le,
    "<": operator.lt,
}


@dataclass(frozen=True)
class Release:
    """A parsed release tag or range version.

    ``prerelease`` is empty for a release, else the label and its numbers, such as
    ``("rc", 1)``. ``text`` is the tag as written.
    """

    major: int
    minor: int
    patch: int
    prerelease: tuple[str | int, ...] = ()
    text: str = ""

    @property
    def is_prerelease(self) -> bool:
        """Whether this is a pre-release (``-alpha``, ``-beta`` or ``-rc``)."""
        return bool(self.prerelease)

    @property
    def core(self) -> tuple[int, int, int]:
        """Major, minor and patch, without the pre-release."""
        return (self.major, self.minor, self.patch)

    @property
    def key(self) -> tuple[int, int, int, int, int, tuple[int, ...]]:
        """Sort key: release order, with pre-releases before their release."""
        if not self.prerelease:
            return (*self.core, 1, 0, ())
        label, *numbers = self.prerelease
        rank = PRERELEASE_LABELS.index(str(label))
        return (*self.core, 0, rank, tuple(int(number) for number in numbers))

    def __str__(self) -> str:
        return self.text or ".".join(str(part) for part in self.core)


def _prerelease_parts(label: str | None, numbers: str | None) -> tuple[str | int, ...]:
    if label is None:
        return ()
    digits = re.findall(r"\d+", numbers or "")
    return (label, *(int(number) for number in digits))


def parse_release_tag(tag: str) -> Release | None:
    """Parse a release tag, or return ``None`` for a tag that is not a release.

    See the module docstring for the grammar and for the tags that are not releases.
    """
    match = _RELEASE_TAG.match(tag)
    if match is None:
        return None
    return Release(
        major=int(match["major"]),
        minor=int(match["minor"]),
        patch=int(match["patch"]),
        prerelease=_prerelease_parts(match["label"], match["numbers"]),
        text=tag,
    )


@dataclass(frozen=True)
class Comparison:
    """One ``OPERATOR VERSION`` part of a release range; ``parts`` counts the numbers written."""

    operator: Operator
    version: Release
    parts: int

    def matches(self, release: Release) -> bool:
        """Tell whether ``release`` satisfies this comparison."""
        if self.operator == "==":
            return self._prefix_equal(release)
        if self.operator == "!=":
            return not self._prefix_equal(release)
        if self.operator == "~=":
            written = self.parts - 1
            same_series = release.core[:written] == self.version.core[:written]
            return same_series and release.key >= self.version.key
        if self.operator == "<" and release.is_prerelease and not self.version.is_prerelease:
            # A pre-release of the bound's own version is not "before" it.
            return release.core < self.version.core
        return _ORDERINGS[self.operator](release.key, self.version.key)

    def _prefix_equal(self, release: Release) -> bool:
        if self.parts < 3:
            return release.core[: self.parts] == self.version.core[: self.parts]
        return release.key == self.version.key

    def __str__(self) -> str:
        return f"{self.operator}{self.version}"


@dataclass(frozen=True)
class ReleaseRange:
    """A parsed release range: every comparison must hold. ``text`` is the range as written."""

    text: str
    comparisons: tuple[Comparison, ...]

    def contains(self, release: Release) -> bool:
        """Tell whether ``release`` satisfies every comparison of the range."""
        return all(comparison.matches(release) for comparison in self.comparisons)

    def __str__(self) -> str:
        return self.text


def _range_error(text: str, problem: str) -> ValueError:
    return ValueError(
        f"invalid release range {text!r}: {problem}; write comparisons joined by commas, such "
        f"as {_RANGE_EXAMPLE}, with the operators >=, >, <=, <, ==, != or ~="
    )


def _parse_comparison(text: str, part: str) -> Comparison:
    match = _COMPARISON.match(part)
    if match is None:
        raise _range_error(text, f"{part!r} does not start with an operator")
    comparator: Operator = match["operator"]  # type: ignore[assignment]
    version_text = match["version"]
    version = _RANGE_VERSION.match(version_text)
    if version is None:
        raise _range_error(text, f"{version_text!r} is not a version such as 1.9 or 1.10.0-rc.1")
    numbers = [version["major"], version["minor"], version["patch"]]
    parts = sum(number is not None for number in numbers)
    if comparator == "~=" and parts < 2:
        raise _range_error(text, f"'~=' needs at least MAJOR.MINOR, got {version_text!r}")
    release = Release(
        major=int(numbers[0]),
        minor=int(numbers[1] or 0),
        patch=int(numbers[2] or 0),
        prerelease=_prerelease_parts(version["label"], version["numbers"]),
        text=version_text,
    )
    return Comparison(comparator, release, parts)


def parse_release_range(text: str) -> ReleaseRange:
    """Parse a release range such as ``>=1.9,<2``; see the module docstring for the grammar.

    Raises:
        ValueError: when the range is empty or a part is not ``OPERATOR VERSION``. The message
            names the range and shows a valid one.
    """
    parts = [part.strip() for part in text.split(",")]
    if not text.strip():
        raise _range_error(text, "it is empty")
    if any(not part for part in parts):
        raise _range_error(text, "it has an empty comparison between commas")
    comparisons = tuple(_parse_comparison(text, part) for part in parts)
    return ReleaseRange(text.strip(), comparisons)


def pick_release(
    tags: Iterable[str], release_range: str | ReleaseRange, *, prereleases: bool
) -> str | None:
    """Return the highest release tag within ``release_range``, or ``None`` when none is.

    Tags that are not releases (see the module docstring) are ignored, and so are pre-releases
    unless ``prereleases`` is true. The result does not depend on the order of ``tags``.

    Raises:
        ValueError: when ``release_range`` is a string that is not a valid range.
    """
    parsed_range = (
        release_range
        if isinstance(release_range, ReleaseRange)
        else parse_release_range(release_range)
    )
    best: Release | None = None
    for tag in tags:
        release = parse_release_tag(tag)
        if release is None or (release.is_prerelease and not prereleases):
            continue
        if not parsed_range.contains(release):
            continue
        if best is None or (release.key, release.text) > (best.key, best.text):
            best = release
    return None if best is None else best.text


# --- Image age ---------------------------------------------------------------------------------

_RFC3339 = re.compile(
    r"^(?P<date>\d{4}-\d{2}-\d{2})[Tt ](?P<hour>\d{2}):(?P<minute>\d{2}):(?P<second>\d{2})"
    r"(?:\.(?P<fraction>\d+))?(?P<offset>[Zz]|[+-]\d{2}:\d{2})$"
)


def parse_created(text: str) -> datetime:
    """Parse an RFC 3339 timestamp, as in an image config's ``created``, into UTC.

    Fractions finer than a microsecond (Go writes nanoseconds) are cut off, which makes the time
    at most 1 µs earlier. A leap second (``:60``) becomes ``:59.999999``.

    Raises:
        ValueError: when ``text`` is not an RFC 3339 date and time with a UTC offset.
    """
    match = _RFC3339.match(text.strip())
    if match is None:
        raise ValueError(
            f"invalid timestamp {text!r}: expected RFC 3339 with a UTC offset, such as "
            "2025-10-01T12:34:56.123456789Z"
        )
    second = int(match["second"])
    microsecond = int((match["fraction"] or "0")[:6].ljust(6, "0"))
    if second == 60:
        second, microsecond = 59, 999_999
    try:
        local = datetime.fromisoformat(
            f"{match['date']}T{match['hour']}:{match['minute']}:{second:02d}"
        ).replace(microsecond=microsecond, tzinfo=_zone(match["offset"]))
    except ValueError as error:
        raise ValueError(f"invalid timestamp {text!r}: {error}") from None
    return local.astimezone(UTC)


def _zone(offset: str) -> timezone:
    """Turn ``Z`` or ``+HH:MM`` into a time zone; raise ``ValueError`` beyond 23:59."""
    if offset.upper() == "Z":
        return UTC
    sign = -1 if offset[0] == "-" else 1
    hours, minutes = int(offset[1:3]), int(offset[4:6])
    if minutes > 59:
        raise ValueError(f"offset {offset} has more than 59 minutes")
    return timezone(sign * timedelta(hours=hours, minutes=minutes))


def config_created(config: Mapping[str, Any]) -> datetime | None:
    """Return the ``created`` time of an image config, or ``None`` when the field is absent.

    NOTE: reproducible builds often set ``created`` to the Unix epoch (``SOURCE_DATE_EPOCH``),
    and such an image always looks old enough.

    Raises:
        ValueError: when ``created`` is present but not a valid RFC 3339 string.
    """
    created = config.get("created")
    if created is None:
        return None
    if not isinstance(created, str):
        raise ValueError(f"invalid image config: 'created' is {created!r}, not a string")
    return parse_created(created)


def old_enough(created: datetime, now: datetime, min_age_seconds: float) -> bool:
    """Tell whether an image created at ``created`` is at least ``min_age_seconds`` old at ``now``.

    An image created after ``now`` (clock skew) is not old enough unless the minimum age is 0.

    Raises:
        ValueError: when a datetime has no time zone or ``min_age_seconds`` is negative.
    """
    if created.tzinfo is None or now.tzinfo is None:
        raise ValueError("old_enough needs time-zone-aware datetimes, such as from parse_created")
    if min_age_seconds < 0:
        raise ValueError(f"invalid minimum age {min_age_seconds} s: it must be 0 or more")
    if min_age_seconds == 0:
        return True
    return (now - created).total_seconds() >= min_age_seconds
