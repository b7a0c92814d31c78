"""Tests of EngineWatcher against real Docker engines that stop, restart and upgrade.

The engines are the test bed's Docker 20.10.24 and 26.1.5. An upgrade stops 20.10 with SIGTERM
and starts 26.1 on the same socket and data root, as a package upgrade does.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import docker
import pytest

from testbed import images
from testbed.engine import DockerEngine
from tuwunel_guard.adapters.events import MAX_BACKOFF, EngineWatcher, backoff_delays

pytestmark = pytest.mark.testbed

# How long a test waits for a callback before it fails.
WAIT = 20.0


@dataclass
class Recorder:
    """Collects what the watcher reports, with monotonic times, for the test thread."""

    events: list[dict[str, Any]] = field(default_factory=list)
    engine_back_times: list[float] = field(default_factory=list)
    fail_first_event: bool = False
    changed: threading.Condition = field(default_factory=threading.Condition)

    def on_event(self, event: dict[str, Any]) -> None:
        with self.changed:
            self.events.append(event)
            self.changed.notify_all()
        if self.fail_first_event and len(self.events) == 1:
            raise RuntimeError("a callback bug the watcher must survive")

    def on_engine_back(self) -> None:
        with self.changed:
            self.engine_back_times.append(time.monotonic())
            self.changed.notify_all()

    def wait_for(self, condition: Any, timeout: float = WAIT) -> None:
        """Wait until ``condition()`` is true; fail the test after ``timeout`` seconds."""
        with self.changed:
            assert self.changed.wait_for(condition, timeout), "the watcher did not report in time"

    def has_event(self, action: str, container_id: str) -> bool:
        """Whether a container event with ``action`` for ``container_id`` arrived."""
        return any(
            event.get("Action") == action and event.get("id") == container_id
            for event in self.events
        )


@pytest.fixture
def standin_archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A docker-archive of the stand-in Synapse image, to load without a registry."""
    folder = tmp_path_factory.mktemp("events-image")
    return images.build_standin_archive("synapse", folder / "synapse.tar").path


def create_container(engine: DockerEngine, archive: Path) -> str:
    """Load the stand-in image into ``engine`` if needed, create a container, return its ID."""
    client = docker.DockerClient(base_url=engine.base_url, version="auto", timeout=30)
    try:
        if not client.images.list(name="standin/synapse"):
            client.images.load(archive.read_bytes())
        container = client.containers.create("standin/synapse:latest")
        return str(container.id)
    finally:
        client.close()


@pytest.fixture
def recorder() -> Recorder:
    """A fresh recorder for the watcher's callbacks."""
    return Recorder()


def start_watcher(engine: DockerEngine, recorder: Recorder, **options: Any) -> EngineWatcher:
    """Start a watcher on ``engine``'s socket that reports to ``recorder``."""
    watcher = EngineWatcher(
        engine.base_url,
        on_event=recorder.on_event,
        on_engine_back=recorder.on_engine_back,
        **options,
    )
    watcher.start()
    return watcher


@pytest.fixture
def stop_watchers() -> Iterator[list[EngineWatcher]]:
    """Watchers appended here are stopped after the test, also when it fails."""
    watchers: list[EngineWatcher] = []
    yield watchers
    for watcher in watchers:
        assert watcher.stop(timeout=10), "the watcher thread did not end"


def test_backoff_delays() -> None:
    """Delays start at the initial value and double up to the maximum."""
    delays = list(itertools.islice(backoff_delays(0.2, 5.0), 8))

    assert delays == pytest.approx([0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0, 5.0])


def test_invalid_backoff() -> None:
    """An initial delay above the maximum is rejected."""
    with pytest.raises(ValueError, match=r"invalid backoff 6 s to 5\.0 s"):
        EngineWatcher(
            "unix:///nonexistent", on_event=print, on_engine_back=print, initial_backoff=6
        )


def test_no_engine_backs_off(tmp_path: Path) -> None:
    """Without an engine the watcher pings with growing delays and never reports it back."""
    slept: list[float] = []
    enough = threading.Event()

    def record_sleep(seconds: float) -> None:
        slept.append(seconds)
        if len(slept) >= 8:
            enough.set()
        time.sleep(0.001)

    backs: list[float] = []
    watcher = EngineWatcher(
        f"unix://{tmp_path}/docker.sock",
        on_event=print,
        on_engine_back=lambda: backs.append(1.0),
        sleep=record_sleep,
    )
    watcher.start()
    try:
        assert enough.wait(10)
    finally:
        assert watcher.stop(timeout=5)

    assert slept[:8] == pytest.approx([0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0, 5.0])
    assert backs == []
    assert not watcher.running


def test_stop_while_idle(engine20: DockerEngine, recorder: Recorder) -> None:
    """stop() closes an idle stream and ends the thread at once, without callbacks."""
    watcher = start_watcher(engine20, recorder)
    time.sleep(0.5)

    began = time.monotonic()
    assert watcher.stop(timeout=5)

    assert time.monotonic() - began < 1.0
    assert recorder.engine_back_times == []
    assert not watcher.running


def test_upgrade_20_to_26(
    engine20: DockerEngine,
    recorder: Recorder,
    standin_archive: Path,
    stop_watchers: list[EngineWatcher],
) -> None:
    """After an upgrade the watcher reports the engine back once and follows the new engine."""
    recorder.fail_first_event = True
    stop_watchers.append(start_watcher(engine20, recorder))
    time.sleep(0.3)
    before = create_container(engine20, standin_archive)
    recorder.wait_for(lambda: recorder.has_event("create", before))

    engine20.upgrade_to("26.1")
    answered = time.monotonic()

    recorder.wait_for(lambda: len(recorder.engine_back_times) >= 1)
    # upgrade_to() returns just after the new engine's first OK on /_ping. The watcher pings
    # on its own backoff schedule, so it may notice up to one maximum delay later.
    delay = recorder.engine_back_times[0] - answered
    assert delay < MAX_BACKOFF + 1.0, f"noticed {delay:.2f} s after the engine answered"
    assert engine20.version_info()["Version"].startswith("26.1")

    after = create_container(engine20, standin_archive)
    recorder.wait_for(lambda: recorder.has_event("create", after))
    assert len(recorder.engine_back_times) == 1
    assert all(event["Type"] == "container" for event in recorder.events)


def test_restart_same_version(
    engine20: DockerEngine,
    recorder: Recorder,
    standin_archive: Path,
    stop_watchers: list[EngineWatcher],
) -> None:
    """A stop and start of the same release is reported once, like an upgrade."""
    stop_watchers.append(start_watcher(engine20, recorder))
    time.sleep(0.3)

    engine20.stop()
    engine20.start()
    answered = time.monotonic()

    recorder.wait_for(lambda: len(recorder.engine_back_times) >= 1)
    assert recorder.engine_back_times[0] - answered < MAX_BACKOFF + 1.0
    after = create_container(engine20, standin_archive)
    recorder.wait_for(lambda: recorder.has_event("create", after))
    assert len(recorder.engine_back_times) == 1


def test_engine_down_at_start(
    engine26: DockerEngine, recorder: Recorder, stop_watchers: list[EngineWatcher]
) -> None:
    """A watcher started while the engine is down reports it once it responds."""
    engine26.stop()
    stop_watchers.append(start_watcher(engine26, recorder, max_backoff=0.5))
    time.sleep(1.0)
    assert recorder.engine_back_times == []

    engine26.start()

    recorder.wait_for(lambda: len(recorder.engine_back_times) == 1)
