"""The podman route: get the Tuwunel image onto an engine before 23.0 through Podman.

Docker 20.10 cannot unpack zstd layers, but Podman 4.3.1 (Debian 12) pulls them. It cannot write
such an image as a docker-archive, though: ``podman save --format docker-archive`` of the pulled
image fails with ``zstd compression is not supported for docker images``. Written to stdout, a
partial archive remains. The engine's ``POST /images/load`` returns status 200 for it and, in
some runs, reports no error while loading nothing. The steps that work:

1. ``podman pull`` by the manifest digest that the registry probe chose, so podman makes no
   platform choice of its own;
2. ``podman create`` a container from it (never started) and ``podman commit --format docker``,
   which writes a new image with Docker media types and uncompressed layers;
3. ``podman save --format docker-archive`` of the committed image to a file;
4. stream the file to the engine's ``POST /images/load``;
5. check that the engine has an image whose ID is the one podman reported for the committed
   image, then tag it ``tuwunel-guard/tuwunel:podman-<first 12 hex digits of that ID>``.

Podman runs as a subprocess with ``--root``, ``--runroot`` and ``--tmpdir`` under the guard's
state folder (or a run folder of its own) and the vfs storage driver by default, so the host's
own Podman images and containers are neither read nor changed. Podman still reads the host's
settings in ``/etc/containers`` (registries, signature policy, container defaults). The
container and both Podman images are removed after each run, by ID.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import docker
import docker.errors
import structlog

from tuwunel_guard.adapters.acquire import AcquiredImage, Progress
from tuwunel_guard.adapters.programs import (
    engine_client,
    inspect_image_id,
    run_with_heartbeat,
)
from tuwunel_guard.core.image import ImageFacts
from tuwunel_guard.core.reference import ImageReference
from tuwunel_guard.errors import EngineError, GuardError, RegistryError

log = structlog.get_logger("tuwunel_guard.adapters.podman")

LOCAL_REPOSITORY = "tuwunel-guard/tuwunel"
SOURCE_LABEL = "org.tuwunel-guard.source-image"
PODMAN_PACKAGE = "podman"

# Variables that `podman create` adds to a container's environment and `podman commit` then
# writes into the image (measured with Podman 4.3.1). The route unsets those the image does not
# set itself, so the committed image keeps the environment the image's authors gave it.
_PODMAN_DEFAULT_ENVIRONMENT = ("TERM", "container")
_IMAGE_ID = re.compile(r"[0-9a-f]{64}")
_LOAD_CHUNK_BYTES = 1024 * 1024
# Podman 4.3.1 exits with "the specified runroot is longer than 50 characters" otherwise.
RUNROOT_MAX_LENGTH = 50
# Seconds between calls of the progress callback while a podman command runs.


class PodmanAcquirer:
    """Gets the image onto the engine through Podman: pull, commit, save, load, verify, tag."""

    route = "podman"

    def __init__(
        self,
        *,
        engine_socket: str,
        state_dir: Path,
        insecure_registries: Iterable[str] = (),
        podman: str = "podman",
        storage_driver: str = "vfs",
        authfile: Path | None = None,
        run_dir: Path | None = None,
        command_timeout: float = 900.0,
        engine_timeout: float = 600.0,
    ) -> None:
        """Set up the route; nothing runs until :meth:`acquire`.

        Args:
            engine_socket: the Docker engine's API socket, for example
                ``unix:///var/run/docker.sock``.
            state_dir: the guard's state folder. Podman's private storage goes to
                ``state_dir/podman``.
            insecure_registries: registry hosts (``host`` or ``host:port``) that podman pulls
                from with ``--tls-verify=false``, which also allows plain HTTP.
            podman: the podman command, a name looked up on ``PATH`` or a path.
            storage_driver: Podman's storage driver. vfs needs no kernel support but copies
                every layer in full; ``overlay`` saves disk where the kernel allows it.
            authfile: registry credentials for podman (``--authfile``). Without it podman reads
                its own auth file or, failing that, ``$HOME/.docker/config.json``.
            run_dir: Podman's ``--runroot``, with ``--tmpdir`` below it; by default
                ``state_dir/podman/run``. Podman accepts at most 50 characters here.
            command_timeout: seconds each podman command may take.
            engine_timeout: seconds to wait for each read from the engine's socket.

        Raises:
            GuardError: the run folder's path is longer than podman accepts.
        """
        self.engine_socket = engine_socket
        self.folder = state_dir / "podman"
        self.run_dir = run_dir if run_dir is not None else self.folder / "run"
        if len(str(self.run_dir)) > RUNROOT_MAX_LENGTH:
            raise GuardError(
                f"podman run folder {self.run_dir} has {len(str(self.run_dir))} characters, but "
                f"podman accepts at most {RUNROOT_MAX_LENGTH}; choose a shorter state folder or "
                "run folder"
            )
        self.insecure_registries = frozenset(host.strip().lower() for host in insecure_registries)
        self.podman = podman
        self.storage_driver = storage_driver
        self.authfile = authfile
        self.command_timeout = command_timeout
        self.engine_timeout = engine_timeout

    def acquire(
        self, reference: ImageReference, image: ImageFacts, progress: Progress | None = None
    ) -> AcquiredImage:
        """Pull ``image`` with podman, convert it to a docker-archive and load it into the engine.

        ``progress`` gets the bytes of the archive sent to the engine so far and in all, and
        ``(0, 0)`` every few seconds while a podman command runs.

        Raises:
            GuardError: podman is missing, or a podman step other than pull failed or timed out.
            RegistryError: ``podman pull`` failed, or the pulled image is not the one the
                registry probe found.
            EngineError: the engine rejected the archive or has no image with the expected ID
                afterwards.
            EngineUnavailable: the engine did not respond.
        """
        podman = _Podman(
            self._find_podman(), self._global_options(), self.command_timeout, progress
        )
        for folder in (self.folder / "root", self.run_dir / "libpod"):
            folder.mkdir(parents=True, exist_ok=True)
        pinned = reference.with_digest(image.manifest_digest)

        pulled_id = self._pull(podman, reference, pinned, image)
        try:
            committed_id = self._commit(podman, pulled_id, pinned)
            try:
                return self._save_and_load(podman, committed_id, progress)
            finally:
                podman.remove_image(committed_id)
        finally:
            podman.remove_image(pulled_id)

    def load_archive(
        self, archive: Path, expected_id: str, progress: Progress | None = None
    ) -> AcquiredImage:
        """Stream the docker-archive ``archive`` to the engine and tag the image ``expected_id``.

        The load counts as done only when the engine has an image with ID ``expected_id``
        afterwards, because the engine returns status 200 for a partial archive.

        Raises:
            EngineError: the engine reported an error while loading, or has no image with
                ``expected_id`` afterwards.
            EngineUnavailable: the engine did not respond.
        """
        total = archive.stat().st_size
        local_reference = f"{LOCAL_REPOSITORY}:podman-{expected_id.removeprefix('sha256:')[:12]}"

        with engine_client(self.engine_socket, self.engine_timeout) as client:
            loaded = _send_archive(client, archive, total, progress)
            if inspect_image_id(client, expected_id) is None:
                found = ", ".join(loaded) or "nothing"
                raise EngineError(
                    f"the engine at {self.engine_socket} has no image {expected_id} after "
                    f"loading {archive} ({total} bytes); it reported loading {found}. "
                    "The archive is incomplete or contains another image; run the podman route "
                    "again, and if it fails the same way, check podman's output in the log"
                )
            repository, _, tag = local_reference.partition(":")
            client.tag(expected_id, repository, tag, force=True)
            image_id = inspect_image_id(client, local_reference)

        if image_id != expected_id:
            raise EngineError(
                f"the engine reports image {image_id} for {local_reference}, "
                f"expected {expected_id} right after tagging it"
            )
        log.debug(
            "image_loaded",
            archive=str(archive),
            size=total,
            image_id=image_id,
            local_reference=local_reference,
            loaded=loaded,
        )
        return AcquiredImage(local_reference=local_reference, image_id=image_id)

    def _find_podman(self) -> str:
        executable = shutil.which(self.podman)
        if executable is None:
            raise GuardError(
                f"podman not found (looked for {self.podman!r} on PATH); the podman strategy "
                f"needs it: install the Debian package {PODMAN_PACKAGE!r} "
                f"(apt-get install {PODMAN_PACKAGE}) or choose another strategy"
            )
        return executable

    def _global_options(self) -> list[str]:
        return [
            f"--root={self.folder / 'root'}",
            f"--runroot={self.run_dir}",
            f"--tmpdir={self.run_dir / 'libpod'}",
            f"--storage-driver={self.storage_driver}",
            # No container ever runs, so neither systemd's cgroups nor the journal is needed;
            # these keep podman working where PID 1 is not systemd.
            "--cgroup-manager=cgroupfs",
            "--events-backend=file",
        ]

    def _pull(
        self, podman: _Podman, reference: ImageReference, pinned: str, image: ImageFacts
    ) -> str:
        arguments = ["pull", "--quiet"]
        if reference.registry_host.lower() in self.insecure_registries:
            arguments.append("--tls-verify=false")
        if self.authfile is not None:
            arguments.append(f"--authfile={self.authfile}")
        pulled_id = podman.image_id(podman.run(*arguments, pinned, error=RegistryError))

        expected = image.config_digest.removeprefix("sha256:")
        if pulled_id != expected:
            podman.remove_image(pulled_id)
            raise RegistryError(
                f"podman pulled {pinned} as image {pulled_id}, but the registry probe found "
                f"config digest {image.config_digest}; the registry changed the manifest or "
                "serves other content. The next check probes the registry again"
            )
        return pulled_id

    def _save_and_load(
        self, podman: _Podman, committed_id: str, progress: Progress | None
    ) -> AcquiredImage:
        archive = self.folder / f"{committed_id}.tar"
        try:
            podman.run("save", "--format=docker-archive", f"--output={archive}", committed_id)
            return self.load_archive(archive, f"sha256:{committed_id}", progress)
        finally:
            archive.unlink(missing_ok=True)

    def _commit(self, podman: _Podman, pulled_id: str, pinned: str) -> str:
        original = podman.inspect_image(pulled_id)
        container_id = podman.container_id(
            podman.run(
                "create",
                "--network=none",
                "--http-proxy=false",
                *_unset_podman_environment(original),
                pulled_id,
            )
        )
        try:
            committed_id = podman.image_id(
                podman.run(
                    "commit",
                    "--quiet",
                    "--format=docker",
                    f"--change=LABEL {SOURCE_LABEL}={pinned}",
                    container_id,
                )
            )
        finally:
            podman.remove_container(container_id)

        differences = config_differences(original, podman.inspect_image(committed_id))
        if differences:
            podman.remove_image(committed_id)
            raise GuardError(
                "podman commit changed the image's settings: "
                + "; ".join(differences)
                + ". Check env and label settings in /etc/containers/containers.conf, "
                "or choose another strategy"
            )
        return committed_id


class _Podman:
    """Runs podman with the route's global options and translates its failures."""

    def __init__(
        self, executable: str, options: list[str], timeout: float, progress: Progress | None
    ) -> None:
        self.executable = executable
        self.options = options
        self.timeout = timeout
        self.progress = progress

    def _heartbeat(self) -> None:
        if self.progress is not None:
            self.progress(0, 0)

    def run(self, *arguments: str, error: type[GuardError] = GuardError) -> str:
        """Run ``podman OPTIONS ARGUMENTS`` and return its standard output.

        Raises ``error`` with podman's own message when it exits with a status other than 0,
        and ``GuardError`` when it cannot start or does not finish within the timeout.
        """
        command = arguments[0]
        argv = [self.executable, *self.options, *arguments]
        began = time.monotonic()
        try:
            result = run_with_heartbeat(argv, self.timeout, self._heartbeat)
        except subprocess.TimeoutExpired:
            raise GuardError(
                f"podman {command} did not finish within {self.timeout:.0f} s "
                f"({' '.join(arguments)}); check the registry and the disk under the "
                "guard's state folder"
            ) from None
        except OSError as os_error:
            raise GuardError(
                f"podman could not be started as {self.executable}: {os_error}"
            ) from None

        log.debug(
            "podman_command_completed",
            argv=argv,
            status=result.returncode,
            seconds=round(time.monotonic() - began, 3),
            # The last line is where pull, create and commit print the ID they made.
            last_line=_last_line(result.stdout)[:200],
        )
        if result.returncode != 0:
            raise error(
                f"podman {command} failed with exit status {result.returncode} "
                f"({' '.join(arguments)}): {_podman_message(result.stderr)}"
            )
        return result.stdout

    def inspect_image(self, image_id: str) -> dict[str, Any]:
        """Return the settings podman stores for ``image_id``: its ``Config`` and health check."""
        output = self.run("image", "inspect", "--format=json", image_id)
        try:
            inspected = json.loads(output)
            config = dict(inspected[0].get("Config") or {})
            config["Healthcheck"] = inspected[0].get("HealthCheck")
        except (ValueError, LookupError, TypeError, AttributeError) as error:
            raise GuardError(
                f"podman image inspect {image_id} returned output that is not the expected "
                f"JSON: {error}; output begins {output[:200]!r}"
            ) from None
        return config

    def remove_container(self, container_id: str) -> None:
        """Remove the container, and log a warning instead of raising when that fails."""
        try:
            self.run("rm", "--force", container_id)
        except GuardError as error:
            log.warning("podman_cleanup_failed", container_id=container_id, error=str(error))

    def remove_image(self, image_id: str) -> None:
        """Remove the image from the private storage, and log a warning when that fails."""
        try:
            self.run("rmi", "--force", image_id)
        except GuardError as error:
            log.warning("podman_cleanup_failed", image_id=image_id, error=str(error))

    @staticmethod
    def image_id(output: str) -> str:
        """Return the image ID on the last line of ``output`` (64 hex digits)."""
        return _last_id(output, "image")

    @staticmethod
    def container_id(output: str) -> str:
        """Return the container ID on the last line of ``output`` (64 hex digits)."""
        return _last_id(output, "container")


def config_differences(original: dict[str, Any], committed: dict[str, Any]) -> list[str]:
    """List how the committed image's settings differ from the pulled image's.

    The order of ``Env`` does not count, because podman commit reorders it; neither does the
    source label that the route adds, nor an empty ``Cmd`` in place of a missing one.
    """
    differences = []
    keys = sorted(set(original) | set(committed))
    for key in keys:
        before, after = original.get(key), committed.get(key)
        if key == "Env":
            before, after = sorted(before or []), sorted(after or [])
        elif key == "Labels":
            after = {name: value for name, value in (after or {}).items() if name != SOURCE_LABEL}
            before = before or {}
        elif key == "Cmd":
            before, after = before or [], after or []
        if before != after:
            differences.append(f"{key} was {json.dumps(before)}, is {json.dumps(after)}")
    return differences


def _unset_podman_environment(config: dict[str, Any]) -> list[str]:
    names = {entry.partition("=")[0] for entry in config.get("Env") or []}
    return [f"--unsetenv={name}" for name in _PODMAN_DEFAULT_ENVIRONMENT if name not in names]


def _last_line(output: str) -> str:
    lines = output.strip().splitlines()
    return lines[-1].strip() if lines else ""


def _last_id(output: str, kind: str) -> str:
    value = _last_line(output)
    if _IMAGE_ID.fullmatch(value) is None:
        raise GuardError(
            f"podman printed no {kind} ID (64 hex digits) where one was expected; "
            f"its output ends {output[-200:]!r}"
        )
    return value


def _podman_message(stderr: str) -> str:
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("Error:")]
    chosen = errors or lines[-3:]
    return " | ".join(chosen) or "(no output on stderr)"


def _send_archive(
    client: docker.APIClient, archive: Path, total: int, progress: Progress | None
) -> list[str]:
    """Stream ``archive`` to ``POST /images/load``; return the image names and IDs it reported.

    Raises ``EngineError`` with the engine's message when the response stream contains an error.

    NOTE: ``progress`` is called while the archive is sent. The engine then unpacks the layers
    before it responds, and that wait has no heartbeat.
    """

    def chunks() -> Iterator[bytes]:
        done = 0
        with archive.open("rb") as stream:
            while chunk := stream.read(_LOAD_CHUNK_BYTES):
                done += len(chunk)
                if progress is not None:
                    progress(done, total)
                yield chunk

    loaded = []
    for message in client.load_image(chunks()):
        if "error" in message:
            detail = (message.get("errorDetail") or {}).get("message") or message["error"]
            raise EngineError(f"the engine failed to load the archive {archive}: {detail}")
        text = str(message.get("stream", "")).strip()
        for prefix in ("Loaded image ID: ", "Loaded image: "):
            if text.startswith(prefix):
                loaded.append(text.removeprefix(prefix))
    return loaded
