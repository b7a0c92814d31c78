"""The config file's schema as pydantic models. Unknown keys are rejected everywhere."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from tuwunel_guard.config.durations import parse_duration
from tuwunel_guard.core.decision import Strategy
from tuwunel_guard.core.image import Platform
from tuwunel_guard.core.reference import ImageReference
from tuwunel_guard.errors import InvalidReference

_SERVICE_NAME = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]*$")
_PROJECT_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*$")
_VARIABLE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_REGISTRY_HOST = re.compile(r"^[A-Za-z0-9.-]+(?::\d{1,5})?$|^\[[0-9A-Fa-f:]+\](?::\d{1,5})?$")


def _duration(value: Any) -> Any:
    if isinstance(value, str):
        return parse_duration(value)
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 90s, 15m or 1h, not a boolean")
    return value


Duration = Annotated[float, BeforeValidator(_duration), Field(ge=0)]
"""Seconds, written in the file as ``90s``, ``15m``, ``1h`` or a plain number of seconds."""


def _check_service(name: str) -> str:
    if not _SERVICE_NAME.match(name):
        raise ValueError(
            f"invalid compose service name {name!r}: use letters, digits, '.', '_', '-'"
        )
    return name


def _check_project(name: str) -> str:
    if not _PROJECT_NAME.match(name):
        raise ValueError(
            f"invalid compose project name {name!r}: use lower-case letters, digits, '_' and '-', "
            "starting with a letter or digit"
        )
    return name


def _check_health_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(
            f"invalid health URL {url!r}: expected http://HOST[:PORT]/PATH or https://"
        )
    return url


def _check_registry_host(host: str) -> str:
    if not _REGISTRY_HOST.match(host):
        raise ValueError(f"invalid registry host {host!r}: expected HOST or HOST:PORT, no scheme")
    return host


def _check_socket(url: str) -> str:
    if not (url.startswith("unix:///") or url.startswith("tcp://") or url.startswith("ssh://")):
        raise ValueError(
            f"invalid engine socket {url!r}: expected unix:///PATH, tcp://HOST:PORT or ssh://HOST"
        )
    return url


def _check_platform(text: str) -> str:
    if text:
        Platform.parse(text)
    return text


ServiceName = Annotated[str, AfterValidator(_check_service)]
ProjectName = Annotated[str, AfterValidator(_check_project)]
HealthUrl = Annotated[str, AfterValidator(_check_health_url)]
RegistryHost = Annotated[str, AfterValidator(_check_registry_host)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EngineConfig(_Section):
    """``[engine]``: how to reach the Docker engine."""

    socket: Annotated[str, AfterValidator(_check_socket)] = "unix:///var/run/docker.sock"
    timeout: Duration = 30.0


class TargetConfig(_Section):
    """``[target]``: the Tuwunel image to watch."""

    image: str = "ghcr.io/matrix-construct/tuwunel"
    tag: str = "latest"
    platform: Annotated[str, AfterValidator(_check_platform)] = ""
    insecure_registries: list[RegistryHost] = []
    credentials_file: Path | None = None
    timeout: Duration = 30.0

    @model_validator(mode="after")
    def _check_reference(self) -> TargetConfig:
        try:
            ImageReference.parse(self.image, self.tag)
        except InvalidReference as error:
            # pydantic collects ValueError only; other errors would end validation early.
            raise ValueError(str(error)) from None
        return self


class SideConfig(_Section):
    """``[deployment.synapse]`` and ``[deployment.tuwunel]``: one homeserver's compose services."""

    compose_files: list[str] = Field(default=["compose.yaml"], min_length=1)
    project: ProjectName
    services: list[ServiceName] = Field(min_length=1)
    health_urls: list[HealthUrl] = Field(min_length=1)


class TuwunelSideConfig(SideConfig):
    """``[deployment.tuwunel]``; writing this table is the admin's consent to switch."""

    image_variable: Annotated[str, Field(pattern=_VARIABLE_NAME.pattern)] = "TUWUNEL_IMAGE"


class DeploymentConfig(_Section):
    """``[deployment]``: the compose project that runs the homeserver."""

    directory: Path
    compose_command: list[str] = []
    compose_timeout: Duration = 300.0
    health_timeout: Duration = 120.0
    health_interval: Duration = 2.0
    health_confirmations: Annotated[int, Field(ge=1, le=100)] = 3
    min_switch_interval: Duration = 3600.0
    backup_directory: Path | None = None
    synapse: SideConfig
    tuwunel: TuwunelSideConfig | None = None


class BuildConfig(_Section):
    """``[build]``: the git repository that the ``build`` strategy builds Tuwunel from."""

    repository: Annotated[str, Field(min_length=1)]
    ref: Annotated[str, Field(min_length=1)] = "main"
    dockerfile: str = "Dockerfile"
    build_args: dict[str, str] = {}


class ScheduleConfig(_Section):
    """``[schedule]``: how often the guard checks."""

    interval: Annotated[float, BeforeValidator(_duration), Field(gt=0)] = 900.0
    jitter: Duration = 60.0


class StateConfig(_Section):
    """``[state]``: where the guard keeps its state file."""

    directory: Path = Path("/var/lib/tuwunel-guard")


class LogConfig(_Section):
    """``[log]``: how much the guard logs."""

    level: Annotated[str, Field(pattern=r"^(debug|info|warning|error)$")] = "info"


class Config(_Section):
    """The whole config file."""

    strategy: Strategy = Strategy.AUTO
    prefer_native_pull: bool = True
    engine: EngineConfig = EngineConfig()
    target: TargetConfig = TargetConfig()
    deployment: DeploymentConfig | None = None
    schedule: ScheduleConfig = ScheduleConfig()
    state: StateConfig = StateConfig()
    log: LogConfig = LogConfig()
    build: BuildConfig | None = None

    @model_validator(mode="after")
    def _check_build_table(self) -> Config:
        if self.strategy is Strategy.BUILD and self.build is None:
            raise ValueError(
                "strategy 'build' needs a [build] table with at least 'repository'; "
                "see config/config.example.toml"
            )
        return self

    @property
    def switch_allowed(self) -> bool:
        """Tell whether the admin consented to a switch by writing ``[deployment.tuwunel]``."""
        return self.deployment is not None and self.deployment.tuwunel is not None
