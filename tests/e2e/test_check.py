"""`tuwunel-guard check` against real engines and a real registry."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from testbed.compose import ComposeProject
from testbed.engine import DockerEngine
from testbed.guard import REPOSITORY_ROOT, GuardSettings, write_config
from testbed.registry import Registry
from tests.testbed_fixtures import StandinImages

pytestmark = pytest.mark.testbed


def run_check(config: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tuwunel_guard", "--config", str(config), "check", *extra],
        cwd=REPOSITORY_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def config_for(
    tmp_path: Path,
    engine: DockerEngine | str,
    registry: Registry,
    project: ComposeProject,
    tag: str = "latest",
) -> Path:
    return write_config(
        tmp_path / "config.toml",
        engine=engine,
        registry=registry,
        project=project,
        state_directory=tmp_path / "state",
        settings=GuardSettings(tag=tag),
    )


def test_check_zstd_on_20_10_is_incompatible(
    registry: Registry,
    standin_images: StandinImages,
    engine20: DockerEngine,
    compose_project: ComposeProject,
    tmp_path: Path,
) -> None:
    """Docker 20.10 and the zstd image: incompatible with the zstd reason, exit 1."""
    result = run_check(config_for(tmp_path, engine20, registry, compose_project))

    assert result.returncode == 1, result.stderr
    assert "Engine:    Docker 20.10.24+dfsg1 (API 1.41" in result.stdout
    assert "Verdict:   incompatible" in result.stdout
    assert "cannot unpack zstd-compressed layers, which needs 23.0.0 or later" in result.stdout
    assert "requires zstd-layers: layer 1 of 1" in result.stdout
    assert (
        "Decision:  stay-on-synapse: waiting for an engine that can run the image: "
        "see the verdict above"
    ) in result.stdout
    assert not (tmp_path / "state" / "state.json").exists()


def test_check_zstd_on_26_1_is_compatible(
    registry: Registry,
    standin_images: StandinImages,
    engine26: DockerEngine,
    compose_project: ComposeProject,
    tmp_path: Path,
) -> None:
    """Docker 26.1.5 and the zstd image: compatible, exit 0; JSON carries the digests."""
    result = run_check(config_for(tmp_path, engine26, registry, compose_project), "--json")

    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["engine"]["version"] == "26.1.5+dfsg1"
    assert document["verdict"]["compatible"] is True
    assert document["image"]["manifest_digest"] == standin_images.tuwunel_zstd.manifest_digest
    assert document["image"]["config_digest"] == standin_images.tuwunel_zstd.config_digest
    assert document["image"]["layer_compressions"] == ["zstd"]
    assert document["decision"]["action"] == "switch-to-tuwunel"


def test_check_gzip_on_20_10_is_compatible(
    registry: Registry,
    standin_images: StandinImages,
    engine20: DockerEngine,
    compose_project: ComposeProject,
    tmp_path: Path,
) -> None:
    """Docker 20.10 and the same stand-in with gzip layers: compatible, exit 0."""
    tag = standin_images.tuwunel_gzip.tag
    result = run_check(config_for(tmp_path, engine20, registry, compose_project, tag=tag), "--json")

    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["verdict"] == {
        "compatible": True,
        "reasons": [
            f"Docker 20.10.24+dfsg1 can run {registry.host}/matrix-construct/tuwunel:{tag}: "
            "the image needs no special feature"
        ],
        "missing": [],
    }
    assert document["image"]["layer_compressions"] == ["gzip"]


def test_check_silent_engine_exits_2(
    registry: Registry, compose_project: ComposeProject, tmp_path: Path
) -> None:
    """An engine socket that does not answer is reported as such, exit 2."""
    silent = f"unix://{tmp_path}/absent.sock"
    result = run_check(config_for(tmp_path, silent, registry, compose_project))

    assert result.returncode == 2
    assert f"Engine:    not answering at {silent}" in result.stdout
    assert "Verdict:   unknown: the Docker engine at" in result.stdout
    assert "Traceback" not in result.stderr


def test_check_config_errors_exit_78(tmp_path: Path) -> None:
    """A config file with three mistakes gets three located errors and exit 78."""
    config = tmp_path / "config.toml"
    config.write_text(
        'strategy = "later"\n[engine]\nsocket = "docker.sock"\n[schedule]\nevery = "1h"\n'
    )
    result = run_check(config)

    assert result.returncode == 78
    lines = result.stderr.splitlines()
    assert lines[0] == f"tuwunel-guard: the config file {config} is invalid:"
    assert len(lines) == 4
    assert lines[1].startswith(f"  {config}: strategy: ")
    assert lines[2].startswith(f"  {config}: engine.socket: invalid engine socket 'docker.sock'")
    assert lines[3].startswith(f"  {config}: schedule.every: unknown key")
    assert "Traceback" not in result.stderr
