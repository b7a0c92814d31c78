"""Compose, run as a subprocess with an argument list (never through a shell).

The compose command is the first that works of: the config's ``compose_command``, compose v2 as
``docker compose``, and a stand-alone ``docker-compose`` (version 2, or 1.x). Compose v1 gets
``COMPOSE_API_VERSION`` set to the engine's API version, at most 1.43. The reason is that compose
1.29.2 fails a recreate on newer APIs with ``KeyError: 'ContainerConfig'``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from tuwunel_guard.core.engine import COMPOSE_V1_MAX_API_VERSION, ApiVersion
from tuwunel_guard.errors import ComposeError
from tuwunel_guard.progress import NO_PROGRESS, Progress

log = structlog.get_logger("tuwunel_guard.compose")

_OUTPUT_TAIL = 2000
_BEAT_SECONDS = 1.0


@dataclass(frozen=True)
class ComposeCommand:
    """The argv prefix that runs compose, and its major version."""

    argv: tuple[str, ...]
    major_version: int


@dataclass(frozen=True)
class ComposeProject:
    """One homeserver's compose files, project name and services."""

    directory: Path
    files: tuple[str, ...]
    project: str
    services: tuple[str, ...]
    environment: Mapping[str, str] = field(default_factory=dict)


def detect_command(configured: Sequence[str], timeout: float) -> ComposeCommand:
    """Find the compose command to use; raise ``ComposeError`` when none works."""
    candidates: list[tuple[str, ...]] = []
    if configured:
        candidates.append(tuple(configured))
    else:
        candidates.extend(_default_candidates())

    tried = []
    for argv in candidates:
        major = _major_version(argv, timeout)
        if major is not None:
            return ComposeCommand(argv=argv, major_version=major)
        tried.append(" ".join(argv))

    raise ComposeError(
        "no working compose command found (tried: "
        + ", ".join(tried or ["nothing on PATH"])
        + "); install compose v2 or set [deployment] compose_command"
    )


def _default_candidates() -> list[tuple[str, ...]]:
    candidates: list[tuple[str, ...]] = []
    docker = shutil.which("docker")
    if docker:
        candidates.append((docker, "compose"))
    standalone = shutil.which("docker-compose")
    if standalone:
        candidates.append((standalone,))
    return candidates


def _major_version(argv: tuple[str, ...], timeout: float) -> int | None:
    try:
        result = subprocess.run(
            [*argv, "version"], capture_output=True, text=True, timeout=timeout, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if result.returncode != 0:
        return None

    match = re.search(r"v?(\d+)\.\d+\.\d+", result.stdout)
    return int(match[1]) if match else None


class Compose:
    """Runs compose commands for one engine."""

    def __init__(
        self,
        command: ComposeCommand,
        engine_socket: str,
        api_version: ApiVersion,
        timeout: float,
        progress: Progress = NO_PROGRESS,
    ) -> None:
        self.command = command
        self.engine_socket = engine_socket
        self.api_version = api_version
        self.timeout = timeout
        self.progress = progress

    def validate(self, project: ComposeProject) -> None:
        """Run ``compose config`` so a broken file fails before anything stops."""
        self._run(project, ["config", "--quiet"])

    def up(self, project: ComposeProject) -> None:
        """Start the project's services detached, without touching other services."""
        self._run(project, ["up", "--detach", "--no-deps", *project.services])

    def stop(self, project: ComposeProject) -> None:
        """Stop the project's services; containers and volumes stay."""
        self._run(project, ["stop", *project.services])

    def _run(self, project: ComposeProject, arguments: list[str]) -> str:
        if not project.directory.is_dir():
            raise ComposeError(
                f"the compose project folder {project.directory} does not exist; "
                "set [deployment] directory to the folder of your compose files"
            )
        argv = [*self.command.argv, *self._file_arguments(project), *arguments]
        log.debug("compose_started", argv=argv, directory=str(project.directory))
        try:
            process = subprocess.Popen(
                argv,
                cwd=project.directory,
                env=self._environment(project),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        except OSError as error:
            raise ComposeError(f"compose could not be started as {argv[0]}: {error}") from None

        stdout, stderr = self._wait(process, arguments)
        if process.returncode != 0:
            raise ComposeError(
                f"compose {' '.join(arguments)} failed with exit status {process.returncode}: "
                + (stderr or stdout)[-_OUTPUT_TAIL:].strip()
            )
        return stdout

    def _wait(self, process: subprocess.Popen[str], arguments: list[str]) -> tuple[str, str]:
        """Wait for ``process`` up to the timeout, telling the progress tracker it is alive."""
        deadline = time.monotonic() + self.timeout
        with self.progress.working(f"compose {arguments[0]}"):
            while True:
                try:
                    return process.communicate(timeout=_BEAT_SECONDS)
                except subprocess.TimeoutExpired:
                    if time.monotonic() >= deadline:
                        process.kill()
                        process.communicate()
                        raise ComposeError(
                            f"compose {' '.join(arguments)} did not finish within "
                            f"{self.timeout:.0f}s and was killed"
                        ) from None
                    self.progress.beat()

    def _file_arguments(self, project: ComposeProject) -> list[str]:
        arguments = [
            "--project-directory",
            str(project.directory),
            "--project-name",
            project.project,
        ]
        for name in project.files:
            arguments += ["--file", str(project.directory / name)]
        return arguments

    def _environment(self, project: ComposeProject) -> dict[str, str]:
        environment = dict(os.environ)
        environment.update(project.environment)
        environment["DOCKER_HOST"] = self.engine_socket
        if self.command.major_version == 1:
            pinned = min(self.api_version, COMPOSE_V1_MAX_API_VERSION, key=_api_key)
            environment["COMPOSE_API_VERSION"] = str(pinned)
        return environment


def _api_key(version: ApiVersion) -> tuple[int, int]:
    return (version.major, version.minor)
