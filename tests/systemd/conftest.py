"""Fixtures that run the real `tuwunel-guard run` under a real systemd 252 booted with nspawn.

Each module boots one container (testbed/nspawn.py) and installs the daemon into it with
scripts/install.sh from a wheelhouse, so the unit under test is systemd/tuwunel-guard.service
from the checkout, hardening included. A test writes the config file and, where it needs one, a
drop-in `test.conf` with the options it changes (WatchdogSec=, Environment=, ...).
"""

from __future__ import annotations

import json
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
PODMAN_DROPIN_SOURCE = CHECKOUT / "systemd" / "podman.conf"
CONFIG_PATH = "/etc/tuwunel-guard/config.toml"
DROPIN_FOLDER = f"/etc/systemd/system/{UNIT}.d"
STATE_FOLDER = "/var/lib/tuwunel-guard"


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

    pip downloads the dependencies here, outside the container, whose network may be private.
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


def install_guard(machine: NspawnMachine, wheelhouse: Path, *options: str) -> str:
    """Run scripts/install.sh with ``options`` inside ``machine`` from ``wheelhouse``.

    Returns the script's output.
    """
    result = machine.run(
        [
            "bash",
            str(CHECKOUT / "scripts" / "install.sh"),
            "--wheelhouse",
            str(wheelhouse),
            *options,
        ],
        check=False,
        timeout=300,
    )
    assert result.returncode == 0, f"install.sh failed: {result.stdout}{result.stderr}"
    return result.stdout


@pytest.fixture(scope="module")
def machine(wheelhouse: Path) -> Iterator[NspawnMachine]:
    """A booted container with a private network and the real daemon installed by install.sh."""
    with NspawnMachine(bind_ro=[CHECKOUT, wheelhouse]) as booted:
        install_guard(booted, wheelhouse)
        yield booted


class GuardUnit:
    """The installed tuwunel-guard unit in a machine, with a test config and drop-in.

    Journal queries return only the entries written after the last install(), so tests that
    share a machine do not see each other's events.
    """

    def __init__(self, machine: NspawnMachine) -> None:
        self.machine = machine
        self.cursor = ""

    def install(
        self,
        config: str,
        service: Mapping[str, str] | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        """Write the config file, and a drop-in with ``service`` options and ``env`` variables."""
        self.machine.write_file(CONFIG_PATH, config, mode=0o640)
        lines = ["[Service]"]
        lines += [f"{key}={value}" for key, value in (service or {}).items()]
        lines += [f'Environment="{key}={value}"' for key, value in (env or {}).items()]
        if len(lines) > 1:
            self.machine.write_file(f"{DROPIN_FOLDER}/test.conf", "\n".join(lines) + "\n")
        self.machine.systemctl("daemon-reload")
        self.cursor = self._last_cursor()

    def write_config(self, config: str) -> None:
        """Replace the config file, for a reload."""
        self.machine.write_file(CONFIG_PATH, config, mode=0o640)

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

    def journal(self, *matches: str) -> list[dict[str, str]]:
        """Return the unit's journal entries since install() that fit ``matches`` (FIELD=value)."""
        self.machine.run(["journalctl", "--sync"])
        # --cursor, not --after-cursor: with matches, journalctl 252's --after-cursor also
        # skips the first matching entry when the cursor's own entry does not match.
        output = self.machine.run(
            [
                "journalctl",
                "--no-pager",
                "--output=json",
                f"--cursor={self.cursor}",
                f"--unit={UNIT}",
                *matches,
            ]
        ).stdout
        entries = [json.loads(line) for line in output.splitlines() if line.strip()]
        return [entry for entry in entries if entry["__CURSOR"] != self.cursor]

    def messages(self) -> str:
        """Return the MESSAGE lines of the unit's journal since install(), systemd's included."""
        return "\n".join(entry.get("MESSAGE", "") for entry in self.journal())

    def wait_for_event(
        self, event: str, timeout: float = 20.0, count: int = 1
    ) -> list[dict[str, str]]:
        """Wait until the daemon logged ``event`` ``count`` times; return those entries."""
        deadline = time.monotonic() + timeout
        entries = self.journal(f"EVENT={event}")
        while len(entries) < count:
            if time.monotonic() > deadline:
                tail = "\n".join(self.messages().splitlines()[-30:])
                pytest.fail(f"no {event} event within {timeout} s; the unit's log ends:\n{tail}")
            time.sleep(0.2)
            entries = self.journal(f"EVENT={event}")
        return entries

    def remove(self) -> None:
        """Stop the unit and remove the test drop-in, the config and the state."""
        self.machine.systemctl("stop", UNIT, check=False)
        self.machine.systemctl("reset-failed", UNIT, check=False)
        self.machine.run(["rm", "-f", f"{DROPIN_FOLDER}/test.conf", f"{DROPIN_FOLDER}/podman.conf"])
        self.machine.run(["rm", "-rf", STATE_FOLDER, CONFIG_PATH])
        self.machine.systemctl("daemon-reload")

    def _last_cursor(self) -> str:
        self.machine.run(["journalctl", "--sync"])
        output = self.machine.run(["journalctl", "--no-pager", "--output=json", "--lines=1"]).stdout
        return str(json.loads(output.splitlines()[-1])["__CURSOR"])


@pytest.fixture
def guard_unit(machine: NspawnMachine) -> Iterator[GuardUnit]:
    unit = GuardUnit(machine)
    yield unit
    unit.remove()
