"""Pytest fixtures for the real test bed: a loopback registry, stand-in images, Docker engines.

Import them into a conftest.py (`from tests.testbed_fixtures import *`) and mark the tests
that use them with @pytest.mark.testbed. Every fixture fails with the install hint when
testbed/install.sh has not run.

Set TESTBED_KEEP_FOLDERS=1 to keep the engine and registry folders (logs, data roots) after
the run; the processes are stopped either way.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from testbed import images, paths
from testbed.compose import ComposeProject
from testbed.engine import DockerEngine
from testbed.images import PublishedImage
from testbed.registry import Registry, free_loopback_port

__all__ = [
    "StandinImages",
    "compose_project",
    "engine20",
    "engine26",
    "registry",
    "standin_images",
    "testbed_installed",
]

SYNAPSE_REPOSITORY = "matrixdotorg/synapse"
TUWUNEL_REPOSITORY = "matrix-construct/tuwunel"


def _keep_folders() -> bool:
    return os.environ.get("TESTBED_KEEP_FOLDERS", "") not in ("", "0")


@dataclass(frozen=True)
class StandinImages:
    """Stand-in images in the session registry, each from its own build (distinct image IDs).

    synapse:      SYNAPSE_REPOSITORY:latest, Docker schema 2 with gzip layers
                  (pulls on both engines)
    tuwunel_zstd: TUWUNEL_REPOSITORY:latest, OCI with zstd layers like the real Tuwunel image
                  (fails on Docker 20.10, pulls on 26.1)
    tuwunel_gzip: TUWUNEL_REPOSITORY:latest-gzip, OCI with gzip layers (pulls on both engines)
    """

    synapse: PublishedImage
    tuwunel_zstd: PublishedImage
    tuwunel_gzip: PublishedImage


@pytest.fixture(scope="session")
def testbed_installed() -> None:
    """Fail the test with the install hint unless testbed/install.sh has run."""
    missing = paths.missing_executables()
    if missing:
        names = ", ".join(str(path) for path in missing)
        pytest.fail(
            f"test bed not installed (missing {names}); {paths.INSTALL_HINT}", pytrace=False
        )


@pytest.fixture(scope="session")
def registry(
    testbed_installed: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Registry]:
    """A running Distribution registry on 127.0.0.1 for the whole session."""
    server = Registry(tmp_path_factory.mktemp("registry"))
    try:
        server.start()
        yield server
    finally:
        if _keep_folders():
            server.stop()
        else:
            server.remove()


@pytest.fixture(scope="session")
def standin_images(registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> StandinImages:
    """Stand-in Synapse and Tuwunel images, published once per session and checked."""
    folder = tmp_path_factory.mktemp("images")
    synapse = images.build_standin_archive("synapse", folder / "synapse.tar")
    tuwunel_zstd = images.build_standin_archive("tuwunel", folder / "tuwunel-zstd.tar")
    tuwunel_gzip = images.build_standin_archive("tuwunel", folder / "tuwunel-gzip.tar")
    return StandinImages(
        synapse=images.publish(synapse, registry, SYNAPSE_REPOSITORY, "latest", fmt="v2s2"),
        tuwunel_zstd=images.publish(
            tuwunel_zstd, registry, TUWUNEL_REPOSITORY, "latest", fmt="oci-zstd"
        ),
        tuwunel_gzip=images.publish(
            tuwunel_gzip, registry, TUWUNEL_REPOSITORY, "latest-gzip", fmt="oci-gzip"
        ),
    )


def _running_engine(version: str) -> Iterator[DockerEngine]:
    engine = DockerEngine(version)
    try:
        engine.start()
        yield engine
    finally:
        # stop() signals only the PID this engine started, and runs on test failure too.
        if _keep_folders():
            engine.stop()
        else:
            engine.remove()


@pytest.fixture
def engine20(testbed_installed: None) -> Iterator[DockerEngine]:
    """A fresh, running Docker Engine 20.10.24 (Debian 12) in its own /tmp/tgXXXX folder."""
    yield from _running_engine("20.10")


@pytest.fixture
def engine26(testbed_installed: None) -> Iterator[DockerEngine]:
    """A fresh, running Docker Engine 26.1.5 (Debian 13) in its own /tmp/tgXXXX folder."""
    yield from _running_engine("26.1")


@pytest.fixture
def compose_project(standin_images: StandinImages, tmp_path: Path) -> ComposeProject:
    """A compose project folder: synapse from the registry, tuwunel = the zstd image.

    Nothing is started. Run it with compose_project.run(engine, "up", "-d", "synapse"). The
    containers belong to the engine, so the engine fixture's teardown removes them.
    """
    return ComposeProject.create(
        tmp_path / "compose",
        port=free_loopback_port(),
        synapse_image=standin_images.synapse.reference,
        tuwunel_image=standin_images.tuwunel_zstd.reference,
    )
