"""One check cycle: probe the engine and the registry, reach a verdict, decide, and act.

Control flows from the daemon's scheduler (or the ``check`` command) into :meth:`Guard.run_cycle`,
which calls the adapters for facts, the pure core for the verdict and the decision, and the
:class:`~tuwunel_guard.switch.Switcher` when the decision is to switch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import structlog

from tuwunel_guard.adapters.compose import Compose, ComposeProject, detect_command
from tuwunel_guard.adapters.credentials import CredentialStore, load_docker_config
from tuwunel_guard.adapters.engine import Engine
from tuwunel_guard.adapters.registry import RegistryClient, probe_image
from tuwunel_guard.adapters.state import State, StateStore
from tuwunel_guard.config.models import Config, DeploymentConfig, SideConfig
from tuwunel_guard.core.decision import Action, Decision, Side, Situation, decide
from tuwunel_guard.core.engine import EngineFacts
from tuwunel_guard.core.image import (
    ImageFacts,
    Platform,
    image_facts_from_dict,
    image_facts_to_dict,
)
from tuwunel_guard.core.reference import ImageReference
from tuwunel_guard.core.verdict import Verdict, reach_verdict
from tuwunel_guard.errors import (
    EngineError,
    EngineUnavailable,
    GuardError,
    RegistryError,
    RegistryUnavailable,
)
from tuwunel_guard.switch import HealthSettings, Switcher, SwitchPlan

log = structlog.get_logger("tuwunel_guard.cycle")


@dataclass
class CycleResult:
    """What one cycle found and decided. ``problem`` is set when a probe failed."""

    engine: EngineFacts | None = None
    image: ImageFacts | None = None
    verdict: Verdict | None = None
    decision: Decision | None = None
    problem: str = ""
    switched: bool = False
    fields: dict[str, Any] = field(default_factory=dict)


class Guard:
    """The guard's adapters and state for one config."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.reference = ImageReference.parse(config.target.image, config.target.tag)
        self.engine = Engine(config.engine.socket, config.engine.timeout)
        self.store = StateStore(config.state.directory)
        self.registry = RegistryClient(
            insecure_registries=config.target.insecure_registries,
            credentials=_credentials(config),
            timeout=config.target.timeout,
        )

    def close(self) -> None:
        """Release the engine and registry connections."""
        self.engine.close()
        self.registry.close()

    def probe_engine(self) -> EngineFacts | None:
        """Probe the engine once; log and return ``None`` when it does not answer."""
        try:
            facts = self.engine.probe()
        except (EngineUnavailable, EngineError) as error:
            log.warning("engine_unavailable", socket=self.config.engine.socket, error=str(error))
            return None

        log.info(
            "engine_probed",
            engine_version=str(facts.version),
            api_version=str(facts.api_version),
            platform=str(facts.platform),
            image_store=facts.image_store,
        )
        return facts

    def run_cycle(self, *, act: bool) -> CycleResult:
        """Run one cycle; switch when the decision says so and ``act`` is true.

        Without ``act`` the cycle only reports: it neither switches nor writes the state file.

        Probe failures are expected states: they end up in ``CycleResult.problem`` and the
        decision, never as an exception.
        """
        state = self.store.load()
        result = CycleResult()
        self._probe(state, result)

        if result.engine is not None and result.image is not None:
            result.verdict = reach_verdict(result.engine, result.image)

        failed_before = (
            result.image is not None
            and result.image.manifest_digest in state.failed_manifest_digests
        )
        decision = decide(
            Situation(
                verdict=result.verdict,
                strategy=self.config.strategy,
                deployed=state.deployed,
                switch_allowed=self.config.switch_allowed,
                failed_before=failed_before,
            )
        )

        result.decision = decision
        self._record(state, result, decision, save=act)
        if act and decision.action is Action.SWITCH_TO_TUWUNEL:
            result.switched = self._switch(state, result)
        return result

    def _probe(self, state: State, result: CycleResult) -> None:
        result.engine = self.probe_engine()
        if result.engine is None:
            result.problem = f"the Docker engine at {self.config.engine.socket} did not answer"
            return

        platform = self._platform(result.engine)
        previous = _stored_facts(state, str(self.reference), platform)
        try:
            result.image = probe_image(self.registry, self.reference, platform, previous)
        except (RegistryUnavailable, RegistryError) as error:
            log.warning("registry_probe_failed", image=str(self.reference), error=str(error))
            result.problem = str(error)

    def _platform(self, engine: EngineFacts) -> Platform:
        if self.config.target.platform:
            return Platform.parse(self.config.target.platform)
        return engine.platform

    def _record(self, state: State, result: CycleResult, decision: Decision, *, save: bool) -> None:
        fields = _cycle_fields(self, state, result, decision)
        result.fields = fields

        verdict_name = result.verdict.name if result.verdict else "unknown"
        if result.verdict is not None and verdict_name != state.last_verdict:
            log.info(
                "verdict_changed",
                previous_verdict=state.last_verdict or "none",
                verdict=verdict_name,
                reason=result.verdict.reason,
                engine_version=fields["engine_version"],
                image=fields["image"],
            )

        log.info("cycle_completed", **fields)
        log.info(
            "decision_made",
            decision=decision.action.value,
            reason=decision.reason,
            strategy=self.config.strategy.value,
            deployed=state.deployed.value,
            verdict=verdict_name,
        )

        if result.verdict is not None:
            state.last_verdict = verdict_name
            state.last_reason = result.verdict.reason
        if result.image is not None:
            state.image_reference = result.image.reference
            state.image_facts = image_facts_to_dict(result.image)
            if state.deployed is Side.SYNAPSE:
                state.tag_digest = result.image.tag_digest
                state.manifest_digest = result.image.manifest_digest
        state.last_check_at = time.time()
        if save:
            self.store.save(state)

    def _switch(self, state: State, result: CycleResult) -> bool:
        engine, image, deployment = result.engine, result.image, self.config.deployment
        if engine is None or image is None or deployment is None or deployment.tuwunel is None:
            # decide() switches only with both probes answered and a [deployment.tuwunel] table.
            raise GuardError("a switch was decided without engine facts, image facts or consent")

        pinned = self.reference.with_digest(image.manifest_digest)
        plan = SwitchPlan(
            image=image,
            pinned_image=pinned,
            synapse=_project(deployment, deployment.synapse, pinned),
            tuwunel=_project(deployment, deployment.tuwunel, pinned),
            synapse_health_urls=tuple(deployment.synapse.health_urls),
            tuwunel_health_urls=tuple(deployment.tuwunel.health_urls),
        )
        try:
            switcher = Switcher(
                self.engine,
                self._compose(engine, deployment),
                self.store,
                HealthSettings(deployment.health_timeout, deployment.health_interval),
            )
            switcher.to_tuwunel(plan, engine, state)
        except GuardError as error:
            log.error("switch_failed", image=pinned, error=str(error))
            return False
        return True

    def _compose(self, engine: EngineFacts, deployment: DeploymentConfig) -> Compose:
        command = detect_command(deployment.compose_command, timeout=self.config.engine.timeout)
        return Compose(
            command,
            engine_socket=self.config.engine.socket,
            api_version=engine.api_version,
            timeout=max(self.config.engine.timeout, 60.0),
        )


def _project(deployment: DeploymentConfig, side: SideConfig, pinned_image: str) -> ComposeProject:
    variable = deployment.tuwunel.image_variable if deployment.tuwunel else "TUWUNEL_IMAGE"
    return ComposeProject(
        directory=deployment.directory,
        files=tuple(side.compose_files),
        project=side.project,
        services=tuple(side.services),
        # Both sides get the variable, because compose interpolates every service of a file
        # even when it acts on one.
        environment={variable: pinned_image},
    )


def _credentials(config: Config) -> CredentialStore | None:
    path = config.target.credentials_file
    return load_docker_config(path) if path is not None else None


def _stored_facts(state: State, reference: str, platform: Platform) -> ImageFacts | None:
    if not state.image_facts:
        return None
    try:
        facts = image_facts_from_dict(state.image_facts)
    except ValueError:
        return None
    if facts.reference != reference or facts.platform != platform:
        return None
    return facts


def _cycle_fields(
    guard: Guard, state: State, result: CycleResult, decision: Decision
) -> dict[str, Any]:
    engine, image, verdict = result.engine, result.image, result.verdict
    return {
        "engine_version": str(engine.version) if engine else "unknown",
        "api_version": str(engine.api_version) if engine else "unknown",
        "image": str(guard.reference),
        "tag_digest": image.tag_digest if image else "",
        "manifest_digest": image.manifest_digest if image else "",
        "config_digest": image.config_digest if image else "",
        "platform": str(image.platform) if image else "",
        "requirements": ",".join(item.requirement.value for item in image.requirements)
        if image
        else "",
        "verdict": verdict.name if verdict else "unknown",
        "reason": verdict.reason if verdict else result.problem,
        "strategy": guard.config.strategy.value,
        "deployed": state.deployed.value,
        "decision": decision.action.value,
    }
