"""The command line: ``tuwunel-guard run``, ``check``, ``status`` and ``switch``."""

from __future__ import annotations

import argparse
import datetime
import json
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from types import FrameType
from typing import Any

import structlog

from tuwunel_guard import __version__
from tuwunel_guard.adapters.state import State, StateStore
from tuwunel_guard.config.load import DEFAULT_PATH, load_config
from tuwunel_guard.config.models import Config
from tuwunel_guard.core.decision import Side
from tuwunel_guard.cycle import CycleResult, Guard
from tuwunel_guard.errors import ConfigError, GuardError, SwitchError, SwitchRefused
from tuwunel_guard.log import configure_logging

EXIT_COMPATIBLE = 0
EXIT_INCOMPATIBLE = 1
EXIT_UNKNOWN = 2
EXIT_CONFIG = 78
"""EX_CONFIG from sysexits.h; the unit's RestartPreventExitStatus names it."""

log = structlog.get_logger("tuwunel_guard.cli")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    arguments = _parser().parse_args(argv)
    if arguments.command is None:
        _parser().print_help(sys.stderr)
        return EXIT_UNKNOWN

    try:
        config = load_config(arguments.config)
    except ConfigError as error:
        return _report_config_error(error, log_event=arguments.command == "run")

    if arguments.command == "run":
        configure_logging(config.log.level)
        return _run(arguments.config, config)

    if arguments.command == "status":
        return _status(config, as_json=arguments.json)

    configure_logging("warning" if not arguments.verbose else config.log.level, journal=False)
    if arguments.command == "switch":
        return _switch(config, Side(arguments.to), assume_yes=arguments.yes)
    return _check(config, as_json=arguments.json)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tuwunel-guard",
        description="Switch a compose deployment from Synapse to Tuwunel once the Docker engine "
        "can run Tuwunel's image.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "--config",
        type=Path,
        default=DEFAULT_PATH,
        help=f"path of the config file (default: {DEFAULT_PATH})",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    commands.add_parser("run", help="run the daemon: check on a schedule and switch when allowed")

    check = commands.add_parser(
        "check",
        help="run one check without acting; exit 0 compatible, 1 incompatible, "
        "2 engine or registry not reachable, 78 config errors",
    )
    check.add_argument("--json", action="store_true", help="print the result as JSON")
    check.add_argument("--verbose", action="store_true", help="also print the log events")

    status = commands.add_parser(
        "status", help="show the deployed side, its image, the last verdict and switch"
    )
    status.add_argument("--json", action="store_true", help="print the status as JSON")

    switch = commands.add_parser(
        "switch",
        help="switch now through the same steps and health gate; exit 0 switched, "
        "1 failed and rolled back, 2 refused",
    )
    switch.add_argument("--to", required=True, choices=[side.value for side in Side])
    switch.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    switch.add_argument("--verbose", action="store_true", help="also print the log events")
    return parser


def _report_config_error(error: ConfigError, *, log_event: bool) -> int:
    if log_event:
        # The daemon's output goes to the journal, where the event carries a MESSAGE_ID.
        configure_logging("info")
        log.critical("config_rejected", config=error.path, problems=error.problems)
    print(f"tuwunel-guard: the config file {error.path} is invalid:", file=sys.stderr)
    for problem in error.problems:
        print(f"  {problem}", file=sys.stderr)
    return EXIT_CONFIG


def _run(config_path: Path, config: Config) -> int:
    # Imported here so that `check` does not load the scheduler.
    from tuwunel_guard.daemon import Daemon  # noqa: PLC0415

    try:
        return Daemon(config_path, config).run()
    except GuardError as error:
        log.critical("daemon_failed", error=str(error))
        return 1


def _check(config: Config, *, as_json: bool) -> int:
    guard = Guard(config)
    try:
        result = guard.run_cycle(act=False)
    except GuardError as error:
        print(f"tuwunel-guard: the check failed: {error}", file=sys.stderr)
        return EXIT_UNKNOWN
    finally:
        guard.close()

    if as_json:
        print(json.dumps(_result_document(config, result), indent=2))
    else:
        print(_result_text(config, result))

    if result.verdict is None:
        return EXIT_UNKNOWN
    return EXIT_COMPATIBLE if result.verdict.compatible else EXIT_INCOMPATIBLE


_CONSEQUENCES = {
    Side.TUWUNEL: (
        "Switching to Tuwunel starts a new, empty homeserver under the same server_name, with its "
        "own signing key: Synapse's rooms, users and history are not carried over. Synapse's "
        "containers and volumes stay untouched."
    ),
    Side.SYNAPSE: (
        "Switching back to Synapse brings back its database and signing key as they were at the "
        "switch: whatever happened on Tuwunel since then is not carried over, and other servers "
        "see the old signing key again. Tuwunel's volumes stay untouched. The guard will not "
        "switch to Tuwunel again until you run 'tuwunel-guard switch --to tuwunel'."
    ),
}


def _switch(config: Config, target: Side, *, assume_yes: bool) -> int:
    print(_CONSEQUENCES[target])
    if not assume_yes:
        if not sys.stdin.isatty():
            print(
                "tuwunel-guard: refusing to switch without --yes when not on a terminal",
                file=sys.stderr,
            )
            return EXIT_UNKNOWN
        if input(f"Type 'yes' to switch to {target.value}: ").strip().lower() != "yes":
            print("tuwunel-guard: nothing changed", file=sys.stderr)
            return EXIT_UNKNOWN

    guard = Guard(config, report=_terminal_progress if sys.stderr.isatty() else None)
    with _signals_deferred() as received:
        status = _run_switch(guard, target)
    # A signal that arrived during the switch ends the command now, with the shell's status.
    return 128 + received[0] if received else status


def _run_switch(guard: Guard, target: Side) -> int:
    try:
        state = guard.switch_manually(target)
    except SwitchRefused as error:
        print(f"tuwunel-guard: the switch was refused: {error}", file=sys.stderr)
        return EXIT_UNKNOWN
    except SwitchError as error:
        print(f"tuwunel-guard: {error}", file=sys.stderr)
        return EXIT_INCOMPATIBLE
    except GuardError as error:
        print(f"tuwunel-guard: the switch was refused: {error}", file=sys.stderr)
        return EXIT_UNKNOWN
    finally:
        guard.close()

    if sys.stderr.isatty():
        print(file=sys.stderr)
    record = state.last_switch
    window = (
        f"{record.window_seconds:.2f}s"
        if record and record.window_seconds is not None
        else "unknown"
    )
    print(f"switched to {state.deployed.value}; neither homeserver answered for at most {window}")
    return 0


@contextmanager
def _signals_deferred() -> Iterator[list[int]]:
    """Keep SIGINT, SIGTERM and SIGHUP from cutting a switch short; they end the command after.

    A switch stopped between its steps would leave neither homeserver serving until the daemon
    next starts, so the signals are collected in the yielded list, and the caller exits after
    the switch has committed or rolled back.
    """
    received: list[int] = []

    def note(signum: int, frame: FrameType | None) -> None:
        received.append(signum)
        print(
            f"\ntuwunel-guard: {signal.Signals(signum).name} received; the switch finishes "
            "first, because stopping it halfway would leave no homeserver serving",
            file=sys.stderr,
        )

    signals = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {number: signal.signal(number, note) for number in signals}
    try:
        yield received
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def _terminal_progress(text: str) -> None:
    """Overwrite one terminal line with the progress of a conversion, pull or build."""
    print(f"\r\033[K{text}", end="", file=sys.stderr, flush=True)


def _status(config: Config, *, as_json: bool) -> int:
    try:
        state = StateStore(config.state.directory).load()
    except GuardError as error:
        print(f"tuwunel-guard: {error}", file=sys.stderr)
        return EXIT_UNKNOWN

    document = asdict(state)
    if as_json:
        print(json.dumps(document, indent=2, default=str))
        return 0

    print(_status_text(state))
    return 0


def _status_text(state: State) -> str:
    lines = [f"Deployed:      {state.deployed.value}"]
    if state.pinned_image:
        lines.append(f"Image:         {state.pinned_image}")
        lines.append(f"  tag digest:      {state.tag_digest}")
        lines.append(f"  manifest digest: {state.manifest_digest}")
        lines.append(f"  image ID:        {state.image_id}")
    if state.held_by_admin:
        lines.append("Held:          on Synapse by the admin; 'switch --to tuwunel' releases it")
    lines.append(f"Last verdict:  {state.last_verdict or 'none yet'}")
    if state.last_reason:
        lines.append(f"  {state.last_reason}")
    lines.append(f"Last check:    {_when(state.last_check_at)}")
    if state.last_switch is not None:
        record = state.last_switch
        window = "" if record.window_seconds is None else f", window {record.window_seconds:.2f}s"
        lines.append(
            f"Last switch:   {record.from_side} -> {record.to_side} {record.outcome} "
            f"at {_when(record.finished_at)}{window}"
        )
        if record.detail:
            lines.append(f"  {record.detail}")
    if state.switch_in_progress is not None:
        lines.append(
            f"Under way:     a switch at step {state.switch_in_progress.step}; if no "
            "tuwunel-guard process runs it was interrupted, and the daemon finishes or undoes "
            "it when it starts"
        )
    for digest in state.failed_manifest_digests:
        lines.append(f"Failed image:  {digest} (not tried again until a new digest appears)")
    overdue = state.next_check_at and state.next_check_at < time.time() - 60
    note = " (overdue: is the daemon running? systemctl status tuwunel-guard)" if overdue else ""
    lines.append(f"Next check:    {_when(state.next_check_at)}{note}")
    return "\n".join(lines)


def _when(timestamp: float) -> str:
    if not timestamp:
        return "unknown"
    moment = datetime.datetime.fromtimestamp(timestamp, datetime.UTC)
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC")


def _result_document(config: Config, result: CycleResult) -> dict[str, Any]:
    engine, image = result.engine, result.image
    return {
        "engine": None
        if engine is None
        else {
            "socket": config.engine.socket,
            "version": str(engine.version),
            "api_version": str(engine.api_version),
            "platform": str(engine.platform),
            "image_store": engine.image_store,
        },
        "image": None
        if image is None
        else {
            "reference": image.reference,
            "tag_digest": image.tag_digest,
            "manifest_digest": image.manifest_digest,
            "config_digest": image.config_digest,
            "platform": str(image.platform),
            "layer_compressions": list(image.layer_compressions),
            "requirements": [
                {"requirement": item.requirement.value, "evidence": item.evidence}
                for item in image.requirements
            ],
        },
        "verdict": None
        if result.verdict is None
        else {
            "compatible": result.verdict.compatible,
            "reasons": list(result.verdict.reasons),
            "missing": [item.value for item in result.verdict.missing],
        },
        "problem": result.problem or None,
        "strategy": config.strategy.value,
        "deployed": result.fields.get("deployed"),
        "decision": None
        if result.decision is None
        else {
            "action": result.decision.action.value,
            "route": result.decision.route.value if result.decision.route else None,
            "reason": result.decision.reason,
        },
    }


def _result_text(config: Config, result: CycleResult) -> str:
    lines = []
    engine, image = result.engine, result.image
    if engine is None:
        lines.append(f"Engine:    not answering at {config.engine.socket}")
    else:
        lines.append(
            f"Engine:    Docker {engine.version} (API {engine.api_version}, {engine.platform}, "
            f"{engine.image_store} image store) at {config.engine.socket}"
        )

    shown = image.reference if image is not None else f"{config.target.image}:{config.target.tag}"
    lines.append(f"Image:     {shown}")
    if image is not None:
        lines.append(f"  tag digest:       {image.tag_digest}")
        lines.append(f"  manifest digest:  {image.manifest_digest} ({image.platform})")
        lines.append(f"  layers:           {', '.join(image.layer_compressions) or 'none'}")
        for item in image.requirements:
            lines.append(f"  requires {item.requirement.value}: {item.evidence}")
        if not image.requirements:
            lines.append("  requires:         nothing beyond a plain pull")

    if result.verdict is not None:
        lines.append(f"Verdict:   {result.verdict.name}")
        lines.extend(f"  {reason}" for reason in result.verdict.reasons)
    else:
        lines.append(f"Verdict:   unknown: {result.problem}")

    lines.append(f"Strategy:  {config.strategy.value}")
    lines.append(f"Deployed:  {result.fields.get('deployed', 'unknown')}")
    if result.decision is not None:
        route = f" ({result.decision.route.value} route)" if result.decision.route else ""
        reason = result.decision.reason
        if result.verdict is not None and result.verdict.reason in reason:
            reason = reason.replace(result.verdict.reason, "see the verdict above")
        lines.append(f"Decision:  {result.decision.action.value}{route}: {reason}")
    return "\n".join(lines)
