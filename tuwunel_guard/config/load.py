"""Read the config file and report every problem in it at once."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from tuwunel_guard.adapters.credentials import load_docker_config
from tuwunel_guard.config.models import Config
from tuwunel_guard.errors import ConfigError, GuardError

DEFAULT_PATH = Path("/etc/tuwunel-guard/config.toml")
MAX_CONFIG_BYTES = 1024 * 1024


def load_config(path: Path) -> Config:
    """Read, parse and validate the config file at ``path``.

    Raises ``ConfigError`` listing every problem, each with the file and the dotted key path.
    """
    try:
        text = _read_limited(path)
    except FileNotFoundError:
        raise ConfigError(
            str(path),
            [f"{path}: file not found; copy config/config.example.toml there or pass --config"],
        ) from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(str(path), [f"{path}: cannot be read: {error}"]) from None

    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(str(path), [f"{path}: invalid TOML: {error}"]) from None

    return validate_config(data, path)


def validate_config(data: dict[str, Any], path: Path) -> Config:
    """Validate already-parsed TOML ``data`` that was read from ``path``.

    The credentials file that ``[target] credentials_file`` names is read here too, so its
    problems are reported with the others.
    """
    problems = _credential_problems(data, path)
    try:
        config = Config.model_validate(data)
    except ValidationError as error:
        problems = [_describe(path, item) for item in error.errors()] + problems
    except GuardError as error:
        # A validator that calls into the core raises the guard's own errors.
        problems = [f"{path}: {error}", *problems]

    if problems:
        raise ConfigError(str(path), problems)
    return config


def _credential_problems(data: dict[str, Any], path: Path) -> list[str]:
    target = data.get("target")
    name = target.get("credentials_file") if isinstance(target, dict) else None
    if not isinstance(name, str) or not name:
        return []
    try:
        load_docker_config(Path(name))
    except ConfigError as error:
        return [f"{path}: target.credentials_file: {problem}" for problem in error.problems]
    return []


def _read_limited(path: Path) -> str:
    # A FIFO or a device would block or never end; a config is a regular file.
    if path.exists() and not path.is_file():
        raise OSError("not a regular file")
    with path.open("rb") as file:
        content = file.read(MAX_CONFIG_BYTES + 1)
    if len(content) > MAX_CONFIG_BYTES:
        raise OSError(f"larger than {MAX_CONFIG_BYTES // 1024} KiB; a config file is far smaller")
    return content.decode("utf-8")


def _describe(path: Path, item: Any) -> str:
    location = ".".join(str(part) for part in item["loc"] if not _is_union_tag(part))
    message = str(item["msg"]).removeprefix("Value error, ")
    if item["type"] == "extra_forbidden":
        message = "unknown key; check its spelling against config/config.example.toml"
    elif item["type"] == "missing":
        message = "required key is missing"
    elif "input" in item and not isinstance(item["input"], dict | list):
        shown = repr(item["input"])
        if shown not in message:
            message = f"{message} (got {shown})"
    return f"{path}: {location or '(top level)'}: {message}"


def _is_union_tag(part: Any) -> bool:
    # pydantic adds the chosen union member's class name to locations, e.g. "TuwunelSideConfig".
    return isinstance(part, str) and part[:1].isupper()
