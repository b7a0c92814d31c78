"""Measure how soon the guard starts a switch after an in-place engine upgrade.

Each run starts a fresh Docker 20.10 engine with Synapse serving, runs the guard with an hour
between scheduled cycles, upgrades the engine in place to 26.1 and measures, from the moment
the new engine answers /_ping, the time to the guard's `switch_started` event, to its
`switch_committed` event, and the window with neither homeserver answering. Prints a Markdown
table; run as root after testbed/install.sh:

    sudo .venv/bin/python bench/switch_delay.py --runs 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

# Run as a script from the checkout: make the test bed package importable.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from testbed import images
from testbed.compose import ComposeProject
from testbed.engine import DockerEngine
from testbed.registry import Registry, free_loopback_port
from testbed.scenario import ScenarioResult, run_upgrade_scenario


def one_run(registry: Registry, synapse: str, tuwunel: str, folder: Path) -> ScenarioResult:
    engine = DockerEngine("20.10")
    try:
        engine.start()
        project = ComposeProject.create(
            folder / "compose",
            port=free_loopback_port(),
            synapse_image=synapse,
            tuwunel_image=tuwunel,
        )
        return run_upgrade_scenario(
            registry=registry, engine=engine, project=project, workdir=folder
        )
    finally:
        engine.remove()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="number of upgrade runs (default 5)")
    arguments = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="tuwunel-guard-bench-"))
    registry = Registry(workdir / "registry")
    results = []
    try:
        registry.start()
        synapse = images.publish(
            images.build_standin_archive("synapse", workdir / "synapse.tar"),
            registry,
            "matrixdotorg/synapse",
            "latest",
            fmt="v2s2",
        )
        tuwunel = images.publish(
            images.build_standin_archive("tuwunel", workdir / "tuwunel.tar"),
            registry,
            "matrix-construct/tuwunel",
            "latest",
            fmt="oci-zstd",
        )
        for run in range(arguments.runs):
            folder = workdir / f"run{run}"
            folder.mkdir()
            results.append(one_run(registry, synapse.reference, tuwunel.reference, folder))
    finally:
        registry.remove()

    print("| measure | median s | max s |")
    print("|---|---|---|")
    for label, values in (
        ("new engine answers -> switch_started", [r.detection_seconds for r in results]),
        ("new engine answers -> switch_committed", [r.switch_seconds for r in results]),
        ("window with neither homeserver answering", [r.window_seconds for r in results]),
        ("engine upgrade (SIGTERM to new engine answering)", [r.upgrade_seconds for r in results]),
    ):
        print(f"| {label} | {statistics.median(values):.2f} | {max(values):.2f} |")
    print(f"\n{len(results)} runs; guard peak memory {max(r.peak_memory_kib for r in results)} KiB")


if __name__ == "__main__":
    main()
