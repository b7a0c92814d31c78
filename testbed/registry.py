"""A Distribution registry (docker-registry 2.8 from Debian 12) on a free loopback port."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import requests

from testbed import paths

log = logging.getLogger(__name__)

CONFIG_TEMPLATE = """\
version: 0.1
log:
  level: info
storage:
  filesystem:
    rootdirectory: {storage}
  delete:
    enabled: true
http:
  addr: 127.0.0.1:{port}
"""


class RegistryError(RuntimeError):
    """Raised when the registry fails to start."""


class Registry:
    """A `docker-registry serve` process without auth, storing blobs in a temporary folder.

    Engines pull from it over plain HTTP without extra flags, because Docker trusts
    127.0.0.0/8 as an insecure registry by default.
    """

    def __init__(self, workdir: Path | None = None) -> None:
        if workdir is None:
            workdir = Path(tempfile.mkdtemp(prefix="tgreg"))
        self.workdir = workdir
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self._log_file: Any = None

    @property
    def host(self) -> str:
        """Registry address as image references use it: 127.0.0.1:PORT."""
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    @property
    def log_path(self) -> Path:
        return self.workdir / "registry.log"

    @property
    def storage(self) -> Path:
        return self.workdir / "storage"

    def start(self, timeout: float = 30.0, attempts: int = 3) -> None:
        """Start the registry and wait until GET /v2/ returns {}.

        The port comes from binding port 0 and closing the socket, so another process can take
        it before the registry binds it. The start is then retried on a new port.
        """
        paths.require_installed()
        self.storage.mkdir(parents=True, exist_ok=True)
        for attempt in range(1, attempts + 1):
            self.port = free_loopback_port()
            config = self.workdir / "config.yml"
            config.write_text(CONFIG_TEMPLATE.format(storage=self.storage, port=self.port))
            self._log_file = self.log_path.open("ab")
            log.info("starting registry on %s (attempt %d)", self.host, attempt)
            self.process = subprocess.Popen(
                [str(paths.REGISTRY_BINARY), "serve", str(config)],
                stdin=subprocess.DEVNULL,
                stdout=self._log_file,
                stderr=subprocess.STDOUT,
                env={"PATH": "/usr/bin:/bin", "HOME": str(self.workdir)},
                start_new_session=True,
            )
            if self._wait_ready(self.process, timeout):
                return
            self.stop()
        raise RegistryError(
            f"registry did not start after {attempts} attempts; "
            f"log {self.log_path}:\n{self._log_tail()}"
        )

    def _wait_ready(self, process: subprocess.Popen[bytes], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                return False
            try:
                response = requests.get(f"{self.url}/v2/", timeout=2)
            except requests.ConnectionError:
                time.sleep(0.05)
                continue
            if response.status_code == 200 and response.json() == {}:
                return True
            time.sleep(0.05)
        return False

    def stop(self, timeout: float = 10.0) -> None:
        """Send SIGTERM to the registry process this object started and wait for it to exit."""
        process = self.process
        if process is None:
            return
        if process.poll() is None:
            os.kill(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(process.pid, signal.SIGKILL)
                process.wait(10)
        self.process = None
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def remove(self) -> None:
        """Stop the registry and delete its folder with every stored blob."""
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def _log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError as error:
            return f"(log not readable: {error})"
        return "\n".join(text.splitlines()[-lines:])

    def __enter__(self) -> Registry:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.remove()


def free_loopback_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago.

    Another process may take it before the caller binds it, so callers retry on failure.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port
