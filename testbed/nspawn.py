"""Boot a real systemd (Debian 12's systemd 252) in a container made from the machine's own root.

The host's PID 1 need not be systemd. ``systemd-nspawn --volatile=overlay`` boots the host's
root file system as the lower layer of an overlay whose upper layer is a tmpfs, so nothing has
to be built and every write inside the container is thrown away when it stops. To keep nspawn
from touching the host's ``/run/systemd``, it runs in a private mount namespace with a tmpfs
there, and it is started inside its own cgroup (``--keep-unit``), which is removed on stop.

Commands run inside with ``nsenter`` into the namespaces of the container's PID 1.
Requirements: root, ``systemd-container`` (``scripts/testbed-systemd-deps.sh`` installs it),
``unshare`` and ``nsenter`` from util-linux.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import TracebackType

BindSpec = Path | tuple[Path, str]
"""A host folder or file bound at the same path inside, or a (host path, container path) pair."""

NSPAWN = "systemd-nspawn"
CGROUP_ROOT = Path("/sys/fs/cgroup")

# Units that the host has installed and enabled but that the tests do not need: masking them
# keeps boot short and stops a second dockerd from starting inside the container.
DEFAULT_MASKED_UNITS = (
    "docker.service",
    "docker.socket",
    "containerd.service",
    "docker-registry.service",
)

# The host may have any number of services enabled in multi-user.target (a database, say) that
# would slow the boot by seconds. basic.target brings up journald, D-Bus and the sockets, which
# is all that units started by a test need.
DEFAULT_TARGET = "basic.target"

# Runs in the new mount namespace. $1 is the cgroup name, $2 the folder to bind / to, the other
# arguments are nspawn's. sh moves itself into the cgroups first so that nspawn, which it then
# execs, and the whole container live there.
_NAMESPACE_SCRIPT = """\
set -e
name="$1"
root="$2"
shift 2
for hierarchy in /sys/fs/cgroup/systemd /sys/fs/cgroup/unified /sys/fs/cgroup; do
    if [ -e "$hierarchy/$name/cgroup.procs" ]; then
        echo $$ > "$hierarchy/$name/cgroup.procs"
    fi
done
mount -t tmpfs -o mode=0755 tmpfs /run/systemd
mount --bind / "$root"
exec "$@"
"""


class NspawnError(RuntimeError):
    """Raised when the container does not boot, or a command inside it fails to start."""


def cgroup_hierarchies() -> list[Path]:
    """Return the cgroup hierarchies a container's cgroup must be created in.

    On a hybrid or legacy layout, systemd needs the named ``systemd`` hierarchy and, where it
    exists, the cgroup2 one mounted at ``unified``. On a pure cgroup2 layout, it is the root.
    """
    if (CGROUP_ROOT / "cgroup.controllers").exists():
        return [CGROUP_ROOT]
    return [path for path in (CGROUP_ROOT / "systemd", CGROUP_ROOT / "unified") if path.is_dir()]


class NspawnMachine:
    """A booted systemd container; use it as a context manager, or call start() and stop().

    Args:
        bind: host folders bound read-write, at the same path inside or, given as a
            ``(host path, container path)`` pair, at the container path.
        bind_ro: host folders bound read-only, given like ``bind``.
        masked_units: units masked at boot (passed to systemd as ``systemd.mask=``).
        target: the unit systemd boots into (``systemd.unit=``).
        private_network: give the container only a loopback interface. Without it the
            container shares the host's network namespace, so it reaches services that
            listen on the host's 127.0.0.1.
    """

    def __init__(
        self,
        *,
        bind: Iterable[BindSpec] = (),
        bind_ro: Iterable[BindSpec] = (),
        masked_units: Iterable[str] = DEFAULT_MASKED_UNITS,
        target: str = DEFAULT_TARGET,
        private_network: bool = True,
    ) -> None:
        self.name = "tg" + secrets.token_hex(4)
        self.folder = Path(tempfile.mkdtemp(prefix=f"{self.name}-"))
        self.bind = [_bind_argument(spec) for spec in bind]
        self.bind_ro = [_bind_argument(spec) for spec in bind_ro]
        self.masked_units = list(masked_units)
        self.target = target
        self.private_network = private_network
        self.process: subprocess.Popen[bytes] | None = None
        self.leader: int | None = None
        self.boot_seconds: float | None = None
        self._cgroups: list[Path] = []

    @property
    def console_log(self) -> Path:
        """File that receives nspawn's own messages and the container's console."""
        return self.folder / "console.log"

    def nspawn_argv(self) -> list[str]:
        """Return the systemd-nspawn command line, without the namespace set-up around it."""
        argv = [
            NSPAWN,
            f"--directory={self.folder / 'root'}",
            "--volatile=overlay",
            "--boot",
            "--register=no",
            "--keep-unit",
            "--console=pipe",
            f"--machine={self.name}",
        ]
        if self.private_network:
            argv.append("--private-network")
        argv += [f"--bind={argument}" for argument in self.bind]
        argv += [f"--bind-ro={argument}" for argument in self.bind_ro]
        # Arguments after the options go to the container's systemd, which reads them like a
        # kernel command line.
        argv.append(f"systemd.unit={self.target}")
        argv += [f"systemd.mask={unit}" for unit in self.masked_units]
        return argv

    def start(self, timeout: float = 60.0) -> None:
        """Boot the container and wait until systemd has finished starting up.

        Raises:
            NspawnError: nspawn is missing, exited, or the boot did not finish within timeout.
        """
        if shutil.which(NSPAWN) is None:
            raise NspawnError(
                f"{NSPAWN} not found; run scripts/testbed-systemd-deps.sh to install "
                "systemd-container"
            )
        (self.folder / "root").mkdir()
        self._create_cgroups()
        started = time.monotonic()
        with self.console_log.open("wb") as console:
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
                    self.name,
                    str(self.folder / "root"),
                    *self.nspawn_argv(),
                ],
                stdin=subprocess.DEVNULL,
                stdout=console,
                stderr=subprocess.STDOUT,
            )
        try:
            self.leader = self._wait_for_leader(started + timeout)
            self._wait_for_boot(started + timeout)
        except BaseException:
            self.stop()
            raise
        self.boot_seconds = time.monotonic() - started

    def run(
        self,
        argv: Sequence[str],
        *,
        check: bool = True,
        timeout: float = 60.0,
        input_bytes: bytes | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` inside the container as root and return its result (text output).

        Raises:
            subprocess.CalledProcessError: ``check`` is set and the command failed.
        """
        if self.leader is None:
            raise NspawnError("the container is not running; call start() first")
        result = subprocess.run(
            ["nsenter", "-t", str(self.leader), "-m", "-u", "-i", "-n", "-p", "-C", "--", *argv],
            capture_output=True,
            timeout=timeout,
            input=input_bytes,
            check=False,
        )
        completed = subprocess.CompletedProcess(
            result.args,
            result.returncode,
            result.stdout.decode(errors="replace"),
            result.stderr.decode(errors="replace"),
        )
        if check:
            completed.check_returncode()
        return completed

    def systemctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run ``systemctl --no-pager ARGS`` inside the container."""
        return self.run(["systemctl", "--no-pager", *args], check=check)

    def unit_properties(self, unit: str, *names: str) -> dict[str, str]:
        """Return the named properties of ``unit`` (``systemctl show -p``)."""
        output = self.systemctl("show", unit, *(f"--property={name}" for name in names)).stdout
        pairs = (line.partition("=") for line in output.splitlines() if "=" in line)
        return {key: value for key, _, value in pairs}

    def write_file(self, path: str, content: str | bytes, mode: int = 0o644) -> None:
        """Write ``content`` to ``path`` inside the container, creating parent folders."""
        data = content.encode() if isinstance(content, str) else content
        self.run(["install", "-D", f"--mode={mode:o}", "/dev/stdin", path], input_bytes=data)

    def stop(self, timeout: float = 30.0) -> None:
        """Shut the container down by the nspawn PID and remove its cgroups and folder.

        The first SIGTERM makes nspawn shut the container down in order. A second one, sent after
        ``timeout``, terminates the container at once, and SIGKILL follows if even that hangs.
        """
        process, self.process = self.process, None
        self.leader = None
        if process is not None:
            for sig in (signal.SIGTERM, signal.SIGTERM, signal.SIGKILL):
                if process.poll() is not None:
                    break
                os.kill(process.pid, sig)
                try:
                    process.wait(timeout)
                except subprocess.TimeoutExpired:
                    continue
        self._remove_cgroups()
        shutil.rmtree(self.folder, ignore_errors=True)

    def _create_cgroups(self) -> None:
        hierarchies = cgroup_hierarchies()
        if not hierarchies:
            raise NspawnError(f"no cgroup hierarchy found under {CGROUP_ROOT}")
        for hierarchy in hierarchies:
            cgroup = hierarchy / self.name
            cgroup.mkdir()
            self._cgroups.append(cgroup)

    def _remove_cgroups(self) -> None:
        # A cgroup folder is removed with rmdir, children first; its files go with it.
        for cgroup in self._cgroups:
            if not cgroup.exists():
                continue
            folders = sorted(
                (path for path in cgroup.rglob("*") if path.is_dir()),
                key=lambda path: len(path.parts),
                reverse=True,
            )
            for folder in [*folders, cgroup]:
                # NOTE: A process still in the cgroup keeps it busy; the folder then stays.
                with contextlib.suppress(OSError):
                    folder.rmdir()
        self._cgroups = []

    def _wait_for_leader(self, deadline: float) -> int:
        """Return the host PID of the container's systemd, a child of nspawn with PID 1 inside."""
        while time.monotonic() < deadline:
            self._raise_if_exited()
            assert self.process is not None
            for pid in _children(self.process.pid):
                if _namespace_pid(pid) == 1:
                    return pid
            time.sleep(0.02)
        raise NspawnError(f"the container's systemd did not appear; see {self.console_log}")

    def _wait_for_boot(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            self._raise_if_exited()
            state = self.run(["systemctl", "is-system-running"], check=False).stdout.strip()
            if state in {"running", "degraded"}:
                return
            time.sleep(0.05)
        raise NspawnError(f"systemd in {self.name} did not finish booting; see {self.console_log}")

    def _raise_if_exited(self) -> None:
        if self.process is not None and self.process.poll() is not None:
            output = self.console_log.read_text(errors="replace")
            raise NspawnError(f"systemd-nspawn exited with {self.process.returncode}: {output}")

    def __enter__(self) -> NspawnMachine:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


def _bind_argument(spec: BindSpec) -> str:
    """Return the value of nspawn's --bind= option for ``spec``: ``PATH`` or ``HOST:CONTAINER``."""
    if isinstance(spec, tuple):
        source, destination = spec
        return f"{source}:{destination}"
    return str(Path(spec))


def _children(pid: int) -> list[int]:
    children: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children += [int(child) for child in (task / "children").read_text().split()]
        except OSError:
            continue
    return children


def _namespace_pid(pid: int) -> int | None:
    """Return the PID of ``pid`` in its innermost PID namespace, from /proc/PID/status."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("NSpid:"):
            return int(line.split()[-1])
    return None
