"""Shared pieces of the routes that run programs or talk to the engine's low-level API."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import docker
import docker.errors
import requests

from tuwunel_guard.errors import EngineError, EngineUnavailable

HEARTBEAT_SECONDS = 5.0
"""Seconds between heartbeats while a program runs."""


def run_with_heartbeat(
    argv: list[str],
    timeout: float,
    heartbeat: Callable[[], None],
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` like ``subprocess.run`` and call ``heartbeat`` every few seconds meanwhile.

    The heartbeat lets a caller show a watchdog that a long command still runs. Raises
    ``subprocess.TimeoutExpired`` after ``timeout`` seconds, once the process is killed, and
    ``OSError`` when it cannot start.
    """
    deadline = time.monotonic() + timeout
    with subprocess.Popen(
        argv,
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as process:
        while True:
            wait = max(0.0, min(HEARTBEAT_SECONDS, deadline - time.monotonic()))
            try:
                stdout, stderr = process.communicate(timeout=wait)
            except subprocess.TimeoutExpired:
                if time.monotonic() >= deadline:
                    process.kill()
                    process.communicate()
                    raise
                heartbeat()
                continue
            return subprocess.CompletedProcess(argv, process.returncode, stdout, stderr)


def inspect_image_id(client: docker.APIClient, reference: str) -> str | None:
    """Return the ID of the engine's image ``reference``, or ``None`` when it has none."""
    try:
        inspected = client.inspect_image(reference)
    except docker.errors.NotFound:
        return None
    return str(inspected["Id"])


@contextmanager
def engine_client(socket: str, timeout: float) -> Iterator[docker.APIClient]:
    """Open a low-level docker client and translate every docker SDK error it raises.

    NOTE: the podman and convert routes find a loaded image by its config digest, which is the
    image ID only with the classic image store. Engines with the containerd image store report
    another ID, but those are 24.0 or later and can pull zstd layers without these routes.
    """
    client: docker.APIClient | None = None
    try:
        client = docker.APIClient(base_url=socket, version="auto", timeout=int(timeout))
        yield client
    except docker.errors.APIError as error:
        raise EngineError(f"the engine at {socket} returned an error: {error}") from error
    except (docker.errors.DockerException, requests.RequestException, OSError) as error:
        raise EngineUnavailable(
            f"the Docker engine at {socket} did not respond: {error}; "
            "check that dockerd runs and that [engine] socket names its socket"
        ) from error
    finally:
        if client is not None:
            client.close()
