"""Tests of scripts/install.sh and scripts/uninstall.sh in fresh systemd 252 containers.

Each test boots a fresh container from the host's root, so /opt, /etc and /usr/lib start as on
the host and every change is thrown away at the end. The container has no network: install.sh
runs offline from a wheelhouse built outside.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from testbed.nspawn import NspawnMachine
from tests.systemd.conftest import (
    CHECKOUT,
    DROPIN_FOLDER,
    PODMAN_DROPIN_SOURCE,
    UNIT,
    install_guard,
)
from tuwunel_guard.messages import MESSAGES

pytestmark = pytest.mark.testbed

UNINSTALL = str(CHECKOUT / "scripts" / "uninstall.sh")
PODMAN_DROPIN = f"{DROPIN_FOLDER}/podman.conf"


@pytest.fixture
def fresh_machine(wheelhouse: Path) -> Iterator[NspawnMachine]:
    with NspawnMachine(bind_ro=[CHECKOUT, wheelhouse]) as booted:
        yield booted


def exists(machine: NspawnMachine, path: str) -> bool:
    return machine.run(["test", "-e", path], check=False).returncode == 0


def test_install_then_start_with_example_config(
    fresh_machine: NspawnMachine, wheelhouse: Path
) -> None:
    """install.sh puts program, unit, catalog and example config in place; the unit starts."""
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
    assert fresh_machine.unit_properties(UNIT, "LoadState", "UnitFileState", "DropInPaths") == {
        "LoadState": "loaded",
        "UnitFileState": "disabled",
        "DropInPaths": "",
    }
    assert not exists(fresh_machine, PODMAN_DROPIN)
    catalog = fresh_machine.run(["journalctl", "--list-catalog"]).stdout
    for message in MESSAGES.values():
        assert message.message_id in catalog
    assert "systemctl enable --now tuwunel-guard" in output

    # The example config names /srv/matrix; the container has no Docker engine, which the
    # daemon reports as an expected state.
    fresh_machine.run(["install", "-d", "/srv/matrix"])
    fresh_machine.systemctl("start", UNIT)
    state = fresh_machine.unit_properties(UNIT, "ActiveState", "SubState", "Type")
    assert state == {"ActiveState": "active", "SubState": "running", "Type": "notify"}
    fresh_machine.run(["journalctl", "--sync"])
    started = fresh_machine.run(
        ["journalctl", "--no-pager", "--output=cat", "-u", UNIT, "EVENT=daemon_started"]
    ).stdout
    assert started.startswith("daemon_started config=/etc/tuwunel-guard/config.toml")
    fresh_machine.systemctl("stop", UNIT)
    assert fresh_machine.unit_properties(UNIT, "Result") == {"Result": "success"}


def test_install_keeps_existing_config(fresh_machine: NspawnMachine, wheelhouse: Path) -> None:
    """A second install leaves an existing config.toml as it is."""
    fresh_machine.write_file("/etc/tuwunel-guard/config.toml", 'strategy = "synapse"\n')
    output = install_guard(fresh_machine, wheelhouse)
    config = fresh_machine.run(["cat", "/etc/tuwunel-guard/config.toml"]).stdout
    assert config == 'strategy = "synapse"\n'
    assert "Keeping the existing config /etc/tuwunel-guard/config.toml" in output


def test_podman_dropin_installed_and_kept_when_changed(
    fresh_machine: NspawnMachine, wheelhouse: Path
) -> None:
    """install.sh --podman adds the drop-in; uninstall.sh keeps it once the admin changed it."""
    output = install_guard(fresh_machine, wheelhouse, "--podman")
    assert f"Installing the podman strategy's drop-in to {PODMAN_DROPIN}" in output
    assert fresh_machine.run(["cat", PODMAN_DROPIN]).stdout == PODMAN_DROPIN_SOURCE.read_text()
    properties = fresh_machine.unit_properties(UNIT, "DropInPaths", "CapabilityBoundingSet")
    assert properties["DropInPaths"] == PODMAN_DROPIN
    assert set(properties["CapabilityBoundingSet"].split()) == {
        "cap_chown",
        "cap_dac_override",
        "cap_dac_read_search",
        "cap_fowner",
        "cap_setfcap",
        "cap_sys_admin",
    }
    verify = fresh_machine.run(
        ["systemd-analyze", "verify", "--man=no", f"/etc/systemd/system/{UNIT}"], check=False
    )
    assert verify.stdout + verify.stderr == ""

    fresh_machine.run(["sh", "-c", f"echo '# changed by the admin' >> {PODMAN_DROPIN}"])
    result = fresh_machine.run(["bash", UNINSTALL])
    assert exists(fresh_machine, PODMAN_DROPIN)
    assert f"Kept {DROPIN_FOLDER}" in result.stdout


def test_uninstall_keeps_config_and_state(fresh_machine: NspawnMachine, wheelhouse: Path) -> None:
    """uninstall.sh removes program, unit, catalog and the unchanged podman drop-in.

    Config and state stay, and the script names them.
    """
    install_guard(fresh_machine, wheelhouse, "--podman")
    fresh_machine.run(["install", "-d", "/srv/matrix"])
    fresh_machine.systemctl("enable", "--now", UNIT)
    assert fresh_machine.unit_properties(UNIT, "UnitFileState", "ActiveState") == {
        "UnitFileState": "enabled",
        "ActiveState": "active",
    }

    result = fresh_machine.run(["bash", UNINSTALL])

    for removed in (
        "/opt/tuwunel-guard",
        f"/etc/systemd/system/{UNIT}",
        "/usr/lib/systemd/catalog/tuwunel-guard.catalog",
        PODMAN_DROPIN,
        DROPIN_FOLDER,
    ):
        assert not exists(fresh_machine, removed), removed
    assert exists(fresh_machine, "/etc/tuwunel-guard/config.toml")
    assert exists(fresh_machine, "/var/lib/tuwunel-guard")
    assert f"Removed {PODMAN_DROPIN}" in result.stdout
    assert "Kept /etc/tuwunel-guard" in result.stdout
    assert "Kept /var/lib/tuwunel-guard" in result.stdout
    assert fresh_machine.unit_properties(UNIT, "LoadState") == {"LoadState": "not-found"}
