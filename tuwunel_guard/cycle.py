"""One check cycle: probe the engine and the registry, reach a verdict, decide, and act.

Control flows from the daemon's scheduler (or the ``check``, ``status`` and ``switch`` commands)
into :class:`Guard`, which calls the adapters for facts, the pure core for the verdict and the
decision, and the :class:`~tuwunel_guard.switch.Switcher` when the decision is to switch.
Before every acting cycle the guard finishes or undoes a switch that an earlier run of the
daemon left half done.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import structlog

from tuwunel_guard.adapters.acquire import ImageAcquirer, KeptImage, PullAcquirer
from tuwunel_guard.adapters.backup import back_up_volumes
from tuwunel_guard.adapters.build import BuildAcquirer
from tuwunel_guard.adapters.compose import Compose, ComposeProject, detect_command
from tuwunel_guard.adapters.convert import ConvertAcquirer
from tuwunel_guard.adapters.credentials import CredentialStore, load_docker_config
from tuwunel_guard.adapters.engine import Engine
from tuwunel_guard.adapters.lock import ActionLock
from tuwunel_guard.adapters.podman import PodmanAcquirer
from tuwunel_guard.adapters.registry import RegistryClient, probe_image
from tuwunel_guard.adapters.state import State, StateStore
from tuwunel_guard.config.models import Config, DeploymentConfig, SideConfig
from tuwunel_guard.core.cpu import CpuLevel, cpu_level_from_cpuinfo, pick_variant
from tuwunel_guard.core.decision import Decision, Route, Side, Situation, Strategy, decide
from tuwunel_guard.core.engine import EngineFacts
from tuwunel_guard.core.image import (
    ImageFacts,
    Platform,
    image_facts_from_dict,
    image_facts_to_dict,
)
from tuwunel_guard.core.reference import ImageReference
from tuwunel_guard.core.verdict import Verdict, reach_verdict
from tuwunel_guard.core.versions import config_created, pick_release
from tuwunel_guard.errors import (
    DigestMismatch,
    EngineError,
    EngineUnavailable,
    GuardError,
    RegistryError,
    RegistryUnavailable,
)
from tuwunel_guard.progress import NO_PROGRESS, Progress, run_with_beats
from tuwunel_guard.switch import (
    HealthSettings,
    SideDeployment,
    Switcher,
    SwitchPlan,
    fault_point,
)

log = structlog.get_logger("tuwunel_guard.cycle")

_MAX_CONFIG_BYTES = 4 * 2**20
_BACKUP_TIMEOUT = 6 * 3600.0


@dataclass
class CycleResult:
    """The findings and decision of one cycle. ``problem`` is set when a probe failed."""

    engine: EngineFacts | None = None
    image: ImageFacts | None = None
    verdict: Verdict | None = None
    decision: Decision | None = None
    problem: str = ""
    age_remaining: float = 0.0
    switched: bool = False
    fields: dict[str, Any] = field(default_factory=dict)


class Guard:
    """The guard's adapters and state for one config."""

    def __init__(
        self,
        config: Config,
        progress: Progress = NO_PROGRESS,
        report: Callable[[str], None] | None = None,
    ) -> None:
        self.config = config
        self.progress = progress
        self.report = report
        self._logged_level = 0
        self.reference = ImageReference.parse(config.target.image, config.target.tag)
        self.engine = Engine(config.engine.socket, config.engine.timeout)
        self.store = StateStore(config.state.directory)
        self.lock = ActionLock(config.state.directory)
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
        """Probe the engine once. Log and return ``None`` when it does not respond."""
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

    def run_cycle(self, *, act: bool, next_check_at: float = 0.0) -> CycleResult:
        """Run one cycle; switch when the decision is to switch and ``act`` is true.

        Without ``act`` the cycle only reports: it neither switches nor writes the state file.
        With ``act`` it holds the action lock, so a manual switch cannot run at the same time,
        and stores ``next_check_at`` (seconds since the epoch) for ``tuwunel-guard status``.
        Probe failures are expected states: they end up in ``CycleResult.problem`` and the
        decision, never as an exception.
        """
        if not act:
            return self._cycle(act=False)
        with self.lock.hold(wait=5.0), self.progress.working("cycle"):
            fault_point("cycle")
            return self._cycle(act=True, next_check_at=next_check_at)

    def _cycle(self, *, act: bool, next_check_at: float = 0.0) -> CycleResult:
        state = self.store.load()
        state.next_check_at = next_check_at
        result = CycleResult()
        result.engine = self.probe_engine()
        if result.engine is None:
            result.problem = f"the Docker engine at {self.config.engine.socket} did not answer"
        elif act and state.switch_in_progress is not None:
            state = self._recover(state, result.engine)

        if result.engine is not None:
            result.image = self._probe_image(state, result.engine, result)
        if result.engine is not None and result.image is not None:
            result.verdict = reach_verdict(result.engine, result.image)

        decision = decide(self._situation(state, result))
        result.decision = decision
        self._record(state, result, decision, save=act)

        if act and decision.route is not None:
            result.switched = self._switch_safely(state, result, decision.route)
        return result

    def _probe_image(
        self, state: State, engine: EngineFacts, result: CycleResult
    ) -> ImageFacts | None:
        platform = self._platform(engine)
        try:
            self.reference = self._tracked_reference()
            # probe_image itself checks that the stored facts still serve this platform.
            previous = _stored_facts(state, str(self.reference), None)
            image = probe_image(self.registry, self.reference, platform, previous)
            result.age_remaining = self._age_remaining(state, image)
        except (RegistryUnavailable, RegistryError) as error:
            log.warning("registry_probe_failed", image=str(self.reference), error=str(error))
            result.problem = str(error)
            return None
        return image

    def _tracked_reference(self) -> ImageReference:
        """Return the reference to probe: the configured tag, or the highest release in
        ``[target] versions`` among every page of the repository's tag list."""
        target = self.config.target
        if not target.versions:
            return self.reference

        tags = self.registry.list_tags(self.reference)
        picked = pick_release(tags, target.versions, prereleases=target.prereleases)
        if picked is None:
            raise RegistryError(
                f"no release tag of {self.reference.name} is inside [target] versions "
                f"{target.versions!r} among {len(tags)} tags; widen the range, or set "
                "prereleases = true if only pre-releases match"
            )
        picked = self._per_variant_tag(picked, tags)
        if picked != self.reference.tag:
            log.info("release_picked", tag=picked, versions=target.versions, tags_seen=len(tags))
        return ImageReference.parse(target.image, picked)

    def _per_variant_tag(self, release: str, tags: list[str]) -> str:
        """Return the per-variant tag of ``release`` for this CPU's x86-64 level, if the
        repository has such tags (``v1.9.0-release-all-x86_64-v3-linux-gnu``), else ``release``.
        """
        candidates = [tag for tag in tags if tag.startswith(f"{release}-") and "x86_64-v" in tag]
        level = _host_cpu_level()
        if not candidates or level is None or self.config.target.platform:
            return release

        choice = pick_variant(candidates, level)
        log.info("variant_picked", release=release, tag=choice.chosen, reason=choice.reason)
        return choice.chosen or release

    def _age_remaining(self, state: State, image: ImageFacts) -> float:
        """Return how long ``image`` must still age before ``[target] min_age`` allows it."""
        min_age = self.config.target.min_age
        if not min_age or image.manifest_digest == state.manifest_digest:
            return 0.0

        with self.registry.open_blob(self.reference, image.config_digest) as blob:
            content = blob.read(_MAX_CONFIG_BYTES)
        actual = "sha256:" + hashlib.sha256(content).hexdigest()
        if actual != image.config_digest:
            raise DigestMismatch(
                f"the config blob of {self.reference} hashes to {actual}, "
                f"not {image.config_digest}; the registry served other content"
            )
        created = config_created(json.loads(content))
        if created is None:
            log.warning("image_age_unknown", image=str(self.reference), config=image.config_digest)
            return 0.0
        now = datetime.datetime.now(datetime.UTC)
        return max(0.0, min_age - (now - created).total_seconds())

    def _platform(self, engine: EngineFacts) -> Platform:
        """Return the platform to choose from the index: the config's, or the engine's with
        this host's x86-64 level, so a v3 build never lands on a CPU without AVX2."""
        if self.config.target.platform:
            return Platform.parse(self.config.target.platform)
        if engine.platform.architecture != "amd64":
            return engine.platform

        # NOTE: the level is this host's; an engine reached over tcp:// or ssh:// may run on
        # a CPU with another level.
        level = _host_cpu_level()
        if level is None:
            return engine.platform
        if self._logged_level != level.level:
            self._logged_level = level.level
            missing = level.missing(level.level + 1) if level.level < 4 else ()
            log.info(
                "cpu_level_detected",
                cpu_level=f"v{level.level}",
                next_level_lacks=",".join(missing) or "nothing",
            )
        variant = f"v{level.level}" if level.level > 1 else ""
        return Platform(engine.platform.os, engine.platform.architecture, variant)

    def _situation(self, state: State, result: CycleResult) -> Situation:
        image = result.image
        failed_before = image is not None and image.manifest_digest in state.failed_manifest_digests
        update_available = (
            state.deployed is Side.TUWUNEL
            and image is not None
            and image.manifest_digest != state.manifest_digest
        )
        return Situation(
            verdict=result.verdict,
            strategy=self.config.strategy,
            deployed=state.deployed,
            switch_allowed=self.config.switch_allowed,
            failed_before=failed_before,
            update_available=update_available,
            cooldown_remaining=self._cooldown_remaining(state),
            prefer_native=self.config.prefer_native_pull,
            held_by_admin=state.held_by_admin,
            age_remaining=result.age_remaining,
        )

    def _cooldown_remaining(self, state: State) -> float:
        deployment = self.config.deployment
        if state.last_switch is None or deployment is None:
            return 0.0
        allowed_at = state.last_switch.finished_at + deployment.min_switch_interval
        return max(0.0, allowed_at - time.time())

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
            route=decision.route.value if decision.route else "",
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
        state.last_check_at = time.time()
        if save:
            self.store.save(state)

    def _switch_safely(self, state: State, result: CycleResult, route: Route) -> bool:
        try:
            self._switch(state, result, route)
        except GuardError as error:
            log.error("switch_failed", image=str(self.reference), error=str(error))
            return False
        return True

    def _switch(self, state: State, result: CycleResult, route: Route) -> None:
        engine, image, deployment = result.engine, result.image, self.config.deployment
        if engine is None or image is None or deployment is None or deployment.tuwunel is None:
            # decide() switches only when both probes succeeded and [deployment.tuwunel] exists.
            raise GuardError("a switch was decided without engine facts, image facts or consent")

        source_side = state.deployed
        plan = SwitchPlan(
            source=_side(deployment, source_side),
            target=_side(deployment, Side.TUWUNEL),
            image=image,
            reference=self.reference,
            image_variable=deployment.tuwunel.image_variable,
            acquirer=self._acquirer(route, engine),
            source_image=state.pinned_image if source_side is Side.TUWUNEL else "",
        )
        self._switcher(engine, deployment).switch(plan, state)

    def _recover(self, state: State, engine: EngineFacts) -> State:
        progress = state.switch_in_progress
        deployment = self.config.deployment
        if progress is None or deployment is None:
            return state

        image = _stored_facts(state, str(self.reference), None) or _placeholder_facts(
            str(self.reference), progress.manifest_digest
        )
        plan = SwitchPlan(
            source=_side(deployment, Side(progress.from_side)),
            target=_side(deployment, Side(progress.to_side)),
            image=image,
            reference=self.reference,
            image_variable=_image_variable(deployment),
            acquirer=KeptImage(self.engine, progress.to_image),
            source_image=progress.from_image,
        )
        try:
            return self._switcher(engine, deployment).recover(plan, state)
        except GuardError as error:
            log.error("recovery_failed", step=progress.step, error=str(error))
            return self.store.load()

    def _switcher(self, engine: EngineFacts, deployment: DeploymentConfig) -> Switcher:
        command = detect_command(deployment.compose_command, timeout=self.config.engine.timeout)
        compose = Compose(
            command,
            engine_socket=self.config.engine.socket,
            api_version=engine.api_version,
            timeout=deployment.compose_timeout,
            progress=self.progress,
        )
        return Switcher(
            self.engine,
            compose,
            self.store,
            HealthSettings(
                deployment.health_timeout,
                deployment.health_interval,
                deployment.health_confirmations,
            ),
            engine_facts=engine,
            before_source_stops=self._back_up if deployment.backup_directory else None,
            progress=self.progress,
            report=self.report,
        )

    def _back_up(self, source: SideDeployment) -> None:
        """Archive the named volumes of Synapse's services before they stop.

        NOTE: the files are read while Synapse still runs, because the backup is written before
        Synapse stops. A file that changes during the read may be archived torn.
        """
        deployment = self.config.deployment
        if source.side is not Side.SYNAPSE or deployment is None or not deployment.backup_directory:
            return
        containers = self.engine.service_containers(source.project.project, source.project.services)
        names = sorted({name for container in containers for name in container.volumes})
        directory = deployment.backup_directory
        try:
            archives = run_with_beats(
                self.progress,
                "volume backup",
                lambda: back_up_volumes(
                    self.config.engine.socket, names, directory, timeout=self.config.engine.timeout
                ),
                timeout=_BACKUP_TIMEOUT,
            )
        except TimeoutError as error:
            raise GuardError(f"the backup of {', '.join(names)} failed: {error}") from None
        for archive in archives:
            log.info(
                "volume_backed_up",
                volume=archive.volume,
                archive=str(archive.path),
                sha256=archive.sha256,
                size=archive.size,
            )

    def _acquirer(self, route: Route, engine: EngineFacts) -> ImageAcquirer:
        if route is Route.NATIVE:
            return PullAcquirer(self.engine, engine)
        if route is Route.CONVERT:
            return ConvertAcquirer(
                self.registry,
                engine_socket=self.config.engine.socket,
                state_directory=self.config.state.directory,
                platform=self._platform(engine),
                timeout=max(self.config.engine.timeout, 120.0),
            )
        if route is Route.PODMAN:
            return PodmanAcquirer(
                engine_socket=self.config.engine.socket,
                state_dir=self.config.state.directory,
                insecure_registries=tuple(self.config.target.insecure_registries),
                authfile=self.config.target.credentials_file,
            )
        build = self.config.build
        if build is None:
            raise GuardError("the build route needs a [build] table in the config")
        return BuildAcquirer(
            engine_socket=self.config.engine.socket,
            state_dir=self.config.state.directory,
            url=build.repository,
            ref=build.ref,
            dockerfile=build.dockerfile,
            build_args=build.build_args,
        )

    def switch_manually(self, target: Side, wait: float = 600.0) -> State:
        """Switch to ``target`` because the admin asked, through the same steps and gate.

        Waits up to ``wait`` seconds for a running daemon cycle to end. Ignores the minimum
        time between automatic switches and an earlier failure of the same image; a switch to
        Synapse holds the guard on Synapse until the admin switches to Tuwunel again. Raises
        ``GuardError`` when the switch is not possible, ``SwitchError`` when it failed.
        """
        with self.lock.hold(wait=wait):
            state = self.store.load()
            engine = self.engine.probe()
            deployment = self.config.deployment
            if deployment is None or deployment.tuwunel is None:
                raise GuardError(
                    "the config has no [deployment.tuwunel] table; add one to allow a switch"
                )
            if state.switch_in_progress is not None:
                state = self._recover(state, engine)
            if state.deployed is target:
                raise GuardError(f"{target.value} is deployed already")

            if target is Side.SYNAPSE:
                return self._switch_back(state, engine, deployment)
            return self._switch_forward(state, engine, deployment)

    def _switch_back(
        self, state: State, engine: EngineFacts, deployment: DeploymentConfig
    ) -> State:
        image = _stored_facts(state, str(self.reference), None) or _placeholder_facts(
            str(self.reference), state.manifest_digest
        )
        plan = SwitchPlan(
            source=_side(deployment, Side.TUWUNEL),
            target=_side(deployment, Side.SYNAPSE),
            image=image,
            reference=self.reference,
            image_variable=_image_variable(deployment),
            acquirer=KeptImage(self.engine, state.pinned_image),
            source_image=state.pinned_image,
        )
        state = self._switcher(engine, deployment).switch(plan, state)
        state.held_by_admin = True
        self.store.save(state)
        return state

    def _switch_forward(
        self, state: State, engine: EngineFacts, deployment: DeploymentConfig
    ) -> State:
        result = CycleResult(engine=engine)
        result.image = self._probe_image(state, engine, result)
        if result.image is None:
            raise GuardError(f"the registry could not be asked: {result.problem}")
        result.verdict = reach_verdict(engine, result.image)

        # The admin's request overrides strategy 'synapse', which only stops automatic switches.
        strategy = self.config.strategy
        situation = replace(
            self._situation(state, result),
            strategy=Strategy.AUTO if strategy is Strategy.SYNAPSE else strategy,
            failed_before=False,
            cooldown_remaining=0.0,
            held_by_admin=False,
            switch_allowed=True,
        )
        decision = decide(situation)
        if decision.route is None:
            raise GuardError(f"the switch is not possible now: {decision.reason}")

        if result.image.manifest_digest in state.failed_manifest_digests:
            state.failed_manifest_digests.remove(result.image.manifest_digest)
        state.held_by_admin = False
        self._switch(state, result, decision.route)
        return state


def _host_cpu_level() -> CpuLevel | None:
    try:
        return cpu_level_from_cpuinfo(Path("/proc/cpuinfo").read_text())
    except (OSError, ValueError):
        return None


def _side(deployment: DeploymentConfig, side: Side) -> SideDeployment:
    side_config: SideConfig | None = (
        deployment.synapse if side is Side.SYNAPSE else deployment.tuwunel
    )
    if side_config is None:
        raise GuardError("the config has no [deployment.tuwunel] table")
    return SideDeployment(
        side=side,
        project=ComposeProject(
            directory=deployment.directory,
            files=tuple(side_config.compose_files),
            project=side_config.project,
            services=tuple(side_config.services),
        ),
        health_urls=tuple(side_config.health_urls),
    )


def _image_variable(deployment: DeploymentConfig) -> str:
    return deployment.tuwunel.image_variable if deployment.tuwunel else "TUWUNEL_IMAGE"


def _credentials(config: Config) -> CredentialStore | None:
    path = config.target.credentials_file
    return load_docker_config(path) if path is not None else None


def _stored_facts(state: State, reference: str, platform: Platform | None) -> ImageFacts | None:
    if not state.image_facts:
        return None
    try:
        facts = image_facts_from_dict(state.image_facts)
    except ValueError:
        return None
    if facts.reference != reference:
        return None
    if platform is not None and facts.platform != platform:
        return None
    return facts


def _placeholder_facts(reference: str, manifest_digest: str) -> ImageFacts:
    return ImageFacts(
        reference=reference,
        tag_digest="",
        tag_media_type="",
        manifest_digest=manifest_digest,
        manifest_media_type="",
        config_digest="",
        platform=Platform("linux", "unknown"),
    )


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
