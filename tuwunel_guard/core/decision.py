"""The decision: given the verdict, the strategy and what is deployed, what to do now.

Pure logic, no I/O. The decision never moves from Tuwunel back to Synapse: switching creates a
new, empty server under the same ``server_name``, so only the admin may switch back.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from tuwunel_guard.core.verdict import Verdict


class Strategy(enum.StrEnum):
    """How the admin wants the guard to get Tuwunel onto the engine (config key ``strategy``)."""

    AUTO = "auto"
    """Switch once the engine can run the image natively."""

    SYNAPSE = "synapse"
    """Never switch; keep checking and reporting."""


class Side(enum.StrEnum):
    """Which homeserver the compose deployment runs."""

    SYNAPSE = "synapse"
    TUWUNEL = "tuwunel"


class Action(enum.StrEnum):
    """What the guard does after a cycle."""

    STAY_ON_SYNAPSE = "stay-on-synapse"
    SWITCH_TO_TUWUNEL = "switch-to-tuwunel"
    NOTHING_TO_DO = "nothing-to-do"


@dataclass(frozen=True)
class Situation:
    """Everything the decision depends on.

    ``verdict`` is ``None`` when the engine or the registry could not be asked this cycle.
    ``failed_before`` is true when a switch to the same manifest digest already failed.
    """

    verdict: Verdict | None
    strategy: Strategy
    deployed: Side
    switch_allowed: bool
    failed_before: bool = False


@dataclass(frozen=True)
class Decision:
    """An action with the reason for it, in words a person understands."""

    action: Action
    reason: str


def decide(situation: Situation) -> Decision:  # noqa: PLR0911 - one return per rule reads as a table
    """Decide what to do in ``situation``; the rules are checked in order, first match wins."""
    if situation.deployed is Side.TUWUNEL:
        return Decision(
            Action.NOTHING_TO_DO,
            "Tuwunel is deployed; the guard never switches back to Synapse on its own",
        )

    if situation.strategy is Strategy.SYNAPSE:
        return Decision(Action.STAY_ON_SYNAPSE, "strategy 'synapse' keeps Synapse deployed")

    if not situation.switch_allowed:
        return Decision(
            Action.STAY_ON_SYNAPSE,
            "the config has no [deployment.tuwunel] table, so the guard only reports; "
            "add one to allow the switch",
        )

    if situation.verdict is None:
        return Decision(
            Action.STAY_ON_SYNAPSE,
            "the engine or the registry could not be asked; the next cycle tries again",
        )

    if situation.failed_before:
        return Decision(
            Action.STAY_ON_SYNAPSE,
            "a switch to this image already failed and was rolled back; "
            "waiting for a new image digest",
        )

    if not situation.verdict.compatible:
        return Decision(
            Action.STAY_ON_SYNAPSE,
            f"waiting for an engine that can run the image: {situation.verdict.reason}",
        )

    return Decision(Action.SWITCH_TO_TUWUNEL, situation.verdict.reason)
