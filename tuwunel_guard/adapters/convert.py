"""The convert route: rebuild the target image as a docker-archive and load it into the engine.

Engines before Docker 23.0 cannot unpack zstd layers, but they load a docker-archive with
uncompressed layers. :class:`ConvertAcquirer` makes one:

1. It fetches the tag's document by the probed tag digest, walks the indexes (nested ones too)
   to the manifest for the host platform, and checks that this is the probed manifest.
2. It fetches the config and reads ``rootfs.diff_ids``.
3. It checks the free space of the state directory, then downloads each layer, decompresses it
   by its first bytes (zstd, gzip or none, whatever its media type) into a scratch file,
   and checks the blob's size and digest and the uncompressed tar's diff_id.
4. It streams the archive to ``POST /images/load``, checks that the engine reports the config
   digest as image ID and the diff_ids as its layers, and only then tags the image.

Every digest is checked before a byte reaches the engine, so a failed check leaves the engine
as it was. Memory use does not grow with the image: blobs pass through in chunks of
``CHUNK_SIZE``. Disk use is the uncompressed layers, in a scratch folder inside the state
directory that is removed afterwards, also after a failure. A folder left by a killed process
is removed by the next conversion.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import shutil
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, BinaryIO, Protocol, cast

import docker
import docker.errors
import requests
import structlog
import zstandard

from tuwunel_guard.adapters.acquire import AcquiredImage, Progress
from tuwunel_guard.adapters.registry import Manifest, RegistryClient
from tuwunel_guard.core import archive
from tuwunel_guard.core.archive import Descriptor
from tuwunel_guard.core.image import ImageFacts, Platform
from tuwunel_guard.core.platforms import (
    INDEX_MEDIA_TYPES,
    MANIFEST_MEDIA_TYPES,
    compression_of,
    resolve,
)
from tuwunel_guard.core.reference import ImageReference
from tuwunel_guard.errors import (
    ConvertError,
    DigestMismatch,
    EngineError,
    EngineUnavailable,
    RegistryError,
)

log = structlog.get_logger(__name__)

CHUNK_SIZE = 1024 * 1024
# Image configs are a few kilobytes; a long build history reaches some hundred.
MAX_CONFIG_BYTES = 16 * 1024 * 1024
SCRATCH_PREFIX = "convert-"
DEFAULT_LOCAL_REPOSITORY = "tuwunel-guard/tuwunel"
_LOADED_ID_PREFIX = "Loaded image ID: "


@dataclass(frozen=True)
class _LayerFile:
    """An uncompressed layer in the scratch folder, its diff_id checked."""

    diff_id: str
    path: Path
    size: int


class ConvertAcquirer:
    """Put the target image on an engine that cannot pull it, by converting it in the guard.

    ``platform`` is the host platform that the probe resolved the image for. ``state_directory``
    contains the scratch folder, so it needs free space of about the uncompressed image size.
    ``local_repository`` names the converted image (``REPOSITORY:<12 hex of the manifest
    digest>``); it must have no registry host, so that compose never tries to pull it.
    ``timeout`` (seconds) applies to each read from the engine's socket.
    """

    route = "convert"

    def __init__(
        self,
        registry: RegistryClient,
        *,
        engine_socket: str,
        state_directory: Path,
        platform: Platform,
        local_repository: str = DEFAULT_LOCAL_REPOSITORY,
        timeout: float = 120.0,
    ) -> None:
        self._registry = registry
        self._socket = engine_socket
        self._state_directory = state_directory
        self._platform = platform
        self._local_repository = local_repository
        self._timeout = timeout

    def acquire(
        self, reference: ImageReference, image: ImageFacts, progress: Progress | None = None
    ) -> AcquiredImage:
        """Convert ``image`` and load it into the engine; return its local name and image ID.

        ``progress`` gets (bytes done, bytes in all), where the bytes are the compressed
        layers downloaded plus the archive streamed to the engine. The total counts the archive
        at the free-space estimate until every layer is downloaded, then at its exact size.

        Raises:
            DigestMismatch: when a manifest, config or layer does not hash to its digest, or an
                uncompressed layer does not match its diff_id.
            RegistryError: on invalid content, a blob shorter or longer than its descriptor
                declares, or a layer that does not decompress.
            RegistryUnavailable: when the registry cannot be reached or a download breaks.
            ConvertError: when the state directory lacks space or cannot be written.
            EngineError: when the engine rejects the archive or reports another image ID.
            EngineUnavailable: when the engine does not answer.
        """
        started = time.monotonic()
        local = archive.local_reference(self._local_repository, image.manifest_digest)
        manifest = self._fetch_manifest(reference, image)
        config, layers = archive.manifest_descriptors(manifest.document)
        config_bytes = self._fetch_config(reference, config)
        diff_ids = archive.parse_diff_ids(_decode_config(config_bytes, config), len(layers))

        with self._engine_client("connect") as client:
            if self._holds_image(client, config.digest, diff_ids):
                self._tag(client, config.digest, local)
                log.info(
                    "image_conversion_skipped",
                    reference=str(reference),
                    image_id=config.digest,
                    local_reference=local,
                )
                return AcquiredImage(local, config.digest)

            distinct = _distinct_layers(layers, diff_ids)
            counter = _ProgressCounter(progress, [layer for layer, _ in distinct])
            with self._scratch_folder([layer for layer, _ in distinct]) as folder:
                files = self._download_layers(reference, distinct, folder, counter)
                counter.set_archive_size(
                    _archive_members(config.digest, config_bytes, diff_ids, files)
                )
                chunks = _archive_chunks(config.digest, config_bytes, diff_ids, files, counter)
                image_id = self._load(client, chunks)
            self._check_loaded(client, image_id, config.digest, diff_ids)
            self._tag(client, image_id, local)

        log.info(
            "image_converted",
            reference=str(reference),
            manifest_digest=manifest.digest,
            image_id=image_id,
            local_reference=local,
            layers=len(layers),
            uncompressed_bytes=sum(item.size for item in files.values()),
            seconds=round(time.monotonic() - started, 1),
        )
        return AcquiredImage(local, image_id)

    # --- Registry ---

    def _fetch_manifest(self, reference: ImageReference, image: ImageFacts) -> Manifest:
        tag = self._registry.get_manifest(reference, image.tag_digest)
        nested: dict[str, dict[str, Any]] = {}
        resolution = resolve(tag.document, tag.media_type, self._platform, nested)
        while resolution.pending is not None:
            child = self._registry.get_manifest(reference, resolution.pending.digest)
            if child.media_type not in INDEX_MEDIA_TYPES:
                raise RegistryError(
                    f"{resolution.pending.describe()} of {reference} is listed as an index but "
                    f"the registry returned {child.media_type}"
                )
            nested[child.digest] = child.document
            resolution = resolve(tag.document, tag.media_type, self._platform, nested)

        entry = resolution.manifest_entry
        manifest = tag if entry is None else self._registry.get_manifest(reference, entry.digest)
        if manifest.media_type not in MANIFEST_MEDIA_TYPES:
            raise RegistryError(
                f"expected an image manifest for {reference} at {manifest.digest}, got "
                f"{manifest.media_type}"
            )
        if manifest.digest != image.manifest_digest:
            raise RegistryError(
                f"tag digest {image.tag_digest} of {reference} leads to manifest "
                f"{manifest.digest} for {self._platform}, but the probe chose "
                f"{image.manifest_digest}: probe the image again before converting it"
            )
        return manifest

    def _fetch_config(self, reference: ImageReference, config: Descriptor) -> bytes:
        if config.size > MAX_CONFIG_BYTES:
            raise RegistryError(
                f"the {config.describe()} of {reference} declares {config.size} bytes, more "
                f"than the {MAX_CONFIG_BYTES} bytes an image config may have here"
            )
        buffer = io.BytesIO()
        with self._registry.open_blob(reference, config.digest) as blob:
            reader = _VerifyingReader(blob, config, lambda _: None)
            while chunk := reader.read(CHUNK_SIZE):
                buffer.write(chunk)
            reader.check(reference)
        return buffer.getvalue()

    def _download_layers(
        self,
        reference: ImageReference,
        distinct: Sequence[tuple[Descriptor, str]],
        folder: Path,
        counter: _ProgressCounter,
    ) -> dict[str, _LayerFile]:
        return {
            diff_id: self._download_layer(reference, layer, diff_id, folder, counter)
            for layer, diff_id in distinct
        }

    def _download_layer(
        self,
        reference: ImageReference,
        layer: Descriptor,
        diff_id: str,
        folder: Path,
        counter: _ProgressCounter,
    ) -> _LayerFile:
        path = folder / f"{diff_id.removeprefix('sha256:')}.tar"
        uncompressed = hashlib.sha256()
        size = 0
        with self._registry.open_blob(reference, layer.digest) as blob:
            reader = _VerifyingReader(blob, layer, counter.add)
            compression = compression_of(reader.peek(4))
            decompressing = _decompressor(compression, reader)
            try:
                with _open_scratch(path) as output:
                    while chunk := decompressing.read(CHUNK_SIZE):
                        uncompressed.update(chunk)
                        size += len(chunk)
                        _write_scratch(output, chunk, path)
            except (zstandard.ZstdError, EOFError, zlib.error, gzip.BadGzipFile) as error:
                # A digest mismatch explains a broken stream better than the decompressor's error.
                reader.drain()
                reader.check(reference)
                raise RegistryError(
                    f"{layer.describe()} of {reference} looks {compression}-compressed by its "
                    f"first bytes but does not decompress ({error}): the image is broken; "
                    "ask its publisher for a fixed one"
                ) from None
            reader.drain()
            reader.check(reference)

        actual = "sha256:" + uncompressed.hexdigest()
        if actual != diff_id:
            raise DigestMismatch(
                f"{layer.describe()} of {reference} decompresses ({compression}) to {actual}, "
                f"but the image config lists diff_id {diff_id}: the image is inconsistent; "
                "the guard does not load it"
            )
        log.debug(
            "layer_converted",
            layer=layer.describe(),
            compression=compression,
            compressed_bytes=layer.size,
            uncompressed_bytes=size,
        )
        return _LayerFile(diff_id, path, size)

    # --- Scratch space ---

    @contextmanager
    def _scratch_folder(self, layers: Sequence[Descriptor]) -> Iterator[Path]:
        """Create a scratch folder after checking free space, and remove it on exit, also after
        an error."""
        try:
            self._state_directory.mkdir(parents=True, exist_ok=True)
            self._remove_leftovers()
            needed = archive.scratch_estimate(layers)
            free = shutil.disk_usage(self._state_directory).free
        except OSError as error:
            raise ConvertError(
                f"cannot use the state directory {self._state_directory} for the converted "
                f"layers: {error}"
            ) from None
        # NOTE: the engine's data root needs about twice the uncompressed size as well (Docker
        # 20.10 unpacks the whole archive to a temporary folder first); that is not checked.
        if free < needed:
            raise ConvertError(
                f"the state directory {self._state_directory} has {_mib(free)} MiB free, but "
                f"converting needs about {_mib(needed)} MiB ({archive.EXPANSION_FACTOR} times "
                "the compressed layers): free some space there"
            )
        folder = Path(tempfile.mkdtemp(prefix=SCRATCH_PREFIX, dir=self._state_directory))
        try:
            yield folder
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def _remove_leftovers(self) -> None:
        for leftover in self._state_directory.glob(f"{SCRATCH_PREFIX}*"):
            if leftover.is_dir():
                log.warning("conversion_leftover_removed", path=str(leftover))
                shutil.rmtree(leftover, ignore_errors=True)

    # --- Engine ---

    @contextmanager
    def _engine_client(self, action: str) -> Iterator[docker.APIClient]:
        with self._engine_errors(action):
            client = docker.APIClient(
                base_url=self._socket, version="auto", timeout=int(self._timeout)
            )
        try:
            yield client
        finally:
            client.close()

    @contextmanager
    def _engine_errors(self, action: str) -> Iterator[None]:
        try:
            yield
        except docker.errors.APIError as error:
            raise EngineError(
                f"the engine at {self._socket} failed to {action}: {_explain(error)}"
            ) from None
        except (docker.errors.DockerException, requests.RequestException, OSError) as error:
            raise EngineUnavailable(
                f"the Docker engine at {self._socket} did not answer ({action}): {error}; "
                "check that dockerd runs and that [engine] socket names its socket"
            ) from None

    def _holds_image(
        self, client: docker.APIClient, image_id: str, diff_ids: Sequence[str]
    ) -> bool:
        with self._engine_errors(f"inspect image {image_id}"):
            try:
                details = client.inspect_image(image_id)
            except docker.errors.NotFound:
                return False
        return _loaded_layers(details) == list(diff_ids)

    def _load(self, client: docker.APIClient, chunks: Iterator[bytes]) -> str:
        """Stream the archive to ``POST /images/load``; return the image ID the engine reports.

        Without ``quiet`` the engine sends progress while it registers each layer, which keeps
        the socket's read timeout from expiring on large layers.
        """
        loaded: list[str] = []
        with self._engine_errors("load the converted image"):
            for message in client.load_image(chunks, quiet=False):
                if "error" in message:
                    detail = (message.get("errorDetail") or {}).get("message") or message["error"]
                    raise EngineError(
                        f"the engine at {self._socket} rejected the converted image: {detail}"
                    )
                text = str(message.get("stream", "")).strip()
                if text.startswith(_LOADED_ID_PREFIX):
                    loaded.append(text.removeprefix(_LOADED_ID_PREFIX))
        if len(loaded) != 1:
            raise EngineError(
                f"the engine at {self._socket} accepted the converted image but reported "
                f"{len(loaded)} loaded image IDs ({', '.join(loaded) or 'none'}), not one: "
                "see the engine's log"
            )
        return loaded[0]

    def _check_loaded(
        self,
        client: docker.APIClient,
        image_id: str,
        config_digest: str,
        diff_ids: Sequence[str],
    ) -> None:
        # The convert route serves engines before 23.0, which all use the classic image store,
        # where the image ID is the config digest.
        if image_id != config_digest:
            raise EngineError(
                f"the engine at {self._socket} loaded the converted image as {image_id}, not "
                f"as its config digest {config_digest}: the engine does not use the classic "
                "image store, which the convert route needs; nothing was tagged"
            )
        with self._engine_errors(f"inspect image {image_id}"):
            details = client.inspect_image(image_id)
        layers = _loaded_layers(details)
        if layers != list(diff_ids):
            raise EngineError(
                f"the engine reports layers {layers} for the converted image {image_id}, not "
                f"the diff_ids {list(diff_ids)} of its config; nothing was tagged"
            )

    def _tag(self, client: docker.APIClient, image_id: str, local: str) -> None:
        repository, _, tag = local.rpartition(":")
        with self._engine_errors(f"tag {image_id} as {local}"):
            client.tag(image_id, repository, tag, force=True)
            details = client.inspect_image(local)
        if details.get("Id") != image_id:
            raise EngineError(
                f"the engine tagged {image_id} as {local}, but {local} now names "
                f"{details.get('Id')}: tag it by hand with `docker tag {image_id} {local}`"
            )


# --- Reading and checking blobs ----------------------------------------------------------------


class _VerifyingReader(io.RawIOBase):
    """Read a blob, counting and hashing its bytes, and refuse more than its declared size."""

    def __init__(
        self,
        source: BinaryIO | io.RawIOBase,
        descriptor: Descriptor,
        on_bytes: Callable[[int], None],
    ) -> None:
        super().__init__()
        self._source = source
        self._descriptor = descriptor
        self._on_bytes = on_bytes
        self._hash = hashlib.sha256()
        self._count = 0
        self._pending = b""

    def readable(self) -> bool:
        return True

    def peek(self, size: int) -> bytes:
        """Return up to ``size`` first bytes, which later reads return again."""
        while len(self._pending) < size:
            chunk = self._read_source(size - len(self._pending))
            if not chunk:
                break
            self._pending += chunk
        return self._pending[:size]

    def readinto(self, buffer: Any) -> int:
        if self._pending:
            data, self._pending = self._pending[: len(buffer)], self._pending[len(buffer) :]
        else:
            data = self._read_source(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def drain(self) -> None:
        """Read the rest of the blob, so that :meth:`check` hashes all of it."""
        while self._read_source(CHUNK_SIZE):
            pass

    def check(self, reference: ImageReference) -> None:
        """Check the bytes read against the descriptor's size and digest.

        Raises:
            RegistryError: when the blob is shorter or longer than the descriptor declares.
            DigestMismatch: when it does not hash to the descriptor's digest.
        """
        what = f"the {self._descriptor.describe()} of {reference}"
        declared = self._descriptor.size
        if self._count < declared:
            raise RegistryError(
                f"{what} ended after {self._count} bytes, but its descriptor declares {declared}: "
                "the blob is truncated; the guard tries again next cycle"
            )
        if self._count > declared:
            raise RegistryError(
                f"{what} is longer than the {declared} bytes its descriptor declares: the "
                "registry sent a different blob; the guard does not use it"
            )
        actual = "sha256:" + self._hash.hexdigest()
        if actual != self._descriptor.digest:
            raise DigestMismatch(
                f"{what} hashes to {actual}, not {self._descriptor.digest}: the registry or a "
                "proxy on the way altered it; the guard does not use it"
            )

    def _read_source(self, size: int) -> bytes:
        # Reading one byte past the declared size is enough to tell that the blob is longer.
        allowed = self._descriptor.size + 1 - self._count
        if allowed <= 0:
            return b""
        data = self._source.read(min(size, allowed)) or b""
        self._count += len(data)
        self._hash.update(data)
        self._on_bytes(len(data))
        return data


def _distinct_layers(
    layers: Sequence[Descriptor], diff_ids: Sequence[str]
) -> list[tuple[Descriptor, str]]:
    """Pair each layer with its diff_id, keeping only the first layer of each diff_id.

    An image may list the same uncompressed layer twice (empty layers often are). The archive
    stores it once and lists it twice, so the later blobs are neither downloaded nor checked.
    """
    first: dict[str, Descriptor] = {}
    for layer, diff_id in zip(layers, diff_ids, strict=True):
        first.setdefault(diff_id, layer)
    return [(layer, diff_id) for diff_id, layer in first.items()]


class _Readable(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...


def _decompressor(compression: str, reader: _VerifyingReader) -> _Readable:
    if compression == "zstd":
        # read_across_frames: a layer may hold several frames, for example zstd:chunked layers.
        return zstandard.ZstdDecompressor().stream_reader(
            cast(IO[bytes], reader), read_size=CHUNK_SIZE, read_across_frames=True
        )
    if compression == "gzip":
        # GzipFile reads every member of a multi-member gzip stream, as engines do.
        return gzip.GzipFile(fileobj=reader, mode="rb")
    return io.BufferedReader(reader, CHUNK_SIZE)


def _decode_config(body: bytes, config: Descriptor) -> dict[str, Any]:
    try:
        document = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise RegistryError(f"the {config.describe()} is not valid JSON: {error}") from None
    if not isinstance(document, dict):
        raise RegistryError(f"the {config.describe()} is not a JSON object")
    return document


@contextmanager
def _open_scratch(path: Path) -> Iterator[BinaryIO]:
    try:
        output = path.open("xb")
    except OSError as error:
        raise ConvertError(f"cannot create the scratch file {path}: {error}") from None
    with output:
        yield output


def _write_scratch(output: BinaryIO, chunk: bytes, path: Path) -> None:
    try:
        output.write(chunk)
    except OSError as error:
        free = shutil.disk_usage(path.parent).free
        raise ConvertError(
            f"writing the uncompressed layer {path} failed ({error}; {_mib(free)} MiB free): "
            "free space in the state directory; the partial files are removed"
        ) from None


# --- The archive stream ------------------------------------------------------------------------


def _archive_members(
    config_digest: str,
    config_bytes: bytes,
    diff_ids: Sequence[str],
    files: dict[str, _LayerFile],
) -> list[tuple[str, int]]:
    members = [(archive.config_path(config_digest), len(config_bytes))]
    members += [(archive.layer_path(item.diff_id), item.size) for item in files.values()]
    manifest = archive.archive_manifest(config_digest, diff_ids)
    return [*members, ("manifest.json", len(manifest))]


def _archive_chunks(
    config_digest: str,
    config_bytes: bytes,
    diff_ids: Sequence[str],
    files: dict[str, _LayerFile],
    counter: _ProgressCounter,
) -> Iterator[bytes]:
    """Yield the docker-archive in chunks, removing each scratch file once it is sent."""
    yield from counter.counted(_member(archive.config_path(config_digest), config_bytes))
    for item in files.values():
        yield from counter.counted(
            [archive.tar_header(archive.layer_path(item.diff_id), item.size)]
        )
        with item.path.open("rb") as layer:
            while chunk := layer.read(CHUNK_SIZE):
                counter.add(len(chunk))
                yield chunk
        item.path.unlink()
        yield from counter.counted([archive.tar_padding(item.size)])
    manifest = archive.archive_manifest(config_digest, diff_ids)
    yield from counter.counted(_member("manifest.json", manifest))
    yield from counter.counted([archive.TAR_TRAILER])


def _member(name: str, content: bytes) -> list[bytes]:
    return [archive.tar_header(name, len(content)), content, archive.tar_padding(len(content))]


class _ProgressCounter:
    """Sum the bytes downloaded and streamed, and pass them to the progress callback."""

    def __init__(self, progress: Progress | None, layers: Sequence[Descriptor]) -> None:
        self._progress = progress
        self._download_total = sum(layer.size for layer in layers)
        self._archive_total = archive.scratch_estimate(layers)
        self._done = 0

    def add(self, count: int) -> None:
        self._done += count
        if self._progress is not None and count:
            self._progress(self._done, self._download_total + self._archive_total)

    def set_archive_size(self, members: Sequence[tuple[str, int]]) -> None:
        self._archive_total = archive.archive_size(members)

    def counted(self, chunks: Sequence[bytes]) -> Iterator[bytes]:
        for chunk in chunks:
            self.add(len(chunk))
            yield chunk


def _loaded_layers(details: dict[str, Any]) -> list[str]:
    return list((details.get("RootFS") or {}).get("Layers") or [])


def _explain(error: docker.errors.APIError) -> str:
    explanation = error.explanation
    if isinstance(explanation, bytes):
        explanation = explanation.decode("utf-8", "replace")
    return str(explanation or error)


def _mib(size: int) -> int:
    return size // (1024 * 1024)
