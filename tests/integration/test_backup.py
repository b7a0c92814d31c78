"""Tests of volume backups against a real Docker Engine 26.1 and its volumes.

Each test creates a volume on the engine and fills its host folder as root with the kinds of
entries a homeserver's data can contain, and some it rarely does. The tests archive it, restore
the archive into fresh folders with Python's tarfile and with GNU tar, and compare both with the
volume entry by entry.
"""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import tarfile
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import docker
import pytest

from testbed.engine import DockerEngine
from tuwunel_guard.adapters.backup import (
    BackupError,
    archive_folder,
    back_up_volumes,
    volume_source,
)
from tuwunel_guard.errors import EngineUnavailable

pytestmark = pytest.mark.testbed

STAMP_TIME = datetime(2025, 10, 1, 12, 34, 56, 789000, tzinfo=UTC)
STAMP = "20251001T123456Z"
SYNAPSE_UID = 991
LONG_NAME = "media_store/remote_content/" + "x" * 120 + ".bin"


def fixed_clock() -> datetime:
    """Return STAMP_TIME."""
    return STAMP_TIME


@pytest.fixture
def client(engine26: DockerEngine) -> Iterator[docker.DockerClient]:
    """A docker SDK client for the engine."""
    sdk = docker.DockerClient(base_url=engine26.base_url, version="auto", timeout=30)
    try:
        yield sdk
    finally:
        sdk.close()


def fill_volume(root: Path) -> None:
    """Write files of many kinds, owners and modes into ``root``, the volume's host folder."""
    (root / "homeserver.signing.key").write_text("ed25519 a_bcde secretkeymaterial\n")
    (root / "homeserver.signing.key").chmod(0o600)
    (root / "homeserver.db").write_bytes(os.urandom(5 * 1024 * 1024))
    (root / "media_store" / "local_content" / "ab").mkdir(parents=True)
    (root / "media_store" / "local_content" / "ab" / "cdef").write_bytes(b"\x89PNG" * 1000)
    (root / "media_store" / "remote_content").mkdir()
    (root / LONG_NAME).write_bytes(b"long name")
    (root / "caf\u00e9 r\u00e9sum\u00e9.txt").write_text("non-ASCII name\n")
    (root / "empty-folder").mkdir(mode=0o750)
    (root / "sticky").mkdir()
    (root / "sticky").chmod(0o1777)
    (root / "setuid-tool").write_bytes(b"#!/bin/sh\n")
    (root / "setuid-tool").chmod(0o4755)
    (root / "no-access").write_text("mode 000\n")
    (root / "no-access").chmod(0)
    (root / "empty-file").touch()
    os.link(root / "homeserver.signing.key", root / "signing.key.hardlink")
    (root / "log.config").symlink_to("homeserver.signing.key")
    (root / "media-link").symlink_to("media_store/local_content")
    (root / "dangling-absolute").symlink_to("/nonexistent/target")
    os.mkfifo(root / "control.fifo", 0o620)
    os.mknod(root / "null-device", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    for path in [root, *root.rglob("*")]:
        os.chown(path, SYNAPSE_UID, SYNAPSE_UID, follow_symlinks=False)
    os.chown(root / "setuid-tool", 0, 0)
    os.chown(root / "empty-file", 1234, 5678)
    root.chmod(0o750)


def snapshot(root: Path) -> dict[str, dict[str, Any]]:
    """Describe every entry under ``root`` (``root`` itself as ``.``) by lstat and content."""
    entries: dict[str, dict[str, Any]] = {}
    inodes: dict[int, str] = {}
    for path in sorted([root, *root.rglob("*")]):
        info = path.lstat()
        name = "." if path == root else str(path.relative_to(root))
        entry: dict[str, Any] = {"mode": info.st_mode, "uid": info.st_uid, "gid": info.st_gid}
        if stat.S_ISLNK(info.st_mode):
            entry["target"] = str(path.readlink())
        else:
            entry["mtime"] = round(info.st_mtime, 3)
        if stat.S_ISREG(info.st_mode):
            entry["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
            entry["hardlink_of"] = inodes.setdefault(info.st_ino, name)
        if stat.S_ISCHR(info.st_mode):
            entry["rdev"] = info.st_rdev
        entries[name] = entry
    return entries


def make_volume(client: docker.DockerClient, name: str, **options: str) -> Path:
    """Create a volume and return its host folder."""
    volume = client.volumes.create(name=name, driver="local", driver_opts=options or None)
    return Path(volume.attrs["Mountpoint"])


def test_volume_archive_restores_identically(
    engine26: DockerEngine, client: docker.DockerClient, tmp_path: Path
) -> None:
    """The archive restores to the same names, contents, modes, owners, links and times."""
    mountpoint = make_volume(client, "synapse-data")
    fill_volume(mountpoint)
    expected = snapshot(mountpoint)
    backups = tmp_path / "backups"

    [archive] = back_up_volumes(engine26.base_url, ["synapse-data"], backups, clock=fixed_clock)

    assert archive.path == backups / f"synapse-data-{STAMP}.tar.gz"
    assert archive.source == mountpoint
    assert archive.members == len(expected)
    python_restore = tmp_path / "python-restore"
    with tarfile.open(archive.path) as opened:
        # The test wrote the archive itself, so its members are trusted.
        opened.extractall(python_restore, numeric_owner=True, filter="fully_trusted")  # noqa: S202
    assert snapshot(python_restore) == expected

    tar_restore = tmp_path / "tar-restore"
    tar_restore.mkdir()
    subprocess.run(
        ["/usr/bin/tar", "--numeric-owner", "-xpzf", str(archive.path), "-C", str(tar_restore)],
        check=True,
    )
    assert snapshot(tar_restore) == expected


def test_archive_names_counts_and_checksum(
    engine26: DockerEngine, client: docker.DockerClient, tmp_path: Path
) -> None:
    """File names, modes, the sha256 file and the entry count are as documented."""
    fill_volume(make_volume(client, "synapse-data"))
    make_volume(client, "synapse-media")
    backups = tmp_path / "new" / "backups"

    archives = back_up_volumes(
        engine26.base_url, ["synapse-data", "synapse-media"], backups, clock=fixed_clock
    )

    names = sorted(path.name for path in backups.iterdir())
    assert names == [
        f"synapse-data-{STAMP}.tar.gz",
        f"synapse-data-{STAMP}.tar.gz.sha256",
        f"synapse-media-{STAMP}.tar.gz",
        f"synapse-media-{STAMP}.tar.gz.sha256",
    ]
    assert stat.S_IMODE(backups.stat().st_mode) == 0o700
    for archive in archives:
        content = archive.path.read_bytes()
        assert archive.sha256 == hashlib.sha256(content).hexdigest()
        assert archive.size == len(content)
        assert archive.checksum_path.read_text() == f"{archive.sha256}  {archive.path.name}\n"
        assert stat.S_IMODE(archive.path.stat().st_mode) == 0o600
        assert stat.S_IMODE(archive.checksum_path.stat().st_mode) == 0o600
    with tarfile.open(archives[0].path) as opened:
        members = opened.getmembers()
    assert len(members) == archives[0].members
    assert members[0].name == "."
    assert all(member.uname == "" and member.gname == "" for member in members)
    assert archives[1].members == 1, "an empty volume holds only its top folder"
    checked = subprocess.run(
        ["/usr/bin/sha256sum", "-c", f"synapse-data-{STAMP}.tar.gz.sha256"],
        cwd=backups,
        capture_output=True,
        text=True,
        check=False,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_existing_archive_never_overwritten(
    engine26: DockerEngine, client: docker.DockerClient, tmp_path: Path
) -> None:
    """A second backup in the same second raises and leaves the first archive as it was."""
    fill_volume(make_volume(client, "synapse-data"))
    [first] = back_up_volumes(engine26.base_url, ["synapse-data"], tmp_path, clock=fixed_clock)
    before = first.path.read_bytes()

    with pytest.raises(BackupError, match="already exists; the guard never overwrites"):
        back_up_volumes(engine26.base_url, ["synapse-data"], tmp_path, clock=fixed_clock)

    assert first.path.read_bytes() == before
    assert not list(tmp_path.glob(".*.partial"))


def test_missing_volume(engine26: DockerEngine, tmp_path: Path) -> None:
    """A volume the engine does not have raises BackupError naming it, and nothing is written."""
    backups = tmp_path / "backups"

    with pytest.raises(BackupError, match=r"cannot archive volume absent: .* has no such volume"):
        back_up_volumes(engine26.base_url, ["absent"], backups, clock=fixed_clock)

    assert not backups.exists()


def test_bind_volume_archives_device(
    engine26: DockerEngine, client: docker.DockerClient, tmp_path: Path
) -> None:
    """A local volume bound to a host folder is archived from that folder."""
    device = tmp_path / "bound"
    device.mkdir()
    (device / "homeserver.yaml").write_text("server_name: example.org\n")
    make_volume(client, "bound", type="none", o="bind", device=str(device))

    [archive] = back_up_volumes(engine26.base_url, ["bound"], tmp_path / "b", clock=fixed_clock)

    assert archive.source == device
    with tarfile.open(archive.path) as opened:
        assert opened.getnames() == [".", "./homeserver.yaml"]


def test_nfs_volume_rejected(
    engine26: DockerEngine, client: docker.DockerClient, tmp_path: Path
) -> None:
    """A local volume backed by NFS is mounted only while in use, so it is not archived."""
    make_volume(client, "remote", type="nfs", o="addr=127.0.0.1,ro", device=":/export")

    with pytest.raises(BackupError, match="mounted from nfs :/export only while a container"):
        back_up_volumes(engine26.base_url, ["remote"], tmp_path, clock=fixed_clock)


def test_backup_directory_inside_volume(
    engine26: DockerEngine, client: docker.DockerClient
) -> None:
    """A backup directory inside the volume would archive itself, so it is rejected."""
    mountpoint = make_volume(client, "synapse-data")

    with pytest.raises(BackupError, match="is inside the folder being archived"):
        back_up_volumes(
            engine26.base_url, ["synapse-data"], mountpoint / "backups", clock=fixed_clock
        )


def test_engine_down(tmp_path: Path) -> None:
    """No engine on the socket raises EngineUnavailable naming the socket."""
    socket = f"unix://{tmp_path}/docker.sock"

    with pytest.raises(EngineUnavailable, match=f"engine at {socket} did not respond"):
        back_up_volumes(socket, ["synapse-data"], tmp_path / "b", clock=fixed_clock)


@pytest.fixture
def tiny_filesystem(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs mounted for the test (the tests run as root), unmounted afterwards."""
    mountpoint = tmp_path / "tiny"
    mountpoint.mkdir()
    subprocess.run(
        ["/usr/bin/mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mountpoint)], check=True
    )
    try:
        yield mountpoint
    finally:
        subprocess.run(["/usr/bin/umount", str(mountpoint)], check=True)


def test_write_failure_keeps_partial(tmp_path: Path, tiny_filesystem: Path) -> None:
    """A full backup file system fails the archive, names the .partial file and keeps it."""
    source = tmp_path / "source"
    source.mkdir()
    (source / "random").write_bytes(os.urandom(512 * 1024))
    partial = tiny_filesystem / f".v-{STAMP}.tar.gz.partial"

    with pytest.raises(BackupError) as caught:
        archive_folder(source, tiny_filesystem, volume="v", stamp=STAMP)

    message = str(caught.value)
    assert message.startswith(f"archiving volume v from {source} failed: [Errno 28]")
    assert message.endswith(f"the incomplete archive is {partial}")
    assert partial.exists()
    assert not (tiny_filesystem / f"v-{STAMP}.tar.gz").exists()


def test_volume_source_rules() -> None:
    """volume_source reads Mountpoint and bind options and rejects other drivers."""
    local = {"Name": "a", "Driver": "local", "Mountpoint": "/var/lib/docker/volumes/a/_data"}
    bound = local | {"Options": {"type": "none", "o": "rbind,ro", "device": "/srv/a"}}
    plugin = {"Name": "b", "Driver": "rexray/ebs", "Mountpoint": "/mnt/b"}

    assert volume_source(local) == Path("/var/lib/docker/volumes/a/_data")
    assert volume_source(bound) == Path("/srv/a")
    with pytest.raises(BackupError, match="its driver is 'rexray/ebs'"):
        volume_source(plugin)
    with pytest.raises(BackupError, match="reports no Mountpoint"):
        volume_source({"Name": "c", "Driver": "local", "Mountpoint": ""})
