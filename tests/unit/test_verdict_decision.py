"""The pure core: engine facts and image requirements give a verdict; the verdict, the strategy
and the deployed side give a decision. Checked exhaustively over every combination."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tuwunel_guard.core.decision import Action, Route, Side, Situation, Strategy, decide
from tuwunel_guard.core.engine import ApiVersion, EngineFacts, EngineVersion
from tuwunel_guard.core.image import ImageFacts, ImageRequirement, Platform, Requirement
from tuwunel_guard.core.verdict import Verdict, reach_verdict

AMD64 = Platform("linux", "amd64")
ENGINES = {
    "20.10.24+dfsg1": ("1.41", set()),
    "23.0.0": ("1.42", {Requirement.ZSTD_LAYERS}),
    "26.1.5+dfsg1": ("1.45", set(Requirement)),
}


def engine(version: str, api: str = "1.41") -> EngineFacts:
    return EngineFacts(
        version=EngineVersion.parse(version),
        api_version=ApiVersion.parse(api),
        min_api_version=ApiVersion.parse("1.12"),
        platform=AMD64,
    )


def image(*requirements: Requirement) -> ImageFacts:
    return ImageFacts(
        reference="127.0.0.1:5000/tuwunel:latest",
        tag_digest="sha256:" + "a" * 64,
        tag_media_type="application/vnd.oci.image.index.v1+json",
        manifest_digest="sha256:" + "b" * 64,
        manifest_media_type="application/vnd.oci.image.manifest.v1+json",
        config_digest="sha256:" + "c" * 64,
        platform=AMD64,
        requirements=tuple(ImageRequirement(r, f"evidence for {r}") for r in requirements),
    )


def all_requirement_sets() -> list[tuple[Requirement, ...]]:
    members = list(Requirement)
    return [
        combo for size in range(len(members) + 1) for combo in itertools.combinations(members, size)
    ]


@pytest.mark.parametrize("version", ENGINES)
@pytest.mark.parametrize("requirements", all_requirement_sets())
def test_verdict_over_every_requirement_set(
    version: str, requirements: tuple[Requirement, ...]
) -> None:
    """Compatible exactly when the engine supports every manifest-level requirement; index-level
    ones are sidestepped by the pull by digest and only noted."""
    api, supported = ENGINES[version]
    verdict = reach_verdict(engine(version, api), image(*requirements))

    lacking = [r for r in requirements if r not in supported]
    expected_missing = tuple(r for r in lacking if not r.index_level)
    sidestepped = [r for r in lacking if r.index_level]
    assert verdict.compatible is (not expected_missing)
    assert verdict.missing == expected_missing
    if expected_missing:
        assert len(verdict.reasons) == len(expected_missing)
    else:
        assert len(verdict.reasons) == 1 + len(sidestepped)
        assert sum("never reads the index" in reason for reason in verdict.reasons) == len(
            sidestepped
        )


def test_only_zstd_is_manifest_level() -> None:
    """zstd layers matter however the image is pulled; the index rules only for tag pulls."""
    assert [r for r in Requirement if not r.index_level] == [Requirement.ZSTD_LAYERS]


def test_verdict_explains_zstd_for_a_person() -> None:
    """The zstd reason names the engine version, zstd and the first release that has it."""
    verdict = reach_verdict(engine("20.10.24+dfsg1"), image(Requirement.ZSTD_LAYERS))
    assert verdict.name == "incompatible"
    assert verdict.reason.startswith(
        "Docker 20.10.24+dfsg1 cannot unpack zstd-compressed layers, which needs 23.0.0 or later"
    )
    assert "evidence for zstd-layers" in verdict.reason


def test_verdict_compatible_when_image_needs_nothing() -> None:
    """A gzip image on 20.10 is compatible, and the reason says why."""
    verdict = reach_verdict(engine("20.10.24+dfsg1"), image())
    assert verdict.compatible
    assert verdict.reason == (
        "Docker 20.10.24+dfsg1 can run 127.0.0.1:5000/tuwunel:latest: "
        "the image needs no special feature"
    )


def test_verdict_rejects_too_old_api() -> None:
    """An engine API older than the SDK supports is incompatible whatever the image."""
    verdict = reach_verdict(engine("1.13.1", api="1.23"), image())
    assert not verdict.compatible
    assert "needs API 1.24 or later" in verdict.reason


COMPATIBLE = Verdict(compatible=True, reasons=("fine",))
INCOMPATIBLE = Verdict(compatible=False, reasons=("no zstd",), missing=(Requirement.ZSTD_LAYERS,))


def expected_route(situation: Situation) -> Route | None:
    """The route rules written out once more: which way the image would reach the engine."""
    compatible = situation.verdict is not None and situation.verdict.compatible
    if situation.strategy in (Strategy.AUTO, Strategy.SYNAPSE):
        return Route.NATIVE if compatible else None
    if compatible and situation.prefer_native:
        return Route.NATIVE
    return Route(situation.strategy.value)


def expected_action(situation: Situation) -> Action:
    """The decision rules written out once more, as a table would state them."""
    acting = (
        situation.strategy is not Strategy.SYNAPSE
        and not (situation.held_by_admin and situation.deployed is Side.SYNAPSE)
        and situation.verdict is not None
        and not situation.failed_before
        and situation.cooldown_remaining <= 0
        and situation.age_remaining <= 0
        and expected_route(situation) is not None
    )
    if situation.deployed is Side.TUWUNEL:
        return (
            Action.UPDATE_TUWUNEL if acting and situation.update_available else Action.NOTHING_TO_DO
        )
    if acting and situation.switch_allowed:
        return Action.SWITCH_TO_TUWUNEL
    return Action.STAY_ON_SYNAPSE


SITUATIONS = [
    Situation(verdict, strategy, deployed, allowed, failed, update, cooldown, native, held, age)
    for verdict in (COMPATIBLE, INCOMPATIBLE, None)
    for strategy in Strategy
    for deployed in Side
    for allowed in (True, False)
    for failed in (True, False)
    for update in (True, False)
    for cooldown in (0.0, 30.0)
    for native in (True, False)
    for held in (True, False)
    for age in (0.0, 10.0)
]


@pytest.mark.parametrize("situation", SITUATIONS)
def test_decision_over_every_situation(situation: Situation) -> None:
    """Every combination of inputs gets the action and route the rules give, with a reason."""
    decision = decide(situation)
    assert decision.action is expected_action(situation)
    assert decision.reason
    if decision.action in (Action.SWITCH_TO_TUWUNEL, Action.UPDATE_TUWUNEL):
        assert decision.route is expected_route(situation)
    else:
        assert decision.route is None


@given(
    verdict=st.sampled_from([COMPATIBLE, INCOMPATIBLE, None]),
    strategy=st.sampled_from(list(Strategy)),
    allowed=st.booleans(),
    failed=st.booleans(),
    update=st.booleans(),
    cooldown=st.floats(min_value=0, max_value=1e6),
)
def test_decision_never_leaves_tuwunel(
    verdict: Verdict | None,
    strategy: Strategy,
    allowed: bool,
    failed: bool,
    update: bool,
    cooldown: float,
) -> None:
    """Once Tuwunel is deployed, nothing the probes find moves the guard back to Synapse."""
    decision = decide(Situation(verdict, strategy, Side.TUWUNEL, allowed, failed, update, cooldown))
    assert decision.action in (Action.NOTHING_TO_DO, Action.UPDATE_TUWUNEL)


def test_decision_convert_switches_on_old_engine() -> None:
    """Strategy convert switches now through the convert route when the engine lacks zstd."""
    decision = decide(Situation(INCOMPATIBLE, Strategy.CONVERT, Side.SYNAPSE, True))
    assert decision.action is Action.SWITCH_TO_TUWUNEL
    assert decision.route is Route.CONVERT
    assert decision.reason == "strategy 'convert' switches through the convert route"


def test_decision_cooldown_says_when() -> None:
    """A recent switch delays the next automatic one and says for how long."""
    decision = decide(
        Situation(COMPATIBLE, Strategy.AUTO, Side.SYNAPSE, True, cooldown_remaining=90)
    )
    assert decision.action is Action.STAY_ON_SYNAPSE
    assert decision.reason.endswith("the next is allowed in 90s")


def test_decision_without_tuwunel_table_says_so() -> None:
    """Without consent the reason tells the admin which table to add."""
    decision = decide(Situation(COMPATIBLE, Strategy.AUTO, Side.SYNAPSE, False))
    assert decision.action is Action.STAY_ON_SYNAPSE
    assert "[deployment.tuwunel]" in decision.reason


def test_decision_waiting_carries_verdict_reason() -> None:
    """While waiting for the engine, the reason repeats why the engine cannot run the image."""
    decision = decide(Situation(INCOMPATIBLE, Strategy.AUTO, Side.SYNAPSE, True))
    assert decision.reason == "waiting for an engine that can run the image: no zstd"
