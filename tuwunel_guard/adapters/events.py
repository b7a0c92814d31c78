"""Watch the Docker engine's event stream, and notice when the engine comes back after a stop.

An upgrade of the engine (the moment the guard waits for) stops dockerd and starts the new
release on the same socket. What the docker SDK 7.2.0 shows of that, measured with Docker
20.10.24 and 26.1.5:

* an open ``GET /events`` stream just ends, without an exception, about 1 s after dockerd gets
  SIGTERM (at once after SIGKILL);
* building a client with ``version="auto"`` raises ``DockerException`` while the engine is down;
* events from before the restart are lost, even with ``since=``.

:class:`EngineWatcher` therefore treats the end of the stream as "the engine went away", polls
``GET /_ping`` with exponential backoff until the engine responds, subscribes again, and then
calls ``on_engine_back`` so that the caller re-reads the engine's state. It subscribes before
the call, so an event that happens while the callback runs is delivered afterwards, never lost.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import docker
import docker.constants
import docker.errors
import requests
import structlog
import urllib3.exceptions

log = structlog.get_logger(__name__)

INITIAL_BACKOFF = 0.2
MAX_BACKOFF = 5.0
# A local engine responds to /_ping within milliseconds, except while it starts: dockerd
# accepts connections on its socket before its API is ready, and responds once it is.
# An engine that takes longer than this counts as down.
PING_TIMEOUT = 2.0
# Errors that end opening or reading the event stream; each means the engine may be gone.
_STREAM_ERRORS = (
    docker.errors.DockerException,
    requests.RequestException,
    urllib3.exceptions.HTTPError,
    OSError,
    ValueError,
)


def backoff_delays(initial: float, maximum: float) -> Iterator[float]:
    """Yield ``initial``, then double it each time, up to ``maximum`` (seconds)."""
    delay = initial
    while True:
        yield min(delay, maximum)
        delay = min(delay * 2, maximum)


class EngineWatcher:
    """A background thread that follows the engine's container events across engine restarts.

    ``on_event`` receives each container event as the engine sends it (a dict with ``Type``,
    ``Action``, ``Actor`` and ``time``). ``on_engine_back`` is called once each time the engine
    responds again after it was unreachable, which includes an engine that was down when the
    watcher started. Both run in the watcher's thread, so they must not block for long. An
    exception from either is logged and does not stop the watcher.

    ``sleep`` waits between pings and ``clock`` returns monotonic seconds. Both exist for tests.
    The default ``sleep`` returns at once when :meth:`stop` is called.
    """

    def __init__(
        self,
        socket: str,
        *,
        on_event: Callable[[dict[str, Any]], None],
        on_engine_back: Callable[[], None],
        timeout: float = 30.0,
        initial_backoff: float = INITIAL_BACKOFF,
        max_backoff: float = MAX_BACKOFF,
        sleep: Callable[[float], object] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 0 < initial_backoff <= max_backoff:
            raise ValueError(
                f"invalid backoff {initial_backoff} s to {max_backoff} s: the initial delay "
                "must be above 0 and at most the maximum delay"
            )
        self.socket = socket
        self.timeout = timeout
        self.initial_backoff = initial_backoff
        self.max_backoff = max_backoff
        self._on_event = on_event
        self._on_engine_back = on_engine_back
        self._stopping = threading.Event()
        self._sleep = sleep or self._stopping.wait
        self._clock = clock
        self._lock = threading.Lock()
        self._stream: Any = None
        self._thread: threading.Thread | None = None
        # Delays between attempts; restarted after each successful subscription.
        self._delays = backoff_delays(initial_backoff, max_backoff)

    @property
    def running(self) -> bool:
        """Whether the watcher's thread is alive."""
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        """Start watching in a daemon thread.

        Raises:
            RuntimeError: when the watcher was started before.
        """
        if self._thread is not None:
            raise RuntimeError("this EngineWatcher was already started; create a new one")
        self._thread = threading.Thread(
            target=self._run, name=f"engine-watcher {self.socket}", daemon=True
        )
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> bool:
        """Stop watching: close the event stream and wait up to ``timeout`` s for the thread.

        Returns whether the thread ended in time. A callback that is still running delays
        the end until it returns.
        """
        self._stopping.set()
        with self._lock:
            stream, self._stream = self._stream, None
        if stream is not None:
            _close_stream(stream)
        if self._thread is None:
            return True
        self._thread.join(timeout)
        ended = not self._thread.is_alive()
        if not ended:
            log.warning("engine_watcher_stop_timed_out", socket=self.socket, timeout=timeout)
        return ended

    # --- The thread ---

    def _run(self) -> None:
        log.debug("engine_watcher_started", socket=self.socket)
        # When the engine was last seen going away; None while it is reachable.
        lost_at: float | None = None
        while not self._stopping.is_set():
            connected = self._connect_when_ready()
            if connected is None:
                break
            client, first_failure_at = connected
            if lost_at is None:
                lost_at = first_failure_at
            stream = self._subscribe(client)
            if stream is None:
                client.close()
                lost_at = self._clock() if lost_at is None else lost_at
                self._sleep(next(self._delays))
                continue
            self._delays = backoff_delays(self.initial_backoff, self.max_backoff)
            if lost_at is not None:
                log.info(
                    "engine_returned",
                    socket=self.socket,
                    unreachable_seconds=round(self._clock() - lost_at, 3),
                )
                self._call("on_engine_back", self._on_engine_back)
                lost_at = None
            self._read(stream)
            client.close()
            if not self._stopping.is_set():
                log.info("engine_event_stream_ended", socket=self.socket)
                lost_at = self._clock()
        log.debug("engine_watcher_stopped", socket=self.socket)

    def _connect_when_ready(self) -> tuple[docker.DockerClient, float | None] | None:
        """Ping until the engine responds, then build a client with the API version negotiated.

        Returns the client and the clock time of the first failed attempt (``None`` when the
        first attempt worked), or ``None`` once stopping.
        """
        first_failure_at: float | None = None
        while not self._stopping.is_set():
            error = self._ping()
            if error is None:
                try:
                    client = docker.DockerClient(
                        base_url=self.socket, version="auto", timeout=int(self.timeout)
                    )
                except docker.errors.DockerException as raised:
                    error = str(raised)
                else:
                    return client, first_failure_at
            if first_failure_at is None:
                first_failure_at = self._clock()
            delay = next(self._delays)
            log.debug("engine_ping_failed", socket=self.socket, error=error, retry_in_seconds=delay)
            self._sleep(delay)
        return None

    def _ping(self) -> str | None:
        """Send ``GET /_ping``; return ``None`` when the engine responds OK, else the error."""
        # /_ping takes no API version. A fixed version keeps the constructor from requesting
        # /version, which would fail while the engine is down.
        client = docker.APIClient(
            base_url=self.socket,
            version=docker.constants.MINIMUM_DOCKER_API_VERSION,
            timeout=PING_TIMEOUT,
        )
        try:
            return None if client.ping() else "the engine did not respond OK"
        except (docker.errors.DockerException, requests.RequestException, OSError) as error:
            return str(error)
        finally:
            client.close()

    def _subscribe(self, client: docker.DockerClient) -> Any:
        """Open the container event stream, or return ``None`` when that fails or on stop."""
        try:
            stream = client.events(decode=True, filters={"type": "container"})
        except _STREAM_ERRORS as error:
            log.warning("engine_events_subscribe_failed", socket=self.socket, error=str(error))
            return None
        with self._lock:
            if self._stopping.is_set():
                _close_stream(stream)
                return None
            self._stream = stream
        log.debug("engine_events_subscribed", socket=self.socket)
        return stream

    def _read(self, stream: Any) -> None:
        """Pass each container event to ``on_event`` until the stream ends."""
        try:
            for event in stream:
                if isinstance(event, dict) and event.get("Type", "container") == "container":
                    self._call("on_event", self._on_event, event)
        except _STREAM_ERRORS as error:
            if not self._stopping.is_set():
                log.warning("engine_event_stream_failed", socket=self.socket, error=str(error))
        finally:
            with self._lock:
                if self._stream is stream:
                    self._stream = None
            _close_stream(stream)

    def _call(self, name: str, callback: Callable[..., None], *arguments: Any) -> None:
        try:
            callback(*arguments)
        except Exception:
            # A failing callback must not end the watch: log it with its traceback and go on.
            log.exception("engine_watcher_callback_failed", socket=self.socket, callback=name)


def _close_stream(stream: Any) -> None:
    """Close an event stream; a stream whose socket is already gone needs no closing."""
    with contextlib.suppress(docker.errors.DockerException, OSError, AttributeError):
        stream.close()
