"""Archive Docker volumes into the backup directory before a switch.

Each volume becomes ``<volume>-<UTC time>.tar.gz`` (for example
``synapse-data-20251001T123456Z.tar.gz``), read from the volume's folder on the host, plus a
``.sha256`` file in the format of ``sha256sum``, so that ``sha256sum -c`` checks it. The archive:

* is a PAX tar compressed with gzip, written as a stream, so memory use does not grow with the
  volume's size;
* keeps numeric owners and groups, modes (setuid, setgid and sticky bits included),
  modification times (with fractions of a second, in PAX headers), symbolic links as links
  (never followed), hard links, empty folders, FIFOs and device nodes. Owner names are left
  empty, because the host's names for the container's user IDs mean nothing. Restore with
  ``tar --numeric-owner -xpzf ARCHIVE -C FOLDER`` as root;
* is written to a hidden ``.partial`` name and renamed once complete and flushed to disk, so a
  file with the final name is always whole. Archives and checksum files are readable by their
  owner only, because a homeserver's volume contains its signing key.

Nothing is ever deleted or overwritten: an archive name that already exists raises
:class:`BackupError`, and a failed archive leaves its ``.partial`` file, which the error names.

NOTE: files are read as they are. Archive a database's volume while its server is stopped, or the
archive may hold a torn copy. Sockets, extended attributes and ACLs are not archived.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import tarfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import docker
import docker.errors
import requests
import structlog

from tuwunel_guard.errors import EngineError, EngineUnavailable, GuardError

log = structlog.get_logger(__name__)

# gzip level 6 is gzip's own default: close to level 9 in size, and several times faster.
GZIP_LEVEL = 6
TIMESTAMP_FORMAT = "%Y%m%dT%H%M%SZ"
_PRIVATE_FILE_MODE = 0o600
_PRIVATE_FOLDER_MODE = 0o700


class BackupError(GuardError):
    """A volume could not be archived; the message names the volume, the path and the cause.

    NOTE: defined here rather than in :mod:`tuwunel_guard.errors` for now.
    """


@dataclass(frozen=True)
class VolumeArchive:
    """One finished archive of a volume.

    ``source`` is the host folder that was archived, ``size`` the archive's size in bytes and
    ``members`` the number of tar entries, the top folder included.
    """

    volume: str
    source: Path
    path: Path
    checksum_path: Path
    sha256: str
    size: int
    members: int


def utc_now() -> datetime:
    """Return the current time in UTC."""
    return datetime.now(UTC)


def back_up_volumes(
    socket: str,
    volumes: Iterable[str],
    backup_directory: Path,
    *,
    timeout: float = 60.0,
    clock: Callable[[], datetime] = utc_now,
) -> list[VolumeArchive]:
    """Archive each named volume of the engine at ``socket`` into ``backup_directory``.

    The folder is created (mode 0700) when missing. All archives of one call share one
    timestamp. The volumes are archived one after another; the first failure stops the run
    and raises, and the archives finished before it stay.

    Raises:
        EngineUnavailable: when the engine does not respond.
        EngineError: when the engine rejects the request.
        BackupError: when a volume does not exist, its data is not in a host folder, or
            reading or writing fails.
    """
    stamp = clock().astimezone(UTC).strftime(TIMESTAMP_FORMAT)
    names = list(volumes)
    sources = _volume_sources(socket, names, timeout)
    _make_backup_directory(backup_directory)
    return [
        archive_folder(source, backup_directory, volume=name, stamp=stamp)
        for name, source in zip(names, sources, strict=True)
    ]


def volume_source(attrs: dict[str, Any]) -> Path:
    """Return the host folder that contains a volume's data, from the volume's inspect document.

    A volume of the ``local`` driver keeps its data in ``Mountpoint``, unless it was created
    with ``type=none,o=bind,device=PATH``, which keeps it in ``PATH``.

    Raises:
        BackupError: for other drivers and for local volumes backed by a file system such as
            NFS, which the engine mounts only while a container uses the volume.
    """
    name = str(attrs.get("Name", "?"))
    driver = attrs.get("Driver", "")
    if driver != "local":
        raise BackupError(
            f"cannot archive volume {name}: its driver is {driver!r}, and only volumes of the "
            "'local' driver keep their data in a host folder; back it up with its driver's tools"
        )
    options = attrs.get("Options") or {}
    device, kind = options.get("device"), options.get("type", "")
    if device:
        mount_options = str(options.get("o", "")).split(",")
        if kind == "none" and ("bind" in mount_options or "rbind" in mount_options):
            return Path(device)
        raise BackupError(
            f"cannot archive volume {name}: it is mounted from {kind or 'a device'} {device} "
            "only while a container uses it; back up that source instead"
        )
    mountpoint = attrs.get("Mountpoint")
    if not mountpoint:
        raise BackupError(f"cannot archive volume {name}: the engine reports no Mountpoint")
    return Path(mountpoint)


def archive_folder(
    source: Path, backup_directory: Path, *, volume: str, stamp: str
) -> VolumeArchive:
    """Archive the folder ``source`` as ``<volume>-<stamp>.tar.gz`` in ``backup_directory``.

    See the module docstring for what the archive keeps and how it is written.

    Raises:
        BackupError: when the name is taken, ``backup_directory`` is inside ``source``, or
            reading or writing fails.
    """
    if "/" in volume or volume.startswith("."):
        raise BackupError(f"invalid volume name {volume!r} for an archive file name")
    final = backup_directory / f"{volume}-{stamp}.tar.gz"
    checksum_path = final.with_name(final.name + ".sha256")
    partial = backup_directory / f".{final.name}.partial"
    _check_paths(source, backup_directory, final, checksum_path)

    log.info("volume_backup_started", volume=volume, source=str(source), archive=str(final))
    began = time.monotonic()
    try:
        with _create_private(partial) as raw:
            writer = _HashingWriter(raw)
            members = _write_tar(source, writer)
            raw.flush()
            os.fsync(raw.fileno())
    except (OSError, tarfile.TarError) as error:
        raise BackupError(
            f"archiving volume {volume} from {source} failed: {error}; the incomplete archive "
            f"is {partial}"
        ) from error

    digest = writer.digest.hexdigest()
    _publish(partial, final)
    _write_checksum(checksum_path, digest, final.name)
    log.info(
        "volume_backed_up",
        volume=volume,
        archive=str(final),
        sha256=digest,
        size=writer.size,
        members=members,
        seconds=round(time.monotonic() - began, 3),
    )
    return VolumeArchive(volume, source, final, checksum_path, digest, writer.size, members)


# --- Helpers -----------------------------------------------------------------------------------


class _HashingWriter:
    """Pass written bytes on to ``raw`` and hash them on the way."""

    def __init__(self, raw: IO[bytes]) -> None:
        self._raw = raw
        self.digest = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self._raw.write(data)
        self.digest.update(data)
        self.size += len(data)
        return len(data)

    def flush(self) -> None:
        self._raw.flush()


def _volume_sources(socket: str, names: Sequence[str], timeout: float) -> list[Path]:
    try:
        client = docker.DockerClient(base_url=socket, version="auto", timeout=int(timeout))
    except docker.errors.DockerException as error:
        raise EngineUnavailable(
            f"the Docker engine at {socket} did not respond (inspect volumes): {error}"
        ) from error
    try:
        return [volume_source(_inspect_volume(client, socket, name)) for name in names]
    finally:
        client.close()


def _inspect_volume(client: docker.DockerClient, socket: str, name: str) -> dict[str, Any]:
    try:
        attrs: dict[str, Any] = client.volumes.get(name).attrs
    except docker.errors.NotFound as error:
        raise BackupError(
            f"cannot archive volume {name}: the engine at {socket} has no such volume; check "
            "the volume names in the config"
        ) from error
    except docker.errors.APIError as error:
        raise EngineError(
            f"the engine at {socket} failed to inspect volume {name}: {error}"
        ) from error
    except (docker.errors.DockerException, requests.RequestException, OSError) as error:
        raise EngineUnavailable(
            f"the Docker engine at {socket} did not respond (inspect volume {name}): {error}"
        ) from error
    return attrs


def _make_backup_directory(backup_directory: Path) -> None:
    try:
        backup_directory.mkdir(mode=_PRIVATE_FOLDER_MODE, parents=True, exist_ok=True)
    except OSError as error:
        raise BackupError(f"cannot create backup directory {backup_directory}: {error}") from error


def _check_paths(source: Path, backup_directory: Path, final: Path, checksum_path: Path) -> None:
    if not source.is_dir():
        raise BackupError(
            f"cannot archive {source}: it is not a folder on this host; the guard must run on "
            "the engine's host, as root"
        )
    if backup_directory.resolve().is_relative_to(source.resolve()):
        raise BackupError(
            f"backup directory {backup_directory} is inside the folder being archived, "
            f"{source}; choose a backup directory outside every volume"
        )
    for path in (final, checksum_path):
        if path.exists() or path.is_symlink():
            raise BackupError(f"{path} already exists; the guard never overwrites a backup")


def _create_private(path: Path) -> IO[bytes]:
    """Open a new file readable by its owner only; raise FileExistsError if it exists."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, _PRIVATE_FILE_MODE)
    return os.fdopen(descriptor, "wb")


def _anonymous_owner(info: tarfile.TarInfo) -> tarfile.TarInfo:
    info.uname = ""
    info.gname = ""
    return info


def _write_tar(source: Path, writer: _HashingWriter) -> int:
    """Write ``source`` as a gzip-compressed tar stream; return the number of entries."""
    count = 0

    def counted(info: tarfile.TarInfo) -> tarfile.TarInfo:
        nonlocal count
        count += 1
        return _anonymous_owner(info)

    # tarfile's own "w|gz" takes no compression level before Python 3.12, so the tar stream
    # ("w|", which needs only write()) goes through a GzipFile.
    with (
        gzip.GzipFile(fileobj=writer, mode="wb", compresslevel=GZIP_LEVEL) as compressed,
        tarfile.open(fileobj=compressed, mode="w|", format=tarfile.PAX_FORMAT) as archive,
    ):
        # add() stats with lstat, so links stay links, and recurses in sorted name order.
        archive.add(str(source), arcname=".", recursive=True, filter=counted)
    return count


def _publish(partial: Path, final: Path) -> None:
    if final.exists():
        raise BackupError(
            f"{final} appeared while it was being written; the new archive stays at {partial}"
        )
    try:
        partial.rename(final)
        _fsync_folder(final.parent)
    except OSError as error:
        raise BackupError(f"cannot rename {partial} to {final}: {error}") from error


def _write_checksum(checksum_path: Path, digest: str, archive_name: str) -> None:
    partial = checksum_path.with_name(f".{checksum_path.name}.partial")
    try:
        with _create_private(partial) as file:
            file.write(f"{digest}  {archive_name}\n".encode())
            file.flush()
            os.fsync(file.fileno())
    except OSError as error:
        raise BackupError(f"cannot write checksum file {checksum_path}: {error}") from error
    _publish(partial, checksum_path)


def _fsync_folder(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
