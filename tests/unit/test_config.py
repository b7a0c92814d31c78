"""Loading and validating the config file."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tuwunel_guard.config.load import load_config
from tuwunel_guard.core.decision import Strategy
from tuwunel_guard.errors import ConfigError

EXAMPLE = Path(__file__).parents[2] / "config" / "config.example.toml"

MINIMAL_DEPLOYMENT = """
[deployment]
directory = "/srv/matrix"
[deployment.synapse]
project = "matrix"
services = ["synapse"]
health_urls = ["http://127.0.0.1:8008/health"]
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text, encoding="utf-8")
    return path


def problems_of(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    return caught.value.problems


def test_example_config_loads() -> None:
    """The shipped example validates and allows the switch."""
    config = load_config(EXAMPLE)
    assert config.strategy is Strategy.AUTO
    assert config.target.image == "ghcr.io/matrix-construct/tuwunel"
    assert config.schedule.interval == 900
    assert config.schedule.jitter == 60
    assert config.deployment is not None
    assert config.deployment.health_timeout == 120
    # The example gives no consent: its [deployment.tuwunel] table is commented out.
    assert not config.switch_allowed


def test_empty_file_gives_defaults(tmp_path: Path) -> None:
    """Every section has defaults; without [deployment] the guard only reports."""
    config = load_config(write(tmp_path, ""))
    assert config.engine.socket == "unix:///var/run/docker.sock"
    assert config.target.tag == "latest"
    assert config.state.directory == Path("/var/lib/tuwunel-guard")
    assert not config.switch_allowed


def test_synapse_only_deployment_is_report_only(tmp_path: Path) -> None:
    """A deployment without a [deployment.tuwunel] table does not allow a switch."""
    config = load_config(write(tmp_path, MINIMAL_DEPLOYMENT))
    assert config.deployment is not None
    assert config.deployment.tuwunel is None
    assert not config.switch_allowed


def test_three_mistakes_give_three_located_errors(tmp_path: Path) -> None:
    """Every error is reported at once, each with the file and the dotted key path."""
    path = write(
        tmp_path,
        'strategy = "sometimes"\n[schedule]\ninterval = "15 minutes"\n[target]\ntagg = "latest"\n',
    )
    problems = problems_of(path)
    assert len(problems) == 3
    assert problems[0].startswith(f"{path}: strategy: ")
    assert "'sometimes'" in problems[0]
    assert problems[1].startswith(f"{path}: target.tagg: unknown key")
    assert problems[2].startswith(f"{path}: schedule.interval: invalid duration '15 minutes'")


def test_nested_errors_name_the_full_path(tmp_path: Path) -> None:
    """Errors inside [deployment.tuwunel] name deployment.tuwunel.KEY and the bad value."""
    path = write(
        tmp_path,
        MINIMAL_DEPLOYMENT + "[deployment.tuwunel]\n"
        'project = "Matrix"\n'
        "services = []\n"
        'health_urls = ["ftp://x/health"]\n'
        'image_variable = "1BAD"\n',
    )
    problems = problems_of(path)
    assert any(
        "deployment.tuwunel.project: invalid compose project name 'Matrix'" in p for p in problems
    )
    assert any("deployment.tuwunel.services: " in p for p in problems)
    assert any(
        "deployment.tuwunel.health_urls.0: invalid health URL 'ftp://x/health'" in p
        for p in problems
    )
    assert any("deployment.tuwunel.image_variable: " in p for p in problems)
    assert len(problems) == 4


def test_missing_required_key(tmp_path: Path) -> None:
    """A missing required key is named."""
    problems = problems_of(write(tmp_path, "[deployment]\n"))
    assert f"{tmp_path / 'config.toml'}: deployment.directory: required key is missing" in problems
    assert any("deployment.synapse: required key is missing" in p for p in problems)


@pytest.mark.parametrize(
    ("image", "tag", "key", "fragment"),
    [
        ("ghcr.io/matrix-construct/tuwunel", "latest;rm -rf /", "tag", "latest;rm -rf /"),
        ("ghcr.io/Matrix/tuwunel", "latest", "image", "ghcr.io/Matrix/tuwunel"),
        ("ghcr.io/matrix-construct/tuwunel:v1", "latest", "image", "contains a tag"),
    ],
)
def test_invalid_image_reference(
    tmp_path: Path, image: str, tag: str, key: str, fragment: str
) -> None:
    """An invalid image or tag is reported under its own key with the bad value."""
    problems = problems_of(write(tmp_path, f'[target]\nimage = "{image}"\ntag = "{tag}"\n'))
    assert len(problems) == 1
    assert problems[0].startswith(f"{tmp_path / 'config.toml'}: target.{key}: ")
    assert fragment in problems[0]


def test_bad_image_reported_beside_other_target_errors(tmp_path: Path) -> None:
    """A bad image and a bad insecure registry are both listed."""
    problems = problems_of(
        write(tmp_path, '[target]\nimage = "Bad Image"\ninsecure_registries = ["*"]\n')
    )
    assert any(": target.image: " in problem for problem in problems)
    assert any(": target.insecure_registries.0: " in problem for problem in problems)


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ('{"credsStore": "desktop", "auths": {}}', "credsStore"),
        ("{not json", "not valid JSON"),
        ('{"auths": {"127.0.0.1:5000": {"auth": "%%%"}}}', "127.0.0.1:5000"),
    ],
)
def test_credentials_problems_join_other_errors(
    tmp_path: Path, content: str, fragment: str
) -> None:
    """Problems of the credentials file are listed with the config's own, never a secret."""
    credentials = tmp_path / "docker.json"
    credentials.write_text(content)
    problems = problems_of(
        write(tmp_path, f'strategy = "later"\n[target]\ncredentials_file = "{credentials}"\n')
    )
    assert len(problems) == 2
    assert ": strategy: " in problems[0]
    assert ": target.credentials_file: " in problems[1]
    assert fragment in problems[1]


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("interval", '"99999999999999d"'),
        ("jitter", '"99999999999999999999d"'),
        ("interval", '"1ms"'),
    ],
)
def test_durations_out_of_range(tmp_path: Path, key: str, value: str) -> None:
    """A duration too large for the scheduler, or an interval under a second, is rejected."""
    problems = problems_of(write(tmp_path, f"[schedule]\n{key} = {value}\n"))
    assert len(problems) == 1
    assert f"schedule.{key}: " in problems[0]


def test_oversized_file_rejected(tmp_path: Path) -> None:
    """A file over 1 MiB is rejected without reading it whole."""
    path = tmp_path / "config.toml"
    path.write_bytes(b"# " + b"x" * (2 * 1024 * 1024))
    problems = problems_of(path)
    assert "larger than 1024 KiB" in problems[0]


def test_invalid_toml_reports_line(tmp_path: Path) -> None:
    """A syntax error names the file and the line."""
    problems = problems_of(write(tmp_path, "strategy = auto\n"))
    assert len(problems) == 1
    assert "invalid TOML" in problems[0]
    assert "line 1" in problems[0]


def test_missing_file_says_what_to_do(tmp_path: Path) -> None:
    """A missing file points at the example and --config."""
    problems = problems_of(tmp_path / "absent.toml")
    assert "file not found" in problems[0]
    assert "--config" in problems[0]


@pytest.mark.parametrize(
    ("key", "value", "fragment"),
    [
        ("socket", '"/var/run/docker.sock"', "invalid engine socket"),
        ("socket", '"ssh://root@host"', "expected unix:///PATH or tcp://HOST:PORT"),
        ("timeout", "true", "not a boolean"),
        ("timeout", '"-5s"', "invalid duration"),
    ],
)
def test_engine_section_checks(tmp_path: Path, key: str, value: str, fragment: str) -> None:
    """Engine keys are checked with a message that shows the fix."""
    problems = problems_of(write(tmp_path, f"[engine]\n{key} = {value}\n"))
    assert len(problems) == 1
    assert f"engine.{key}: " in problems[0]
    assert fragment in problems[0]


def test_insecure_registry_with_scheme_rejected(tmp_path: Path) -> None:
    """insecure_registries takes HOST[:PORT] without a scheme."""
    problems = problems_of(
        write(tmp_path, '[target]\ninsecure_registries = ["http://127.0.0.1:5000"]\n')
    )
    assert (
        "target.insecure_registries.0: invalid registry host 'http://127.0.0.1:5000'" in problems[0]
    )


def test_reference_doc_is_current() -> None:
    """docs/configuration.md is what the models generate; rerun the generator if this fails."""
    from tuwunel_guard.config.reference import render

    document = (Path(__file__).parents[2] / "docs" / "configuration.md").read_text()
    assert document == render(), (
        "run: python -m tuwunel_guard.config.reference > docs/configuration.md"
    )


def test_example_mentions_every_key() -> None:
    """Each key of the models appears in the commented example, set or commented out."""
    from pydantic import BaseModel

    from tuwunel_guard.config.models import Config

    example = EXAMPLE.read_text()
    missing = []

    def walk(model: type[BaseModel]) -> None:
        for name, info in model.model_fields.items():
            if (
                f"{name} =" not in example
                and f"[{name}]" not in example
                and f".{name}]" not in example
            ):
                missing.append(name)
            for candidate in (info.annotation, *getattr(info.annotation, "__args__", ())):
                if isinstance(candidate, type) and issubclass(candidate, BaseModel):
                    walk(candidate)

    walk(Config)
    assert missing == []


@pytest.mark.parametrize(
    ("section", "key", "value"),
    [
        ("target", "timeout", '"0s"'),
        ("engine", "timeout", '"0s"'),
        ("deployment", "health_timeout", '"0s"'),
        ("deployment", "health_interval", '"0s"'),
        ("deployment", "compose_timeout", '"500ms"'),
    ],
)
def test_zero_time_limits_rejected(tmp_path: Path, section: str, key: str, value: str) -> None:
    """A time limit of zero would fail every request or probe, so it is rejected."""
    if section == "deployment":
        text = MINIMAL_DEPLOYMENT.replace("[deployment]\n", f"[deployment]\n{key} = {value}\n")
    else:
        text = f"[{section}]\n{key} = {value}\n"
    problems = problems_of(write(tmp_path, text))
    assert len(problems) == 1
    assert f"{section}.{key}: " in problems[0]


def test_fifo_config_rejected_at_once(tmp_path: Path) -> None:
    """A FIFO given as the config file is rejected instead of blocking."""
    fifo = tmp_path / "config.toml"
    os.mkfifo(fifo)
    problems = problems_of(fifo)
    assert "not a regular file" in problems[0]


@pytest.mark.parametrize("key", ["prereleases"])
def test_booleans_are_toml_booleans(tmp_path: Path, key: str) -> None:
    """A string such as "yes" is not taken for a boolean."""
    problems = problems_of(write(tmp_path, f'[target]\n{key} = "yes"\n'))
    assert len(problems) == 1
    assert f"target.{key}: " in problems[0]
