"""Tests of systemd/tuwunel-guard.service under a real systemd 252 (see conftest.py)."""

from __future__ import annotations

import json
import time

import pytest

from testbed.nspawn import NspawnMachine
from tests.systemd.conftest import CATALOG_SOURCE, UNIT, UNIT_SOURCE, GuardUnit, fake_only
from tuwunel_guard.messages import MESSAGES

pytestmark = pytest.mark.testbed


def test_unit_verify_prints_nothing(machine: NspawnMachine) -> None:
    """systemd-analyze verify finds nothing to say about the unit file."""
    # verify checks that ExecStart= names an executable; a placeholder replaces it unless
    # the real daemon is installed.
    program = "/opt/tuwunel-guard/bin/tuwunel-guard"
    placeholder = machine.run(["test", "-x", program], check=False).returncode != 0
    if placeholder:
        machine.write_file(program, "#!/bin/sh\n", mode=0o755)
    machine.write_file(f"/tmp/verify/{UNIT}", UNIT_SOURCE.read_text())
    try:
        result = machine.run(
            ["systemd-analyze", "verify", "--man=no", f"/tmp/verify/{UNIT}"], check=False
        )
    finally:
        machine.run(["rm", "-rf", "/tmp/verify"])
        if placeholder:
            machine.run(["rm", "-rf", "/opt/tuwunel-guard"])
    assert result.stdout + result.stderr == ""
    assert result.returncode == 0


@fake_only
def test_activating_until_ready(guard_unit: GuardUnit) -> None:
    """The unit stays activating until READY=1, then is active with the daemon's STATUS."""
    guard_unit.install(env={"FAKE_READY_DELAY": "2", "FAKE_STATUS": "engine 20.10.24: waiting"})
    started = time.monotonic()
    guard_unit.machine.systemctl("start", "--no-block", UNIT)

    early = guard_unit.wait_for(
        lambda unit: unit["ActiveState"] != "inactive", "ActiveState", "SubState"
    )
    assert early == {"ActiveState": "activating", "SubState": "start"}

    ready = guard_unit.wait_for(
        lambda unit: unit["ActiveState"] != "activating", "ActiveState", "SubState", "StatusText"
    )
    assert time.monotonic() - started >= 2.0
    assert ready == {
        "ActiveState": "active",
        "SubState": "running",
        "StatusText": "engine 20.10.24: waiting",
    }


@fake_only
def test_status_in_systemctl_status(guard_unit: GuardUnit) -> None:
    """STATUS= text appears on the Status: line of systemctl status."""
    guard_unit.install(env={"FAKE_STATUS": "Tuwunel image is incompatible: zstd layers"})
    guard_unit.machine.systemctl("start", UNIT)
    output = guard_unit.machine.systemctl("status", UNIT).stdout
    assert 'Status: "Tuwunel image is incompatible: zstd layers"' in output


@fake_only
def test_watchdog_kill(guard_unit: GuardUnit) -> None:
    """A daemon that stops sending WATCHDOG=1 is killed with Result=watchdog and restarted."""
    guard_unit.install(service={"WatchdogSec": "1s"}, env={"FAKE_WATCHDOG": "hang"})
    guard_unit.machine.systemctl("start", UNIT)

    killed = guard_unit.wait_for(
        lambda unit: unit["Result"] != "success", "Result", "SubState", timeout=10
    )
    assert killed["Result"] == "watchdog"
    # Restart=on-failure with RestartSec=30s: the unit waits to start again.
    assert killed["SubState"] in {"auto-restart", "final-sigterm", "stop-watchdog"}
    restart = guard_unit.wait_for(
        lambda unit: unit["SubState"] == "auto-restart", "SubState", "ActiveState", timeout=10
    )
    assert restart["ActiveState"] == "activating"


def test_watchdog_pings_keep_unit_running(guard_unit: GuardUnit) -> None:
    """A daemon that sends WATCHDOG=1 in time outlives several watchdog periods."""
    guard_unit.install(service={"WatchdogSec": "1s"}, env={"FAKE_WATCHDOG": "ping"})
    guard_unit.machine.systemctl("start", UNIT)
    time.sleep(3.5)
    assert guard_unit.properties("ActiveState", "Result", "NRestarts") == {
        "ActiveState": "active",
        "Result": "success",
        "NRestarts": "0",
    }


@fake_only
def test_config_exit_status_not_restarted(guard_unit: GuardUnit) -> None:
    """Exit status 78 (invalid config) leaves the unit failed instead of restarting it."""
    guard_unit.install(env={"FAKE_EXIT": "78"})
    guard_unit.machine.systemctl("start", UNIT, check=False)
    failed = guard_unit.wait_for(
        lambda unit: unit["ActiveState"] == "failed",
        "ActiveState",
        "Result",
        "ExecMainStatus",
        "NRestarts",
    )
    assert failed == {
        "ActiveState": "failed",
        "Result": "exit-code",
        "ExecMainStatus": "78",
        "NRestarts": "0",
    }


@fake_only
def test_crash_is_restarted(guard_unit: GuardUnit) -> None:
    """Any other failing exit status schedules a restart."""
    guard_unit.install(service={"RestartSec": "0.5s"}, env={"FAKE_EXIT": "1"})
    guard_unit.machine.systemctl("start", UNIT, check=False)
    guard_unit.wait_for(lambda unit: int(unit["NRestarts"] or 0) >= 1, "NRestarts")
    guard_unit.machine.systemctl("stop", UNIT)
    # Result= and ExecMainStatus= change with every new start, so read systemd's own record.
    guard_unit.machine.run(["journalctl", "--sync"])
    log = guard_unit.machine.run(["journalctl", "--no-pager", "-u", UNIT]).stdout
    assert "Main process exited, code=exited, status=1/FAILURE" in log
    assert "Scheduled restart job, restart counter is at 1." in log


@fake_only
def test_reload_sends_sighup(guard_unit: GuardUnit) -> None:
    """systemctl reload delivers SIGHUP; the daemon's RELOADING=1 and READY=1 bracket it."""
    guard_unit.install()
    guard_unit.machine.systemctl("start", UNIT)
    guard_unit.machine.systemctl("reload", UNIT)
    # systemd 252 returns from reload before the daemon has finished reloading.
    reloaded = guard_unit.wait_for(
        lambda unit: unit["StatusText"] == "reloaded 1", "StatusText", "ActiveState", "SubState"
    )
    assert reloaded["ActiveState"] == "active"
    assert reloaded["SubState"] == "running"


@fake_only
def test_state_directory_and_read_only_system(guard_unit: GuardUnit) -> None:
    """Only the state directory and the private /tmp are writable; /usr and /etc are not."""
    guard_unit.install()
    guard_unit.machine.systemctl("start", UNIT)
    report = json.loads(
        guard_unit.machine.run(["cat", "/var/lib/tuwunel-guard/report.json"]).stdout
    )
    assert report["state_directory"] == "/var/lib/tuwunel-guard"
    assert report["state_mode"] == "0o700"
    assert report["configuration_directory"] == "/etc/tuwunel-guard"
    assert report["write_state"] == "ok"
    assert report["write_tmp"] == "ok"
    assert report["write_usr"] == "error:Read-only file system"
    assert report["write_etc"] == "error:Read-only file system"
    assert report["uid"] == 0


@fake_only
def test_catalog_text_in_journalctl_x(guard_unit: GuardUnit) -> None:
    """journalctl -x shows the catalog entry, with fields filled in, under a MESSAGE_ID event."""
    machine = guard_unit.machine
    machine.write_file("/usr/lib/systemd/catalog/tuwunel-guard.catalog", CATALOG_SOURCE.read_text())
    machine.run(["journalctl", "--update-catalog"])
    listed = machine.run(["journalctl", "--list-catalog"]).stdout
    for message in MESSAGES.values():
        assert message.message_id in listed

    guard_unit.install(env={"FAKE_EVENT": "verdict_changed"})
    machine.systemctl("start", UNIT)
    message_id = MESSAGES["verdict_changed"].message_id
    deadline = time.monotonic() + 10
    output = ""
    while "Subject:" not in output and time.monotonic() < deadline:
        machine.run(["journalctl", "--sync"])
        output = machine.run(
            ["journalctl", "-x", "--no-pager", f"MESSAGE_ID={message_id}"], check=False
        ).stdout
        time.sleep(0.1)
    assert "verdict_changed verdict=compatible" in output
    assert "Subject: Verdict changed: Tuwunel image is now compatible on Docker 26.1.5" in output
    assert "verdict changed from incompatible to compatible" in output
