"""End-to-end tests of journal output against a real systemd-journald.

journald runs in a private mount namespace (see testbed/journald.py). The logging process joins
that namespace, so it finds journald's socket at the usual path, as the daemon does under systemd.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import textwrap
from collections.abc import Iterator
from typing import Any

import pytest

from testbed.journald import JOURNALD, Journald
from tuwunel_guard.messages import MESSAGES

pytestmark = [
    pytest.mark.testbed,
    pytest.mark.skipif(os.geteuid() != 0, reason="mount namespaces need root"),
    pytest.mark.skipif(
        not JOURNALD.exists() or shutil.which("unshare") is None,
        reason="needs systemd-journald and unshare (util-linux)",
    ),
]

# Runs inside journald's namespace: logs each event read from stdin through configure_logging
# with journal detection left to auto, as `tuwunel-guard run` does.
LOGGING_CHILD = textwrap.dedent(
    """
    import json, sys
    import structlog
    from tuwunel_guard.log import configure_logging

    configure_logging("debug")
    log = structlog.get_logger("tuwunel_guard")
    for level, event, fields in json.load(sys.stdin):
        getattr(log, level)(event, **fields)
    """
)

# Logs one caught exception with its traceback.
EXCEPTION_CHILD = textwrap.dedent(
    """
    import structlog
    from tuwunel_guard.log import configure_logging

    configure_logging("info")
    try:
        raise RuntimeError("engine gone")
    except RuntimeError:
        structlog.get_logger("tuwunel_guard").exception("cycle_failed", cycle=1)
    """
)

# Sends one entry with a small send buffer, so that it must go through the memfd path.
MEMFD_CHILD = textwrap.dedent(
    """
    import sys
    from tuwunel_guard.adapters.journal import JournalSender

    blob = sys.stdin.buffer.read()
    sender = JournalSender(send_buffer=4096)
    sender.send([("MESSAGE", "memfd_entry_sent"), ("SYSLOG_IDENTIFIER", "tuwunel-guard"),
                 ("BLOB", blob)])
    sender.close()
    """
)


@pytest.fixture(scope="module")
def journald() -> Iterator[Journald]:
    with Journald() as server:
        yield server


def log_events(journald: Journald, events: list[tuple[str, str, dict[str, Any]]]) -> None:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    journald.run(
        [sys.executable, "-c", LOGGING_CHILD], env=env, input_bytes=json.dumps(events).encode()
    )


def entries_of(journald: Journald, event: str) -> list[dict[str, Any]]:
    return journald.entries("SYSLOG_IDENTIFIER=tuwunel-guard", f"EVENT={event}")


def test_fields_come_back_exactly(journald: Journald) -> None:
    """Every event field is stored as its upper-case journal field with the same value."""
    log_events(
        journald,
        [
            (
                "info",
                "verdict_reached",
                {
                    "engine_version": "20.10.24",
                    "verdict": "incompatible",
                    "reason": "zstd layers need Docker 23.0\nsecond line",
                    "image.ref": "ghcr.io/matrix-construct/tuwunel:latest",
                    "_private": "kept",
                    "2nd": "digit",
                    "count": 3,
                    "text": "ünïcode ✓",
                },
            )
        ],
    )
    (entry,) = entries_of(journald, "verdict_reached")

    assert entry["ENGINE_VERSION"] == "20.10.24"
    assert entry["VERDICT"] == "incompatible"
    assert entry["REASON"] == "zstd layers need Docker 23.0\nsecond line"
    assert entry["IMAGE_REF"] == "ghcr.io/matrix-construct/tuwunel:latest"
    assert entry["PRIVATE"] == "kept"
    assert entry["FIELD_2ND"] == "digit"
    assert entry["COUNT"] == "3"
    assert entry["TEXT"] == "ünïcode ✓"
    assert entry["PRIORITY"] == "6"
    assert entry["SYSLOG_IDENTIFIER"] == "tuwunel-guard"
    assert entry["_TRANSPORT"] == "journal"
    assert entry["MESSAGE"].startswith("verdict_reached engine_version=20.10.24 verdict=")
    assert "MESSAGE_ID" not in entry


@pytest.mark.parametrize(
    ("level", "priority"),
    [("debug", "7"), ("info", "6"), ("warning", "4"), ("error", "3"), ("critical", "2")],
)
def test_priority_per_level(journald: Journald, level: str, priority: str) -> None:
    """Each level is stored with its syslog priority."""
    event = f"priority_checked_{level}"
    log_events(journald, [(level, event, {})])
    (entry,) = entries_of(journald, event)
    assert entry["PRIORITY"] == priority


@pytest.mark.parametrize("event", sorted(MESSAGES))
def test_message_id_matches(journald: Journald, event: str) -> None:
    """`journalctl MESSAGE_ID=...` finds the admin events by the ID in the message table."""
    message_id = MESSAGES[event].message_id
    log_events(journald, [("warning", event, {"marker": f"{event}-marker"})])

    found = journald.entries(f"MESSAGE_ID={message_id}")
    assert [entry["MARKER"] for entry in found] == [f"{event}-marker"]
    assert found[0]["EVENT"] == event


def test_large_entry_through_memfd(journald: Journald) -> None:
    """An entry larger than the send buffer arrives whole through the sealed memfd."""
    blob = bytes(range(256)) * 4096  # 1 MiB including NUL bytes and newlines
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    journald.run([sys.executable, "-c", MEMFD_CHILD], env=env, input_bytes=blob)

    (entry,) = journald.entries("SYSLOG_IDENTIFIER=tuwunel-guard", "MESSAGE=memfd_entry_sent")
    # journalctl -o json writes values that are not valid UTF-8 as lists of byte values.
    assert bytes(entry["BLOB"]) == blob


def test_exception_traceback_stored(journald: Journald) -> None:
    """log.exception stores the traceback in EXCEPTION and at the end of MESSAGE."""
    journald.run([sys.executable, "-c", EXCEPTION_CHILD])

    (entry,) = entries_of(journald, "cycle_failed")
    assert entry["PRIORITY"] == "3"
    assert entry["EXCEPTION"].endswith("RuntimeError: engine gone")
    assert entry["MESSAGE"].startswith("cycle_failed cycle=1\nTraceback (most recent call last):")
