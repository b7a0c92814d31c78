"""The decision: given the verdict, the strategy and what is deployed, what to do now.

Pure logic, no I/O. The decision never moves from Tuwunel back to Synapse: switching creates a
new, empty server under the same ``server_name``, so only the admin may switch back
(``tuwunel-guard switch --to synapse``).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from tuwunel_guard.core.verdict import Verdict


class Strategy(enum.StrEnum):
    """The admin's choice of how Tuwunel gets onto the engine (config key ``strategy``)."""

    AUTO = "auto"
    """Switch once the engine can run the image natively."""

    SYNAPSE = "synapse"
    """Never switch; keep checking and reporting."""

    CONVERT = "convert"
    """Switch now; convert the image into one the engine can load when it cannot pull it."""

    PODMAN = "podman"
    """Switch now; pull the image with Podman and hand it to the engine."""

    BUILD = "build"
    """Switch now; build the image from a git repository on the engine."""


class Route(enum.StrEnum):
    """The way the image gets onto the engine for one switch."""

    NATIVE = "native"
    CONVERT = "convert"
    PODMAN = "podman"
    BUILD = "build"


_STRATEGY_ROUTES = {
    Strategy.CONVERT: Route.CONVERT,
    Strategy.PODMAN: Route.PODMAN,
    Strategy.BUILD: Route.BUILD,
}


class Side(enum.StrEnum):
    """A homeserver of the compose deployment."""

    SYNAPSE = "synapse"
    TUWUNEL = "tuwunel"


class Action(enum.StrEnum):
    """The guard's action after a cycle."""

    STAY_ON_SYNAPSE = "stay-on-synapse"
    SWITCH_TO_TUWUNEL = "switch-to-tuwunel"
    UPDATE_TUWUNEL = "update-tuwunel"
    NOTHING_TO_DO = "nothing-to-do"


@dataclass(frozen=True)
class Situation:
    """Everything the decision depends on.

    ``verdict`` is ``None`` when the engine or the registry could not be asked this cycle.
    ``failed_before`` is true when a switch to the same manifest digest already failed.
    ``update_available`` is true when Tuwunel is deployed from another manifest digest than
    the target's. ``cooldown_remaining`` is the time in seconds until another automatic switch
    is allowed. ``prefer_native`` makes the convert, podman and build strategies use a native
    pull once the engine can run the image. ``held_by_admin`` is true after the admin switched
    back to Synapse by hand, until the admin switches to Tuwunel by hand. ``age_remaining``
    is the time in seconds until the target image reaches the configured ``min_age``.
    """

    verdict: Verdict | None
    strategy: Strategy
    deployed: Side
    switch_allowed: bool
    failed_before: bool = False
    update_available: bool = False
    cooldown_remaining: float = 0.0
    prefer_native: bool = True
    held_by_admin: bool = False
    age_remaining: float = 0.0


@dataclass(frozen=True)
class Decision:
    """An action with the reason for it, in words a person understands.

    ``route`` is the way the image gets onto the engine when the action switches or updates.
    """

    action: Action
    reason: str
    route: Route | None = None


def decide(situation: Situation) -> Decision:
    """Decide what to do in ``situation``."""
    if situation.deployed is Side.TUWUNEL:
        return _decide_on_tuwunel(situation)
    return _decide_on_synapse(situation)


def _decide_on_synapse(situation: Situation) -> Decision:
    stay = Action.STAY_ON_SYNAPSE
    if situation.strategy is Strategy.SYNAPSE:
        return Decision(stay, "strategy 'synapse' keeps Synapse deployed")

    if situation.held_by_admin:
        return Decision(
            stay,
            "the admin switched back to Synapse with 'tuwunel-guard switch --to synapse'; "
            "run 'tuwunel-guard switch --to tuwunel' to let the guard switch again",
        )

    if not situation.switch_allowed:
        return Decision(
            stay,
            "the config has no [deployment.tuwunel] table, so the guard only reports; "
            "add one to allow the switch",
        )

    blocked = _blocked(situation)
    if blocked:
        return Decision(stay, blocked)

    route = _route(situation)
    if route is None:
        return Decision(
            stay, f"waiting for an engine that can run the image: {_verdict_reason(situation)}"
        )

    return Decision(Action.SWITCH_TO_TUWUNEL, _route_reason(situation, route), route)


def _decide_on_tuwunel(situation: Situation) -> Decision:
    nothing = Action.NOTHING_TO_DO
    if not situation.update_available:
        return Decision(
            nothing,
            "Tuwunel is deployed from the target image; "
            "the guard never switches back to Synapse on its own",
        )

    if situation.strategy is Strategy.SYNAPSE:
        return Decision(
            nothing,
            "strategy 'synapse' makes no change; Tuwunel stays deployed until "
            "'tuwunel-guard switch --to synapse'",
        )

    blocked = _blocked(situation)
    if blocked:
        return Decision(nothing, blocked)

    route = _route(situation)
    if route is None:
        return Decision(
            nothing,
            "a newer Tuwunel image exists, but the engine cannot run it: "
            + _verdict_reason(situation),
        )

    return Decision(Action.UPDATE_TUWUNEL, _route_reason(situation, route), route)


def _blocked(situation: Situation) -> str:
    if situation.verdict is None:
        return "the engine or the registry could not be asked; the next cycle tries again"

    if situation.failed_before:
        return (
            "a switch to this image already failed and was rolled back; "
            "waiting for a new image digest"
        )

    if situation.age_remaining > 0:
        return (
            f"the image is younger than [target] min_age; it is adopted in "
            f"{situation.age_remaining:.0f}s"
        )

    if situation.cooldown_remaining > 0:
        return (
            f"the last automatic switch was recent; the next is allowed in "
            f"{situation.cooldown_remaining:.0f}s"
        )
    return ""


def _route(situation: Situation) -> Route | None:
    compatible = situation.verdict is not None and situation.verdict.compatible
    fixed_route = _STRATEGY_ROUTES.get(situation.strategy)

    if fixed_route is None:
        return Route.NATIVE if compatible else None
    if compatible and situation.prefer_native:
        return Route.NATIVE
    return fixed_route


def _verdict_reason(situation: Situation) -> str:
    return situation.verdict.reason if situation.verdict is not None else "no verdict"


def _route_reason(situation: Situation, route: Route) -> str:
    if route is Route.NATIVE:
        return _verdict_reason(situation)
    return f"strategy '{situation.strategy.value}' switches through the {route.value} route"
