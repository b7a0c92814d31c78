"""Locations that testbed/install.sh fills, and the check that it has run."""

from __future__ import annotations

from pathlib import Path

PREFIX = Path("/opt/tuwunel-guard-testbed")
DOCKER26_ROOT = PREFIX / "docker26"
COMPOSE_BINARY = PREFIX / "bin" / "docker-compose"
CACHE_DIR = Path("/var/cache/tuwunel-guard-testbed")

DOCKERD20 = Path("/usr/sbin/dockerd")
DOCKERD26 = DOCKER26_ROOT / "usr" / "sbin" / "dockerd"
CONTAINERD26 = DOCKER26_ROOT / "usr" / "bin" / "containerd"
# Debian 13's docker-init is a symlink to tini-static, which is not among the unpacked
# packages, so both engines use Debian 12's.
DOCKER_INIT = Path("/usr/bin/docker-init")
RUNC = Path("/usr/sbin/runc")
REGISTRY_BINARY = Path("/usr/bin/docker-registry")
SKOPEO = Path("/usr/bin/skopeo")
BUSYBOX = Path("/bin/busybox")
ZSTD = Path("/usr/bin/zstd")

REQUIRED_EXECUTABLES = (
    DOCKERD20,
    DOCKERD26,
    CONTAINERD26,
    DOCKER_INIT,
    RUNC,
    REGISTRY_BINARY,
    SKOPEO,
    BUSYBOX,
    ZSTD,
    COMPOSE_BINARY,
)

INSTALL_HINT = "run testbed/install.sh as root to install the test bed"


class TestbedNotInstalledError(RuntimeError):
    """Raised when a program that testbed/install.sh provides is missing."""

    __test__ = False  # not a test class, although its name starts with "Test"


def missing_executables() -> list[Path]:
    """Return the required programs that are missing or not executable."""
    return [path for path in REQUIRED_EXECUTABLES if not _is_executable(path)]


def require_installed() -> None:
    """Raise TestbedNotInstalledError unless every required program is present."""
    missing = missing_executables()
    if missing:
        names = ", ".join(str(path) for path in missing)
        raise TestbedNotInstalledError(f"test bed not installed, missing: {names}; {INSTALL_HINT}")


def _is_executable(path: Path) -> bool:
    try:
        mode = path.stat().st_mode
    except OSError:
        return False
    return path.is_file() and bool(mode & 0o111)
