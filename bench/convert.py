"""Benchmark the convert route against skopeo's two-step copy, on a real Docker 20.10 engine.

Builds a two-layer image: the stand-in layer (busybox, so that a container can run) and a data
layer of at least ``--size-mib`` MiB. The data layer is the host's own ``/usr/lib``, ``/usr/bin``
and ``/usr/share`` files: ELF binaries, shared libraries, Python code and data, as in a
distribution-based image. The script compresses the data layer with the zstd command at
level 11, the level of Tuwunel's published images, publishes the image as OCI with zstd layers
to a loopback registry, and then gets it onto a fresh 20.10 engine by each route in turn:

* convert: ``ConvertAcquirer.acquire`` in a child process;
* skopeo: ``skopeo copy --dest-decompress docker://... dir:D``, then
  ``skopeo copy dir:D docker-daemon:NAME:TAG``.

For each it records the wall time, the peak RSS of the route's processes (their VmHWM, see
:func:`run_child`), the bytes those processes wrote (``ru_oublock``, which counts the
bytes they dirtied in the page cache, also for files deleted before writeback) and the bytes the
engine's process tree wrote (``write_bytes`` of dockerd's ``/proc/PID/io``, which includes its
reaped children). Between the routes the image is removed from the engine. The registry's blobs
are in the page cache for both routes, because they were written just before.

Run as root after ``testbed/install.sh``, from the repository root:

    sudo .venv/bin/python bench/convert.py [--size-mib 1024] [--json FILE]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import docker
import requests
import zstandard

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from testbed import images, paths
from testbed.engine import DockerEngine
from testbed.registry import Registry
from tuwunel_guard.adapters.convert import ConvertAcquirer
from tuwunel_guard.adapters.registry import RegistryClient, probe_image
from tuwunel_guard.core.image import Platform
from tuwunel_guard.core.reference import ImageReference

MIB = 1024 * 1024
DATA_FOLDERS = (Path("/usr/lib"), Path("/usr/bin"), Path("/usr/share"))
ZSTD_LEVEL = 11
REPOSITORY = "bench/tuwunel"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
HOST_ARCHITECTURE = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), "amd64")


@dataclass
class Measurement:
    """Cost of one route: seconds, peak RSS and bytes written."""

    route: str
    seconds: float
    peak_rss_mib: float
    tool_written_mib: float
    engine_written_mib: float
    image_id: str


@dataclass
class ChildUsage:
    """Resource use of one finished child process."""

    seconds: float
    max_rss_kib: int
    written_bytes: int
    stdout: str


# --- Building and publishing the image ---------------------------------------------------------


def sha256_file(path: Path) -> str:
    """Return the sha256 digest string of a file, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(MIB):
            digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def data_files(target: int) -> Iterator[Path]:
    """Yield regular files from DATA_FOLDERS, in sorted order, until they add up to ``target``."""
    total = 0
    for folder in DATA_FOLDERS:
        for root, folders, names in os.walk(folder):
            folders.sort()
            for name in sorted(names):
                path = Path(root, name)
                if path.is_symlink() or not path.is_file():
                    continue
                try:
                    size = path.stat().st_size
                except OSError:
                    continue
                yield path
                total += size
                if total >= target:
                    return
    raise SystemExit(f"{', '.join(map(str, DATA_FOLDERS))} hold less than {target} bytes")


def build_data_layer(destination: Path, target: int) -> None:
    """Write an uncompressed layer tar of at least ``target`` bytes of host files."""
    with tarfile.open(destination, "w", format=tarfile.PAX_FORMAT) as layer:
        for path in data_files(target):
            try:
                layer.add(str(path), arcname=f"data{path}", recursive=False)
            except OSError:
                continue


def upload_blob(registry: Registry, path: Path) -> tuple[str, int]:
    """Upload a file as a blob with a streamed PUT; return its digest and size."""
    digest = sha256_file(path)
    base = f"{registry.url}/v2/{REPOSITORY}/blobs/uploads/"
    started = requests.post(base, timeout=30)
    assert started.status_code == 202, started.text
    location = requests.compat.urljoin(base, started.headers["Location"])
    separator = "&" if "?" in location else "?"
    with path.open("rb") as file:
        finished = requests.put(
            f"{location}{separator}digest={digest}",
            data=file,
            headers={"Content-Type": "application/octet-stream"},
            timeout=600,
        )
    assert finished.status_code == 201, finished.text
    return digest, path.stat().st_size


def publish_image(registry: Registry, work: Path, size: int) -> dict[str, Any]:
    """Build, compress and push the benchmark image; return its facts for the report."""
    standin = images.build_standin_archive("tuwunel", work / "standin.tar")
    with tarfile.open(standin.path) as archive:
        entry = json.loads(_read_member(archive, "manifest.json"))[0]
        config = json.loads(_read_member(archive, entry["Config"]))
        standin_layer = _read_member(archive, entry["Layers"][0])

    started = time.monotonic()
    data_tar = work / "data.tar"
    build_data_layer(data_tar, size)
    data_diff_id = sha256_file(data_tar)
    data_zst = work / "data.tar.zst"
    subprocess.run(
        [str(paths.ZSTD), "-q", f"-{ZSTD_LEVEL}", "-T2", "-o", str(data_zst), str(data_tar)],
        check=True,
    )
    standin_zst = work / "standin.tar.zst"
    standin_zst.write_bytes(zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(standin_layer))
    small_config = work / "small-config.json"
    small_config.write_bytes(json.dumps(config).encode())
    config["rootfs"]["diff_ids"].append(data_diff_id)
    config_path = work / "config.json"
    config_path.write_bytes(json.dumps(config).encode())
    built = time.monotonic() - started

    standin_blob = upload_blob(registry, standin_zst)
    push_manifest(registry, "small", upload_blob(registry, small_config), [standin_blob])
    data_blob = upload_blob(registry, data_zst)
    config_digest, config_size = upload_blob(registry, config_path)
    push_manifest(registry, "latest", (config_digest, config_size), [standin_blob, data_blob])
    facts = {
        "uncompressed_mib": round(data_tar.stat().st_size / MIB, 1),
        "compressed_mib": round(data_zst.stat().st_size / MIB, 1),
        "config_digest": config_digest,
        "token": standin.token,
        "build_seconds": round(built, 1),
    }
    data_tar.unlink()
    return facts


def push_manifest(
    registry: Registry, tag: str, config: tuple[str, int], layers: list[tuple[str, int]]
) -> None:
    """Push an OCI manifest of zstd layers under ``tag``."""
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": config[0], "size": config[1]},
        "layers": [
            {"mediaType": OCI_ZSTD, "digest": digest, "size": size} for digest, size in layers
        ],
    }
    response = requests.put(
        f"{registry.url}/v2/{REPOSITORY}/manifests/{tag}",
        data=json.dumps(manifest).encode(),
        headers={"Content-Type": OCI_MANIFEST},
        timeout=30,
    )
    assert response.status_code == 201, response.text


def _read_member(archive: tarfile.TarFile, name: str) -> bytes:
    file = archive.extractfile(name)
    assert file is not None, name
    return file.read()


# --- Measuring ---------------------------------------------------------------------------------


def run_child(command: list[str], environment: dict[str, str] | None = None) -> ChildUsage:
    """Run ``command`` and return its wall time, peak RSS and bytes written.

    The peak RSS is the child's VmHWM, read every 10 ms while it runs, because ``ru_maxrss``
    from ``wait4`` starts at the RSS of the forking parent (Linux keeps the high-water mark of
    the address space that ``exec`` replaces). VmHWM only grows, so the last reading misses at
    most the last 10 ms. The bytes written come from ``ru_oublock``, which starts at zero.
    """
    started = time.monotonic()
    peak_kib = 0
    with tempfile.TemporaryFile() as output, tempfile.TemporaryFile() as errors:
        process = subprocess.Popen(command, stdout=output, stderr=errors, env=environment)
        while True:
            peak_kib = max(peak_kib, _vm_hwm_kib(process.pid))
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                break
            time.sleep(0.01)
        seconds = time.monotonic() - started
        process.returncode = os.waitstatus_to_exitcode(status)
        output.seek(0)
        errors.seek(0)
        stdout, stderr = output.read().decode(), errors.read().decode()
    if process.returncode != 0:
        raise SystemExit(f"{command[0]} failed with status {process.returncode}: {stderr[-2000:]}")
    return ChildUsage(seconds, peak_kib, usage.ru_oublock * 512, stdout)


def _vm_hwm_kib(pid: int) -> int:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def engine_written(engine: DockerEngine) -> int:
    """Return the bytes that dockerd and its reaped children wrote so far."""
    assert engine.process is not None
    for line in Path(f"/proc/{engine.process.pid}/io").read_text().splitlines():
        if line.startswith("write_bytes:"):
            return int(line.split()[1])
    raise SystemExit("no write_bytes in dockerd's /proc/PID/io")


def image_id_of(engine: DockerEngine, reference: str) -> str:
    """Return the ID of ``reference`` on the engine."""
    client = docker.APIClient(base_url=engine.base_url, version="auto")
    try:
        return str(client.inspect_image(reference)["Id"])
    finally:
        client.close()


def remove_images(engine: DockerEngine) -> None:
    """Remove every image from the engine, so that the next route starts from nothing."""
    client = docker.APIClient(base_url=engine.base_url, version="auto")
    try:
        for image in client.images(all=True):
            client.remove_image(image["Id"], force=True)
    finally:
        client.close()


def measure_convert(
    registry: Registry, engine: DockerEngine, work: Path, label: str, tag: str = "latest"
) -> Measurement:
    """Run the convert route in a child process and measure it."""
    state = work / f"state-{label}"
    before = engine_written(engine)
    usage = run_child(
        [
            sys.executable,
            __file__,
            "--convert-child",
            json.dumps(
                {
                    "registry": registry.host,
                    "tag": tag,
                    "socket": engine.base_url,
                    "state": str(state),
                }
            ),
        ]
    )
    result = json.loads(usage.stdout.strip().splitlines()[-1])
    return Measurement(
        route=label,
        seconds=round(usage.seconds, 1),
        peak_rss_mib=round(usage.max_rss_kib / 1024, 1),
        tool_written_mib=round(usage.written_bytes / MIB, 1),
        engine_written_mib=round((engine_written(engine) - before) / MIB, 1),
        image_id=image_id_of(engine, result["local_reference"]),
    )


def measure_skopeo(registry: Registry, engine: DockerEngine, work: Path) -> list[Measurement]:
    """Run skopeo's two steps and measure each, and both together."""
    policy = work / "policy.json"
    policy.write_text('{"default": [{"type": "insecureAcceptAnything"}]}\n')
    tmp = work / "skopeo-tmp"
    tmp.mkdir()
    environment = {"PATH": "/usr/bin:/bin", "HOME": str(work), "TMPDIR": str(tmp)}
    folder = work / "skopeo-dir"
    skopeo = [str(paths.SKOPEO), "--policy", str(policy), "copy", "--quiet"]

    before_fetch = engine_written(engine)
    fetch = run_child(
        [
            *skopeo,
            "--src-tls-verify=false",
            "--dest-decompress",
            f"docker://{registry.host}/{REPOSITORY}:latest",
            f"dir:{folder}",
        ],
        environment,
    )
    before_load = engine_written(engine)
    load = run_child(
        [
            *skopeo,
            "--dest-daemon-host",
            engine.base_url,
            f"dir:{folder}",
            "docker-daemon:bench/skopeo:latest",
        ],
        environment,
    )
    after_load = engine_written(engine)
    image_id = image_id_of(engine, "bench/skopeo:latest")
    shutil.rmtree(folder)

    steps = [
        ("skopeo step 1 (to dir:)", fetch, before_load - before_fetch),
        ("skopeo step 2 (to the engine)", load, after_load - before_load),
    ]
    measured = [
        Measurement(
            route=name,
            seconds=round(usage.seconds, 1),
            peak_rss_mib=round(usage.max_rss_kib / 1024, 1),
            tool_written_mib=round(usage.written_bytes / MIB, 1),
            engine_written_mib=round(engine_part / MIB, 1),
            image_id=image_id,
        )
        for name, usage, engine_part in steps
    ]
    total = Measurement(
        route="skopeo, both steps",
        seconds=round(fetch.seconds + load.seconds, 1),
        peak_rss_mib=round(max(fetch.max_rss_kib, load.max_rss_kib) / 1024, 1),
        tool_written_mib=round((fetch.written_bytes + load.written_bytes) / MIB, 1),
        engine_written_mib=round((after_load - before_fetch) / MIB, 1),
        image_id=image_id,
    )
    return [*measured, total]


def convert_child(arguments: dict[str, str]) -> None:
    """Convert the benchmark image; print the local reference as JSON. Runs in the child."""
    host = Platform("linux", HOST_ARCHITECTURE)
    reference = ImageReference.parse(f"{arguments['registry']}/{REPOSITORY}", arguments["tag"])
    with RegistryClient(insecure_registries=[arguments["registry"]]) as registry:
        facts = probe_image(registry, reference, host, None)
        acquirer = ConvertAcquirer(
            registry,
            engine_socket=arguments["socket"],
            state_directory=Path(arguments["state"]),
            platform=host,
        )
        acquired = acquirer.acquire(reference, facts)
    print(json.dumps({"local_reference": acquired.local_reference, "image_id": acquired.image_id}))


# --- Main --------------------------------------------------------------------------------------


def run(size_mib: int) -> dict[str, Any]:
    """Run the whole benchmark and return its results."""
    paths.require_installed()
    work = Path(tempfile.mkdtemp(prefix="tgbench", dir="/var/tmp"))
    registry = Registry(work / "registry")
    engine = DockerEngine("20.10")
    try:
        registry.start()
        engine.start()
        image = publish_image(registry, work, size_mib * MIB)
        small = measure_convert(registry, engine, work, "convert, stand-in layer only", "small")
        remove_images(engine)
        results = [measure_convert(registry, engine, work, "convert")]
        remove_images(engine)
        results += measure_skopeo(registry, engine, work)
        for result in results:
            assert result.image_id == image["config_digest"], result
        results.insert(0, small)
    finally:
        engine.remove()
        registry.remove()
        shutil.rmtree(work, ignore_errors=True)
    return {
        "machine": (
            f"{os.cpu_count()} cores, {platform.machine()}, Python {platform.python_version()}"
        ),
        "image": image,
        "results": [asdict(result) for result in results],
    }


def print_table(report: dict[str, Any]) -> None:
    """Print the results as a Markdown table."""
    image = report["image"]
    print(
        f"data layer: {image['uncompressed_mib']} MiB uncompressed, "
        f"{image['compressed_mib']} MiB as zstd level {ZSTD_LEVEL}; {report['machine']}"
    )
    print("| route | wall s | peak RSS MiB | tool wrote MiB | engine wrote MiB |")
    print("|---|---|---|---|---|")
    for result in report["results"]:
        print(
            f"| {result['route']} | {result['seconds']} | {result['peak_rss_mib']} | "
            f"{result['tool_written_mib']} | {result['engine_written_mib']} |"
        )


def main() -> None:
    """Parse the command line and run the benchmark or, with --convert-child, one conversion."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024, help="minimum data layer size, MiB")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    parser.add_argument("--convert-child", help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.convert_child:
        convert_child(json.loads(arguments.convert_child))
        return
    report = run(arguments.size_mib)
    print_table(report)
    if arguments.json:
        arguments.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
