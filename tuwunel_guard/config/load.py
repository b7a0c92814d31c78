"""Read the config file and report every problem in it at once."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from tuwunel_guard.config.models import Config
from tuwunel_guard.errors import ConfigError, GuardError

DEFAULT_PATH = Path("/etc/tuwunel-guard/config.toml")


def load_config(path: Path) -> Config:
    """Read, parse and validate the config file at ``path``.

    Raises ``ConfigError`` listing every problem, each with the file and the dotted key path.
    """
    try:
        text = path.read_text(encoding="utf-8")
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
    """Validate already-parsed TOML ``data`` that was read from ``path``."""
    try:
        config = Config.model_validate(data)
    except ValidationError as error:
        raise ConfigError(str(path), [_describe(path, item) for item in error.errors()]) from None
    except GuardError as error:
        # A validator that calls into the core raises the guard's own errors.
        raise ConfigError(str(path), [f"{path}: {error}"]) from None

    return config


def _describe(path: Path, item: Any) -> str:
    location = ".".join(str(part) for part in item["loc"] if not _is_union_tag(part))
    message = str(item["msg"]).removeprefix("Value error, ")
    if item["type"] == "extra_forbidden":
        message = "unknown key; check its spelling against config/config.example.toml"
    elif item["type"] == "missing":
        message = "required key is missing"
    elif "input" in item and not isinstance(item["input"], dict | list):
        message = f"{message} (got {item['input']!r})"
    return f"{path}: {location or '(top level)'}: {message}"


def _is_union_tag(part: Any) -> bool:
    # pydantic adds the chosen union member's class name to locations, e.g. "TuwunelSideConfig".
    return isinstance(part, str) and part[:1].isupper()
