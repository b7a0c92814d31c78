"""The owner of a TCP port: the preflight check that nothing outside the deployment listens on
the port that Tuwunel will need.

Read from ``/proc``: listening sockets from ``/proc/net/tcp`` and ``/proc/net/tcp6``, their
owners from the ``socket:[INODE]`` links under ``/proc/PID/fd``, and a process's container from
``/proc/PID/cgroup``, whose path names the container ID for engines that use cgroups.
"""

from __future__ import annotations

import ipaddress
import socket
from pathlib import Path
from urllib.parse import urlsplit

from tuwunel_guard.adapters.health import display_url
from tuwunel_guard.errors import GuardError

_LISTEN = "0A"
_PROC = Path("/proc")


class PortHeld(GuardError):
    """A process outside the deployment listens on a port the target needs."""


def check_port_free_or_owned(url: str, owned_container_ids: set[str]) -> None:
    """Raise ``PortHeld`` when a process outside the deployment listens on ``url``'s port.

    Only URLs whose host is this machine are checked; a health URL served through another host
    (a reverse proxy, say) is left alone. Processes of the deployment's containers and the
    engine's ``docker-proxy`` for published ports count as the deployment's own.
    """
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    if not _is_local(parts.hostname or ""):
        return

    for pid in listening_pids(port):
        if not _owned_by_deployment(pid, owned_container_ids):
            raise PortHeld(
                f"port {port} of {display_url(url)} is held by process {pid} "
                f"({_command(pid)}), which is not part of the deployment; stop it or change "
                "the health URL"
            )


def listening_pids(port: int) -> set[int]:
    """Return the PIDs that hold a listening TCP socket on ``port``, on any address."""
    inodes = _listening_inodes(port)
    if not inodes:
        return set()

    pids = set()
    for process in _PROC.iterdir():
        if not process.name.isdigit():
            continue
        try:
            links = [link.readlink().as_posix() for link in (process / "fd").iterdir()]
        except OSError:
            continue
        if any(link in inodes for link in links):
            pids.add(int(process.name))
    return pids


def _listening_inodes(port: int) -> set[str]:
    inodes = set()
    for table in ("tcp", "tcp6"):
        try:
            lines = (_PROC / "net" / table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == _LISTEN and int(local.rsplit(":", 1)[1], 16) == port:
                inodes.add(f"socket:[{inode}]")
    return inodes


def _owned_by_deployment(pid: int, owned_container_ids: set[str]) -> bool:
    if _command(pid) == "docker-proxy":
        # NOTE: any docker-proxy counts as the deployment's; the engine starts one per
        # published port, and telling which container it serves needs a request to the engine.
        return True
    try:
        cgroups = (_PROC / str(pid) / "cgroup").read_text()
    except OSError:
        return False
    return any(container_id in cgroups for container_id in owned_container_ids)


def _command(pid: int) -> str:
    try:
        return (_PROC / str(pid) / "comm").read_text().strip()
    except OSError:
        return "unknown"


def _is_local(host: str) -> bool:
    if host in ("localhost", ""):
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        try:
            address = ipaddress.ip_address(socket.gethostbyname(host))
        except OSError:
            return False
    return address.is_loopback or address.is_unspecified
