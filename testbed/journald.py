"""Run a real systemd-journald in a private mount namespace and read back what it stored.

The host's PID 1 need not be systemd. ``unshare --mount --propagation private`` gives journald
its own view of the file system: a tmpfs on ``/run/systemd`` (where its sockets appear), private
folders bound over ``/run/log`` and ``/var/log``, and a private ``journald.conf`` with
persistent storage, no rate limit and no forwarding. These mounts are invisible outside the
namespace, so the host keeps its own (or no) journal.

Programs that should log to this journald run inside the namespace with :meth:`Journald.run`
(``nsenter -t PID -m``). Entries are read back from outside with ``journalctl --directory``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

JOURNALD = Path("/lib/systemd/systemd-journald")
JOURNAL_SOCKET = "/run/systemd/journal/socket"

JOURNALD_CONF = """\
[Journal]
Storage=persistent
RateLimitBurst=0
ForwardToSyslog=no
ForwardToKMsg=no
ForwardToConsole=no
ForwardToWall=no
"""

# Runs as PID JOURNALD inside the new namespace: sh execs journald, and unshare without --fork
# execs sh, so the PID of the unshare process is journald's. The "flushed" flag makes journald
# write to /var/log/journal at once instead of /run/log/journal.
_NAMESPACE_SCRIPT = """\
set -e
mount -t tmpfs -o mode=0755 tmpfs /run/systemd
mkdir /run/systemd/journal
mount --bind "$1/run-log" /run/log
mount --bind "$1/var-log" /var/log
mount --bind "$1/journald.conf" /etc/systemd/journald.conf
touch /run/systemd/journal/flushed
exec "$2"
"""


class JournaldError(RuntimeError):
    """Raised when journald does not start, or a journal query fails."""


class Journald:
    """A systemd-journald process with a private journal folder.

    Use it as a context manager, or call :meth:`start` and :meth:`stop`. The folder is removed
    on stop unless ``keep`` is set.
    """

    def __init__(self, folder: Path | None = None, *, keep: bool = False) -> None:
        self.folder = folder or Path(tempfile.mkdtemp(prefix="tg-journald-"))
        self.keep = keep
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        """PID of journald; raises JournaldError when it is not running."""
        if self.process is None:
            raise JournaldError("journald is not running; call start() first")
        return self.process.pid

    @property
    def journal_dir(self) -> Path:
        """The folder journald writes its files to, as seen from outside the namespace."""
        machine_id = Path("/etc/machine-id").read_text().strip()
        return self.folder / "var-log" / "journal" / machine_id

    def start(self, timeout: float = 10.0) -> None:
        """Start journald and wait until its native socket exists."""
        if not JOURNALD.exists():
            raise JournaldError(f"{JOURNALD} not found; install the systemd package")
        for name in ("run-log", "var-log/journal"):
            (self.folder / name).mkdir(parents=True, exist_ok=True)
        (self.folder / "journald.conf").write_text(JOURNALD_CONF)
        log_file = (self.folder / "journald.log").open("wb")
        self.process = subprocess.Popen(
            [
                "unshare",
                "--mount",
                "--propagation",
                "private",
                "--",
                "/bin/sh",
                "-c",
                _NAMESPACE_SCRIPT,
                "sh",
                str(self.folder),
                str(JOURNALD),
            ],
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
        log_file.close()
        self._wait_for_socket(timeout)

    def _wait_for_socket(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                output = (self.folder / "journald.log").read_text(errors="replace")
                raise JournaldError(
                    f"journald exited with status {self.process.returncode}: {output}"
                )
            # The tmpfs on /run/systemd exists only inside the namespace, so look from there.
            probe = self.run(["test", "-S", JOURNAL_SOCKET], check=False)
            if probe.returncode == 0:
                return
            time.sleep(0.05)
        self.stop()
        raise JournaldError(f"journald did not create {JOURNAL_SOCKET} within {timeout} s")

    def run(
        self,
        argv: Sequence[str],
        *,
        check: bool = True,
        env: dict[str, str] | None = None,
        timeout: float = 60.0,
        input_bytes: bytes | None = None,
    ) -> subprocess.CompletedProcess[bytes]:
        """Run ``argv`` inside journald's mount namespace and return its result."""
        return subprocess.run(
            ["nsenter", "-t", str(self.pid), "-m", "--", *argv],
            check=check,
            capture_output=True,
            env=env,
            timeout=timeout,
            input=input_bytes,
        )

    def sync(self) -> None:
        """Make journald write every received entry to its files (``journalctl --sync``)."""
        self.run(["journalctl", "--sync"])

    def entries(self, *matches: str) -> list[dict[str, Any]]:
        """Return the stored entries that fit the journalctl ``matches``, oldest first.

        Each entry is journalctl's JSON object, with values of any size. Values that are not
        printable UTF-8 come back as lists of byte values, as ``journalctl -o json`` writes them.
        """
        self.sync()
        result = subprocess.run(
            [
                "journalctl",
                f"--directory={self.journal_dir}",
                "--output=json",
                "--all",  # without it, values over 4096 bytes come back as null
                "--no-pager",
                *matches,
            ],
            capture_output=True,
            check=False,
            timeout=30,
        )
        if result.returncode != 0:
            message = result.stderr.decode(errors="replace")
            raise JournaldError(f"journalctl failed with status {result.returncode}: {message}")
        return [json.loads(line) for line in result.stdout.splitlines() if line.strip()]

    def stop(self, timeout: float = 10.0) -> None:
        """Stop journald by its PID, wait for it to exit and remove the folder."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            os.kill(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(process.pid, signal.SIGKILL)
                process.wait(timeout)
        if not self.keep:
            shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> Journald:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()
