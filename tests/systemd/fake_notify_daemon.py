"""A stand-in for `tuwunel-guard run` that exercises the Type=notify contract and nothing else.

Standard library only, so that Debian's /usr/bin/python3 runs it inside the container. Its
behaviour is set through the environment:

FAKE_READY_DELAY   seconds to wait before READY=1 (default 0)
FAKE_STATUS        STATUS= text sent with READY=1 (default "checking")
FAKE_WATCHDOG      "ping" sends WATCHDOG=1 every WATCHDOG_USEC/2; "hang" never does
FAKE_EXIT          exit at once with this status instead of running
FAKE_EVENT         log this event through the native journal protocol after READY=1

It writes a report of what it could and could not write to $STATE_DIRECTORY/report.json.
SIGHUP sends RELOADING=1, then READY=1 with STATUS=reloaded N; SIGTERM exits with status 0.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time
from pathlib import Path
from types import FrameType


def notify(message: str) -> None:
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.sendto(message.encode(), address)


def try_write(path: Path) -> str:
    try:
        path.write_text("probe\n")
    except OSError as error:
        return f"error:{os.strerror(error.errno or 0)}"
    path.unlink()
    return "ok"


def write_report() -> None:
    state = Path(os.environ["STATE_DIRECTORY"])
    report = {
        "state_directory": str(state),
        "state_mode": oct(state.stat().st_mode & 0o777),
        "configuration_directory": os.environ.get("CONFIGURATION_DIRECTORY", ""),
        "write_state": try_write(state / "probe"),
        "write_usr": try_write(Path("/usr/tuwunel-guard-probe")),
        "write_etc": try_write(Path("/etc/tuwunel-guard-probe")),
        "write_tmp": try_write(Path("/tmp/tuwunel-guard-probe")),
        "uid": os.getuid(),
    }
    (state / "report.json").write_text(json.dumps(report))


def log_event(event: str) -> None:
    # Imported here: only this path needs the checkout on PYTHONPATH.
    from tuwunel_guard.adapters.journal import JournalSender
    from tuwunel_guard.messages import message_id_for

    fields = [
        ("MESSAGE", f"{event} verdict=compatible"),
        ("PRIORITY", "6"),
        ("SYSLOG_IDENTIFIER", "tuwunel-guard"),
        ("EVENT", event),
        ("PREVIOUS_VERDICT", "incompatible"),
        ("VERDICT", "compatible"),
        ("ENGINE_VERSION", "26.1.5"),
        ("IMAGE", "ghcr.io/matrix-construct/tuwunel:latest"),
        ("REASON", "Docker 26.1.5 supports zstd layers"),
    ]
    message_id = message_id_for(event)
    if message_id:
        fields.append(("MESSAGE_ID", message_id))
    sender = JournalSender()
    sender.send(fields)
    sender.close()


def main() -> int:
    if "FAKE_EXIT" in os.environ:
        print("fake daemon exits at once", file=sys.stderr)
        return int(os.environ["FAKE_EXIT"])

    reloads = 0
    reload_requested = False
    stop_requested = False

    def on_hup(signum: int, frame: FrameType | None) -> None:
        nonlocal reload_requested
        reload_requested = True

    def on_term(signum: int, frame: FrameType | None) -> None:
        nonlocal stop_requested
        stop_requested = True

    signal.signal(signal.SIGHUP, on_hup)
    signal.signal(signal.SIGTERM, on_term)

    write_report()
    time.sleep(float(os.environ.get("FAKE_READY_DELAY", "0")))
    notify(f"READY=1\nSTATUS={os.environ.get('FAKE_STATUS', 'checking')}")
    if os.environ.get("FAKE_EVENT"):
        log_event(os.environ["FAKE_EVENT"])

    watchdog_usec = int(os.environ.get("WATCHDOG_USEC", "0"))
    ping = os.environ.get("FAKE_WATCHDOG", "ping") == "ping" and watchdog_usec > 0
    interval = watchdog_usec / 2e6 if ping else 0.2
    while not stop_requested:
        time.sleep(min(interval, 0.2))
        if ping:
            notify("WATCHDOG=1")
        if reload_requested:
            reload_requested = False
            notify("RELOADING=1")
            time.sleep(0.5)
            reloads += 1
            notify(f"READY=1\nSTATUS=reloaded {reloads}")
    notify("STOPPING=1")
    return 0


if __name__ == "__main__":
    sys.exit(main())
