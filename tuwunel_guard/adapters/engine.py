"""The Docker engine, reached through the docker SDK with the API version negotiated.

Every docker SDK and requests error is translated here into ``EngineUnavailable`` (the engine
did not respond: an expected state, retried by the next cycle) or ``EngineError``.
"""

from __future__ import annotations

import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docker
import docker.errors
import requests

from tuwunel_guard.core.engine import ApiVersion, EngineFacts, EngineVersion
from tuwunel_guard.core.image import Platform
from tuwunel_guard.errors import EngineError, EngineUnavailable

_CONTAINERD_SNAPSHOTTER = "io.containerd.snapshotter.v1"


@dataclass(frozen=True)
class LocalImage:
    """An image the engine holds: its ID and the digests it was pulled by."""

    image_id: str
    repo_digests: tuple[str, ...]


class Engine:
    """A connection to one Docker engine; each call opens a fresh client if the last one failed."""

    def __init__(self, socket: str, timeout: float) -> None:
        self.socket = socket
        self.timeout = timeout
        self._client: docker.DockerClient | None = None

    def probe(self) -> EngineFacts:
        """Ask the engine for its version, API versions, platform and image store."""
        with self._errors("probe"):
            client = self._connect()
            version = client.version()
            info = client.info()

        return facts_from_answers(version, info)

    def ping(self) -> bool:
        """Tell whether the engine responds to ``/_ping`` now."""
        try:
            with self._errors("ping"):
                return bool(self._connect().ping())
        except (EngineUnavailable, EngineError):
            return False

    def pull(self, reference: str, on_progress: Callable[[str], None] | None = None) -> None:
        """Pull ``reference`` (``host/repo@sha256:...`` or ``host/repo:tag``).

        Raises ``EngineError`` with the engine's own message when the pull fails, for instance
        ``failed to register layer: ... archive/tar: invalid tar header`` for zstd layers on
        engines before 23.0.
        """
        with self._errors(f"pull {reference}"):
            stream = self._connect().api.pull(reference, stream=True, decode=True)
            for message in stream:
                self._check_pull_message(reference, message, on_progress)

    def inspect_image(self, reference: str) -> LocalImage | None:
        """Return the engine's image for ``reference``, or ``None`` when it has none."""
        try:
            with self._errors(f"inspect image {reference}"):
                answer = self._connect().api.inspect_image(reference)
        except _NotFound:
            return None

        return LocalImage(
            image_id=str(answer["Id"]), repo_digests=tuple(answer.get("RepoDigests") or ())
        )

    def volume_exists(self, name: str) -> bool:
        """Tell whether the engine has a volume called ``name``."""
        try:
            with self._errors(f"inspect volume {name}"):
                self._connect().api.inspect_volume(name)
        except _NotFound:
            return False
        return True

    def service_containers(self, project: str, services: tuple[str, ...]) -> list[ServiceContainer]:
        """Return the containers compose made for ``services`` of ``project``, stopped ones too.

        Compose labels each container with ``com.docker.compose.project`` and
        ``com.docker.compose.service``; those labels are how the guard finds them.
        """
        with self._errors(f"list the containers of compose project {project}"):
            client = self._connect()
            summaries = client.api.containers(
                all=True, filters={"label": [f"com.docker.compose.project={project}"]}
            )
            containers = []
            for summary in summaries:
                service = (summary.get("Labels") or {}).get("com.docker.compose.service", "")
                if service in services:
                    details = client.api.inspect_container(summary["Id"])
                    containers.append(_service_container(service, details))
        return containers

    def close(self) -> None:
        """Close the client's connection pool."""
        if self._client is not None:
            self._client.close()
            self._client = None

    def _connect(self) -> docker.DockerClient:
        if self._client is None:
            _check_unix_socket(self.socket)
            # With version="auto" the SDK requests the engine's API version at once and raises
            # DockerException while the engine is down; _errors turns that into EngineUnavailable.
            self._client = docker.DockerClient(
                base_url=self.socket, version="auto", timeout=int(self.timeout)
            )
        return self._client

    @staticmethod
    def _check_pull_message(
        reference: str, message: dict[str, Any], on_progress: Callable[[str], None] | None
    ) -> None:
        if "error" in message:
            detail = message.get("errorDetail", {}).get("message") or message["error"]
            raise EngineError(f"the engine failed to pull {reference}: {detail}")
        if on_progress is not None and "status" in message:
            on_progress(str(message["status"]))

    @contextmanager
    def _errors(self, action: str) -> Iterator[None]:
        try:
            yield
        except docker.errors.NotFound as error:
            raise _NotFound(str(error)) from error
        except docker.errors.APIError as error:
            raise EngineError(
                f"the engine at {self.socket} failed to {action}: {_explain(error)}"
            ) from error
        except (docker.errors.DockerException, requests.RequestException, OSError) as error:
            self.close()
            raise EngineUnavailable(
                f"the Docker engine at {self.socket} did not respond ({action}): {error}; "
                "check that dockerd runs and that [engine] socket names its socket"
            ) from error


def _check_unix_socket(url: str) -> None:
    """Raise ``EngineUnavailable`` naming the problem when a unix socket path is not a socket."""
    if not url.startswith("unix://"):
        return
    path = Path(url.removeprefix("unix://"))
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise EngineUnavailable(
            f"the Docker engine socket {path} does not exist; check that dockerd runs and that "
            "[engine] socket names its socket"
        ) from None
    except OSError as error:
        raise EngineUnavailable(
            f"the Docker engine socket {path} cannot be read: {error}"
        ) from None
    if not stat.S_ISSOCK(mode):
        raise EngineUnavailable(
            f"{path} is not a socket; set [engine] socket to the engine's API socket, "
            "such as unix:///var/run/docker.sock"
        )


class _NotFound(Exception):
    """The engine returned 404. Only this module handles it."""


def _explain(error: docker.errors.APIError) -> str:
    explanation = error.explanation
    if isinstance(explanation, bytes):
        explanation = explanation.decode("utf-8", "replace")
    return str(explanation or error)


def facts_from_answers(version: dict[str, Any], info: dict[str, Any]) -> EngineFacts:
    """Build ``EngineFacts`` from the engine's ``/version`` and ``/info`` answers.

    Raises ``EngineError`` when a field is missing or malformed, naming the field and value.
    """
    try:
        engine_version = EngineVersion.parse(str(version["Version"]))
        api_version = ApiVersion.parse(str(version["ApiVersion"]))
        min_api_version = ApiVersion.parse(str(version.get("MinAPIVersion") or "1.12"))
        platform = Platform(os=str(version["Os"]), architecture=str(version["Arch"]))
    except (KeyError, ValueError) as error:
        raise EngineError(f"the engine's /version response is invalid: {error}") from error

    return EngineFacts(
        version=engine_version,
        api_version=api_version,
        min_api_version=min_api_version,
        platform=platform,
        image_store=_image_store(info),
    )


def _image_store(info: dict[str, Any]) -> str:
    for pair in info.get("DriverStatus") or ():
        if len(pair) == 2 and pair[0] == "driver-type" and pair[1] == _CONTAINERD_SNAPSHOTTER:
            return "containerd"
    return "classic"


@dataclass(frozen=True)
class ServiceContainer:
    """A container of a compose service, as the engine reports it.

    ``health`` is ``None`` when the image and compose file define no health check.
    """

    container_id: str
    service: str
    status: str
    restart_count: int
    health: str | None
    image: str
    volumes: tuple[str, ...] = ()
    """Names of the named volumes mounted into the container."""

    @property
    def running(self) -> bool:
        """Tell whether the container runs now."""
        return self.status == "running"


def _service_container(service: str, details: dict[str, Any]) -> ServiceContainer:
    state = details.get("State") or {}
    health = state.get("Health")
    return ServiceContainer(
        container_id=str(details["Id"]),
        service=service,
        status=str(state.get("Status", "unknown")),
        restart_count=int(details.get("RestartCount") or 0),
        health=str(health["Status"]) if isinstance(health, dict) and "Status" in health else None,
        image=str((details.get("Config") or {}).get("Image", "")),
        volumes=tuple(
            str(mount["Name"])
            for mount in details.get("Mounts") or ()
            if mount.get("Type") == "volume" and mount.get("Name")
        ),
    )
