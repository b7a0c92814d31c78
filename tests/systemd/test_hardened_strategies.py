"""Every strategy switches under the hardened unit: the real daemon in a systemd 252 container.

The Docker engines, the registry and the compose containers run on the host. The container
shares the host's network namespace (no --private-network), so the daemon reaches the loopback
registry and the health URLs on 127.0.0.1. One host folder is bound into the container at
SHARED_INSIDE. It contains each test's engine folder (its API socket), compose project and build
repository. The path differs from the host's on purpose: the unit's PrivateTmp= hides the
container's /tmp from the daemon.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import shutil
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from testbed import images
from testbed.compose import ComposeProject
from testbed.engine import DockerEngine
from testbed.guard import GuardSettings, write_config
from testbed.nspawn import NspawnMachine
from testbed.registry import Registry, free_loopback_port
from testbed.scenario import fetch_json, wait_until_serving
from tests.e2e.test_strategies import make_standin_repository
from tests.systemd.conftest import (
    CHECKOUT,
    DROPIN_FOLDER,
    PODMAN_DROPIN_SOURCE,
    STATE_FOLDER,
    UNIT,
    UNIT_SOURCE,
    GuardUnit,
    install_guard,
)
from tests.testbed_fixtures import StandinImages
from tuwunel_guard.messages import MESSAGES

pytestmark = pytest.mark.testbed

SHARED_INSIDE = Path("/srv/tuwunel-guard-test")
SWITCH_TIMEOUT = 120.0


@pytest.fixture(scope="module")
def shared_folder() -> Iterator[Path]:
    """A short host folder under /tmp: engine sockets must stay within the kernel's 107 bytes."""
    folder = Path(tempfile.mkdtemp(prefix="tgs", dir="/tmp"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def host_network_machine(
    wheelhouse: Path, shared_folder: Path, testbed_installed: None
) -> Iterator[NspawnMachine]:
    """A container on the host's network with the shared folder bound and the daemon installed."""
    with NspawnMachine(
        bind=[(shared_folder, str(SHARED_INSIDE))],
        bind_ro=[CHECKOUT, wheelhouse],
        private_network=False,
    ) as booted:
        install_guard(booted, wheelhouse)
        yield booted


@pytest.fixture
def unit(host_network_machine: NspawnMachine) -> Iterator[GuardUnit]:
    guard_unit = GuardUnit(host_network_machine)
    yield guard_unit
    guard_unit.remove()


@dataclasses.dataclass
class Deployment:
    """A running engine with Synapse serving, and the config that makes the daemon switch."""

    engine: DockerEngine
    project: ComposeProject
    config: str


Deploy = Callable[..., Deployment]
"""deploy(engine_version, strategy, extra_config="") -> Deployment"""


@pytest.fixture
def deploy(
    shared_folder: Path, registry: Registry, standin_images: StandinImages
) -> Iterator[Deploy]:
    """Return a function that starts an engine and Synapse and writes a config for a strategy.

    The config names the paths as they appear inside the container.
    """
    engines: list[DockerEngine] = []

    def start(engine_version: str, strategy: str, extra_config: str = "") -> Deployment:
        engine = DockerEngine(engine_version, Path(tempfile.mkdtemp(prefix="e", dir=shared_folder)))
        engines.append(engine)
        engine.start()
        project = ComposeProject.create(
            Path(tempfile.mkdtemp(prefix="compose-", dir=shared_folder)),
            port=free_loopback_port(),
            synapse_image=standin_images.synapse.reference,
            tuwunel_image=standin_images.tuwunel_zstd.reference,
        )
        project.run(engine, "up", "--detach", "synapse")
        wait_until_serving(project.url("/health"), timeout=60)

        inside = dataclasses.replace(project, folder=SHARED_INSIDE / project.folder.name)
        config_file = Path(tempfile.mkdtemp(dir=shared_folder)) / "config.toml"
        write_config(
            config_file,
            engine=f"unix://{SHARED_INSIDE / engine.workdir.name / 'docker.sock'}",
            registry=registry,
            project=inside,
            state_directory=Path(STATE_FOLDER),
            settings=GuardSettings(strategy=strategy, interval="1h"),
        )
        return Deployment(engine, project, config_file.read_text() + extra_config)

    yield start
    for engine in engines:
        engine.remove()


def switch_under_unit(unit: GuardUnit, deployment: Deployment) -> dict[str, str]:
    """Start the unit with the deployment's config and return its switch_committed entry."""
    unit.install(deployment.config)
    unit.machine.systemctl("start", UNIT)
    [committed] = unit.wait_for_event("switch_committed", timeout=SWITCH_TIMEOUT)
    return committed


def assert_tuwunel_serves(project: ComposeProject) -> None:
    assert fetch_json(project.url("/_tuwunel/server_version"))["name"] == "Tuwunel"


def assert_switch_journal(unit: GuardUnit, strategy: str, route: str, verdict: str) -> None:
    """Check the decision fields, the MESSAGE_IDs and the catalog text of one switch."""
    [decision] = unit.journal("EVENT=decision_made")
    assert decision["DECISION"] == "switch-to-tuwunel"
    assert decision["VERDICT"] == verdict
    assert decision["STRATEGY"] == strategy
    assert decision["ROUTE"] == route
    assert decision["REASON"]
    [changed] = unit.journal("EVENT=verdict_changed")
    assert changed["MESSAGE_ID"] == MESSAGES["verdict_changed"].message_id
    assert changed["PREVIOUS_VERDICT"] == "none"
    assert changed["VERDICT"] == verdict

    committed_id = MESSAGES["switch_committed"].message_id
    explained = unit.machine.run(
        [
            "journalctl",
            "-x",
            "--no-pager",
            f"--cursor={unit.cursor}",
            f"--unit={UNIT}",
            f"MESSAGE_ID={committed_id}",
        ]
    ).stdout
    assert "Subject: Switch to Tuwunel committed" in explained
    assert "passed its health checks and now serves the" in explained


def test_convert_under_unit(unit: GuardUnit, deploy: Deploy, standin_images: StandinImages) -> None:
    """convert on Docker 20.10: the layers are recompressed in the state folder and loaded."""
    deployment = deploy("20.10", "convert")
    committed = switch_under_unit(unit, deployment)

    assert committed["ROUTE"] == "convert"
    assert committed["IMAGE_ID"] == standin_images.tuwunel_zstd.config_digest
    assert committed["OUTCOME"] == "committed"
    assert_tuwunel_serves(deployment.project)
    assert_switch_journal(unit, "convert", "convert", "incompatible")
    [decision] = unit.journal("EVENT=decision_made")
    assert decision["REASON"] == "strategy 'convert' switches through the convert route"


def test_build_under_unit(
    unit: GuardUnit, deploy: Deploy, shared_folder: Path, standin_images: StandinImages
) -> None:
    """build on Docker 20.10: git clones a local repository and the engine builds it."""
    source = Path(tempfile.mkdtemp(prefix="source-", dir=shared_folder))
    repository = make_standin_repository(source / "repository", standin_images, source)
    inside = SHARED_INSIDE / repository.relative_to(shared_folder)
    build_table = (
        f'\n[build]\nrepository = "file://{inside}"\nref = "main"\ndockerfile = "Dockerfile"\n'
    )
    deployment = deploy("20.10", "build", build_table)
    committed = switch_under_unit(unit, deployment)

    assert committed["ROUTE"] == "build"
    assert committed["IMAGE"].startswith("tuwunel-guard/tuwunel:build-")
    assert_tuwunel_serves(deployment.project)
    served = wait_until_serving(deployment.project.url("/built-from-source"), timeout=5)
    assert served.decode().strip() == "yes"
    assert_switch_journal(unit, "build", "build", "incompatible")


def test_podman_refused_without_dropin(unit: GuardUnit, deploy: Deploy) -> None:
    """Without systemd/podman.conf the hardening stops podman, and Synapse keeps serving."""
    deployment = deploy("20.10", "podman")
    unit.install(deployment.config)
    unit.machine.systemctl("start", UNIT)
    [refused] = unit.wait_for_event("switch_refused", timeout=SWITCH_TIMEOUT)

    assert refused["STEP"] == "preflight"
    assert "podman pull failed with exit status 125" in refused["ERROR"]
    assert "cannot re-exec process" in refused["ERROR"]
    assert refused["MESSAGE_ID"] == MESSAGES["switch_refused"].message_id
    assert wait_until_serving(deployment.project.url("/health"), timeout=5) == b"OK"


def test_podman_under_unit_with_dropin(unit: GuardUnit, deploy: Deploy) -> None:
    """podman on Docker 20.10 with systemd/podman.conf installed as a drop-in."""
    deployment = deploy("20.10", "podman")
    unit.machine.write_file(f"{DROPIN_FOLDER}/podman.conf", PODMAN_DROPIN_SOURCE.read_text())
    # As on a host where podman never ran as root: the drop-in's ExecStartPre= creates it.
    unit.machine.run(["rm", "-rf", "/etc/containers/networks"])
    committed = switch_under_unit(unit, deployment)

    assert committed["ROUTE"] == "podman"
    assert committed["IMAGE"].startswith("tuwunel-guard/tuwunel:podman-")
    assert_tuwunel_serves(deployment.project)
    assert_switch_journal(unit, "podman", "podman", "incompatible")
    drop_ins = unit.properties("DropInPaths")["DropInPaths"]
    assert f"{DROPIN_FOLDER}/podman.conf" in drop_ins.split()
    assert unit.machine.run(["test", "-d", "/etc/containers/networks"]).returncode == 0


def test_auto_under_unit_on_docker_26(
    unit: GuardUnit, deploy: Deploy, standin_images: StandinImages
) -> None:
    """auto on Docker 26.1: the engine pulls the zstd image itself and the switch goes ahead."""
    deployment = deploy("26.1", "auto")
    committed = switch_under_unit(unit, deployment)

    assert committed["ROUTE"] == "native"
    assert committed["OUTCOME"] == "committed"
    assert_tuwunel_serves(deployment.project)
    assert_switch_journal(unit, "auto", "native", "compatible")


# The podman route's steps up to the archive, as `tuwunel-guard` runs them (adapters/podman.py).
PODMAN_STEPS = """\
#!/bin/sh
set -eu
folder=/var/lib/tuwunel-guard/podman
mkdir -p "$folder/root" "$folder/run/libpod"
podman() {
    /usr/bin/podman --root="$folder/root" --runroot="$folder/run" \\
        --tmpdir="$folder/run/libpod" --storage-driver=vfs --cgroup-manager=cgroupfs \\
        --events-backend=file "$@"
}
pulled=$(podman pull --quiet --tls-verify=false "$1")
container=$(podman create "$pulled")
committed=$(podman commit --quiet --format docker "$container")
podman save --format docker-archive --output "$folder/image.tar" "$committed"
echo "saved $(stat --format=%s "$folder/image.tar") bytes"
"""


def build_owned_files_archive(destination: Path) -> Path:
    """Write a docker-archive whose one layer has files of uid 1000 and a file capability.

    The Tuwunel stand-in has only root-owned files, so its extraction needs neither CAP_CHOWN,
    CAP_FOWNER nor CAP_SETFCAP. This layer needs all three.
    """
    layer = io.BytesIO()
    body = b"content\n"
    with tarfile.open(fileobj=layer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for name, mode in (("data", 0o700), ("data/inner", 0o500)):
            folder = tarfile.TarInfo(name)
            folder.type = tarfile.DIRTYPE
            folder.mode = mode
            folder.uid = folder.gid = 1000
            archive.addfile(folder)
        owned = tarfile.TarInfo("data/inner/file")
        owned.size = len(body)
        owned.mode = 0o400
        owned.uid = owned.gid = 1000
        archive.addfile(owned, io.BytesIO(body))
        # security.capability: version 2, effective, with CAP_NET_BIND_SERVICE (bit 10) permitted.
        capability = bytes([1, 0, 0, 2, 0, 4, 0, 0]) + bytes(12)
        with_capability = tarfile.TarInfo("bin-with-capability")
        with_capability.size = len(body)
        with_capability.mode = 0o755
        with_capability.pax_headers = {
            "SCHILY.xattr.security.capability": capability.decode("latin-1")
        }
        archive.addfile(with_capability, io.BytesIO(body))
    layer_bytes = layer.getvalue()
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {"Cmd": ["/bin-with-capability"]},
            "rootfs": {
                "type": "layers",
                "diff_ids": [f"sha256:{hashlib.sha256(layer_bytes).hexdigest()}"],
            },
        }
    ).encode()
    config_name = f"{hashlib.sha256(config).hexdigest()}.json"
    manifest = [{"Config": config_name, "RepoTags": ["owned:latest"], "Layers": ["layer.tar"]}]
    with tarfile.open(destination, "w") as archive:
        for name, content in (
            ("layer.tar", layer_bytes),
            (config_name, config),
            ("manifest.json", json.dumps(manifest).encode()),
        ):
            member = tarfile.TarInfo(name)
            member.size = len(content)
            archive.addfile(member, io.BytesIO(content))
    return destination


def test_podman_dropin_extracts_owned_files(
    host_network_machine: NspawnMachine, registry: Registry, shared_folder: Path
) -> None:
    """Under the unit with podman.conf, podman extracts files of other owners and capabilities.

    The steps run as a oneshot copy of the unit, with the unit's sandbox and the drop-in.
    """
    machine = host_network_machine
    image = images.publish(
        build_owned_files_archive(shared_folder / "owned.tar"),
        registry,
        "tuwunel-guard-test/owned-files",
        "latest",
        fmt="oci-zstd",
    )
    steps = shared_folder / "podman-steps.sh"
    steps.write_text(PODMAN_STEPS)
    steps.chmod(0o755)

    probe = "podman-probe.service"
    machine.write_file(f"/etc/systemd/system/{probe}", UNIT_SOURCE.read_text())
    machine.write_file(
        f"/etc/systemd/system/{probe}.d/podman.conf", PODMAN_DROPIN_SOURCE.read_text()
    )
    machine.write_file(
        f"/etc/systemd/system/{probe}.d/oneshot.conf",
        "[Service]\nType=oneshot\nWatchdogSec=0\nRestart=no\nExecReload=\nExecStart=\n"
        f"ExecStart={SHARED_INSIDE / steps.name} {image.reference}\n",
    )
    machine.systemctl("daemon-reload")
    try:
        started = machine.systemctl("start", probe, check=False)
        machine.run(["journalctl", "--sync"])
        log = machine.run(["journalctl", "--no-pager", "--output=cat", f"--unit={probe}"]).stdout
    finally:
        machine.run(["rm", "-rf", f"/etc/systemd/system/{probe}", f"/etc/systemd/system/{probe}.d"])
        machine.run(["rm", "-rf", STATE_FOLDER])
        machine.systemctl("daemon-reload")

    assert started.returncode == 0, log
    assert "saved " in log
