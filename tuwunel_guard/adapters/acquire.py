"""Ways to get the Tuwunel image onto the engine, one per strategy route.

Each way returns an :class:`AcquiredImage`: the reference that compose gets through the image
variable, and the image ID the engine reports for it. The switch checks that ID against the
engine before anything stops, because an exit status alone can lie (Docker 20.10 reports a pull
of an image whose config it already holds as done without reading a layer, and ``docker load``
of a partial archive exits 0 while loading nothing).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from tuwunel_guard.adapters.engine import Engine
from tuwunel_guard.core.engine import EngineFacts
from tuwunel_guard.core.image import ImageFacts
from tuwunel_guard.core.reference import ImageReference
from tuwunel_guard.errors import SwitchError

Progress = Callable[[int, int], None]
"""Called with (bytes done, bytes in all) while an image is fetched, converted or built."""


@dataclass(frozen=True)
class AcquiredImage:
    """An image on the engine: the reference compose is given, and the ID the engine reports."""

    local_reference: str
    image_id: str


class ImageAcquirer(Protocol):
    """Gets the target image onto the engine by one route (native pull, convert, podman, build)."""

    route: str

    def acquire(
        self, reference: ImageReference, image: ImageFacts, progress: Progress | None = None
    ) -> AcquiredImage:
        """Put ``image`` on the engine and return how compose names it.

        Raises a ``GuardError`` subclass when any step fails; the engine may then hold a partial
        image but nothing deployed has changed.
        """
        ...


class PullAcquirer:
    """The native route: the engine pulls the image itself, pinned by its manifest digest."""

    route = "native"

    def __init__(self, engine: Engine, engine_facts: EngineFacts) -> None:
        self.engine = engine
        self.engine_facts = engine_facts

    def acquire(
        self, reference: ImageReference, image: ImageFacts, progress: Progress | None = None
    ) -> AcquiredImage:
        """Pull ``image`` by digest and check that the engine reports the expected image ID."""
        pinned = reference.with_digest(image.manifest_digest)
        self.engine.pull(pinned, on_progress=lambda status: progress(0, 0) if progress else None)

        local = self.engine.inspect_image(pinned)
        expected = expected_image_ids(self.engine_facts, image)
        if local is None or local.image_id not in expected:
            found = local.image_id if local else "no image"
            raise SwitchError(
                f"after pulling {pinned} the engine reports {found}, "
                f"expected {' or '.join(sorted(expected))}"
            )
        return AcquiredImage(local_reference=pinned, image_id=local.image_id)


class KeptImage:
    """No new image: the target runs an image already on the engine (a switch back to Synapse)."""

    route = "none"

    def __init__(self, engine: Engine, local_reference: str) -> None:
        self.engine = engine
        self.local_reference = local_reference

    def acquire(
        self, reference: ImageReference, image: ImageFacts, progress: Progress | None = None
    ) -> AcquiredImage:
        """Return the image the engine holds under ``local_reference``; raise if it is gone."""
        local = self.engine.inspect_image(self.local_reference)
        if local is None:
            raise SwitchError(
                f"image {self.local_reference} was not found on the engine; pull or load it again"
            )
        return AcquiredImage(local_reference=self.local_reference, image_id=local.image_id)


def expected_image_ids(engine: EngineFacts, image: ImageFacts) -> set[str]:
    """Return the image IDs the engine may report for ``image`` once it holds it.

    The classic image store reports the config digest; the containerd image store reports the
    manifest or index digest that was pulled.
    """
    if engine.image_store == "containerd":
        return {image.manifest_digest, image.tag_digest}
    return {image.config_digest}
