"""Tests of the log setup and of the journal's native protocol encoder and sender."""

from __future__ import annotations

import array
import fcntl
import logging
import os
import re
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog
from structlog.testing import capture_logs

from tuwunel_guard import log as guard_log
from tuwunel_guard.adapters.journal import (
    FIELD_NAME_MAX,
    JournalSender,
    encode_entry,
    field_name,
)
from tuwunel_guard.log import configure_logging, journal_fields
from tuwunel_guard.messages import MESSAGES, message_id_for

LINE = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z) (\w+) +(.*)$")


def decode_entry(payload: bytes) -> list[tuple[str, bytes]]:
    """Decode a native-protocol entry, independently of the encoder under test."""
    fields: list[tuple[str, bytes]] = []
    position = 0
    while position < len(payload):
        newline = payload.index(b"\n", position)
        line = payload[position:newline]
        if b"=" in line:
            name, _, value = line.partition(b"=")
            fields.append((name.decode("ascii"), value))
            position = newline + 1
            continue
        (length,) = struct.unpack_from("<Q", payload, newline + 1)
        start = newline + 1 + 8
        value = payload[start : start + length]
        assert payload[start + length : start + length + 1] == b"\n"
        fields.append((line.decode("ascii"), value))
        position = start + length + 1
    return fields


@pytest.fixture
def journal_socket(tmp_path: Path) -> Iterator[socket.socket]:
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(str(tmp_path / "journal.socket"))
    receiver.settimeout(5)
    yield receiver
    receiver.close()


@pytest.fixture(autouse=True)
def _reset_logging() -> Iterator[None]:
    yield
    structlog.reset_defaults()
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, guard_log._StdlibBridge):
            root.removeHandler(handler)
    root.setLevel(logging.WARNING)


# Field names


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("engine_version", "ENGINE_VERSION"),
        ("image.digest", "IMAGE_DIGEST"),
        ("_hidden", "HIDDEN"),
        ("__pid", "PID"),
        ("2fa", "FIELD_2FA"),
        ("_", "FIELD_"),
        ("größe", "GR_SSE"),
        ("a" * 80, "A" * FIELD_NAME_MAX),
    ],
)
def test_field_name_sanitised(name: str, expected: str) -> None:
    """Names become upper case [A-Z0-9_], never start with _ or a digit, max 64 characters."""
    assert field_name(name) == expected


def test_encode_rejects_invalid_name() -> None:
    """encode_entry does not sanitise silently: a bad name is a caller's bug."""
    with pytest.raises(ValueError, match="invalid journal field name"):
        encode_entry([("lower", "x")])


# Framing


def test_encode_single_line_value() -> None:
    """A value without a newline is sent as NAME=value."""
    assert encode_entry([("MESSAGE", "hello world"), ("PRIORITY", "6")]) == (
        b"MESSAGE=hello world\nPRIORITY=6\n"
    )


def test_encode_multiline_value() -> None:
    """A value with a newline is sent as NAME, a u64 little-endian length, the bytes and \\n."""
    value = "first line\nsecond line"
    payload = encode_entry([("REASON", value)])
    assert payload == b"REASON\n" + struct.pack("<Q", 22) + value.encode() + b"\n"
    assert decode_entry(payload) == [("REASON", value.encode())]


def test_encode_binary_safe() -> None:
    """Every byte value, NUL and newline included, comes back unchanged."""
    blob = bytes(range(256)) * 3
    payload = encode_entry([("BLOB", blob), ("AFTER", "x")])
    assert decode_entry(payload) == [("BLOB", blob), ("AFTER", b"x")]


def test_encode_value_with_equals_and_utf8() -> None:
    """An '=' inside a value and non-ASCII text need no escaping."""
    payload = encode_entry([("REASON", "a=b ✓")])
    assert decode_entry(payload) == [("REASON", "a=b ✓".encode())]


def test_encode_repeated_field() -> None:
    """A name may repeat; journald stores several values for it."""
    payload = encode_entry([("TAG", "a"), ("TAG", "b")])
    assert decode_entry(payload) == [("TAG", b"a"), ("TAG", b"b")]


# Sending


def test_sender_sends_one_datagram(journal_socket: socket.socket) -> None:
    """A small entry arrives as one datagram with the encoded fields."""
    sender = JournalSender(journal_socket.getsockname())
    sender.send({"MESSAGE": "hello", "REASON": "two\nlines"})
    sender.close()

    payload, ancillary, _, _ = journal_socket.recvmsg(65536, socket.CMSG_SPACE(4))
    assert ancillary == []
    assert decode_entry(payload) == [("MESSAGE", b"hello"), ("REASON", b"two\nlines")]


def test_sender_large_entry_uses_sealed_memfd(journal_socket: socket.socket) -> None:
    """An entry larger than the send buffer goes as a sealed memfd passed with SCM_RIGHTS."""
    sender = JournalSender(journal_socket.getsockname(), send_buffer=4096)
    big = os.urandom(256 * 1024)
    sender.send([("MESSAGE", "large"), ("BLOB", big)])
    sender.close()

    payload, ancillary, _, _ = journal_socket.recvmsg(65536, socket.CMSG_SPACE(4))
    assert payload == b""
    assert len(ancillary) == 1
    level, kind, data = ancillary[0]
    assert (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS)
    fd = array.array("i", data)[0]
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        expected = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL
        assert seals & expected == expected
        content = os.pread(fd, len(big) + 4096, 0)
    finally:
        os.close(fd)
    assert decode_entry(content) == [("MESSAGE", b"large"), ("BLOB", big)]


def test_sender_missing_socket_raises(tmp_path: Path) -> None:
    """With no journald listening, send raises OSError for the caller to handle."""
    sender = JournalSender(str(tmp_path / "absent.socket"))
    with pytest.raises(FileNotFoundError):
        sender.send({"MESSAGE": "lost"})
    sender.close()


# Journal fields of an event


def test_journal_fields_of_admin_event() -> None:
    """An admin event carries MESSAGE, PRIORITY, the identifier, MESSAGE_ID and each field."""
    event = {
        "engine_version": "26.1.5",
        "verdict": "compatible",
        "event": "verdict_changed",
        "level": "warning",
        "timestamp": "2026-01-02T03:04:05.123456Z",
    }
    assert journal_fields(event) == [
        ("MESSAGE", "verdict_changed engine_version=26.1.5 verdict=compatible"),
        ("PRIORITY", "4"),
        ("SYSLOG_IDENTIFIER", "tuwunel-guard"),
        ("EVENT", "verdict_changed"),
        ("MESSAGE_ID", MESSAGES["verdict_changed"].message_id),
        ("ENGINE_VERSION", "26.1.5"),
        ("VERDICT", "compatible"),
    ]


@pytest.mark.parametrize(
    ("level", "priority"),
    [("debug", "7"), ("info", "6"), ("warning", "4"), ("error", "3"), ("critical", "2")],
)
def test_journal_priority_from_level(level: str, priority: str) -> None:
    """Levels map to syslog priorities: debug 7, info 6, warning 4, error 3, critical 2."""
    fields = dict(journal_fields({"event": "cycle_finished", "level": level}))
    assert fields["PRIORITY"] == priority
    assert "MESSAGE_ID" not in fields


def test_journal_fields_reserved_names_prefixed() -> None:
    """A field named like a journal field cannot override it; it gets a GUARD_ prefix."""
    fields = journal_fields(
        {"event": "switch_refused", "level": "error", "message": "x", "priority": "1"}
    )
    names = [name for name, _ in fields]
    assert names.count("MESSAGE") == 1
    assert names.count("PRIORITY") == 1
    assert ("GUARD_MESSAGE", "x") in fields
    assert ("GUARD_PRIORITY", "1") in fields


def test_journal_fields_value_formats() -> None:
    """Non-string values are formatted as on stderr; bytes pass unchanged."""
    fields = dict(
        journal_fields(
            {"event": "e", "count": 3, "ok": True, "tags": ["a", "b"], "raw": b"\x00\xff"}
        )
    )
    assert fields["COUNT"] == "3"
    assert fields["OK"] == "true"
    assert fields["TAGS"] == '["a", "b"]'
    assert fields["RAW"] == b"\x00\xff"


# Message table


def test_message_ids_are_32_hex_and_unique() -> None:
    """IDs are 32 lower-case hex digits without hyphens, and no two events share one."""
    ids = [message.message_id for message in MESSAGES.values()]
    assert all(re.fullmatch(r"[0-9a-f]{32}", message_id) for message_id in ids)
    assert len(set(ids)) == len(ids)


def test_message_table_lists_admin_events() -> None:
    """Every event an admin acts on has an ID, and other events have none."""
    assert set(MESSAGES) == {
        "verdict_changed",
        "switch_started",
        "switch_committed",
        "rollback_completed",
        "switch_refused",
        "config_rejected",
    }
    assert message_id_for("verdict_reached") is None


def test_catalog_has_entry_per_message_id() -> None:
    """systemd/tuwunel-guard.catalog has one entry for each MESSAGE_ID, and no other."""
    catalog = Path(__file__).parents[2] / "systemd" / "tuwunel-guard.catalog"
    headers = re.findall(r"^-- ([0-9a-f]{32})$", catalog.read_text(), flags=re.MULTILINE)
    assert sorted(headers) == sorted(message.message_id for message in MESSAGES.values())


# configure_logging


def test_console_line_format(capsys: pytest.CaptureFixture[str]) -> None:
    """Without the journal, each event is one line: timestamp, level, event, key=value."""
    configure_logging("info", journal=False)
    structlog.get_logger("tuwunel_guard").info(
        "verdict_reached",
        engine_version="20.10.24",
        verdict="incompatible",
        reason="zstd layers need Docker 23.0",
    )
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1
    match = LINE.match(lines[0])
    assert match is not None, lines[0]
    assert match.group(2) == "info"
    assert match.group(3) == (
        "verdict_reached engine_version=20.10.24 verdict=incompatible "
        'reason="zstd layers need Docker 23.0"'
    )


def test_console_filters_below_level(capsys: pytest.CaptureFixture[str]) -> None:
    """Events below the configured level are dropped."""
    configure_logging("warning", journal=False)
    logger = structlog.get_logger("tuwunel_guard")
    logger.info("cycle_finished")
    logger.warning("registry_slowed", seconds=4.5)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1
    assert lines[0].endswith("warning  registry_slowed seconds=4.5")


def test_console_exception_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    """log.exception writes the traceback on the lines after the event."""
    configure_logging("info", journal=False)
    try:
        raise RuntimeError("engine gone")
    except RuntimeError:
        structlog.get_logger("tuwunel_guard").exception("cycle_failed", cycle=7)
    err = capsys.readouterr().err
    first, *rest = err.splitlines()
    assert first.endswith("error    cycle_failed cycle=7")
    assert rest[0] == "Traceback (most recent call last):"
    assert rest[-1] == "RuntimeError: engine gone"


def test_stdlib_records_reach_output(capsys: pytest.CaptureFixture[str]) -> None:
    """Records of the logging module appear with their logger name."""
    configure_logging("info", journal=False)
    logging.getLogger("apscheduler.scheduler").warning("job %s missed", "check")
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1
    assert lines[0].endswith('warning  "job check missed" logger=apscheduler.scheduler')


def test_capture_logs_still_works() -> None:
    """structlog.testing.capture_logs captures whole events after configure_logging."""
    configure_logging("info", journal=False)
    with capture_logs() as events:
        structlog.get_logger("tuwunel_guard").info("switch_started", target="tuwunel")
    assert events == [{"event": "switch_started", "target": "tuwunel", "log_level": "info"}]


def test_invalid_level_rejected() -> None:
    """An unknown level name raises ValueError naming the valid ones."""
    with pytest.raises(ValueError, match="invalid log level 'verbose'; expected one of: debug"):
        configure_logging("verbose", journal=False)


def test_journal_output_sends_entry(
    journal_socket: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With journal=True, an event becomes one entry on the journal socket."""
    monkeypatch.setattr(guard_log, "JOURNAL_SOCKET", journal_socket.getsockname())
    monkeypatch.setattr(
        guard_log, "JournalSender", lambda: JournalSender(journal_socket.getsockname())
    )
    configure_logging("info", journal=True)
    structlog.get_logger("tuwunel_guard").error("switch_refused", reason="disk full")

    fields = dict(decode_entry(journal_socket.recv(65536)))
    assert fields["MESSAGE"] == b'switch_refused reason="disk full"'
    assert fields["PRIORITY"] == b"3"
    assert fields["MESSAGE_ID"] == MESSAGES["switch_refused"].message_id.encode()
    assert fields["REASON"] == b"disk full"


def test_journal_unreachable_falls_back_to_stderr(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """When journald does not accept an entry, the line goes to stderr with the error."""
    absent = str(tmp_path / "absent.socket")
    monkeypatch.setattr(guard_log, "JournalSender", lambda: JournalSender(absent))
    configure_logging("info", journal=True)
    structlog.get_logger("tuwunel_guard").info("switch_started")
    err = capsys.readouterr().err
    assert "info     switch_started journal_error=" in err
    assert "No such file or directory" in err


@pytest.mark.parametrize(
    ("journal_stream", "socket_exists", "expected"),
    [("8:1234", False, True), ("", True, True), ("", False, False)],
)
def test_journal_auto_detection(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    journal_stream: str,
    socket_exists: bool,
    expected: bool,
) -> None:
    """journal=None picks the journal when JOURNAL_STREAM is set or the socket exists."""
    socket_path = tmp_path / "socket"
    if socket_exists:
        socket_path.touch()
    monkeypatch.setenv("JOURNAL_STREAM", journal_stream)
    monkeypatch.setattr(guard_log, "JOURNAL_SOCKET", str(socket_path))
    assert guard_log.journal_available() is expected
