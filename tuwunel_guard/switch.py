"""The switch from Synapse to Tuwunel, and the rollback when Tuwunel does not prove healthy.

Order of steps, and what a failure at each leaves behind:

1. preflight: ``compose config`` accepts both sides' files; the image is pulled by its manifest
   digest and the engine reports the expected image ID. A failure here leaves Synapse untouched.
2. Synapse's services are stopped (containers and volumes stay).
3. Tuwunel's services are started with the image variable set to the pinned image.
4. Tuwunel's health URLs answer as Tuwunel for several probes in a row.
5. The state file records Tuwunel as deployed.

A failure in steps 2 to 4 rolls back: Tuwunel's services stop, Synapse's start again and must
answer, and the manifest digest is recorded as failed. Nothing in either direction removes a
container, image or volume.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from tuwunel_guard.adapters import health
from tuwunel_guard.adapters.compose import Compose, ComposeProject
from tuwunel_guard.adapters.engine import Engine
from tuwunel_guard.adapters.state import State, StateStore, SwitchRecord
from tuwunel_guard.core.decision import Side
from tuwunel_guard.core.engine import EngineFacts
from tuwunel_guard.core.image import ImageFacts
from tuwunel_guard.errors import GuardError, HealthCheckFailed, SwitchError

log = structlog.get_logger("tuwunel_guard.switch")

HEALTH_CONFIRMATIONS = 3
"""Probes in a row that must show Tuwunel serving before the switch commits."""


@dataclass(frozen=True)
class HealthSettings:
    """How long and how often to probe health URLs."""

    timeout: float
    interval: float
    request_timeout: float = 5.0


@dataclass(frozen=True)
class SwitchPlan:
    """What to switch to: the verified image, pinned by its manifest digest."""

    image: ImageFacts
    pinned_image: str
    synapse: ComposeProject
    tuwunel: ComposeProject
    synapse_health_urls: tuple[str, ...]
    tuwunel_health_urls: tuple[str, ...]


@dataclass
class _Timeline:
    started: float
    synapse_stop_started: float | None = None
    tuwunel_first_answer: float | None = None


def expected_image_ids(engine: EngineFacts, image: ImageFacts) -> set[str]:
    """Return the image IDs the engine may report for ``image`` once it holds it.

    The classic image store reports the config digest; the containerd image store reports the
    manifest or index digest that was pulled.
    """
    if engine.image_store == "containerd":
        return {image.manifest_digest, image.tag_digest}
    return {image.config_digest}


class Switcher:
    """Carries out one switch, with its rollback, and records the outcome."""

    def __init__(
        self,
        engine: Engine,
        compose: Compose,
        store: StateStore,
        health_settings: HealthSettings,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.engine = engine
        self.compose = compose
        self.store = store
        self.health = health_settings
        self.clock = clock
        self.sleep = sleep

    def to_tuwunel(self, plan: SwitchPlan, engine_facts: EngineFacts, state: State) -> State:
        """Switch to Tuwunel; return the new state, or raise ``SwitchError`` after rolling back."""
        timeline = _Timeline(started=self.clock())
        wall_started = time.time()
        log.info(
            "switch_started",
            from_side=Side.SYNAPSE.value,
            to_side=Side.TUWUNEL.value,
            image=plan.pinned_image,
            tag_digest=plan.image.tag_digest,
            manifest_digest=plan.image.manifest_digest,
        )

        try:
            image_id = self._preflight(plan, engine_facts)
        except GuardError as error:
            log.error("switch_refused", step="preflight", error=str(error), image=plan.pinned_image)
            raise SwitchError(f"preflight failed, Synapse was left untouched: {error}") from error

        try:
            self._replace_synapse(plan, timeline)
        except GuardError as error:
            self._roll_back(plan, state, timeline, wall_started, error)
            raise SwitchError(f"the switch failed and was rolled back: {error}") from error

        return self._commit(plan, state, image_id, timeline, wall_started)

    def _preflight(self, plan: SwitchPlan, engine_facts: EngineFacts) -> str:
        self.compose.validate(plan.synapse)
        self.compose.validate(plan.tuwunel)

        self.engine.pull(plan.pinned_image)
        local = self.engine.inspect_image(plan.pinned_image)
        expected = expected_image_ids(engine_facts, plan.image)
        if local is None or local.image_id not in expected:
            found = local.image_id if local else "no image"
            raise SwitchError(
                f"after pulling {plan.pinned_image} the engine reports {found}, "
                f"expected {' or '.join(sorted(expected))}"
            )

        _step("image_verified", image=plan.pinned_image, image_id=local.image_id)
        return local.image_id

    def _replace_synapse(self, plan: SwitchPlan, timeline: _Timeline) -> None:
        timeline.synapse_stop_started = self.clock()
        self.compose.stop(plan.synapse)
        _step("synapse_stopped", services=list(plan.synapse.services))

        self.compose.up(plan.tuwunel)
        _step("tuwunel_started", services=list(plan.tuwunel.services), image=plan.pinned_image)

        answer_at = self._wait_healthy(plan.tuwunel_health_urls, Side.TUWUNEL)
        timeline.tuwunel_first_answer = answer_at
        _step("tuwunel_healthy", urls=list(plan.tuwunel_health_urls))

    def _wait_healthy(self, urls: tuple[str, ...], side: Side) -> float:
        """Probe ``urls`` until one serves ``side`` several times in a row; return the first
        time it did. Raise ``HealthCheckFailed`` at the deadline with the last answers."""
        deadline = self.clock() + self.health.timeout
        streak = 0
        first_answer: float | None = None
        last: list[health.HealthAnswer] = []

        while True:
            last = [health.probe(url, self.health.request_timeout) for url in urls]
            if any(answer.serves(side) for answer in last):
                first_answer = first_answer if first_answer is not None else self.clock()
                streak += 1
                if streak >= HEALTH_CONFIRMATIONS:
                    return first_answer
            else:
                streak = 0
                first_answer = None

            if self.clock() >= deadline:
                details = "; ".join(f"{answer.url}: {answer.detail}" for answer in last)
                raise HealthCheckFailed(
                    f"{side.value} did not answer as {side.value} within "
                    f"{self.health.timeout:.0f}s ({details})"
                )
            self.sleep(self.health.interval)

    def _commit(
        self,
        plan: SwitchPlan,
        state: State,
        image_id: str,
        timeline: _Timeline,
        wall_started: float,
    ) -> State:
        window = _window(timeline)
        state.deployed = Side.TUWUNEL
        state.pinned_image = plan.pinned_image
        state.tag_digest = plan.image.tag_digest
        state.manifest_digest = plan.image.manifest_digest
        state.image_id = image_id
        state.last_switch = SwitchRecord(
            started_at=wall_started,
            finished_at=time.time(),
            from_side=Side.SYNAPSE.value,
            to_side=Side.TUWUNEL.value,
            outcome="committed",
            manifest_digest=plan.image.manifest_digest,
            window_seconds=window,
        )
        self.store.save(state)

        log.info(
            "switch_committed",
            from_side=Side.SYNAPSE.value,
            to_side=Side.TUWUNEL.value,
            image=plan.pinned_image,
            tag_digest=plan.image.tag_digest,
            manifest_digest=plan.image.manifest_digest,
            image_id=image_id,
            duration_seconds=round(self.clock() - timeline.started, 3),
            window_seconds=window,
            outcome="committed",
        )
        return state

    def _roll_back(
        self,
        plan: SwitchPlan,
        state: State,
        timeline: _Timeline,
        wall_started: float,
        cause: GuardError,
    ) -> None:
        log.warning(
            "rollback_started", cause=str(cause), manifest_digest=plan.image.manifest_digest
        )
        outcome = "rolled-back"
        detail = str(cause)
        try:
            self.compose.stop(plan.tuwunel)
            self.compose.up(plan.synapse)
            synapse_back = self._wait_healthy(plan.synapse_health_urls, Side.SYNAPSE)
        except GuardError as error:
            outcome = "rollback-failed"
            detail = f"{cause}; then the rollback failed: {error}"
            synapse_back = None
            log.critical("rollback_failed", error=str(error), cause=str(cause))

        window = None
        if synapse_back is not None and timeline.synapse_stop_started is not None:
            window = round(synapse_back - timeline.synapse_stop_started, 3)

        state.deployed = Side.SYNAPSE
        if plan.image.manifest_digest not in state.failed_manifest_digests:
            state.failed_manifest_digests.append(plan.image.manifest_digest)
        state.last_switch = SwitchRecord(
            started_at=wall_started,
            finished_at=time.time(),
            from_side=Side.SYNAPSE.value,
            to_side=Side.TUWUNEL.value,
            outcome=outcome,
            manifest_digest=plan.image.manifest_digest,
            window_seconds=window,
            detail=detail,
        )
        self.store.save(state)

        log.info(
            "rollback_completed",
            from_side=Side.TUWUNEL.value,
            to_side=Side.SYNAPSE.value,
            image=plan.pinned_image,
            manifest_digest=plan.image.manifest_digest,
            duration_seconds=round(self.clock() - timeline.started, 3),
            window_seconds=window,
            outcome=outcome,
            cause=str(cause),
        )


def _window(timeline: _Timeline) -> float | None:
    if timeline.synapse_stop_started is None or timeline.tuwunel_first_answer is None:
        return None
    return round(timeline.tuwunel_first_answer - timeline.synapse_stop_started, 3)


def _step(name: str, **fields: object) -> None:
    log.info("switch_step_completed", step=name, **fields)
