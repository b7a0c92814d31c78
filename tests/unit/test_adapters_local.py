"""Adapters that need no engine: sd_notify, the state file, health answers, compose arguments."""

from __future__ import annotations

import http.server
import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import pytest

from tuwunel_guard.adapters import health
from tuwunel_guard.adapters.compose import Compose, ComposeCommand, ComposeProject
from tuwunel_guard.adapters.engine import Engine
from tuwunel_guard.adapters.notify import Notifier
from tuwunel_guard.adapters.state import State, StateStore, SwitchRecord
from tuwunel_guard.core.decision import Side
from tuwunel_guard.core.engine import ApiVersion
from tuwunel_guard.errors import EngineUnavailable, GuardError


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    path = str(tmp_path / "notify")
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(path)
    receiver.settimeout(2)
    yield path, receiver
    receiver.close()


def test_notifier_sends_utf8_status(notify_socket: tuple[str, socket.socket]) -> None:
    """STATUS keeps characters outside latin-1 (sdnotify 0.3.2 would drop the message)."""
    path, receiver = notify_socket
    Notifier(path).status("incompatible: Docker 20.10 → needs 23.0\nsecond line")
    assert receiver.recv(4096).decode("utf-8") == (
        "STATUS=incompatible: Docker 20.10 → needs 23.0 second line"
    )


def test_notifier_abstract_socket() -> None:
    """An address starting with @ names the abstract namespace."""
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind("\0tuwunel-guard-test-notify")
    receiver.settimeout(2)
    try:
        Notifier("@tuwunel-guard-test-notify").ready()
        assert receiver.recv(64) == b"READY=1"
    finally:
        receiver.close()


def test_notifier_without_socket_does_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Outside systemd no socket is named and nothing is sent."""
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    notifier = Notifier()
    assert not notifier.enabled
    notifier.ready()


def test_state_round_trip(tmp_path: Path) -> None:
    """A saved state loads back equal, and no temporary file stays behind."""
    store = StateStore(tmp_path / "state")
    state = State(
        deployed=Side.TUWUNEL,
        manifest_digest="sha256:" + "b" * 64,
        failed_manifest_digests=["sha256:" + "f" * 64],
        last_switch=SwitchRecord(1.0, 2.0, "synapse", "tuwunel", "committed", "sha256:x", 1.5),
    )
    store.save(state)
    assert store.load() == state
    assert [p.name for p in store.directory.iterdir()] == ["state.json"]


def test_state_missing_file_means_synapse(tmp_path: Path) -> None:
    """Without a state file the guard assumes Synapse is deployed."""
    assert StateStore(tmp_path).load().deployed is Side.SYNAPSE


@pytest.mark.parametrize(
    "content", ["{", "[]", '{"format": 99}', '{"format": 1, "deployed": "dendrite"}']
)
def test_state_invalid_file_is_reported(tmp_path: Path, content: str) -> None:
    """A damaged state file raises an error that names the file and the fix."""
    (tmp_path / "state.json").write_text(content)
    with pytest.raises(GuardError, match="move it aside"):
        StateStore(tmp_path).load()


class _Handler(http.server.BaseHTTPRequestHandler):
    answers: ClassVar[dict[str, tuple[int, bytes]]] = {}

    def do_GET(self) -> None:
        status, body = self.answers.get(self.path, (404, b""))
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def homeserver() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize(
    ("path", "body", "tuwunel", "synapse"),
    [
        ("/_tuwunel/server_version", {"name": "Tuwunel", "version": "1.9.0"}, True, False),
        ("/_matrix/federation/v1/version", {"server": {"name": "Synapse"}}, False, True),
        ("/_matrix/federation/v1/version", {"server": {"name": "Tuwunel"}}, True, False),
        ("/_tuwunel/server_version", {"version": "1.9.0"}, False, False),
        ("/_tuwunel/server_version", ["not", "an", "object"], False, False),
    ],
)
def test_health_names_the_server(
    homeserver: str, path: str, body: object, tuwunel: bool, synapse: bool
) -> None:
    """Version endpoints count for the side they name and no other."""
    _Handler.answers = {path: (200, json.dumps(body).encode())}
    answer = health.probe(homeserver + path, timeout=2)
    assert answer.serves(Side.TUWUNEL) is tuwunel
    assert answer.serves(Side.SYNAPSE) is synapse


def test_health_synapse_ok_text(homeserver: str) -> None:
    """Synapse's /health answers the text OK."""
    _Handler.answers = {"/health": (200, b"OK")}
    answer = health.probe(homeserver + "/health", timeout=2)
    assert answer.serves(Side.SYNAPSE)
    assert not answer.serves(Side.TUWUNEL)


def test_health_error_status_and_refused(homeserver: str) -> None:
    """A 500 and a refused connection both count as not answering, with the detail."""
    _Handler.answers = {"/health": (500, b"")}
    assert health.probe(homeserver + "/health", timeout=2).detail == "status 500"

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    refused = health.probe(f"http://127.0.0.1:{port}/health", timeout=2)
    assert not refused.answered
    assert "refused" in refused.detail.lower()


def _project(tmp_path: Path) -> ComposeProject:
    return ComposeProject(
        directory=tmp_path,
        files=("compose.yaml", "tuwunel.yaml"),
        project="matrix",
        services=("tuwunel",),
        environment={"TUWUNEL_IMAGE": "127.0.0.1:5000/tuwunel@sha256:" + "b" * 64},
    )


def test_compose_v1_pins_api_version(tmp_path: Path) -> None:
    """Compose v1 gets COMPOSE_API_VERSION capped at 1.43; the image variable is passed."""
    compose = Compose(
        ComposeCommand(("docker-compose",), 1), "unix:///x.sock", ApiVersion(1, 45), 5
    )
    environment = compose._environment(_project(tmp_path))
    assert environment["COMPOSE_API_VERSION"] == "1.43"
    assert environment["DOCKER_HOST"] == "unix:///x.sock"
    assert environment["TUWUNEL_IMAGE"].endswith("b" * 64)

    older = Compose(ComposeCommand(("docker-compose",), 1), "unix:///x.sock", ApiVersion(1, 41), 5)
    assert older._environment(_project(tmp_path))["COMPOSE_API_VERSION"] == "1.41"


def test_compose_v2_leaves_api_version(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Compose v2 negotiates by itself, so no COMPOSE_API_VERSION is set."""
    monkeypatch.delenv("COMPOSE_API_VERSION", raising=False)
    compose = Compose(
        ComposeCommand(("docker", "compose"), 2), "unix:///x.sock", ApiVersion(1, 45), 5
    )
    assert "COMPOSE_API_VERSION" not in compose._environment(_project(tmp_path))
    assert compose._file_arguments(_project(tmp_path)) == [
        "--project-directory",
        str(tmp_path),
        "--project-name",
        "matrix",
        "--file",
        str(tmp_path / "compose.yaml"),
        "--file",
        str(tmp_path / "tuwunel.yaml"),
    ]


def test_display_url_hides_secrets() -> None:
    """User information and query strings never reach a log line."""
    url = "http://admin:Hunter2@127.0.0.1:8008/health?access_token=TOKEN"
    shown = health.display_url(url)
    assert shown == "http://127.0.0.1:8008/health?..."
    assert "Hunter2" not in shown
    assert "TOKEN" not in shown


def test_refused_detail_has_no_query() -> None:
    """The detail of a failed probe carries the reason, not the URL with its query."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    answer = health.probe(f"http://127.0.0.1:{port}/health?access_token=TOKEN", timeout=2)
    assert answer.detail == "connection refused"


@pytest.mark.parametrize("kind", ["missing", "file", "folder"])
def test_engine_socket_that_is_no_socket(tmp_path: Path, kind: str) -> None:
    """A socket path that is missing, a file or a folder is named as such, not as refused."""
    path = tmp_path / "docker.sock"
    if kind == "file":
        path.write_text("")
    elif kind == "folder":
        path.mkdir()
    engine = Engine(f"unix://{path}", timeout=2)
    expected = "does not exist" if kind == "missing" else "is not a socket"
    with pytest.raises(EngineUnavailable, match=expected):
        engine.probe()
