"""Logging setup: structlog events to the systemd journal or to stderr.

Code logs facts through structlog, an event name in past-tense snake_case plus flat fields::

    log = structlog.get_logger("tuwunel_guard")
    log.info("verdict_reached", engine_version="20.10.24", verdict="incompatible", reason="...")

:func:`configure_logging` picks one output:

* **journal**: one native journal entry per event. ``MESSAGE`` is the event name followed by
  ``key=value`` pairs, ``PRIORITY`` comes from the level, ``SYSLOG_IDENTIFIER`` is
  ``tuwunel-guard``, each field is also its own upper-case journal field, and the events listed in
  :mod:`tuwunel_guard.messages` carry their ``MESSAGE_ID``.
* **stderr**: one line per event, ``TIMESTAMP LEVEL EVENT key=value ...``, with the timestamp in
  UTC (ISO 8601, milliseconds). Values with spaces, quotes or ``=`` are JSON-quoted.

Records from the standard ``logging`` module (docker, urllib3, apscheduler) go to the same
output, with the logger name in the ``logger`` field.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Callable, MutableMapping
from typing import Any, TextIO

import structlog

from tuwunel_guard.adapters.journal import JOURNAL_SOCKET, FieldValue, JournalSender, field_name
from tuwunel_guard.messages import message_id_for

SYSLOG_IDENTIFIER = "tuwunel-guard"

LEVELS: dict[str, int] = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}

# syslog priorities as journald stores them in PRIORITY (see syslog(3)).
PRIORITIES: dict[str, int] = {
    "debug": 7,
    "info": 6,
    "warning": 4,
    "error": 3,
    "critical": 2,
}

# Fields the journal entry sets itself. An event field with one of these names is sent with a
# GUARD_ prefix so that it neither overrides nor duplicates them.
_RESERVED_FIELDS = frozenset(
    {
        "MESSAGE",
        "MESSAGE_ID",
        "PRIORITY",
        "SYSLOG_IDENTIFIER",
        "SYSLOG_FACILITY",
        "SYSLOG_PID",
        "SYSLOG_TIMESTAMP",
        "SYSLOG_RAW",
        "CODE_FILE",
        "CODE_LINE",
        "CODE_FUNC",
        "ERRNO",
        "EVENT",
        "INVOCATION_ID",
        "USER_INVOCATION_ID",
        "TID",
        "UNIT",
        "USER_UNIT",
        "DOCUMENTATION",
    }
)

# Keys added by processors rather than by the call site; they are not repeated in MESSAGE.
_META_KEYS = ("timestamp", "level", "event")

EventDict = MutableMapping[str, Any]


def configure_logging(level: str = "info", *, journal: bool | None = None) -> None:
    """Configure structlog and the standard ``logging`` module for the whole process.

    Args:
        level: the lowest level logged: debug, info, warning, error or critical.
        journal: True sends events to journald, False writes lines to stderr, and None picks
            the journal when systemd connected stderr to it (``JOURNAL_STREAM`` is set) or when
            the journal socket exists. With the journal chosen and stderr a terminal, lines are
            written to stderr as well, so an interactive run still shows them.

    Raises:
        ValueError: ``level`` is not one of the five level names.
    """
    min_level = _parse_level(level)
    use_journal = journal_available() if journal is None else journal

    final: structlog.typing.Processor
    if use_journal:
        echo = sys.stderr if sys.stderr is not None and sys.stderr.isatty() else None
        final = JournalRenderer(JournalSender(), echo=echo)
    else:
        final = ConsoleRenderer()

    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True, key="timestamp"),
            structlog.processors.format_exc_info,
            final,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(min_level),
        logger_factory=_SinkLoggerFactory(),
        cache_logger_on_first_use=False,
    )
    _route_stdlib_logging(min_level)


def journal_available() -> bool:
    """Return True when journald is reachable: ``JOURNAL_STREAM`` is set or its socket exists."""
    return bool(os.environ.get("JOURNAL_STREAM")) or os.path.exists(JOURNAL_SOCKET)  # noqa: PTH110


def _parse_level(level: str) -> int:
    try:
        return LEVELS[level.lower()]
    except KeyError:
        names = ", ".join(LEVELS)
        raise ValueError(f"invalid log level {level!r}; expected one of: {names}") from None


def format_value(value: Any) -> str:
    """Format one field value for a ``key=value`` pair.

    Strings pass unchanged, lists and dicts become JSON, and anything else uses ``str()``.
    """
    if isinstance(value, str):
        return value
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple | dict):
        return json.dumps(value, default=str, ensure_ascii=False)
    return str(value)


def _quote(text: str) -> str:
    if text and not any(char in text for char in ' "=\n\t\\'):
        return text
    return json.dumps(text, ensure_ascii=False)


def render_pairs(event_dict: EventDict) -> str:
    """Render the event name and its call-site fields as ``event key=value ...``.

    A multi-line ``exception`` field (a formatted traceback) is appended after a newline.
    """
    fields = {key: value for key, value in event_dict.items() if key not in _META_KEYS}
    exception = fields.pop("exception", None)
    # Events are snake_case names; only free text from the logging module needs quoting.
    parts = [_quote(str(event_dict.get("event", "")))]
    parts.extend(f"{key}={_quote(format_value(value))}" for key, value in fields.items())
    line = " ".join(parts)
    if exception:
        line += "\n" + str(exception).rstrip("\n")
    return line


class ConsoleRenderer:
    """Renders an event as one stderr line: ``TIMESTAMP LEVEL EVENT key=value ...``."""

    def __call__(self, logger: Any, method_name: str, event_dict: EventDict) -> dict[str, str]:
        timestamp = event_dict.get("timestamp") or _utc_now()
        level = str(event_dict.get("level", method_name))
        line = f"{_short_timestamp(str(timestamp))} {level:<8} {render_pairs(event_dict)}"
        return {"line": line}


class JournalRenderer:
    """Sends an event to journald as one entry.

    When journald does not accept the entry (its socket is gone, or it is restarting), the line
    goes to stderr instead, which systemd also stores in the journal for a service.
    """

    def __init__(self, sender: JournalSender, *, echo: TextIO | None = None) -> None:
        self._sender = sender
        self._echo = echo
        self._console = ConsoleRenderer()

    def __call__(self, logger: Any, method_name: str, event_dict: EventDict) -> dict[str, str]:
        line = self._console(logger, method_name, event_dict)["line"]
        try:
            self._sender.send(journal_fields(event_dict, method_name))
        except (OSError, ValueError) as error:
            _write_line(sys.stderr, f"{line} journal_error={_quote(str(error))}")
        else:
            if self._echo is not None:
                _write_line(self._echo, line)
        # The sink logger prints nothing for the journal: the entry has been sent.
        return {"line": ""}


def journal_fields(
    event_dict: EventDict, method_name: str = "info"
) -> list[tuple[str, FieldValue]]:
    """Build the journal fields of one event: MESSAGE, PRIORITY, identifiers and each field."""
    level = str(event_dict.get("level", method_name)).lower()
    event = str(event_dict.get("event", ""))
    fields: list[tuple[str, FieldValue]] = [
        ("MESSAGE", render_pairs(event_dict)),
        ("PRIORITY", str(PRIORITIES.get(level, PRIORITIES["info"]))),
        ("SYSLOG_IDENTIFIER", SYSLOG_IDENTIFIER),
        ("EVENT", event),
    ]
    message_id = message_id_for(event)
    if message_id is not None:
        fields.append(("MESSAGE_ID", message_id))

    for key, value in event_dict.items():
        if key in _META_KEYS:
            continue
        name = field_name(key)
        if name in _RESERVED_FIELDS:
            name = field_name("GUARD_" + name)
        data: FieldValue = value if isinstance(value, bytes) else format_value(value)
        fields.append((name, data))
    return fields


class _SinkLogger:
    """The logger at the end of the chain: writes the rendered ``line``, if any, to stderr."""

    def _write(self, line: str = "") -> None:
        if line:
            _write_line(sys.stderr, line)

    debug = info = warning = warn = error = critical = exception = fatal = msg = log = _write


class _SinkLoggerFactory:
    def __call__(self, *args: Any) -> _SinkLogger:
        return _SinkLogger()


def _write_line(stream: TextIO | None, line: str) -> None:
    if stream is None:
        return
    try:
        stream.write(line + "\n")
        stream.flush()
    except (OSError, ValueError):
        # NOTE: A closed or broken stderr leaves nowhere to report the failure; the event is lost.
        pass


class _StdlibBridge(logging.Handler):
    """Passes records of the standard ``logging`` module to structlog's output."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            logger = structlog.get_logger("tuwunel_guard")
            method: Callable[..., Any] = getattr(logger, record.levelname.lower(), logger.info)
            fields: dict[str, Any] = {"logger": record.name}
            if record.exc_info:
                fields["exc_info"] = record.exc_info
            method(record.getMessage(), **fields)
        except Exception:  # handleError reports it; a handler must not raise into the logging code
            self.handleError(record)


def _route_stdlib_logging(min_level: int) -> None:
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, _StdlibBridge):
            root.removeHandler(handler)
    root.addHandler(_StdlibBridge())
    root.setLevel(min_level)
    # urllib3 logs each request line, query strings included, at DEBUG; a health URL's query
    # may carry an access token.
    logging.getLogger("urllib3").setLevel(max(min_level, logging.INFO))


def _utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + ".000Z"


def _short_timestamp(timestamp: str) -> str:
    # structlog writes microseconds ("2026-01-02T03:04:05.123456Z"); milliseconds read better.
    if len(timestamp) == 27 and timestamp.endswith("Z") and timestamp[19] == ".":
        return timestamp[:23] + "Z"
    return timestamp
