"""Fixtures that run the tuwunel-guard unit under a real systemd 252 booted with systemd-nspawn.

The unit under test is systemd/tuwunel-guard.service from the checkout, hardening included. A
drop-in replaces only ExecStart= and what a test sets (WatchdogSec=, Environment=, ...).

The daemon the unit runs is DAEMON_COMMAND. Until `tuwunel-guard run` is ready it is a small
Type=notify stand-in (fake_notify_daemon.py); set DAEMON_COMMAND to None to run the unit's own
ExecStart, after `install_guard` has put the real daemon under /opt/tuwunel-guard.
"""

from __future__ import annotations

import os
import shutil
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

pytestmark = pytest.mark.testbed


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


@pytest.fixture(scope="module")
def machine() -> Iterator[NspawnMachine]:
    """A booted container with the checkout bound read-only at its own path."""
    with NspawnMachine(bind_ro=[CHECKOUT]) as booted:
        booted.write_file(FAKE_DAEMON_PATH, FAKE_DAEMON_SOURCE.read_bytes(), mode=0o755)
        yield booted


class GuardUnit:
    """The tuwunel-guard unit installed in a machine, with a test drop-in."""

    def __init__(self, machine: NspawnMachine) -> None:
        self.machine = machine

    def install(self, service: Mapping[str, str] | None = None, env: Mapping[str, str] = {}) -> None:
        """Install the unit and a drop-in with ``service`` options and ``env`` variables."""
        self.machine.write_file(f"/etc/systemd/system/{UNIT}", UNIT_SOURCE.read_text())
        lines = ["[Service]"]
        if DAEMON_COMMAND is not None:
            lines += ["ExecStart=", f"ExecStart={DAEMON_COMMAND}"]
            lines.append(f"Environment=PYTHONPATH={CHECKOUT}")
        for key, value in (service or {}).items():
            lines.append(f"{key}={value}")
        lines += [f'Environment="{key}={value}"' for key, value in env.items()]
        self.machine.write_file(
            f"/etc/systemd/system/{UNIT}.d/test.conf", "\n".join(lines) + "\n"
        )
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
                pytest.fail(f"{UNIT} did not reach the expected state within {timeout} s: "
                            f"{properties}")
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
