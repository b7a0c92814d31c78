"""Start and stop real Docker engines (20.10 from Debian 12, 26.1 from Debian 13).

Each engine runs in its own short folder under /tmp, with its own socket, data root, exec root
and pidfile, so several engines can run side by side and none touches /var/lib/docker.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from testbed import paths, unixhttp

log = logging.getLogger(__name__)

# The kernel limits a unix socket path to 107 bytes, and containerd puts its sockets several
# folders deep under the exec root, so engine folders must stay short.
MAX_SOCKET_PATH = 107
SYSTEM_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass(frozen=True)
class EngineRelease:
    """One Docker Engine release that the test bed can start."""

    version: str
    dockerd: Path
    path: str


RELEASES: dict[str, EngineRelease] = {
    "20.10": EngineRelease("20.10", paths.DOCKERD20, SYSTEM_PATH),
    # Debian 13's containerd 1.7 and docker-proxy come first on PATH. runc is missing from
    # that root on purpose: Debian 13's runc needs glibc 2.38, so Debian 12's runc is used.
    "26.1": EngineRelease(
        "26.1",
        paths.DOCKERD26,
        f"{paths.DOCKER26_ROOT}/usr/sbin:{paths.DOCKER26_ROOT}/usr/bin:{SYSTEM_PATH}",
    ),
}


class EngineError(RuntimeError):
    """Raised when a Docker engine fails to start or to stop."""


class DockerEngine:
    """A dockerd process of one release, with its own socket, data root and exec root.

    Call start() and stop(), or use it as a context manager. The folder stays after stop()
    so that upgrade_to() can start the next release on the same data; remove() deletes it.
    """

    def __init__(self, version: str, workdir: Path | None = None) -> None:
        if version not in RELEASES:
            raise ValueError(
                f"unknown engine version {version!r}; expected one of {sorted(RELEASES)}"
            )
        self.release = RELEASES[version]
        if workdir is None:
            workdir = Path(tempfile.mkdtemp(prefix="tg", dir="/tmp"))
        self.workdir = workdir
        self.process: subprocess.Popen[bytes] | None = None
        self._log_file: Any = None
        longest = self.exec_root / "containerd" / "containerd.sock.ttrpc"
        if len(str(longest)) > MAX_SOCKET_PATH - 20:
            raise ValueError(
                f"engine folder {workdir} is too long for unix socket paths "
                f"(max {MAX_SOCKET_PATH} bytes, and containerd adds about 60); "
                "use a folder like /tmp/tgXXXX"
            )

    @property
    def version(self) -> str:
        """Release of the engine that start() runs: "20.10" or "26.1"."""
        return self.release.version

    @property
    def socket_path(self) -> Path:
        return self.workdir / "docker.sock"

    @property
    def base_url(self) -> str:
        """Value for DOCKER_HOST or docker.DockerClient(base_url=...)."""
        return f"unix://{self.socket_path}"

    @property
    def data_root(self) -> Path:
        return self.workdir / "root"

    @property
    def exec_root(self) -> Path:
        return self.workdir / "exec"

    @property
    def pidfile(self) -> Path:
        return self.workdir / "docker.pid"

    @property
    def config_file(self) -> Path:
        return self.workdir / "daemon.json"

    @property
    def log_path(self) -> Path:
        """Output of the current dockerd; each release writes its own file."""
        return self.workdir / f"dockerd-{self.version}.log"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def command(self) -> list[str]:
        """Return the dockerd argument list for the current release."""
        return [
            str(self.release.dockerd),
            f"--host={self.base_url}",
            f"--data-root={self.data_root}",
            f"--exec-root={self.exec_root}",
            f"--pidfile={self.pidfile}",
            f"--config-file={self.config_file}",
            f"--init-path={paths.DOCKER_INIT}",
            "--iptables=false",
            "--bridge=none",
            "--storage-driver=vfs",
        ]

    def start(self, timeout: float = 60.0) -> None:
        """Start dockerd and wait until GET /_ping returns OK.

        Raise EngineError with the end of the engine's log when dockerd exits or times out.
        """
        if self.running:
            raise EngineError(f"engine {self.version} in {self.workdir} is already running")
        paths.require_installed()
        self.workdir.mkdir(parents=True, exist_ok=True)
        # An empty configuration file keeps a host's /etc/docker/daemon.json out of the test.
        self.config_file.write_text("{}\n")
        environment = {"PATH": self.release.path, "HOME": str(self.workdir), "LANG": "C.UTF-8"}
        self._log_file = self.log_path.open("ab")
        log.info("starting Docker engine %s in %s", self.version, self.workdir)
        self.process = subprocess.Popen(
            self.command(),
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            env=environment,
            start_new_session=True,
        )
        self._wait_ready(self.process, timeout)

    def _wait_ready(self, process: subprocess.Popen[bytes], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                self._close_log()
                raise EngineError(
                    f"dockerd {self.version} exited with status {process.returncode} "
                    f"before GET /_ping returned OK; log {self.log_path}:\n{self.log_tail()}"
                )
            if self.ping():
                return
            time.sleep(0.1)
        self.stop()
        raise EngineError(
            f"timed out after {timeout:.0f} s waiting for dockerd {self.version} "
            f"on {self.socket_path}; "
            f"log {self.log_path}:\n{self.log_tail()}"
        )

    def ping(self) -> bool:
        """Return True when GET /_ping on the socket returns 200 OK."""
        try:
            status, body = unixhttp.get(self.socket_path, "/_ping", timeout=2.0)
        except OSError:
            return False
        return status == 200 and body == b"OK"

    def version_info(self) -> dict[str, Any]:
        """Return the engine's GET /version document (Version, ApiVersion, ...)."""
        status, body = unixhttp.get(self.socket_path, "/version")
        if status != 200:
            raise EngineError(f"GET /version on {self.socket_path} failed with status {status}")
        info: dict[str, Any] = json.loads(body)
        return info

    def stop(self, timeout: float = 60.0) -> None:
        """Send SIGTERM to the PID in the pidfile and wait for dockerd to exit.

        dockerd stops its containers first (10 s per container that ignores SIGTERM). After
        `timeout` seconds the process gets SIGKILL. Does nothing when the engine is not running.

        NOTE: after SIGKILL, containerd-shim processes of running containers outlive dockerd,
        because they detach from it. Only the SIGTERM path is covered by the tests.
        """
        process = self.process
        if process is None:
            return
        if process.poll() is None:
            pid = self._pid_to_signal(process)
            log.info("stopping Docker engine %s (PID %d)", self.version, pid)
            os.kill(pid, signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning(
                    "dockerd PID %d ignored SIGTERM for %.0f s; sending SIGKILL", pid, timeout
                )
                os.kill(pid, signal.SIGKILL)
                process.wait(10)
        self.process = None
        self._close_log()

    def _pid_to_signal(self, process: subprocess.Popen[bytes]) -> int:
        # Signal the pidfile's PID only when it is the process that this object started.
        # A stale pidfile from an earlier run then raises instead of killing another process.
        try:
            pid = int(self.pidfile.read_text().strip())
        except (OSError, ValueError):
            pid = process.pid
        if pid != process.pid:
            raise EngineError(
                f"pidfile {self.pidfile} names PID {pid}, but this engine started PID {process.pid}"
            )
        return pid

    def upgrade_to(self, version: str, timeout: float = 60.0) -> float:
        """Stop this engine and start `version` on the same socket, data root and exec root.

        Containers with a restart policy come back under the new engine. Returns the seconds
        from SIGTERM until the new engine returns OK on GET /_ping.
        """
        if version not in RELEASES:
            raise ValueError(
                f"unknown engine version {version!r}; expected one of {sorted(RELEASES)}"
            )
        began = time.monotonic()
        self.stop(timeout)
        self.release = RELEASES[version]
        self.start(timeout)
        return time.monotonic() - began

    def remove(self) -> None:
        """Stop the engine and delete its folder, after unmounting anything left under it."""
        self.stop()
        for mountpoint in sorted(_mountpoints_under(self.workdir), reverse=True):
            subprocess.run(["/bin/umount", "--lazy", str(mountpoint)], check=False)
        shutil.rmtree(self.workdir, ignore_errors=True)

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError as error:
            return f"(log not readable: {error})"
        return "\n".join(text.splitlines()[-lines:])

    def _close_log(self) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def __enter__(self) -> DockerEngine:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"DockerEngine({self.version!r}, {str(self.workdir)!r}, {state})"


def _mountpoints_under(folder: Path) -> list[Path]:
    """Return the mount points below `folder` listed in /proc/self/mountinfo."""
    prefix = str(folder.resolve()) + "/"
    found = []
    with Path("/proc/self/mountinfo").open() as mountinfo:
        for line in mountinfo:
            # Field 5 is the mount point, with spaces and other bytes escaped as octal.
            mountpoint = line.split()[4].encode().decode("unicode_escape")
            if mountpoint.startswith(prefix):
                found.append(Path(mountpoint))
    return found
