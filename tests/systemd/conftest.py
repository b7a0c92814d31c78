"""Fixtures that run the tuwunel-guard unit under a real systemd 252 booted with systemd-nspawn.

The unit under test is systemd/tuwunel-guard.service from the checkout, hardening included. A
drop-in replaces only ExecStart= and what a test sets (WatchdogSec=, Environment=, ...).

The daemon the unit runs is DAEMON_COMMAND: a small Type=notify stand-in (fake_notify_daemon.py)
whose behaviour the tests set through the environment. Set DAEMON_COMMAND to None to run the
unit's own ExecStart instead: the `machine` fixture then installs the real daemon with
scripts/install.sh, and tests marked `fake_only` (they need the stand-in's knobs) are skipped.
test_install.py always runs the real daemon.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import pytest

from testbed.nspawn import NspawnMachine

CHECKOUT = Path(__file__).resolve().parents[2]
UNIT = "tuwunel-guard.service"
UNIT_SOURCE = CHECKOUT / "systemd" / UNIT
CATALOG_SOURCE = CHECKOUT / "systemd" / "tuwunel-guard.catalog"
FAKE_DAEMON_SOURCE = Path(__file__).with_name("fake_notify_daemon.py")
FAKE_DAEMON_PATH = "/usr/local/lib/tuwunel-guard-test/fake_notify_daemon.py"

# The one line to change when the real daemon is ready: None runs the unit's own ExecStart.
DAEMON_COMMAND: str | None = f"/usr/bin/python3 {FAKE_DAEMON_PATH}"

fake_only = pytest.mark.skipif(
    DAEMON_COMMAND is None, reason="needs the stand-in daemon's FAKE_* settings"
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    reason = None
    if os.geteuid() != 0:
        reason = "systemd-nspawn needs root"
    elif shutil.which("systemd-nspawn") is None:
        reason = "systemd-nspawn missing; run scripts/testbed-systemd-deps.sh"
    if reason is None:
        return
    for item in items:
        if Path(str(item.fspath)).parent == Path(__file__).parent:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def wheelhouse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Wheels of tuwunel-guard and its dependencies, for an offline install in a container.

    pip downloads the dependencies here, outside the container, whose network is private.
    """
    folder = tmp_path_factory.mktemp("wheelhouse")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--disable-pip-version-check",
            "--wheel-dir",
            str(folder),
            str(CHECKOUT),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if result.returncode != 0:
        pytest.fail(f"pip wheel failed with status {result.returncode}: {result.stderr[-2000:]}")
    return folder


def install_guard(machine: NspawnMachine, wheelhouse: Path) -> str:
    """Run scripts/install.sh inside ``machine`` from ``wheelhouse``; return its output."""
    result = machine.run(
        ["bash", str(CHECKOUT / "scripts" / "install.sh"), "--wheelhouse", str(wheelhouse)],
        check=False,
        timeout=300,
    )
    assert result.returncode == 0, f"install.sh failed: {result.stdout}{result.stderr}"
    return result.stdout


@pytest.fixture(scope="module")
def machine(request: pytest.FixtureRequest) -> Iterator[NspawnMachine]:
    """A booted container with the checkout bound read-only at its own path.

    With DAEMON_COMMAND set to None it also contains the real daemon, installed by install.sh.
    """
    binds = [CHECKOUT]
    wheels = request.getfixturevalue("wheelhouse") if DAEMON_COMMAND is None else None
    if wheels is not None:
        binds.append(wheels)
    with NspawnMachine(bind_ro=binds) as booted:
        booted.write_file(FAKE_DAEMON_PATH, FAKE_DAEMON_SOURCE.read_bytes(), mode=0o755)
        if wheels is not None:
            install_guard(booted, wheels)
        yield booted


class GuardUnit:
    """The tuwunel-guard unit installed in a machine, with a test drop-in."""

    def __init__(self, machine: NspawnMachine) -> None:
        self.machine = machine

    def install(
        self, service: Mapping[str, str] | None = None, env: Mapping[str, str] | None = None
    ) -> None:
        """Install the unit and a drop-in with ``service`` options and ``env`` variables."""
        self.machine.write_file(f"/etc/systemd/system/{UNIT}", UNIT_SOURCE.read_text())
        lines = ["[Service]"]
        if DAEMON_COMMAND is not None:
            lines += ["ExecStart=", f"ExecStart={DAEMON_COMMAND}"]
            lines.append(f"Environment=PYTHONPATH={CHECKOUT}")
        for key, value in (service or {}).items():
            lines.append(f"{key}={value}")
        lines += [f'Environment="{key}={value}"' for key, value in (env or {}).items()]
        self.machine.write_file(f"/etc/systemd/system/{UNIT}.d/test.conf", "\n".join(lines) + "\n")
        self.machine.systemctl("daemon-reload")

    def properties(self, *names: str) -> dict[str, str]:
        return self.machine.unit_properties(UNIT, *names)

    def wait_for(
        self, condition: Callable[[dict[str, str]], bool], *names: str, timeout: float = 20.0
    ) -> dict[str, str]:
        """Poll the unit's properties until ``condition`` holds; fail the test on timeout."""
        deadline = time.monotonic() + timeout
        properties = self.properties(*names)
        while not condition(properties):
            if time.monotonic() > deadline:
                pytest.fail(
                    f"{UNIT} did not reach the expected state within {timeout} s: {properties}"
                )
            time.sleep(0.1)
            properties = self.properties(*names)
        return properties

    def remove(self) -> None:
        self.machine.systemctl("stop", UNIT, check=False)
        self.machine.systemctl("reset-failed", UNIT, check=False)
        self.machine.run(["rm", "-rf", f"/etc/systemd/system/{UNIT}.d", "/var/lib/tuwunel-guard"])
        self.machine.systemctl("daemon-reload")


@pytest.fixture
def guard_unit(machine: NspawnMachine) -> Iterator[GuardUnit]:
    unit = GuardUnit(machine)
    yield unit
    unit.remove()
