"""Tests of scripts/install.sh and scripts/uninstall.sh, and of the real daemon under the unit.

Each test boots a fresh container from the host's root, so /opt, /etc and /usr/lib start as on
the host and every change is thrown away at the end. The container has no network: install.sh
runs offline from a wheelhouse built outside.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from testbed.nspawn import NspawnMachine
from tests.systemd.conftest import CHECKOUT, UNIT, install_guard
from tuwunel_guard.messages import MESSAGES

UNINSTALL = str(CHECKOUT / "scripts" / "uninstall.sh")


@pytest.fixture
def fresh_machine(wheelhouse: Path) -> Iterator[NspawnMachine]:
    with NspawnMachine(bind_ro=[CHECKOUT, wheelhouse]) as booted:
        yield booted


def test_install_puts_files_in_place(fresh_machine: NspawnMachine, wheelhouse: Path) -> None:
    """install.sh installs the program, unit, catalog and example config, then reloads systemd."""
    output = install_guard(fresh_machine, wheelhouse)

    version = fresh_machine.run(["/opt/tuwunel-guard/bin/tuwunel-guard", "--version"]).stdout
    assert version.startswith("tuwunel-guard ")
    installed = fresh_machine.run(
        ["cmp", str(CHECKOUT / "systemd" / UNIT), f"/etc/systemd/system/{UNIT}"], check=False
    )
    assert installed.returncode == 0
    example = fresh_machine.run(
        ["cmp", str(CHECKOUT / "config" / "config.example.toml"), "/etc/tuwunel-guard/config.toml"],
        check=False,
    )
    assert example.returncode == 0
    assert fresh_machine.unit_properties(UNIT, "LoadState", "UnitFileState") == {
        "LoadState": "loaded",
        "UnitFileState": "disabled",
    }
    catalog = fresh_machine.run(["journalctl", "--list-catalog"]).stdout
    for message in MESSAGES.values():
        assert message.message_id in catalog
    assert "systemctl enable --now tuwunel-guard" in output


def test_install_keeps_existing_config(fresh_machine: NspawnMachine, wheelhouse: Path) -> None:
    """A second install leaves an existing config.toml as it is."""
    fresh_machine.write_file("/etc/tuwunel-guard/config.toml", 'strategy = "synapse"\n')
    output = install_guard(fresh_machine, wheelhouse)
    config = fresh_machine.run(["cat", "/etc/tuwunel-guard/config.toml"]).stdout
    assert config == 'strategy = "synapse"\n'
    assert "Keeping the existing config /etc/tuwunel-guard/config.toml" in output


def test_unit_verify_with_real_program(fresh_machine: NspawnMachine, wheelhouse: Path) -> None:
    """With the program installed, systemd-analyze verify prints nothing for the unit."""
    install_guard(fresh_machine, wheelhouse)
    result = fresh_machine.run(
        ["systemd-analyze", "verify", "--man=no", f"/etc/systemd/system/{UNIT}"], check=False
    )
    assert result.stdout + result.stderr == ""


def test_real_daemon_starts_hardened(fresh_machine: NspawnMachine, wheelhouse: Path) -> None:
    """`tuwunel-guard run` reaches READY under every hardening option and logs to the journal.

    The container has no Docker engine, so the daemon's first check reports it unreachable,
    which is an expected state and no reason to fail.
    """
    install_guard(fresh_machine, wheelhouse)
    fresh_machine.run(["install", "-d", "/srv/matrix"])
    fresh_machine.systemctl("start", UNIT)

    state = fresh_machine.unit_properties(UNIT, "ActiveState", "SubState", "Type", "StatusText")
    assert state["ActiveState"] == "active"
    assert state["SubState"] == "running"
    assert state["Type"] == "notify"

    fresh_machine.run(["journalctl", "--sync"])
    started = fresh_machine.run(
        ["journalctl", "--no-pager", "--output=cat", "-u", UNIT, "EVENT=daemon_started"]
    ).stdout
    assert started.startswith("daemon_started config=/etc/tuwunel-guard/config.toml")

    fresh_machine.systemctl("stop", UNIT)
    assert fresh_machine.unit_properties(UNIT, "Result") == {"Result": "success"}


def test_uninstall_keeps_config_and_state(fresh_machine: NspawnMachine, wheelhouse: Path) -> None:
    """uninstall.sh removes program, unit and catalog; config and state stay and are named."""
    install_guard(fresh_machine, wheelhouse)
    fresh_machine.run(["install", "-d", "/srv/matrix"])
    fresh_machine.systemctl("enable", "--now", UNIT)

    result = fresh_machine.run(["bash", UNINSTALL])

    for removed in (
        "/opt/tuwunel-guard",
        f"/etc/systemd/system/{UNIT}",
        "/usr/lib/systemd/catalog/tuwunel-guard.catalog",
    ):
        assert fresh_machine.run(["test", "-e", removed], check=False).returncode != 0, removed
    assert fresh_machine.run(["test", "-f", "/etc/tuwunel-guard/config.toml"]).returncode == 0
    assert fresh_machine.run(["test", "-d", "/var/lib/tuwunel-guard"]).returncode == 0
    assert "Kept /etc/tuwunel-guard" in result.stdout
    assert "Kept /var/lib/tuwunel-guard" in result.stdout
    assert fresh_machine.unit_properties(UNIT, "LoadState") == {"LoadState": "not-found"}
