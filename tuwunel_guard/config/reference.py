"""Write the config reference (docs/configuration.md) from the models, so it cannot drift.

Run ``python -m tuwunel_guard.config.reference > docs/configuration.md``; a test compares the
file with this output.
"""

from __future__ import annotations

import enum
import json
import types
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from tuwunel_guard.config.durations import format_duration
from tuwunel_guard.config.models import Config

_DURATION_KEYS = {
    "timeout", "min_age", "compose_timeout", "health_timeout", "health_interval",
    "min_switch_interval", "interval", "jitter",
}  # fmt: skip

_HEADER = """\
# Configuration reference

The guard reads one TOML file, `/etc/tuwunel-guard/config.toml` unless `--config` names another.
Unknown keys are errors. Durations are written like `90s`, `15m`, `1h` or `1h30m`.
`config/config.example.toml` is a commented example that validates.

This page is generated from the config models by
`python -m tuwunel_guard.config.reference`; a test fails when it is out of date.
"""


def render() -> str:
    """Return the reference as Markdown."""
    sections = [_HEADER]
    sections.append(_table("Top level", Config, prefix="", scalars_only=True))
    for name, info in Config.model_fields.items():
        sections.extend(_nested_tables(name, info))
    return "\n".join(sections)


def _nested_tables(path: str, info: FieldInfo) -> list[str]:
    model = _model_of(info.annotation)
    if model is None:
        return []
    tables = [_table(f"[{path}]", model, prefix=f"{path}.", scalars_only=True)]
    for name, child in model.model_fields.items():
        tables.extend(_nested_tables(f"{path}.{name}", child))
    return tables


def _table(title: str, model: type[BaseModel], prefix: str, *, scalars_only: bool) -> str:
    doc = (model.__doc__ or "").strip().split("\n")[0]
    lines = [f"## {title}", "", doc.replace("``", "`"), ""]
    lines.append("| key | type | default | meaning |")
    lines.append("|---|---|---|---|")
    for name, info in model.model_fields.items():
        if scalars_only and _model_of(info.annotation) is not None:
            continue
        description = " ".join((info.description or "").split()).replace("``", "`")
        lines.append(
            f"| `{prefix}{name}` | {_type_name(name, info.annotation)} | "
            f"{_default(name, info)} | {description} |"
        )
    lines.append("")
    return "\n".join(lines)


def _model_of(annotation: Any) -> type[BaseModel] | None:
    for candidate in (annotation, *typing.get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _type_name(name: str, annotation: Any) -> str:  # noqa: PLR0911 - one return per type
    if name in _DURATION_KEYS:
        return "duration"
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _type_name(name, typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        parts = [
            _type_name(name, arg) for arg in typing.get_args(annotation) if arg is not type(None)
        ]
        return " or ".join(parts) + " (optional)"
    if origin is list:
        return f"list of {_type_name(name, typing.get_args(annotation)[0])}"
    if origin is dict:
        return "table of strings"
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return " or ".join(f"`{member.value}`" for member in annotation)
    return {str: "string", bool: "boolean", int: "integer", float: "number", Path: "path"}.get(
        annotation, str(annotation)
    )


def _default(name: str, info: FieldInfo) -> str:
    if info.is_required():
        return "required"
    value = info.default
    if value is None:
        return "none"
    if isinstance(value, enum.Enum):
        return f"`{value.value}`"
    if name in _DURATION_KEYS and isinstance(value, int | float):
        return f"`{format_duration(value)}`"
    if isinstance(value, Path):
        return f"`{value}`"
    return f"`{json.dumps(value)}`"


if __name__ == "__main__":
    print(render(), end="")
