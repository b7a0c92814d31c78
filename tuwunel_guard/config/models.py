"""The config file's schema as pydantic models. Unknown keys are rejected everywhere."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    model_validator,
)

from tuwunel_guard.config.durations import parse_duration
from tuwunel_guard.core.decision import Strategy
from tuwunel_guard.core.image import Platform
from tuwunel_guard.core.reference import ImageReference, validate_tag
from tuwunel_guard.core.versions import parse_release_range
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


MAX_DURATION = 366 * 86400.0
"""Maximum duration of any key: a year. Larger values overflow the scheduler's clock."""

Duration = Annotated[float, BeforeValidator(_duration), Field(ge=0, le=MAX_DURATION)]
"""Seconds, written in the file as ``90s``, ``15m``, ``1h`` or a plain number of seconds."""

Timeout = Annotated[float, BeforeValidator(_duration), Field(ge=1, le=MAX_DURATION)]
"""A time limit of one request or command: a second at least, because 0 would fail every one."""

Pause = Annotated[float, BeforeValidator(_duration), Field(ge=0.1, le=3600)]
"""A pause between two probes: at least 100 ms, at most an hour."""


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
    # ssh:// would need paramiko, which the guard does not install.
    if not (url.startswith("unix:///") or url.startswith("tcp://")):
        raise ValueError(f"invalid engine socket {url!r}: expected unix:///PATH or tcp://HOST:PORT")
    return url


def _check_image(image: str) -> str:
    try:
        ImageReference.parse(image, "latest")
    except InvalidReference as error:
        # pydantic collects ValueError only; other errors would end validation early.
        raise ValueError(str(error)) from None
    return image


def _check_tag(tag: str) -> str:
    try:
        validate_tag(tag)
    except InvalidReference as error:
        raise ValueError(str(error)) from None
    return tag


def _check_platform(text: str) -> str:
    if text:
        Platform.parse(text)
    return text


ServiceName = Annotated[str, AfterValidator(_check_service)]
ProjectName = Annotated[str, AfterValidator(_check_project)]
HealthUrl = Annotated[str, AfterValidator(_check_health_url)]
RegistryHost = Annotated[str, AfterValidator(_check_registry_host)]


class _Section(BaseModel):
    # Attribute docstrings become field descriptions, which docs/configuration.md is built from.
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class EngineConfig(_Section):
    """``[engine]``: how to reach the Docker engine."""

    socket: Annotated[str, AfterValidator(_check_socket)] = "unix:///var/run/docker.sock"
    """The engine's API socket: ``unix:///PATH`` or ``tcp://HOST:PORT``."""

    timeout: Timeout = 30.0
    """Time limit of one engine request."""


class TargetConfig(_Section):
    """``[target]``: the Tuwunel image to watch."""

    image: Annotated[str, AfterValidator(_check_image)] = "ghcr.io/matrix-construct/tuwunel"
    """The image name without tag, such as ``ghcr.io/matrix-construct/tuwunel``."""

    tag: Annotated[str, AfterValidator(_check_tag)] = "latest"
    """The tag to follow; ignored when ``versions`` is set."""

    versions: str = ""
    """A release range such as ``>=1.9,<2``: the guard follows the highest release tag in it.
    Empty means: follow ``tag``."""

    prereleases: StrictBool = False
    """Whether ``versions`` may pick pre-release tags such as ``v1.10.0-rc.1``."""

    min_age: Duration = 0.0
    """Minimum age of a new image (its config's ``created`` time) before the guard adopts it."""

    platform: Annotated[str, AfterValidator(_check_platform)] = ""
    """The platform to choose from a multi-platform image, such as ``linux/amd64``. Empty means
    the engine's own platform, with the x86-64 level of this host's CPU."""

    insecure_registries: list[RegistryHost] = []
    """Registries reached over plain HTTP, as ``HOST`` or ``HOST:PORT``. TLS is verified for
    every other registry."""

    credentials_file: Path | None = None
    """A Docker ``config.json`` with registry credentials in ``auths``. Omit for public images."""

    timeout: Timeout = 30.0
    """Time limit of one registry request."""

    @model_validator(mode="after")
    def _check_versions(self) -> TargetConfig:
        if self.versions:
            parse_release_range(self.versions)
        return self


class SideConfig(_Section):
    """``[deployment.synapse]`` and ``[deployment.tuwunel]``: one homeserver's compose services."""

    compose_files: list[str] = Field(default=["compose.yaml"], min_length=1)
    """Compose files of this side, relative to ``[deployment] directory``."""

    project: ProjectName
    """The compose project name."""

    services: list[ServiceName] = Field(min_length=1)
    """The compose services that make up this homeserver."""

    health_urls: list[HealthUrl] = Field(min_length=1)
    """URLs that must answer as this homeserver: ``/_tuwunel/server_version``,
    ``/_matrix/federation/v1/version`` or Synapse's ``/health``; other paths must answer 200."""


class TuwunelSideConfig(SideConfig):
    """``[deployment.tuwunel]``; writing this table is the admin's consent to switch."""

    image_variable: Annotated[str, Field(pattern=_VARIABLE_NAME.pattern)] = "TUWUNEL_IMAGE"
    """The compose variable that receives the verified image; write ``image: ${TUWUNEL_IMAGE}``
    in the Tuwunel service."""


class DeploymentConfig(_Section):
    """``[deployment]``: the compose project that runs the homeserver."""

    directory: Path
    """The compose project folder."""

    compose_command: list[str] = []
    """The compose command as a list, such as ``["docker", "compose"]``. Empty means compose v2
    as ``docker compose``, else a ``docker-compose`` on ``PATH``."""

    compose_timeout: Timeout = 300.0
    """Time limit of one compose command."""

    health_timeout: Timeout = 120.0
    """How long a started homeserver may take to pass the health gate."""

    health_interval: Pause = 2.0
    """Pause between two health probes."""

    health_confirmations: Annotated[int, Field(ge=1, le=100)] = 3
    """Passing health probes in a row that prove a homeserver healthy."""

    min_switch_interval: Duration = 3600.0
    """Minimum time between two automatic switches or updates, so a failing image cannot make
    the deployment flap."""

    backup_directory: Path | None = None
    """Folder for archives of Synapse's named volumes, written before Synapse stops. Omit for no
    backup."""

    synapse: SideConfig
    """The Synapse side."""

    tuwunel: TuwunelSideConfig | None = None
    """The Tuwunel side. Without it the guard only reports."""


class BuildConfig(_Section):
    """``[build]``: the git repository that the ``build`` strategy builds Tuwunel from."""

    repository: Annotated[str, Field(min_length=1)]
    """The git repository URL (``https://``, ``ssh://``, ``git://`` or ``file://``)."""

    ref: Annotated[str, Field(min_length=1)] = "main"
    """The branch, tag or commit to build."""

    dockerfile: str = "Dockerfile"
    """The Dockerfile's path inside the repository."""

    build_args: dict[str, str] = {}
    """Build arguments passed to the build."""


class ScheduleConfig(_Section):
    """``[schedule]``: how often the guard checks."""

    interval: Annotated[float, BeforeValidator(_duration), Field(ge=1, le=MAX_DURATION)] = 900.0
    """Time between two checks. An engine restart triggers a check at once as well."""

    jitter: Duration = 60.0
    """A random delay up to this long added to each check, so hosts do not ask the registry
    at the same moment."""


class StateConfig(_Section):
    """``[state]``: where the guard keeps its state file."""

    directory: Path = Path("/var/lib/tuwunel-guard")
    """The folder of ``state.json``, the lock file and temporary files of the strategies."""


class LogConfig(_Section):
    """``[log]``: how much the guard logs."""

    level: Annotated[str, Field(pattern=r"^(debug|info|warning|error)$")] = "info"
    """One of ``debug``, ``info``, ``warning``, ``error``."""


class Config(_Section):
    """The whole config file."""

    strategy: Strategy = Strategy.AUTO
    """How the guard gets Tuwunel onto the engine: ``auto``, ``synapse``, ``convert``,
    ``podman`` or ``build`` (see docs/strategies.md)."""

    prefer_native_pull: StrictBool = True
    """With ``convert``, ``podman`` or ``build``: use the engine's own pull once the engine can
    run the image."""

    engine: EngineConfig = EngineConfig()
    """The ``[engine]`` table."""

    target: TargetConfig = TargetConfig()
    """The ``[target]`` table."""

    deployment: DeploymentConfig | None = None
    """The ``[deployment]`` table. Without it the guard only reports."""

    schedule: ScheduleConfig = ScheduleConfig()
    """The ``[schedule]`` table."""

    state: StateConfig = StateConfig()
    """The ``[state]`` table."""

    log: LogConfig = LogConfig()
    """The ``[log]`` table."""

    build: BuildConfig | None = None
    """The ``[build]`` table, needed by strategy ``build``."""

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
