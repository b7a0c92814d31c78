"""The README's main job: run the upgrade scenario on a throwaway test bed and print what the
guard decides as it happens.

Everything lives in a temporary folder and is stopped by PID at the end: a registry on
127.0.0.1, a Docker 20.10 engine that is upgraded in place to 26.1, and a compose project with
stand-in Synapse and Tuwunel images. No existing Docker deployment is touched.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from testbed import images
from testbed.compose import ComposeProject
from testbed.engine import DockerEngine
from testbed.registry import Registry, free_loopback_port
from testbed.scenario import run_upgrade_scenario


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--keep", action="store_true", help="keep the temporary folder for inspection"
    )
    arguments = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="tuwunel-guard-demo-"))
    registry = Registry(workdir / "registry")
    engine = DockerEngine("20.10")
    began = time.monotonic()
    try:
        print(f"== test bed in {workdir}", flush=True)
        registry.start()
        print(f"== registry on {registry.host}; publishing stand-in images", flush=True)
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
        print(f"   Tuwunel stand-in: {tuwunel.reference}, OCI, zstd layers", flush=True)

        engine.start()
        print(
            f"== Docker {engine.version} running at {engine.base_url}; starting Synapse", flush=True
        )
        project = ComposeProject.create(
            workdir / "compose",
            port=free_loopback_port(),
            synapse_image=synapse.reference,
            tuwunel_image=tuwunel.reference,
        )
        print("== starting tuwunel-guard; its log follows", flush=True)
        result = run_upgrade_scenario(
            registry=registry, engine=engine, project=project, workdir=workdir, echo=sys.stdout
        )
    finally:
        if arguments.keep:
            engine.stop()
            registry.stop()
        else:
            engine.remove()
            registry.remove()

    print()
    print("== result")
    print(f"   engine upgrade 20.10 -> 26.1 took {result.upgrade_seconds:.1f}s")
    print(f"   switch started {result.detection_seconds:.1f}s after the new engine answered")
    print(f"   switch committed {result.switch_seconds:.1f}s after the new engine answered")
    print(f"   neither homeserver answered for at most {result.window_seconds:.2f}s")
    print(f"   Tuwunel answers: {result.tuwunel_answer}")
    print(f"   state file: deployed={result.state['deployed']}")
    print(f"   guard peak memory {result.peak_memory_kib / 1024:.1f} MiB")
    print(f"   whole run {time.monotonic() - began:.0f}s")
    if arguments.keep:
        print(f"   kept {workdir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
