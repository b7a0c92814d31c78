"""The verdict: can this engine run this image natively? Pure logic, no I/O."""

from __future__ import annotations

from dataclasses import dataclass

from tuwunel_guard.core.engine import (
    MINIMUM_API_VERSION,
    Capability,
    EngineFacts,
    capabilities_of,
    capability_row,
)
from tuwunel_guard.core.image import ImageFacts, Requirement


@dataclass(frozen=True)
class Verdict:
    """Whether the engine can pull and run the image, with the reasons in plain words.

    ``missing`` lists the image requirements the engine lacks; it is empty when compatible.
    """

    compatible: bool
    reasons: tuple[str, ...]
    missing: tuple[Requirement, ...] = ()

    @property
    def name(self) -> str:
        """Return ``compatible`` or ``incompatible``, the word used in logs and JSON."""
        return "compatible" if self.compatible else "incompatible"

    @property
    def reason(self) -> str:
        """Return the reasons joined into one line."""
        return "; ".join(self.reasons)


def reach_verdict(engine: EngineFacts, image: ImageFacts) -> Verdict:
    """Compare the engine's capabilities with the image's requirements."""
    if engine.api_version < MINIMUM_API_VERSION:
        return Verdict(
            compatible=False,
            reasons=(
                f"Docker {engine.version} offers engine API {engine.api_version}, "
                f"but the guard needs API {MINIMUM_API_VERSION} or later",
            ),
        )

    capabilities = capabilities_of(engine.version)
    lacking = [
        item for item in image.requirements if Capability(item.requirement) not in capabilities
    ]
    missing = [item for item in lacking if not item.requirement.index_level]
    sidestepped = tuple(
        _sidestepped_reason(engine, item.requirement)
        for item in lacking
        if item.requirement.index_level
    )
    if not missing:
        return Verdict(compatible=True, reasons=(_compatible_reason(engine, image), *sidestepped))

    return Verdict(
        compatible=False,
        reasons=tuple(_missing_reason(engine, item.requirement, item.evidence) for item in missing),
        missing=tuple(item.requirement for item in missing),
    )


def _compatible_reason(engine: EngineFacts, image: ImageFacts) -> str:
    if not image.requirements:
        return (
            f"Docker {engine.version} can run {image.reference}: the image needs no special feature"
        )

    needed = ", ".join(str(item.requirement) for item in image.requirements)
    return f"Docker {engine.version} can run {image.reference}: it supports {needed}"


def _sidestepped_reason(engine: EngineFacts, requirement: Requirement) -> str:
    row = capability_row(Capability(requirement))
    return (
        f"Docker {engine.version} cannot {row.what}, but the guard pulls the platform's "
        "manifest by its digest, so the engine never reads the index"
    )


def _missing_reason(engine: EngineFacts, requirement: Requirement, evidence: str) -> str:
    row = capability_row(Capability(requirement))
    return (
        f"Docker {engine.version} cannot {row.what}, which needs {row.since} or later "
        f"({row.source}); the image needs it: {evidence}"
    )
