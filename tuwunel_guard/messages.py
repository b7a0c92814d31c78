"""Journal message IDs for the log events an administrator acts on.

Each ID is a random 128-bit value written as 32 lower-case hex digits without hyphens, the form
``journalctl MESSAGE_ID=...`` matches. The IDs are fixed: changing one breaks every saved
journal query and the catalog entry in ``systemd/tuwunel-guard.catalog`` that shares it.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType


@dataclass(frozen=True)
class Message:
    """A journal message kind: its ID and what an event of that kind means."""

    message_id: str
    meaning: str


MESSAGES: MappingProxyType[str, Message] = MappingProxyType(
    {
        "verdict_changed": Message(
            "2669000c8a794b81a7f06f2f51921970",
            "The engine's verdict on the Tuwunel image changed since the last check.",
        ),
        "switch_started": Message(
            "9d05a892288641d3a0cea5eabaa42786",
            "A switch from Synapse to Tuwunel started.",
        ),
        "switch_committed": Message(
            "ad0e3accdf16430d8c65fc3e8ff45cbe",
            "Tuwunel passed its health checks and the switch is final.",
        ),
        "rollback_completed": Message(
            "ec60315a382747628877fda417bbe5b9",
            "A failed switch was undone and Synapse serves again.",
        ),
        "switch_refused": Message(
            "0044adb12de34732986da877b20acd4c",
            "A preflight check failed, so the switch did not start.",
        ),
        "config_rejected": Message(
            "973482df3f0848238c22923fb70c03ff",
            "The config file is invalid and was not loaded.",
        ),
    }
)


def message_id_for(event: str) -> str | None:
    """Return the MESSAGE_ID of ``event``, or None when the event has no catalog entry."""
    message = MESSAGES.get(event)
    return message.message_id if message is not None else None
