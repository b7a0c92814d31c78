"""Send entries to systemd-journald over its native protocol.

The protocol (systemd's ``sd_journal_sendv`` and the "Native Journal Protocol" page of
systemd.io) sends one AF_UNIX datagram per entry to ``/run/systemd/journal/socket``:

* ``NAME=value\\n`` for a value without a newline;
* ``NAME\\n`` + the value's length as a little-endian u64 + the raw bytes + ``\\n`` otherwise,
  which also makes the value binary-safe;
* an entry larger than the socket accepts goes into a sealed memfd, and the datagram carries only
  that file descriptor (SCM_RIGHTS) and no payload.

Written by hand because the binding ``systemd-python`` ships only as a source distribution: it
needs a C compiler and ``libsystemd-dev`` at install time, which the offline wheelhouse install
on a Debian host cannot assume. The encoder is about forty lines and has no other dependency.
"""

from __future__ import annotations

import array
import contextlib
import errno
import fcntl
import os
import re
import socket
import struct
import threading
from collections.abc import Iterable, Mapping

JOURNAL_SOCKET = "/run/systemd/journal/socket"

# journald rejects field names longer than 64 bytes (JOURNAL_FIELD_NAME_MAX in systemd 252).
FIELD_NAME_MAX = 64

# sd_journal_sendv raises SO_SNDBUF to 8 MiB so that most entries fit in one datagram. The
# kernel caps the value at net.core.wmem_max unless the process may use SO_SNDBUFFORCE.
DEFAULT_SEND_BUFFER = 8 * 1024 * 1024

# Python's socket module does not export SO_SNDBUFFORCE. 32 is its value in
# <asm-generic/socket.h>, used by x86, arm and most other Linux architectures.
# NOTE: mips, parisc, sparc and alpha use other values; there the call fails and is ignored.
_SO_SNDBUFFORCE = 32

# Errors after which sd_journal_sendv retries the entry through a memfd.
_TOO_LARGE = frozenset({errno.EMSGSIZE, errno.ENOBUFS, errno.EAGAIN})

_INVALID_NAME_CHARS = re.compile(r"[^A-Z0-9_]")

FieldValue = str | bytes


def field_name(name: str) -> str:
    """Convert ``name`` to a valid journal field name.

    Upper-cases it, replaces every character outside ``[A-Z0-9_]`` with ``_``, drops leading
    underscores (those names are reserved for fields journald adds itself), prefixes ``FIELD_``
    when the rest is empty or starts with a digit, and cuts it to 64 characters.
    """
    cleaned = _INVALID_NAME_CHARS.sub("_", name.upper()).lstrip("_")
    if not cleaned or cleaned[0].isdigit():
        cleaned = "FIELD_" + cleaned
    return cleaned[:FIELD_NAME_MAX]


def encode_entry(fields: Iterable[tuple[str, FieldValue]]) -> bytes:
    """Encode ``(name, value)`` pairs as one native-protocol entry.

    Names must already be valid field names (see :func:`field_name`); a name may repeat, which
    journald stores as several values of one field. Text values are encoded as UTF-8.

    Raises:
        ValueError: a name is not a valid journal field name.
    """
    parts: list[bytes] = []
    for name, value in fields:
        if field_name(name) != name:
            raise ValueError(f"invalid journal field name {name!r}; use field_name() first")
        data = value.encode("utf-8", "surrogateescape") if isinstance(value, str) else value
        key = name.encode("ascii")
        if b"\n" in data:
            parts.append(key + b"\n" + struct.pack("<Q", len(data)) + data + b"\n")
        else:
            parts.append(key + b"=" + data + b"\n")
    return b"".join(parts)


class JournalSender:
    """Sends encoded entries to one journald socket.

    One sender may be shared by several threads; sends are serialised by a lock.
    """

    def __init__(
        self, socket_path: str = JOURNAL_SOCKET, *, send_buffer: int = DEFAULT_SEND_BUFFER
    ) -> None:
        self.socket_path = socket_path
        self._send_buffer = send_buffer
        self._socket: socket.socket | None = None
        self._lock = threading.Lock()

    def send(self, fields: Mapping[str, FieldValue] | Iterable[tuple[str, FieldValue]]) -> None:
        """Encode ``fields`` and send them as one journal entry.

        Raises:
            OSError: the socket is missing or journald did not accept the entry.
            ValueError: a field name is not valid.
        """
        pairs = fields.items() if isinstance(fields, Mapping) else fields
        payload = encode_entry(pairs)
        with self._lock:
            sock = self._connect()
            try:
                sock.sendto(payload, self.socket_path)
            except OSError as error:
                if error.errno not in _TOO_LARGE:
                    raise
                self._send_as_memfd(sock, payload)

    def close(self) -> None:
        """Close the socket; the next :meth:`send` opens a new one."""
        with self._lock:
            if self._socket is not None:
                self._socket.close()
                self._socket = None

    def _connect(self) -> socket.socket:
        if self._socket is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            # SO_SNDBUF is capped at net.core.wmem_max; SO_SNDBUFFORCE lifts the cap but needs
            # CAP_NET_ADMIN. Whatever still does not fit goes through the memfd path.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self._send_buffer)
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, _SO_SNDBUFFORCE, self._send_buffer)
            self._socket = sock
        return self._socket

    def _send_as_memfd(self, sock: socket.socket, payload: bytes) -> None:
        fd = os.memfd_create("tuwunel-guard-journal", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            with os.fdopen(os.dup(fd), "wb") as memfd:
                memfd.write(payload)
            # journald accepts the descriptor only when it is sealed against any change.
            seals = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
            rights = array.array("i", [fd])
            sock.sendmsg([], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, rights)], 0, self.socket_path)
        finally:
            os.close(fd)
