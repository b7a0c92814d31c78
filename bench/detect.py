"""Measure how soon EngineWatcher notices an upgraded Docker engine.

Each run starts a fresh Docker 20.10 engine, starts an :class:`EngineWatcher` on its socket,
and upgrades the engine in place to 26.1 (SIGTERM, then the new dockerd on the same socket and
data root, as ``testbed.engine.DockerEngine.upgrade_to`` does). With ``--down-seconds N`` the
new engine starts N seconds after the old one exited, as when a package upgrade takes a while.
The watcher's backoff then decides the delay. ``--down-jitter J`` adds a random 0 to J seconds
to each run's down time (seeded by ``--seed``), so that the runs sample the backoff schedule
at different points instead of hitting the same one each time. A separate thread sends
``GET /_ping`` every ``--probe-interval`` seconds over the socket and records when the new
engine first answers OK. The figure per run is the time from that first answer to the call of
``on_engine_back``. The probe's own interval adds up to one interval of error in either
direction.

Also recorded per run: the seconds from the start of the upgrade to the first OK (how long the
engine was away) and how many times ``on_engine_back`` was called within 2 s after the first
call (1 means no spurious call).

Run as root after ``testbed/install.sh``, from the repository root:

    sudo .venv/bin/python bench/detect.py [--runs 10] [--down-seconds 0] [--down-jitter 0]
        [--seed 1] [--max-backoff 5.0] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from testbed import unixhttp
from testbed.engine import RELEASES, DockerEngine
from tuwunel_guard.adapters.events import INITIAL_BACKOFF, MAX_BACKOFF, EngineWatcher

# How long a run waits for on_engine_back before it counts as failed.
RUN_TIMEOUT = 60.0


@dataclass(frozen=True)
class Run:
    """One upgrade: seconds from the upgrade's start to the new engine's first OK, from that
    OK to on_engine_back, and the number of on_engine_back calls."""

    engine_away_s: float
    detection_s: float
    engine_back_calls: int


class PingProbe:
    """Poll /_ping in a thread and record the first OK after the engine stopped responding."""

    def __init__(self, socket_path: Path, interval: float) -> None:
        self.socket_path = socket_path
        self.interval = interval
        self.first_ok_after_down: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _ok(self) -> bool:
        try:
            status, body = unixhttp.get(self.socket_path, "/_ping", timeout=1.0)
        except OSError:
            return False
        return status == 200 and body == b"OK"

    def _run(self) -> None:
        seen_down = False
        while not self._stop.is_set():
            ok = self._ok()
            now = time.monotonic()
            if not ok:
                seen_down = True
            elif seen_down and self.first_ok_after_down is None:
                self.first_ok_after_down = now
            self._stop.wait(self.interval)


def upgrade(engine: DockerEngine, down_seconds: float) -> None:
    """Upgrade ``engine`` to 26.1, starting the new release ``down_seconds`` after the stop."""
    if down_seconds <= 0:
        engine.upgrade_to("26.1")
        return
    engine.stop()
    time.sleep(down_seconds)
    engine.release = RELEASES["26.1"]
    engine.start()


def measure_once(
    initial_backoff: float, max_backoff: float, probe_interval: float, down_seconds: float
) -> Run:
    """Upgrade a fresh 20.10 engine to 26.1 under a watcher and return the timings."""
    calls: list[float] = []
    called = threading.Event()

    def on_engine_back() -> None:
        calls.append(time.monotonic())
        called.set()

    engine = DockerEngine("20.10")
    engine.start()
    watcher = EngineWatcher(
        engine.base_url,
        on_event=lambda event: None,
        on_engine_back=on_engine_back,
        initial_backoff=initial_backoff,
        max_backoff=max_backoff,
    )
    probe = PingProbe(engine.socket_path, probe_interval)
    try:
        watcher.start()
        probe.start()
        time.sleep(0.5)
        began = time.monotonic()
        upgrade(engine, down_seconds)
        if not called.wait(RUN_TIMEOUT):
            raise RuntimeError(f"on_engine_back was not called within {RUN_TIMEOUT:.0f} s")
        time.sleep(2.0)
    finally:
        probe.stop()
        watcher.stop()
        engine.remove()
    first_ok = probe.first_ok_after_down
    if first_ok is None:
        raise RuntimeError("the probe never saw the engine down and back")
    return Run(
        engine_away_s=first_ok - began,
        detection_s=calls[0] - first_ok,
        engine_back_calls=sum(1 for call in calls if call - calls[0] <= 2.0),
    )


def summary(runs: list[Run]) -> dict[str, Any]:
    """Median, minimum and maximum of each figure."""
    detection = [run.detection_s for run in runs]
    away = [run.engine_away_s for run in runs]
    return {
        "runs": len(runs),
        "detection_median_s": statistics.median(detection),
        "detection_min_s": min(detection),
        "detection_max_s": max(detection),
        "engine_away_median_s": statistics.median(away),
        "engine_away_max_s": max(away),
        "max_engine_back_calls": max(run.engine_back_calls for run in runs),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10, help="number of upgrades (default 10)")
    parser.add_argument(
        "--initial-backoff",
        type=float,
        default=INITIAL_BACKOFF,
        help=f"the watcher's first delay between pings, in seconds (default {INITIAL_BACKOFF})",
    )
    parser.add_argument(
        "--max-backoff",
        type=float,
        default=MAX_BACKOFF,
        help=f"the watcher's longest delay between pings, in seconds (default {MAX_BACKOFF})",
    )
    parser.add_argument(
        "--probe-interval",
        type=float,
        default=0.01,
        help="seconds between the probe's own pings (default 0.01)",
    )
    parser.add_argument(
        "--down-seconds",
        type=float,
        default=0.0,
        help="seconds between the old engine's exit and the new engine's start (default 0)",
    )
    parser.add_argument(
        "--down-jitter",
        type=float,
        default=0.0,
        help="add a random 0 to this many seconds to each run's down time (default 0)",
    )
    parser.add_argument("--seed", type=int, default=1, help="seed for --down-jitter (default 1)")
    parser.add_argument("--json", type=Path, help="also write every run and the summary here")
    arguments = parser.parse_args()

    # Reproducible jitter for a benchmark, not a secret.
    jitter = random.Random(arguments.seed)  # noqa: S311
    runs = []
    print("| run | engine away s | detection s | on_engine_back calls |")
    print("|---|---|---|---|")
    for number in range(1, arguments.runs + 1):
        run = measure_once(
            arguments.initial_backoff,
            arguments.max_backoff,
            arguments.probe_interval,
            arguments.down_seconds + jitter.uniform(0, arguments.down_jitter),
        )
        runs.append(run)
        print(
            f"| {number} | {run.engine_away_s:.2f} | {run.detection_s:.3f} | "
            f"{run.engine_back_calls} |",
            flush=True,
        )
    result = summary(runs)
    print()
    print(
        f"detection: median {result['detection_median_s']:.3f} s, min "
        f"{result['detection_min_s']:.3f} s, max {result['detection_max_s']:.3f} s over "
        f"{result['runs']} runs (backoff {arguments.initial_backoff} s to "
        f"{arguments.max_backoff} s, engine started {arguments.down_seconds} s plus 0 to "
        f"{arguments.down_jitter} s after the stop)"
    )
    if arguments.json:
        document = {
            "settings": vars(arguments) | {"json": str(arguments.json)},
            "runs": [asdict(run) for run in runs],
            "summary": result,
        }
        arguments.json.write_text(json.dumps(document, indent=2) + "\n")


if __name__ == "__main__":
    main()
