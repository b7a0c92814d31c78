"""The build route: build the Tuwunel image from source on the engine itself.

An engine stores what it builds in its own layer format, so the built image runs on it whatever
the published image's compression. The route clones one ref of a git repository into the
guard's state folder (``git clone --depth 1 --branch REF``, or ``git fetch --depth 1`` of a full
commit hash). The engine then builds a Dockerfile from that checkout through ``POST /build``.
The result is tagged ``tuwunel-guard/tuwunel:build-<first 12 hex digits of the commit>``, and
its image ID is read back from the engine.

Tuwunel's own repository has no plain Dockerfile (its images come from ``docker buildx bake``,
which needs BuildKit, and the API used here runs the classic builder), so admins point the route
at a repository with a Dockerfile of their own, for example one that copies a released static
binary into an image.
"""

from __future__ import annotations

import collections
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import structlog

from tuwunel_guard.adapters.acquire import AcquiredImage, Progress
from tuwunel_guard.adapters.programs import (
    engine_client,
    inspect_image_id,
    run_with_heartbeat,
)
from tuwunel_guard.core.image import ImageFacts
from tuwunel_guard.core.reference import ImageReference
from tuwunel_guard.errors import EngineError, GuardError

log = structlog.get_logger("tuwunel_guard.adapters.build")

LOCAL_REPOSITORY = "tuwunel-guard/tuwunel"
COMMIT_LABEL = "org.tuwunel-guard.source-commit"
REPOSITORY_LABEL = "org.tuwunel-guard.source-repository"
URL_SCHEMES = ("https", "ssh", "file", "git")
# Lines of build output kept for the error message when a build step fails.
OUTPUT_LINES_IN_ERRORS = 20

_COMMIT_HASH = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")
_HEX = re.compile(r"[0-9a-fA-F]+")
# Characters that git check-ref-format rejects anywhere in a ref name.
_REF_FORBIDDEN = re.compile(r"[\x00-\x20\x7f~^:?*\[\\]")
_SCP_LIKE_URL = re.compile(r"[^/@:]+@[^/:]+:")
# Seconds between calls of the progress callback while a git command runs.


class BuildAcquirer:
    """Gets the image onto the engine by building a Dockerfile from one ref of a git repository."""

    route = "build"

    def __init__(
        self,
        *,
        engine_socket: str,
        state_dir: Path,
        url: str,
        ref: str,
        dockerfile: str = "Dockerfile",
        build_args: Mapping[str, str] | None = None,
        git: str = "git",
        clone_timeout: float = 600.0,
        build_timeout: float = 3600.0,
        engine_timeout: float = 600.0,
    ) -> None:
        """Check the source settings; nothing is cloned or built until :meth:`acquire`.

        Args:
            engine_socket: the Docker engine's API socket.
            state_dir: the guard's state folder. Each clone goes to a new folder under
                ``state_dir/build`` and is removed after the build.
            url: the git repository, with scheme ``https``, ``ssh``, ``file`` or ``git``.
            ref: a branch, a tag or a full commit hash (40 or 64 hex digits).
            dockerfile: the Dockerfile's path inside the repository; the repository's top
                folder is the build context.
            build_args: values for the Dockerfile's ``ARG`` instructions.
            git: the git command, a name looked up on ``PATH`` or a path.
            clone_timeout: seconds each git command may take.
            build_timeout: seconds the whole build may take.
            engine_timeout: seconds to wait for each read from the engine's socket.

        Raises:
            GuardError: ``url``, ``ref``, ``dockerfile`` or a build argument name is invalid;
                the message names the value and the form expected.
        """
        self.engine_socket = engine_socket
        self.folder = state_dir / "build"
        self.url = validate_url(url)
        self.ref = validate_ref(ref)
        self.dockerfile = validate_dockerfile(dockerfile)
        self.build_args = validate_build_args(build_args or {})
        self.git = git
        self.clone_timeout = clone_timeout
        self.build_timeout = build_timeout
        self.engine_timeout = engine_timeout

    def acquire(
        self, reference: ImageReference, image: ImageFacts, progress: Progress | None = None
    ) -> AcquiredImage:
        """Clone the ref, build the Dockerfile on the engine, tag the image and read its ID back.

        ``reference`` and ``image`` describe the published image, which this route does not use.
        A build reports steps, not bytes, so ``progress`` only gets ``(0, 0)`` every few seconds
        while git runs and for each message of the build output.

        Raises:
            GuardError: git is missing, the clone failed or timed out, the Dockerfile is not in
                the checkout, or the build took longer than the build timeout.
            EngineError: a build step failed (the message ends with the last build output
                lines) or the engine has no image under the new tag afterwards.
            EngineUnavailable: the engine did not respond.
        """

        def heartbeat() -> None:
            if progress is not None:
                progress(0, 0)

        self.folder.mkdir(parents=True, exist_ok=True)
        checkout = Path(tempfile.mkdtemp(prefix="source-", dir=self.folder))
        try:
            commit = self._clone(checkout, heartbeat)
            self._check_dockerfile(checkout)
            local_reference = f"{LOCAL_REPOSITORY}:build-{commit[:12]}"
            return self._build(checkout, commit, local_reference, heartbeat)
        finally:
            shutil.rmtree(checkout, ignore_errors=True)

    def _clone(self, checkout: Path, heartbeat: Callable[[], None]) -> str:
        git = shutil.which(self.git)
        if git is None:
            raise GuardError(
                f"git not found (looked for {self.git!r} on PATH); the build strategy needs it: "
                "install the Debian package 'git' (apt-get install git) or choose another strategy"
            )

        if _COMMIT_HASH.fullmatch(self.ref):
            self._git(heartbeat, git, "init", "--quiet", str(checkout))
            self._git(
                heartbeat,
                git,
                "fetch",
                "--quiet",
                "--depth=1",
                "--",
                self.url,
                self.ref,
                cwd=checkout,
            )
            self._git(heartbeat, git, "checkout", "--quiet", "--detach", "FETCH_HEAD", cwd=checkout)
        else:
            self._git(
                heartbeat,
                git,
                "clone",
                "--quiet",
                "--depth=1",
                f"--branch={self.ref}",
                "--",
                self.url,
                str(checkout),
            )

        commit = self._git(heartbeat, git, "rev-parse", "HEAD", cwd=checkout).strip()
        if _COMMIT_HASH.fullmatch(commit) is None:
            raise GuardError(f"git rev-parse HEAD in {checkout} printed {commit!r}, not a commit")
        if _COMMIT_HASH.fullmatch(self.ref) and commit != self.ref:
            raise GuardError(f"git checked out commit {commit}, but the config requests {self.ref}")
        log.debug("source_cloned", url=redact_url(self.url), ref=self.ref, commit=commit)
        return commit

    def _git(
        self, heartbeat: Callable[[], None], git: str, *arguments: str, cwd: Path | None = None
    ) -> str:
        environment = {
            **os.environ,
            # Fail at once instead of waiting for a password on a terminal no one watches.
            "GIT_TERMINAL_PROMPT": "0",
            # Also covers transports git picks by itself (redirects, submodules, ext::).
            "GIT_ALLOW_PROTOCOL": ":".join(URL_SCHEMES),
        }
        try:
            result = run_with_heartbeat(
                [git, *arguments], self.clone_timeout, heartbeat, cwd=cwd, env=environment
            )
        except subprocess.TimeoutExpired:
            raise GuardError(
                f"git {arguments[0]} of {redact_url(self.url)} (ref {self.ref!r}) did not finish "
                f"within {self.clone_timeout:.0f} s; check that the repository is reachable"
            ) from None
        except OSError as error:
            raise GuardError(f"git could not be started as {git}: {error}") from None

        if result.returncode != 0:
            raise GuardError(
                f"git {arguments[0]} failed with exit status {result.returncode} for "
                f"{redact_url(self.url)} (ref {self.ref!r}): {self._git_message(result.stderr)}. "
                f"{self._ref_hint()}"
            )
        return result.stdout

    def _git_message(self, stderr: str) -> str:
        lines = [line.strip() for line in stderr.splitlines() if line.strip()]
        message = " | ".join(lines[-3:]) or "(no output on stderr)"
        return message.replace(self.url, redact_url(self.url))

    def _ref_hint(self) -> str:
        if _HEX.fullmatch(self.ref) and _COMMIT_HASH.fullmatch(self.ref) is None:
            return (
                f"If {self.ref!r} is an abbreviated commit hash, give all 40 hex digits, "
                "because git fetches commits only by their full hash"
            )
        return "Check the URL, that the branch, tag or commit exists there, and git's credentials"

    def _check_dockerfile(self, checkout: Path) -> None:
        path = (checkout / self.dockerfile).resolve()
        if not path.is_relative_to(checkout.resolve()) or not path.is_file():
            raise GuardError(
                f"Dockerfile {self.dockerfile!r} not found in {redact_url(self.url)} at ref "
                f"{self.ref!r}; set the Dockerfile path relative to the repository's top folder"
            )

    def _build(
        self, checkout: Path, commit: str, local_reference: str, heartbeat: Callable[[], None]
    ) -> AcquiredImage:
        deadline = time.monotonic() + self.build_timeout
        with engine_client(self.engine_socket, self.engine_timeout) as client:
            stream = client.build(
                path=str(checkout),
                dockerfile=self.dockerfile,
                buildargs=dict(self.build_args),
                tag=local_reference,
                labels={COMMIT_LABEL: commit, REPOSITORY_LABEL: redact_url(self.url)},
                rm=True,
                forcerm=True,
                decode=True,
                timeout=int(self.engine_timeout),
            )
            built_id = self._follow_build(stream, commit, deadline, heartbeat)
            image_id = inspect_image_id(client, local_reference)

        if image_id is None:
            raise EngineError(
                f"the build of {redact_url(self.url)} at {commit} ended without an error, but "
                f"the engine at {self.engine_socket} has no image {local_reference}"
            )
        if built_id is not None and built_id != image_id:
            raise EngineError(
                f"the build reported image {built_id}, but the engine reports {image_id} for "
                f"{local_reference}; another build may have moved the tag, so try again"
            )
        return AcquiredImage(local_reference=local_reference, image_id=image_id)

    def _follow_build(
        self,
        stream: Iterator[dict[str, Any]],
        commit: str,
        deadline: float,
        heartbeat: Callable[[], None],
    ) -> str | None:
        """Log each build output line and return the built image ID, if the engine sent one.

        NOTE: the engine sends nothing while one step runs, so a step that runs longer than the
        service's watchdog interval gets no heartbeat and no deadline check until it ends.
        """
        output = _BuildOutput(commit)
        built_id = None
        for message in stream:
            heartbeat()
            if time.monotonic() > deadline:
                # NOTE: the engine keeps building after the guard stops reading; the classic
                # builder has no cancel request other than closing the connection.
                raise GuardError(
                    f"the build of {redact_url(self.url)} at {commit} did not finish within "
                    f"{self.build_timeout:.0f} s; raise the build timeout or check the Dockerfile"
                )
            output.add(message)
            if "error" in message:
                output.flush()
                detail = (message.get("errorDetail") or {}).get("message") or message["error"]
                raise EngineError(
                    f"the engine failed to build {self.dockerfile} of {redact_url(self.url)} at "
                    f"{commit}: {detail}\nLast build output:\n" + "\n".join(output.recent)
                )
            aux = message.get("aux")
            if isinstance(aux, dict) and "ID" in aux:
                built_id = str(aux["ID"])
        output.flush()
        return built_id


class _BuildOutput:
    """Joins the build's ``stream`` texts into lines, logs each line and keeps the last ones.

    The engine sends a step's title and its line break as two messages, so a line is complete
    only at a line break. ``status`` texts (pulls of the base image) are whole lines.
    """

    def __init__(self, commit: str) -> None:
        self.commit = commit
        self.recent: collections.deque[str] = collections.deque(maxlen=OUTPUT_LINES_IN_ERRORS)
        self._partial = ""

    def add(self, message: dict[str, Any]) -> None:
        if "stream" in message:
            *lines, self._partial = (self._partial + str(message["stream"])).split("\n")
            for line in lines:
                self._emit(line)
        elif "status" in message and "progress" not in message:
            # Download progress bars repeat many times per layer and are left out.
            self._emit(" ".join(str(message[key]) for key in ("id", "status") if key in message))

    def flush(self) -> None:
        self._emit(self._partial)
        self._partial = ""

    def _emit(self, line: str) -> None:
        line = line.rstrip()
        if line.strip():
            self.recent.append(line)
            log.debug("build_output_received", line=line, commit=self.commit)


def validate_url(url: str) -> str:
    """Return ``url`` if it is a git repository URL with an allowed scheme.

    Raises ``GuardError`` for a leading ``-`` (git would read it as an option), whitespace,
    an scp-like ``user@host:path`` form, or a scheme other than https, ssh, file or git.
    """
    if not url or url.startswith("-") or any(c.isspace() or ord(c) < 32 for c in url):
        raise GuardError(
            f"invalid git repository URL {url!r}: it must not be empty, start with '-' or "
            "contain spaces or control characters"
        )
    if _SCP_LIKE_URL.match(url) and "://" not in url:
        raise GuardError(
            f"invalid git repository URL {redact_url(url)!r}: write the scp-like form as an "
            "ssh URL, for example 'ssh://git@example.org/owner/repository.git'"
        )
    parts = urlsplit(url)
    if parts.scheme not in URL_SCHEMES:
        raise GuardError(
            f"unsupported git repository URL {redact_url(url)!r}: the scheme must be one of "
            f"{', '.join(URL_SCHEMES)} (for example 'https://example.org/owner/repository.git')"
        )
    if parts.scheme == "file" and not parts.path:
        raise GuardError(f"invalid git repository URL {url!r}: a file URL needs a path")
    if parts.scheme != "file" and not parts.hostname:
        raise GuardError(f"invalid git repository URL {redact_url(url)!r}: it names no host")
    return url


def validate_ref(ref: str) -> str:
    """Return ``ref`` if it is a valid branch or tag name or a full commit hash.

    The branch and tag rules are those of ``git check-ref-format --allow-onelevel``.
    Raises ``GuardError`` naming the rule that ``ref`` breaks.
    """
    rules = (
        (not ref, "it is empty"),
        (ref.startswith("-"), "it starts with '-', which git would read as an option"),
        (
            _REF_FORBIDDEN.search(ref) is not None,
            "it contains a space, a control character or one of ~ ^ : ? * [ \\",
        ),
        (".." in ref or "@{" in ref or "//" in ref, "it contains '..', '@{' or '//'"),
        (
            ref.startswith("/") or ref.endswith(("/", ".")),
            "it starts with '/' or ends with '/' or '.'",
        ),
        (ref == "@", "it is '@'"),
        (
            any(part.startswith(".") or part.endswith(".lock") for part in ref.split("/")),
            "a '/'-separated part starts with '.' or ends with '.lock'",
        ),
    )
    for broken, reason in rules:
        if broken:
            raise GuardError(
                f"invalid git ref {ref!r}: {reason}; give a branch, a tag or a full commit hash "
                "(for example 'main', 'v1.9.0' or 40 hex digits)"
            )
    return ref


def validate_dockerfile(dockerfile: str) -> str:
    """Return ``dockerfile`` if it is a relative path that stays inside the repository."""
    path = PurePosixPath(dockerfile)
    if not dockerfile or path.is_absolute() or ".." in path.parts or dockerfile.startswith("-"):
        raise GuardError(
            f"invalid Dockerfile path {dockerfile!r}: give a path relative to the repository's "
            "top folder without '..', for example 'Dockerfile' or 'docker/Dockerfile.release'"
        )
    return dockerfile


def validate_build_args(build_args: Mapping[str, str]) -> dict[str, str]:
    """Return ``build_args`` as a dict if every name is a valid ``ARG`` name."""
    for name in build_args:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise GuardError(
                f"invalid build argument name {name!r}: use letters, digits and '_', "
                "not starting with a digit, as in the Dockerfile's ARG instruction"
            )
    return dict(build_args)


def redact_url(url: str) -> str:
    """Return ``url`` with any user name and password replaced by ``***``."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"***@{host}"))
