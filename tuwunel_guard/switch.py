"""The switch between two deployed sides, with its health gate, rollback and crash recovery.

A switch moves the compose deployment from a *source* (Synapse, or Tuwunel with its current
image) to a *target* (Tuwunel with a new image). Its steps, each recorded in the state file
before it runs, so that a restart can finish or undo a switch that was killed halfway:

1. ``image_verified``: ``compose config`` accepts both sides' files, the health URL's port is
   not held outside the deployment, the image is on the engine with the expected image ID, and
   the optional backup of the source's volumes is written. A failure here leaves the source
   untouched.
2. ``<source>_stopped``: the source's services stop.
3. ``<target>_started``: the target's services start with the image variable set.
4. ``<target>_healthy``: the health gate passes (see :meth:`Switcher.wait_healthy`).
5. ``committed``: the state file records the target as deployed, in the same write that
   clears the record of the switch.

A failure in steps 2 to 4 rolls back: the target's services stop, the source's start again
and must pass the health gate, and the manifest digest is recorded as failed. Nothing here
removes an image or a volume, and the guard itself removes no container. ``compose up`` does
replace a service's container when its image changes, as in a Tuwunel update.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import structlog

from tuwunel_guard.adapters import health, ports
from tuwunel_guard.adapters.acquire import AcquiredImage, ImageAcquirer
from tuwunel_guard.adapters.compose import Compose, ComposeProject
from tuwunel_guard.adapters.engine import Engine
from tuwunel_guard.adapters.state import State, StateStore, SwitchProgress, SwitchRecord
from tuwunel_guard.core.decision import Side
from tuwunel_guard.core.engine import EngineFacts
from tuwunel_guard.core.image import ImageFacts
from tuwunel_guard.core.reference import ImageReference
from tuwunel_guard.errors import GuardError, HealthCheckFailed, SwitchError, SwitchRefused
from tuwunel_guard.progress import NO_PROGRESS, Progress

log = structlog.get_logger("tuwunel_guard.switch")

FAULT_VARIABLE = "TUWUNEL_GUARD_TEST_FAULT"
"""Tests set this to a step name; the daemon then kills itself with SIGKILL right after that
step, to prove crash recovery. Nothing else reads it."""

HANG_VARIABLE = "TUWUNEL_GUARD_TEST_HANG"
"""Tests set this to a step name (or ``cycle``); the daemon then hangs there without signs of
progress, to prove that systemd's watchdog restarts it. Nothing else reads it."""

INTERRUPTED_ATTEMPTS_LIMIT = 2
"""Interrupted switches to one manifest digest after which the digest counts as failed, so a
crash that repeats at the same step cannot switch back and forth for ever."""


@dataclass(frozen=True)
class HealthSettings:
    """How long and how often to probe, and how many passing probes in a row prove health."""

    timeout: float
    interval: float
    confirmations: int = 3
    request_timeout: float = 5.0


@dataclass(frozen=True)
class SideDeployment:
    """One side of the deployment: its compose services and health URLs."""

    side: Side
    project: ComposeProject
    health_urls: tuple[str, ...]

    def with_image(self, variable: str, image: str) -> SideDeployment:
        """Return this side with the compose image variable set to ``image``."""
        environment = {**self.project.environment, variable: image}
        return replace(self, project=replace(self.project, environment=environment))


@dataclass(frozen=True)
class SwitchPlan:
    """The source and target sides of a switch, and the route that gets the target image."""

    source: SideDeployment
    target: SideDeployment
    image: ImageFacts
    reference: ImageReference
    image_variable: str
    acquirer: ImageAcquirer
    source_image: str = ""


@dataclass
class _Attempt:
    """One run of a switch: its plan, both sides with their images, and its record."""

    plan: SwitchPlan
    source: SideDeployment
    target: SideDeployment
    state: State
    progress: SwitchProgress
    timeline: _Timeline


@dataclass
class _Timeline:
    started: float
    wall_started: float
    source_stop_started: float | None = None
    target_first_answer: float | None = None
    events: dict[str, float] = field(default_factory=dict)


def fault_point(step: str) -> None:
    """Kill or hang the process at ``step`` when a test armed that fault; else do nothing."""
    if os.environ.get(FAULT_VARIABLE) == step:
        log.warning("fault_point_reached", step=step, fault="kill")
        os.kill(os.getpid(), signal.SIGKILL)
    if os.environ.get(HANG_VARIABLE) == step:
        log.warning("fault_point_reached", step=step, fault="hang")
        threading.Event().wait()


_fault = fault_point


class Switcher:
    """Carries out a switch with its health gate and rollback, and recovers interrupted ones."""

    def __init__(
        self,
        engine: Engine,
        compose: Compose,
        store: StateStore,
        health_settings: HealthSettings,
        *,
        engine_facts: EngineFacts,
        before_source_stops: Callable[[SideDeployment], None] | None = None,
        progress: Progress = NO_PROGRESS,
        report: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.engine = engine
        self.compose = compose
        self.store = store
        self.health = health_settings
        self.engine_facts = engine_facts
        self.before_source_stops = before_source_stops
        self.progress = progress
        self.report = report
        self._last_report = 0.0
        self.clock = clock
        self.sleep = sleep

    def switch(self, plan: SwitchPlan, state: State) -> State:
        """Run every step; return the committed state or raise ``SwitchError`` after undoing."""
        timeline = _Timeline(started=self.clock(), wall_started=time.time())
        progress = SwitchProgress(
            step="image_verified",
            from_side=plan.source.side.value,
            to_side=plan.target.side.value,
            from_image=plan.source_image,
            to_image="",
            manifest_digest=plan.image.manifest_digest,
            started_at=timeline.wall_started,
        )
        log.info(
            "switch_started",
            from_side=progress.from_side,
            to_side=progress.to_side,
            route=plan.acquirer.route,
            image=str(plan.reference),
            tag_digest=plan.image.tag_digest,
            manifest_digest=plan.image.manifest_digest,
        )

        self._record(state, progress)
        try:
            acquired = self._preflight(plan)
        except GuardError as error:
            state.switch_in_progress = None
            self.store.save(state)
            log.error(
                "switch_refused", step="preflight", error=str(error), image=str(plan.reference)
            )
            raise SwitchRefused(
                f"preflight failed, {plan.source.side.value} was left untouched: {error}"
            ) from error
        _fault("image_verified")

        progress.to_image = acquired.local_reference
        progress.image_id = acquired.image_id
        target = plan.target.with_image(plan.image_variable, acquired.local_reference)
        source = plan.source.with_image(plan.image_variable, acquired.local_reference)
        if plan.source.side is Side.TUWUNEL:
            source = plan.source.with_image(plan.image_variable, plan.source_image)

        attempt = _Attempt(plan, source, target, state, progress, timeline)
        try:
            self._replace(attempt)
        except GuardError as error:
            outcome = self._roll_back(attempt, error, failed=True)
            if outcome == "rollback-failed":
                raise SwitchError(
                    f"the switch failed and so did the rollback: {error}; "
                    f"{plan.source.side.value} may not be serving, so check "
                    "'docker compose ps' and the journal now"
                ) from error
            raise SwitchError(f"the switch failed and was rolled back: {error}") from error

        return self._commit(plan, state, progress, timeline)

    def _record(self, state: State, progress: SwitchProgress) -> None:
        state.switch_in_progress = progress
        self.store.save(state)

    def _preflight(self, plan: SwitchPlan) -> AcquiredImage:
        for side in (plan.source, plan.target):
            self.compose.validate(side.with_image(plan.image_variable, "preflight").project)

        owned = self._deployment_container_ids(plan)
        for url in plan.target.health_urls:
            ports.check_port_free_or_owned(url, owned)

        with self.progress.working(f"{plan.acquirer.route} route"):
            acquired = plan.acquirer.acquire(
                plan.reference,
                plan.image,
                progress=lambda done, total: self._on_progress(plan.acquirer.route, done, total),
            )
        local = self.engine.inspect_image(acquired.local_reference)
        if local is None or local.image_id != acquired.image_id:
            found = local.image_id if local else "no image"
            raise SwitchError(
                f"after the {plan.acquirer.route} route the engine reports {found} for "
                f"{acquired.local_reference}, expected {acquired.image_id}"
            )

        # A failed backup belongs to preflight: it must leave the source untouched.
        if self.before_source_stops is not None:
            self.before_source_stops(plan.source)

        _step("image_verified", image=acquired.local_reference, image_id=acquired.image_id)
        return acquired

    def _on_progress(self, route: str, done: int, total: int) -> None:
        self.progress.beat()
        now = self.clock()
        if self.report is None or not total or now - self._last_report < 1.0:
            return
        self._last_report = now
        self.report(
            f"{route} route: {done / 2**20:.0f} of {total / 2**20:.0f} MiB ({done / total:.0%})"
        )

    def _deployment_container_ids(self, plan: SwitchPlan) -> set[str]:
        owned: set[str] = set()
        for side in (plan.source, plan.target):
            containers = self.engine.service_containers(side.project.project, side.project.services)
            owned.update(container.container_id for container in containers)
        return owned

    def _replace(self, attempt: _Attempt) -> None:
        source, target, state = attempt.source, attempt.target, attempt.state
        progress, timeline = attempt.progress, attempt.timeline
        stopped_step = f"{source.side.value}_stopped"
        progress.step = stopped_step
        self._record(state, progress)
        timeline.source_stop_started = self.clock()
        self.compose.stop(source.project)
        _step(stopped_step, services=list(source.project.services))
        _fault(stopped_step)

        started_step = f"{target.side.value}_started"
        progress.step = started_step
        self._record(state, progress)
        self.compose.up(target.project)
        _step(started_step, services=list(target.project.services), image=progress.to_image)
        _fault(started_step)

        healthy_step = f"{target.side.value}_healthy"
        progress.step = healthy_step
        self._record(state, progress)
        timeline.target_first_answer = self.wait_healthy(target)
        _step(healthy_step, urls=[health.display_url(url) for url in target.health_urls])
        _fault(healthy_step)

    def wait_healthy(self, deployment: SideDeployment) -> float:
        """Wait until ``deployment`` passes the health gate; return when it first answered.

        The gate passes when, for ``confirmations`` probes in a row, a health URL answers as
        the side's server, every service container runs, none restarted since the gate began,
        and the engine's health status is ``healthy`` wherever the image or compose file
        defines a health check. Raises ``HealthCheckFailed`` at the deadline, or at once when a
        container restarts or turns ``unhealthy``.
        """
        deadline = self.clock() + self.health.timeout
        baseline = self._restart_counts(deployment)
        streak = 0
        first_answer: float | None = None

        while True:
            self.progress.beat(f"health gate of {deployment.side.value}")
            passed, detail = self._probe_round(deployment, baseline)
            if passed:
                first_answer = first_answer if first_answer is not None else self.clock()
                streak += 1
                if streak >= self.health.confirmations:
                    return first_answer
            else:
                streak, first_answer = 0, None

            if self.clock() >= deadline:
                raise HealthCheckFailed(
                    f"{deployment.side.value} did not answer as {deployment.side.value} within "
                    f"{self.health.timeout:.0f}s ({detail})"
                )
            self.sleep(self.health.interval)

    def _restart_counts(self, deployment: SideDeployment) -> dict[str, int]:
        containers = self.engine.service_containers(
            deployment.project.project, deployment.project.services
        )
        return {container.container_id: container.restart_count for container in containers}

    def _probe_round(
        self, deployment: SideDeployment, baseline: dict[str, int]
    ) -> tuple[bool, str]:
        containers = self.engine.service_containers(
            deployment.project.project, deployment.project.services
        )
        for container in containers:
            before = baseline.setdefault(container.container_id, container.restart_count)
            if container.restart_count > before:
                raise HealthCheckFailed(
                    f"{deployment.side.value} container {container.container_id[:12]} of service "
                    f"{container.service} restarted {container.restart_count - before} time(s) "
                    "during the health check"
                )
            if container.health == "unhealthy":
                raise HealthCheckFailed(
                    f"the engine reports {deployment.side.value} container "
                    f"{container.container_id[:12]} of service {container.service} as unhealthy"
                )

        answers = [health.probe(url, self.health.request_timeout) for url in deployment.health_urls]
        serving = any(answer.serves(deployment.side) for answer in answers)
        waiting = [
            f"{c.service} is {c.status}" + (f", health {c.health}" if c.health else "")
            for c in containers
            if not c.running or c.health not in (None, "healthy")
        ]
        if not containers:
            waiting.append("no container of the services exists")
        detail = "; ".join(
            [*(f"{health.display_url(a.url)}: {a.detail}" for a in answers), *waiting]
        )
        return serving and not waiting, detail

    def _commit(
        self, plan: SwitchPlan, state: State, progress: SwitchProgress, timeline: _Timeline
    ) -> State:
        window = _window(timeline.source_stop_started, timeline.target_first_answer)
        state.deployed = plan.target.side
        if plan.target.side is Side.TUWUNEL:
            # These fields describe the Tuwunel that runs, or ran last; a switch back to
            # Synapse keeps them for a later switch to the same image.
            state.pinned_image = progress.to_image
            state.tag_digest = plan.image.tag_digest
            state.manifest_digest = plan.image.manifest_digest
            state.image_id = progress.image_id
        state.switch_in_progress = None
        state.interrupted_attempts.pop(plan.image.manifest_digest, None)
        state.last_switch = _record_of(progress, timeline, "committed", window)
        self.store.save(state)

        log.info(
            "switch_committed",
            from_side=progress.from_side,
            to_side=progress.to_side,
            route=plan.acquirer.route,
            image=progress.to_image,
            tag_digest=plan.image.tag_digest,
            manifest_digest=plan.image.manifest_digest,
            image_id=progress.image_id,
            duration_seconds=round(self.clock() - timeline.started, 3),
            window_seconds=window,
            outcome="committed",
        )
        _fault("committed")
        return state

    def _roll_back(self, attempt: _Attempt, cause: GuardError, *, failed: bool) -> str:
        """Undo ``attempt`` and return the outcome, ``rolled-back`` or ``rollback-failed``."""
        state, progress, timeline = attempt.state, attempt.progress, attempt.timeline
        log.warning(
            "rollback_started",
            cause=str(cause),
            from_side=progress.to_side,
            to_side=progress.from_side,
            manifest_digest=progress.manifest_digest,
        )
        outcome, detail, back_at = self._restore(attempt.source, attempt.target, cause)

        state.deployed = attempt.source.side
        if failed and progress.manifest_digest not in state.failed_manifest_digests:
            state.failed_manifest_digests.append(progress.manifest_digest)
        state.switch_in_progress = None
        window = _window(timeline.source_stop_started, back_at)
        state.last_switch = _record_of(progress, timeline, outcome, window, detail)
        self.store.save(state)

        log.info(
            "rollback_completed",
            from_side=progress.to_side,
            to_side=progress.from_side,
            image=progress.to_image,
            restored_image=progress.from_image,
            manifest_digest=progress.manifest_digest,
            duration_seconds=round(self.clock() - timeline.started, 3),
            window_seconds=window,
            outcome=outcome,
            cause=str(cause),
        )
        return outcome

    def _restore(
        self, source: SideDeployment, target: SideDeployment, cause: GuardError
    ) -> tuple[str, str, float | None]:
        try:
            if target.project.services != source.project.services or target.side != source.side:
                self.compose.stop(target.project)
            self.compose.up(source.project)
            back_at = self.wait_healthy(source)
        except GuardError as error:
            log.critical("rollback_failed", error=str(error), cause=str(cause))
            return "rollback-failed", f"{cause}; then the rollback failed: {error}", None
        return "rolled-back", str(cause), back_at

    def recover(self, plan: SwitchPlan, state: State) -> State:
        """Finish or undo the switch that ``state`` records as interrupted.

        A switch interrupted after its health step is finished when the target still passes
        the gate; any other interrupted switch is undone. After
        ``INTERRUPTED_ATTEMPTS_LIMIT`` interrupted attempts the digest counts as failed.
        """
        progress = state.switch_in_progress
        if progress is None:
            return state

        timeline = _Timeline(started=self.clock(), wall_started=progress.started_at)
        log.warning(
            "switch_interrupted",
            step=progress.step,
            from_side=progress.from_side,
            to_side=progress.to_side,
            manifest_digest=progress.manifest_digest,
        )
        target = plan.target.with_image(plan.image_variable, progress.to_image)
        source_image = progress.from_image or progress.to_image
        source = plan.source.with_image(plan.image_variable, source_image)

        attempt = _Attempt(plan, source, target, state, progress, timeline)
        if progress.step == f"{progress.to_side}_healthy":
            try:
                timeline.target_first_answer = self.wait_healthy(target)
            except GuardError as error:
                self._undo_interrupted(attempt, error)
                return state
            return self._commit(plan, state, progress, timeline)

        self._undo_interrupted(
            attempt, SwitchError(f"the guard stopped during step {progress.step}")
        )
        return state

    def _undo_interrupted(self, attempt: _Attempt, cause: GuardError) -> None:
        state, progress = attempt.state, attempt.progress
        attempts = state.interrupted_attempts.get(progress.manifest_digest, 0) + 1
        state.interrupted_attempts[progress.manifest_digest] = attempts
        # The window starts when the source stopped; a switch cut off before that had none.
        attempt.timeline.source_stop_started = None
        self._roll_back(attempt, cause, failed=attempts >= INTERRUPTED_ATTEMPTS_LIMIT)


def _record_of(
    progress: SwitchProgress,
    timeline: _Timeline,
    outcome: str,
    window: float | None,
    detail: str = "",
) -> SwitchRecord:
    return SwitchRecord(
        started_at=timeline.wall_started,
        finished_at=time.time(),
        from_side=progress.from_side,
        to_side=progress.to_side,
        outcome=outcome,
        manifest_digest=progress.manifest_digest,
        window_seconds=window,
        detail=detail,
    )


def _window(stopped_at: float | None, answered_at: float | None) -> float | None:
    if stopped_at is None or answered_at is None:
        return None
    return round(answered_at - stopped_at, 3)


def _step(name: str, **fields: object) -> None:
    log.info("switch_step_completed", step=name, **fields)
