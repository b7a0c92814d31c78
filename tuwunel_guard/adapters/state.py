"""The state file: what is deployed, which image, and what happened last.

Written atomically: a temporary file in the same folder is written, flushed to disk with fsync,
renamed over the old file, and the folder is synced so the rename survives a power cut.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tuwunel_guard.core.decision import Side
from tuwunel_guard.errors import GuardError

STATE_FILE_NAME = "state.json"
_FORMAT_VERSION = 1


@dataclass
class SwitchRecord:
    """The outcome of the last switch attempt."""

    started_at: float
    finished_at: float
    from_side: str
    to_side: str
    outcome: str
    manifest_digest: str
    window_seconds: float | None
    detail: str = ""


@dataclass
class SwitchProgress:
    """A switch under way, recorded before each of its steps so that a restart can finish or
    undo it. ``step`` names the step that was about to run or ran last."""

    step: str
    from_side: str
    to_side: str
    from_image: str
    to_image: str
    manifest_digest: str
    started_at: float
    image_id: str = ""


@dataclass
class State:
    """Everything the guard remembers between cycles and restarts."""

    deployed: Side = Side.SYNAPSE
    image_reference: str = ""
    tag_digest: str = ""
    manifest_digest: str = ""
    image_id: str = ""
    pinned_image: str = ""
    last_verdict: str = ""
    last_reason: str = ""
    last_check_at: float = 0.0
    failed_manifest_digests: list[str] = field(default_factory=list)
    last_switch: SwitchRecord | None = None
    image_facts: dict[str, Any] | None = None
    switch_in_progress: SwitchProgress | None = None
    interrupted_attempts: dict[str, int] = field(default_factory=dict)
    held_by_admin: bool = False
    next_check_at: float = 0.0


class StateStore:
    """Reads and writes ``state.json`` in one folder."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path = directory / STATE_FILE_NAME

    def load(self) -> State:
        """Return the stored state, or a fresh one when no file exists yet."""
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return State()
        except (OSError, ValueError) as error:
            raise GuardError(
                f"the state file {self.path} cannot be read: {error}; move it aside and restart. "
                "The guard then assumes Synapse is deployed: if Tuwunel serves, set "
                'strategy = "synapse" before you restart it'
            ) from error

        return _state_from_dict(data, self.path)

    def save(self, state: State) -> None:
        """Write ``state`` atomically."""
        self.directory.mkdir(parents=True, exist_ok=True)
        document = {"format": _FORMAT_VERSION, **asdict(state)}
        payload = json.dumps(document, indent=2, sort_keys=True).encode("utf-8")

        handle, temporary = tempfile.mkstemp(prefix=".state-", suffix=".json", dir=self.directory)
        try:
            with os.fdopen(handle, "wb") as file:
                file.write(payload)
                file.flush()
                os.fsync(file.fileno())
            Path(temporary).replace(self.path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise

        _fsync_directory(self.directory)


def _fsync_directory(directory: Path) -> None:
    descriptor = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _state_from_dict(data: Any, path: Path) -> State:
    if not isinstance(data, dict) or data.get("format") != _FORMAT_VERSION:
        raise GuardError(f"the state file {path} has an unknown format; move it aside and restart")
    fields = {key: value for key, value in data.items() if key != "format"}
    switch = fields.pop("last_switch", None)
    progress = fields.pop("switch_in_progress", None)
    try:
        state = State(**fields)
        state.deployed = Side(state.deployed)
        state.last_switch = SwitchRecord(**switch) if switch else None
        state.switch_in_progress = SwitchProgress(**progress) if progress else None
    except (TypeError, ValueError) as error:
        raise GuardError(
            f"the state file {path} is invalid: {error}; move it aside and restart"
        ) from error
    return state
