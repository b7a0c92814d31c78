"""Tests of the build route: a git repository made in the test, built by a real Docker 20.10.

The repository's Dockerfile starts ``FROM scratch`` and copies Debian's static busybox, so the
build needs no registry and no base image.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import docker
import pytest
import requests
from structlog.testing import capture_logs

from testbed import paths
from testbed.engine import DockerEngine
from testbed.registry import free_loopback_port
from tuwunel_guard.adapters.build import (
    COMMIT_LABEL,
    REPOSITORY_LABEL,
    BuildAcquirer,
    redact_url,
    validate_ref,
    validate_url,
)
from tuwunel_guard.core.image import ImageFacts, Platform
from tuwunel_guard.core.reference import ImageReference
from tuwunel_guard.errors import EngineError, GuardError

UNKNOWN_DIGEST = "sha256:" + "0" * 64
REFERENCE = ImageReference.parse("ghcr.io/matrix-construct/tuwunel", "latest")
FACTS = ImageFacts(
    reference=str(REFERENCE),
    tag_digest=UNKNOWN_DIGEST,
    tag_media_type="",
    manifest_digest=UNKNOWN_DIGEST,
    manifest_media_type="",
    config_digest=UNKNOWN_DIGEST,
    platform=Platform("linux", "amd64"),
)

DOCKERFILE = """\
FROM scratch
ARG GREETING=unset
LABEL greeting=$GREETING
COPY busybox /bin/busybox
COPY www/ /www/
ENTRYPOINT ["/bin/busybox", "httpd", "-f", "-h", "/www"]
"""

FAILING_DOCKERFILE = """\
FROM scratch
COPY busybox /bin/busybox
RUN ["/bin/busybox", "sh", "-c", "echo build-marker-42; exit 3"]
"""


@dataclass(frozen=True)
class SourceRepository:
    """A git repository in the test's folder, with branch ``main`` and tag ``v1``."""

    path: Path
    commit: str
    token: str

    @property
    def url(self) -> str:
        return f"file://{self.path}"


def git(folder: Path, *arguments: str) -> str:
    result = subprocess.run(
        [
            "git",
            "-C",
            str(folder),
            "-c",
            "user.name=Test",
            "-c",
            "user.email=test@example.org",
            *arguments,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return result.stdout.strip()


def make_repository(folder: Path, files: dict[str, str]) -> SourceRepository:
    """Create a repository with ``files``, busybox and www/version, on branch main, tag v1."""
    token = folder.name
    (folder / "www").mkdir(parents=True)
    (folder / "www" / "version").write_text(token)
    shutil.copy(paths.BUSYBOX, folder / "busybox")
    for name, content in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(content)
    git(folder, "init", "--quiet", "--initial-branch=main")
    git(folder, "add", ".")
    git(folder, "commit", "--quiet", "--message=Stand-in Tuwunel")
    git(folder, "tag", "v1")
    return SourceRepository(folder, git(folder, "rev-parse", "HEAD"), token)


@pytest.fixture
def source(tmp_path: Path) -> SourceRepository:
    """A repository whose Dockerfile builds an image that serves www/ with busybox httpd."""
    return make_repository(tmp_path / "source-ok", {"Dockerfile": DOCKERFILE})


def make_acquirer(
    engine: DockerEngine, state_dir: Path, url: str, ref: str, **options: object
) -> BuildAcquirer:
    return BuildAcquirer(
        engine_socket=engine.base_url,
        state_dir=state_dir,
        url=url,
        ref=ref,
        clone_timeout=60,
        build_timeout=300,
        engine_timeout=60,
        **options,  # type: ignore[arg-type]
    )


@contextlib.contextmanager
def engine_client(engine: DockerEngine) -> Iterator[docker.APIClient]:
    client = docker.APIClient(base_url=engine.base_url, version="auto", timeout=60)
    try:
        yield client
    finally:
        client.close()


def wait_for_text(url: str, timeout: float = 30.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return requests.get(url, timeout=2).text
        except requests.ConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


@pytest.mark.testbed
@pytest.mark.parametrize("ref_kind", ["branch", "tag", "commit"])
def test_build_route_builds_each_ref_kind(
    engine20: DockerEngine, source: SourceRepository, tmp_path: Path, ref_kind: str
) -> None:
    """A branch, a tag and a full commit hash all build the commit they name."""
    ref = {"branch": "main", "tag": "v1", "commit": source.commit}[ref_kind]
    acquirer = make_acquirer(
        engine20, tmp_path / "state", source.url, ref, build_args={"GREETING": "hello"}
    )

    acquired = acquirer.acquire(REFERENCE, FACTS)

    assert acquired.local_reference == f"tuwunel-guard/tuwunel:build-{source.commit[:12]}"
    with engine_client(engine20) as client:
        inspected = client.inspect_image(acquired.local_reference)
    assert inspected["Id"] == acquired.image_id
    labels = inspected["Config"]["Labels"]
    assert labels[COMMIT_LABEL] == source.commit
    assert labels[REPOSITORY_LABEL] == source.url
    assert labels["greeting"] == "hello"
    assert list((tmp_path / "state" / "build").iterdir()) == []


@pytest.mark.testbed
def test_built_image_serves_on_20_10(
    engine20: DockerEngine, source: SourceRepository, tmp_path: Path
) -> None:
    """A container of the built image serves the files of the built commit."""
    acquired = make_acquirer(engine20, tmp_path / "state", source.url, "main").acquire(
        REFERENCE, FACTS
    )
    port = free_loopback_port()

    client = docker.DockerClient(base_url=engine20.base_url, version="auto", timeout=60)
    try:
        container = client.containers.run(
            acquired.local_reference,
            ["-p", f"127.0.0.1:{port}"],
            detach=True,
            network_mode="host",
        )
        try:
            served = wait_for_text(f"http://127.0.0.1:{port}/version")
        finally:
            container.remove(force=True)
    finally:
        client.close()

    assert served == source.token


@pytest.mark.testbed
def test_build_output_is_logged(
    engine20: DockerEngine, source: SourceRepository, tmp_path: Path
) -> None:
    """Each build output line becomes one build_output_received event, joined across chunks."""
    acquirer = make_acquirer(engine20, tmp_path / "state", source.url, "main")

    with capture_logs() as events:
        acquirer.acquire(REFERENCE, FACTS)

    lines = [event for event in events if event["event"] == "build_output_received"]
    assert {
        "event": "build_output_received",
        "log_level": "debug",
        # The engine adds one LABEL step per label the route sets, so 6 steps become 8.
        "line": "Step 1/8 : FROM scratch",
        "commit": source.commit,
    } in lines
    assert any(event["line"].startswith("Successfully built ") for event in lines)
    assert all("\n" not in event["line"] for event in lines)


@pytest.mark.testbed
def test_failing_step_carries_output(engine20: DockerEngine, tmp_path: Path) -> None:
    """A failing RUN step raises EngineError with the engine's message and the step's output."""
    failing = make_repository(tmp_path / "source-failing", {"Dockerfile": FAILING_DOCKERFILE})
    acquirer = make_acquirer(engine20, tmp_path / "state", failing.url, "main")

    with pytest.raises(EngineError) as raised:
        acquirer.acquire(REFERENCE, FACTS)

    message = str(raised.value)
    assert "returned a non-zero code: 3" in message
    assert "\nbuild-marker-42\n" in message
    assert 'Step 3/5 : RUN ["/bin/busybox", "sh", "-c", "echo build-marker-42; exit 3"]' in message
    assert failing.commit in message
    with engine_client(engine20) as client:
        assert client.containers(all=True) == []


@pytest.mark.testbed
def test_unknown_ref_fails(
    engine20: DockerEngine, source: SourceRepository, tmp_path: Path
) -> None:
    """A branch the repository lacks fails with git's message and nothing is built."""
    acquirer = make_acquirer(engine20, tmp_path / "state", source.url, "no-such-branch")

    with pytest.raises(GuardError) as raised:
        acquirer.acquire(REFERENCE, FACTS)

    message = str(raised.value)
    assert message.startswith("git clone failed with exit status 128")
    assert "Remote branch no-such-branch not found" in message
    assert "Check the URL, that the branch, tag or commit exists" in message
    with engine_client(engine20) as client:
        assert client.images(name="tuwunel-guard/tuwunel") == []


@pytest.mark.testbed
def test_abbreviated_commit_names_fix(
    engine20: DockerEngine, source: SourceRepository, tmp_path: Path
) -> None:
    """An abbreviated commit hash fails with the hint to give all 40 hex digits."""
    acquirer = make_acquirer(engine20, tmp_path / "state", source.url, source.commit[:12])

    with pytest.raises(GuardError) as raised:
        acquirer.acquire(REFERENCE, FACTS)

    assert "give all 40 hex digits" in str(raised.value)


@pytest.mark.testbed
def test_unknown_commit_fails(
    engine20: DockerEngine, source: SourceRepository, tmp_path: Path
) -> None:
    """A full commit hash the repository lacks fails in git fetch."""
    acquirer = make_acquirer(engine20, tmp_path / "state", source.url, "1" * 40)

    with pytest.raises(GuardError) as raised:
        acquirer.acquire(REFERENCE, FACTS)

    assert str(raised.value).startswith("git fetch failed with exit status")


@pytest.mark.testbed
def test_missing_dockerfile_fails(
    engine20: DockerEngine, source: SourceRepository, tmp_path: Path
) -> None:
    """A Dockerfile path that the checkout lacks is named in the error."""
    acquirer = make_acquirer(
        engine20, tmp_path / "state", source.url, "main", dockerfile="docker/Dockerfile.release"
    )

    with pytest.raises(GuardError) as raised:
        acquirer.acquire(REFERENCE, FACTS)

    assert str(raised.value).startswith("Dockerfile 'docker/Dockerfile.release' not found in")


def test_missing_git_names_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without git on PATH the route names the Debian package to install."""
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    acquirer = BuildAcquirer(
        engine_socket="unix:///nonexistent.sock",
        state_dir=tmp_path,
        url="https://example.org/tuwunel-image.git",
        ref="main",
    )

    with pytest.raises(GuardError) as raised:
        acquirer.acquire(REFERENCE, FACTS)

    assert "apt-get install git" in str(raised.value)


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("", "must not be empty"),
        ("--upload-pack=touch /tmp/x", "start with '-'"),
        ("https://example.org/a b.git", "contain spaces"),
        ("git@example.org:owner/repository.git", "write the scp-like form as an ssh URL"),
        ("http://example.org/repository.git", "the scheme must be one of"),
        ("ext::sh -c touch% /tmp/x", "contain spaces"),
        ("ext::sh", "the scheme must be one of"),
        ("/srv/repository", "the scheme must be one of"),
        ("https:///repository.git", "it names no host"),
        ("file://", "a file URL needs a path"),
    ],
)
def test_invalid_url_rejected(url: str, problem: str) -> None:
    """An invalid or disallowed repository URL is rejected with the reason."""
    with pytest.raises(GuardError) as raised:
        validate_url(url)

    assert problem in str(raised.value)


@pytest.mark.parametrize(
    "url",
    [
        "https://github.com/owner/repository.git",
        "ssh://git@example.org:2222/owner/repository.git",
        "git://example.org/repository",
        "file:///srv/git/repository.git",
    ],
)
def test_valid_url_accepted(url: str) -> None:
    """Each allowed scheme passes validation unchanged."""
    assert validate_url(url) == url


@pytest.mark.parametrize(
    ("ref", "problem"),
    [
        ("", "it is empty"),
        ("-c", "starts with '-'"),
        ("--upload-pack=x", "starts with '-'"),
        ("a b", "contains a space"),
        ("a..b", "contains '..'"),
        ("main@{1}", "contains '..', '@{' or '//'"),
        ("refs/heads/", "ends with '/'"),
        ("v1.", "ends with '/' or '.'"),
        ("feature/.hidden", "starts with '.' or ends with '.lock'"),
        ("main.lock", "ends with '.lock'"),
        ("a:b", "one of ~ ^ : ? * [ \\"),
        ("@", "it is '@'"),
    ],
)
def test_invalid_ref_rejected(ref: str, problem: str) -> None:
    """A ref that git check-ref-format rejects, or that looks like an option, is rejected."""
    with pytest.raises(GuardError) as raised:
        validate_ref(ref)

    assert problem in str(raised.value)


@pytest.mark.parametrize("ref", ["main", "v1.9.0", "release/1.9", "a" * 40, "b" * 64])
def test_valid_ref_accepted(ref: str) -> None:
    """Branches, tags and full commit hashes pass validation unchanged."""
    assert validate_ref(ref) == ref


@pytest.mark.parametrize("dockerfile", ["", "/etc/Dockerfile", "../Dockerfile", "a/../../b"])
def test_dockerfile_outside_repository_rejected(dockerfile: str, tmp_path: Path) -> None:
    """A Dockerfile path that is empty, absolute or leaves the repository is rejected."""
    with pytest.raises(GuardError) as raised:
        BuildAcquirer(
            engine_socket="unix:///nonexistent.sock",
            state_dir=tmp_path,
            url="https://example.org/repository.git",
            ref="main",
            dockerfile=dockerfile,
        )

    assert "invalid Dockerfile path" in str(raised.value)


def test_invalid_build_arg_name_rejected(tmp_path: Path) -> None:
    """A build argument name that an ARG instruction cannot declare is rejected."""
    with pytest.raises(GuardError) as raised:
        BuildAcquirer(
            engine_socket="unix:///nonexistent.sock",
            state_dir=tmp_path,
            url="https://example.org/repository.git",
            ref="main",
            build_args={"1VERSION": "1.9.0"},
        )

    assert "invalid build argument name '1VERSION'" in str(raised.value)


def test_redact_url_hides_credentials() -> None:
    """User name and password leave URLs before they reach messages or labels."""
    assert redact_url("https://user:secret@example.org/r.git") == "https://***@example.org/r.git"
    assert redact_url("ssh://git@example.org/r.git") == "ssh://***@example.org/r.git"
    assert redact_url("https://example.org/r.git") == "https://example.org/r.git"
