"""The sd_notify protocol: one datagram to the socket that systemd names in ``NOTIFY_SOCKET``.

Written with the standard library rather than the ``sdnotify`` package because sdnotify 0.3.2
encodes messages as latin-1 and silently drops a ``STATUS=`` with other characters, while the
guard's status lines carry image names and reasons that may not fit latin-1.
"""

from __future__ import annotations

import os
import socket

import structlog

log = structlog.get_logger("tuwunel_guard.notify")

_MAX_STATUS = 1024


class Notifier:
    """Sends state changes to systemd; does nothing when not run by systemd."""

    def __init__(self, address: str | None = None) -> None:
        address = address if address is not None else os.environ.get("NOTIFY_SOCKET", "")
        if address.startswith("@"):
            address = "\0" + address[1:]
        self.address = address

    @property
    def enabled(self) -> bool:
        """Tell whether a notify socket was given."""
        return bool(self.address)

    def ready(self) -> None:
        """Tell systemd that start-up is done."""
        self.send("READY=1")

    def reloading(self) -> None:
        """Tell systemd that the service re-reads its config."""
        self.send("RELOADING=1")

    def stopping(self) -> None:
        """Tell systemd that the service shuts down."""
        self.send("STOPPING=1")

    def watchdog(self) -> None:
        """Tell systemd's watchdog that the service is alive and making progress."""
        self.send("WATCHDOG=1")

    def status(self, text: str) -> None:
        """Show ``text`` as the unit's status line; newlines become spaces."""
        line = " ".join(text.split())[:_MAX_STATUS]
        self.send(f"STATUS={line}")

    def send(self, message: str) -> None:
        """Send ``message`` as UTF-8; a failure is logged, never raised."""
        if not self.address:
            return
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto(message.encode("utf-8"), self.address)
        except OSError as error:
            log.warning("notify_failed", message=message.split("=", 1)[0], error=str(error))
