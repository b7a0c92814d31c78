"""A compose project with a stand-in Synapse and a stand-in Tuwunel, run with compose v2.

Both services use network_mode: host and the same loopback port, as a deployment that switches
from one homeserver to the other does. The tuwunel service is in the compose profile "tuwunel",
so a plain `up -d` starts only synapse. Compose v2 still starts a profiled service that is
named on the command line (`up -d tuwunel`), without --profile.

Images come from the environment: SYNAPSE_IMAGE and TUWUNEL_IMAGE, with defaults written to
the project's .env file. A TUWUNEL_IMAGE in the environment of the compose process wins over
.env, which is how a caller switches between the zstd and gzip Tuwunel images.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from testbed import paths
from testbed.engine import DockerEngine

COMPOSE_TEMPLATE = """\
name: {project_name}

services:
  synapse:
    image: ${{SYNAPSE_IMAGE}}
    network_mode: host
    # docker-init (tini) as PID 1 forwards SIGTERM to httpd, so the container stops at once
    # instead of after the 10 s stop timeout.
    init: true
    restart: unless-stopped
    environment:
      STANDIN_PORT: "{port}"
    volumes:
      - synapse-data:/data
    healthcheck:
      test: ["CMD", "/bin/busybox", "wget", "-q", "-O", "/dev/null", "http://127.0.0.1:{port}/health"]
      interval: 1s
      timeout: 2s
      retries: 15

  tuwunel:
    image: ${{TUWUNEL_IMAGE}}
    profiles: ["tuwunel"]
    network_mode: host
    init: true
    restart: unless-stopped
    environment:
      STANDIN_PORT: "{port}"
    volumes:
      - tuwunel-data:/var/lib/tuwunel
    healthcheck:
      test: ["CMD", "/bin/busybox", "wget", "-q", "-O", "/dev/null", "http://127.0.0.1:{port}/_tuwunel/server_version"]
      interval: 1s
      timeout: 2s
      retries: 15

volumes:
  synapse-data:
  tuwunel-data:
"""


class ComposeError(RuntimeError):
    """Raised when a compose command exits with a non-zero status."""


@dataclass(frozen=True)
class ComposeCommand:
    """Argument list and complete environment for one compose v2 run."""

    argv: list[str]
    env: dict[str, str]


@dataclass(frozen=True)
class ComposeProject:
    """A compose project folder written by create()."""

    folder: Path
    project_name: str
    port: int
    synapse_image: str
    tuwunel_image: str

    @property
    def compose_file(self) -> Path:
        return self.folder / "compose.yaml"

    @property
    def env_file(self) -> Path:
        return self.folder / ".env"

    @property
    def docker_config(self) -> Path:
        """An empty DOCKER_CONFIG folder, so no user's config.json or CLI plugins apply."""
        return self.folder / ".docker"

    @classmethod
    def create(
        cls,
        folder: Path,
        *,
        port: int,
        synapse_image: str,
        tuwunel_image: str,
        project_name: str = "standin",
    ) -> ComposeProject:
        """Write compose.yaml and .env into `folder` and return the project."""
        project = cls(folder, project_name, port, synapse_image, tuwunel_image)
        folder.mkdir(parents=True, exist_ok=True)
        project.docker_config.mkdir(exist_ok=True)
        project.compose_file.write_text(
            COMPOSE_TEMPLATE.format(project_name=project_name, port=port)
        )
        project.env_file.write_text(
            f"SYNAPSE_IMAGE={synapse_image}\nTUWUNEL_IMAGE={tuwunel_image}\n"
        )
        return project

    def url(self, path: str = "/") -> str:
        """Return the URL of `path` on the homeserver port."""
        return f"http://127.0.0.1:{self.port}{path}"

    def command(
        self, engine: DockerEngine | str, *args: str, env: dict[str, str] | None = None
    ) -> ComposeCommand:
        """Return the argv and environment that run `docker-compose ARGS` against `engine`.

        `engine` is a DockerEngine or a DOCKER_HOST value such as unix:///tmp/tgXXXX/docker.sock.
        `env` adds variables, for example {"TUWUNEL_IMAGE": ...}.
        """
        docker_host = engine.base_url if isinstance(engine, DockerEngine) else engine
        environment = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(self.folder),
            "DOCKER_HOST": docker_host,
            "DOCKER_CONFIG": str(self.docker_config),
            "COMPOSE_PROJECT_NAME": self.project_name,
        }
        environment.update(env or {})
        argv = [
            str(paths.COMPOSE_BINARY),
            "--project-directory",
            str(self.folder),
            "--file",
            str(self.compose_file),
            *args,
        ]
        return ComposeCommand(argv, environment)

    def run(
        self,
        engine: DockerEngine | str,
        *args: str,
        env: dict[str, str] | None = None,
        timeout: float = 120.0,
    ) -> subprocess.CompletedProcess[str]:
        """Run `docker-compose ARGS` against `engine`; raise ComposeError if it fails."""
        command = self.command(engine, *args, env=env)
        result = subprocess.run(
            command.argv,
            env=command.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if result.returncode != 0:
            raise ComposeError(
                f"docker-compose {' '.join(args)} failed with status {result.returncode}:\n"
                f"{result.stderr.strip()}"
            )
        return result
