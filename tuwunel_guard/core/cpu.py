"""The host CPU's x86-64 micro-architecture level, and the image variant it can run.

Tuwunel publishes two ``linux/amd64`` builds: x86-64-v1 and x86-64-v3. The v3 build dies with
"Illegal instruction" on a CPU without the v3 features, and Docker 26 picks the variant by the
host's level on its own. The guard makes the same choice explicitly, with a reason a person can
check, and pins the digest it chose.

The levels and their features come from the x86-64 psABI (System V Application Binary
Interface, AMD64 Architecture Processor Supplement, table "Micro-Architecture Levels"), which
glibc implements in ``sysdeps/x86/get-isa-level.h``. Each level includes the ones below it:

* v1, the x86-64 baseline: CMOV, CMPXCHG8B, FPU, FXSR, MMX, OSFXSR, SCE, SSE, SSE2. Linux needs
  these to run in 64-bit mode at all, so every x86-64 Linux host has v1 and its flags are not
  checked;
* v2: CMPXCHG16B, LAHF-SAHF, POPCNT, SSE3, SSE4_1, SSE4_2, SSSE3;
* v3: AVX, AVX2, BMI1, BMI2, F16C, FMA, LZCNT, MOVBE, OSXSAVE;
* v4: AVX512F, AVX512BW, AVX512CD, AVX512DQ, AVX512VL.

``/proc/cpuinfo`` spells some of these differently: SSE3 is ``pni``, CMPXCHG16B is ``cx16``,
LAHF-SAHF is ``lahf_lm`` and LZCNT is ``abm``. Linux does not list OSXSAVE, but it removes
``xsave`` and every AVX flag when the kernel does not enable XSAVE, so ``xsave`` is checked in
its place.
A flag counts only when every processor lists it.

Everything here is pure: the caller reads ``/proc/cpuinfo`` and passes its text.

NOTE: this describes the CPU the guard runs on. With ``[engine] socket`` pointing at an engine
on another host, that engine's CPU may differ.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from tuwunel_guard.core.platforms import IndexEntry, normalize_platform

MIN_LEVEL = 1
MAX_LEVEL = 4

# The features each level adds, as (flag in /proc/cpuinfo, psABI name when it differs).
LEVEL_FEATURES: dict[int, tuple[tuple[str, str], ...]] = {
    2: (
        ("cx16", "CMPXCHG16B"),
        ("lahf_lm", "LAHF-SAHF"),
        ("popcnt", ""),
        ("pni", "SSE3"),
        ("sse4_1", ""),
        ("sse4_2", ""),
        ("ssse3", ""),
    ),
    3: (
        ("avx", ""),
        ("avx2", ""),
        ("bmi1", ""),
        ("bmi2", ""),
        ("f16c", ""),
        ("fma", ""),
        ("abm", "LZCNT"),
        ("movbe", ""),
        ("xsave", "OSXSAVE"),
    ),
    4: (
        ("avx512f", ""),
        ("avx512bw", ""),
        ("avx512cd", ""),
        ("avx512dq", ""),
        ("avx512vl", ""),
    ),
}

_FLAGS_LINE = re.compile(r"^flags\s*:(?P<flags>.*)$", re.MULTILINE)
# Per-platform tags such as v1.9.0-release-all-x86_64-v3-linux-gnu name the level this way.
_TAG_LEVEL = re.compile(r"(?:^|[-_.])x86[_-]64-v(?P<level>[1-4])(?:$|[-_.])")


def _feature_name(flag: str, psabi_name: str) -> str:
    return f"{flag} ({psabi_name})" if psabi_name else flag


@dataclass(frozen=True)
class CpuLevel:
    """The x86-64 level of a CPU (1 to 4) and the ``/proc/cpuinfo`` flags it was found from."""

    level: int
    flags: frozenset[str]

    def missing(self, level: int) -> tuple[str, ...]:
        """List the features that ``level`` and the levels below it need and the CPU lacks.

        Each feature is its ``/proc/cpuinfo`` flag, followed by its psABI name when that
        differs, such as ``abm (LZCNT)``.
        """
        return tuple(
            _feature_name(flag, psabi_name)
            for needed in range(MIN_LEVEL + 1, level + 1)
            for flag, psabi_name in LEVEL_FEATURES[needed]
            if flag not in self.flags
        )

    def __str__(self) -> str:
        return f"x86-64-v{self.level}"


def parse_cpu_flags(cpuinfo: str) -> frozenset[str]:
    """Return the flags that every processor in ``/proc/cpuinfo`` text lists.

    Raises:
        ValueError: when the text has no ``flags`` line, as on non-x86 CPUs.
    """
    lines = [match["flags"].split() for match in _FLAGS_LINE.finditer(cpuinfo)]
    if not lines:
        raise ValueError(
            "/proc/cpuinfo has no 'flags' line, so this is not an x86 CPU; x86-64 levels "
            "apply only to amd64 hosts"
        )
    common = set(lines[0])
    for flags in lines[1:]:
        common.intersection_update(flags)
    return frozenset(common)


def cpu_level(flags: Iterable[str]) -> CpuLevel:
    """Find the highest x86-64 level whose features, and those of every level below, are in
    ``flags``."""
    present = frozenset(flags)
    level = MIN_LEVEL
    for candidate in range(MIN_LEVEL + 1, MAX_LEVEL + 1):
        if any(flag not in present for flag, _ in LEVEL_FEATURES[candidate]):
            break
        level = candidate
    return CpuLevel(level, present)


def cpu_level_from_cpuinfo(cpuinfo: str) -> CpuLevel:
    """Find the x86-64 level from the text of ``/proc/cpuinfo``.

    Raises:
        ValueError: when the text has no ``flags`` line.
    """
    return cpu_level(parse_cpu_flags(cpuinfo))


# --- Variant choice ----------------------------------------------------------------------------

Candidate = TypeVar("Candidate", IndexEntry, str)


@dataclass(frozen=True)
class VariantChoice(Generic[Candidate]):
    """The variant picked for a CPU, or ``None`` when no candidate fits, with the reason."""

    chosen: Candidate | None
    level: int | None
    reason: str


def variant_level(candidate: IndexEntry | str) -> int | None:
    """Return the x86-64 level that an index entry or per-platform tag is built for.

    An index entry counts when its platform is ``amd64`` (or ``x86_64``) and its variant is
    empty (meaning v1) or ``v1`` to ``v4``; attestation entries never count. A tag counts when
    it contains ``x86_64-vN`` between separators, such as
    ``v1.9.0-release-all-x86_64-v3-linux-gnu``. Everything else gives ``None``.
    """
    if isinstance(candidate, str):
        match = _TAG_LEVEL.search(candidate)
        return int(match["level"]) if match else None
    if candidate.attestation or candidate.platform is None:
        return None
    platform = normalize_platform(candidate.platform)
    if platform.architecture != "amd64":
        return None
    level_text = platform.variant.removeprefix("v")
    if not level_text.isdigit() or not MIN_LEVEL <= int(level_text) <= MAX_LEVEL:
        return None
    return int(level_text)


def _describe(candidate: IndexEntry | str, level: int) -> str:
    where = candidate if isinstance(candidate, str) else candidate.describe()
    return f"x86-64-v{level} ({where})"


def _has_reason(level: int) -> str:
    if level == MIN_LEVEL:
        return "v1 is the x86-64 baseline"
    features = ", ".join(_feature_name(flag, name) for flag, name in LEVEL_FEATURES[level])
    return f"the CPU has every v{level} feature: {features}"


def pick_variant(candidates: Sequence[Candidate], host: CpuLevel) -> VariantChoice[Candidate]:
    """Pick the candidate built for the highest x86-64 level at or below the host's.

    ``candidates`` are index entries or per-platform tags; those that name no x86-64 level
    (see :func:`variant_level`) are ignored. The first listed wins a tie, as in Docker 26.
    The reason names the pick and why, and each higher variant skipped with the features the
    CPU lacks, for example ``picked x86-64-v1 (...) because v1 is the x86-64 baseline;
    skipped x86-64-v3 (...): the CPU lacks avx2, bmi1``.
    """
    levelled: list[tuple[int, Candidate]] = []
    for candidate in candidates:
        level = variant_level(candidate)
        if level is not None:
            levelled.append((level, candidate))
    if not levelled:
        return VariantChoice(None, None, "no candidate names an x86-64 level")

    fitting = [item for item in levelled if item[0] <= host.level]
    skipped: list[str] = [
        f"skipped {_describe(candidate, level)}: the CPU lacks {', '.join(host.missing(level))}"
        for level, candidate in sorted(levelled, key=lambda item: -item[0])
        if level > host.level
    ]
    if not fitting:
        reason = f"no candidate fits this CPU ({host}): " + "; ".join(skipped)
        return VariantChoice(None, None, reason)

    best_level = max(level for level, _ in fitting)
    chosen = next(candidate for level, candidate in fitting if level == best_level)
    reason = f"picked {_describe(chosen, best_level)} because {_has_reason(best_level)}"
    return VariantChoice(chosen, best_level, "; ".join([reason, *skipped]))
