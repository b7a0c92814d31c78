"""Run tuwunel-guard against the test bed: write its config, start the daemon, read its events.

The daemon runs as a child process (`python -m tuwunel_guard run`) with its own notify socket,
so a test sees READY=1 and STATUS= as systemd would. Its stderr goes to a log file and, when
`echo` is set, to the terminal as well.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from testbed import paths
from testbed.compose import ComposeProject
from testbed.engine import DockerEngine
from testbed.registry import Registry

REPOSITORY_ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class GuardSettings:
    """What varies between test bed runs of the guard."""

    interval: str = "3s"
    health_timeout: str = "60s"
    strategy: str = "auto"
    tag: str = "latest"
    with_tuwunel_table: bool = True
    health_confirmations: int = 3
    min_switch_interval: str = "1h"
    backup_directory: str = ""
    tuwunel_compose_files: tuple[str, ...] = ("compose.yaml",)


def write_config(
    destination: Path,
    *,
    engine: DockerEngine | str,
    registry: Registry,
    project: ComposeProject,
    state_directory: Path,
    settings: GuardSettings = GuardSettings(),
) -> Path:
    """Write a config file for the test bed deployment and return its path."""
    socket_url = engine.base_url if isinstance(engine, DockerEngine) else engine
    backup_line = (
        f'backup_directory = "{settings.backup_directory}"\n' if settings.backup_directory else ""
    )
    text = f"""\
strategy = "{settings.strategy}"

[engine]
socket = "{socket_url}"
timeout = "20s"

[target]
image = "{registry.host}/matrix-construct/tuwunel"
tag = "{settings.tag}"
insecure_registries = ["{registry.host}"]

[deployment]
directory = "{project.folder}"
compose_command = ["{paths.COMPOSE_BINARY}"]
health_timeout = "{settings.health_timeout}"
health_interval = "500ms"
health_confirmations = {settings.health_confirmations}
min_switch_interval = "{settings.min_switch_interval}"
{backup_line}
[deployment.synapse]
compose_files = ["compose.yaml"]
project = "{project.project_name}"
services = ["synapse"]
health_urls = ["{project.url("/health")}"]
"""
    if settings.with_tuwunel_table:
        text += f"""
[deployment.tuwunel]
compose_files = {json.dumps(list(settings.tuwunel_compose_files))}
project = "{project.project_name}"
services = ["tuwunel"]
health_urls = ["{project.url("/_tuwunel/server_version")}"]
image_variable = "TUWUNEL_IMAGE"
"""
    text += f"""
[schedule]
interval = "{settings.interval}"
jitter = "0s"

[state]
directory = "{state_directory}"

[log]
level = "info"
"""
    destination.write_text(text, encoding="utf-8")
    return destination


class GuardProcess:
    """`tuwunel-guard run` as a child process, stopped by its own PID."""

    def __init__(self, config: Path, log_path: Path, *, echo: TextIO | None = None) -> None:
        self.config = config
        self.log_path = log_path
        self.echo = echo
        self.notify_path = log_path.with_suffix(".notify")
        self.notifications: list[str] = []
        self.process: subprocess.Popen[bytes] | None = None
        self._lines: list[str] = []
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._notify_socket: socket.socket | None = None

    def start(self, extra_environment: dict[str, str] | None = None) -> None:
        """Start the daemon with a private notify socket."""
        self.notify_path.unlink(missing_ok=True)
        self._notify_socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._notify_socket.bind(str(self.notify_path))
        self._notify_socket.settimeout(0.5)

        environment = {
            **os.environ,
            "NOTIFY_SOCKET": str(self.notify_path),
            **(extra_environment or {}),
        }
        environment.pop("JOURNAL_STREAM", None)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tuwunel_guard", "--config", str(self.config), "run"],
            cwd=REPOSITORY_ROOT,
            env=environment,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        self._threads = [
            threading.Thread(target=self._read_log, daemon=True),
            threading.Thread(target=self._read_notifications, daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def _read_log(self) -> None:
        assert self.process is not None and self.process.stderr is not None
        with self.log_path.open("w", encoding="utf-8") as log_file:
            for raw in self.process.stderr:
                line = raw.decode("utf-8", "replace").rstrip("\n")
                log_file.write(line + "\n")
                log_file.flush()
                with self._lock:
                    self._lines.append(line)
                if self.echo is not None:
                    self.echo.write(line + "\n")
                    self.echo.flush()

    def _read_notifications(self) -> None:
        while self._notify_socket is not None:
            try:
                message = self._notify_socket.recv(4096).decode("utf-8", "replace")
            except TimeoutError:
                if self.process is not None and self.process.poll() is not None:
                    return
                continue
            except OSError:
                return
            with self._lock:
                self.notifications.append(message)

    def lines(self) -> list[str]:
        """Return the log lines read so far."""
        with self._lock:
            return list(self._lines)

    def wait_for(
        self, predicate: Callable[[str], bool], timeout: float, what: str, start: int = 0
    ) -> tuple[int, str]:
        """Wait until a log line after index `start` matches; return its index and text."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            lines = self.lines()
            for index in range(start, len(lines)):
                if predicate(lines[index]):
                    return index, lines[index]
            if self.process is not None and self.process.poll() is not None:
                raise AssertionError(
                    f"the guard exited with {self.process.returncode} before {what}"
                )
            time.sleep(0.1)
        tail = "\n".join(self.lines()[-20:])
        raise AssertionError(f"no {what} within {timeout:.0f}s; last log lines:\n{tail}")

    def wait_for_notification(self, prefix: str, timeout: float) -> str:
        """Wait for an sd_notify message that starts with `prefix`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                for message in self.notifications:
                    if message.startswith(prefix):
                        return message
            time.sleep(0.05)
        raise AssertionError(
            f"no {prefix} notification within {timeout:.0f}s: {self.notifications}"
        )

    def peak_memory_kib(self) -> int:
        """Return the daemon's peak resident memory (VmHWM) in KiB while it runs."""
        assert self.process is not None
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        match = re.search(r"^VmHWM:\s+(\d+) kB", status, re.MULTILINE)
        assert match is not None
        return int(match[1])

    def wait_exit(self, timeout: float) -> int:
        """Wait until the daemon exits by itself and return its exit status."""
        assert self.process is not None
        status = self.process.wait(timeout)
        self._finish()
        return status

    def _finish(self) -> None:
        for thread in self._threads:
            thread.join(timeout=5)
        if self._notify_socket is not None:
            self._notify_socket.close()
            self._notify_socket = None

    def stop(self, timeout: float = 30.0) -> int:
        """Send SIGTERM to the daemon's PID and return its exit status."""
        if self.process is None:
            return 0
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
        try:
            status = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.kill(self.process.pid, signal.SIGKILL)
            status = self.process.wait()
        self._finish()
        return status


def event_field(line: str, name: str) -> str | None:
    """Return the value of `name=` in a stderr log line, unquoted, or None."""
    match = re.search(rf'\b{re.escape(name)}=("(?:[^"\\]|\\.)*"|\S+)', line)
    if match is None:
        return None
    value = match[1]
    if value.startswith('"'):
        decoded: str = json.loads(value)
        return decoded
    return value


def is_event(line: str, event: str, **fields: str) -> bool:
    """Tell whether `line` is the event `event` with each of `fields` equal."""
    parts = line.split(maxsplit=3)
    if len(parts) < 3 or parts[2] != event:
        return False
    return all(event_field(line, key) == value for key, value in fields.items())
