"""A registry that drips its answer is cut off after the client's timeout in all, not per read.

The server here is a stand-in for a slow or hostile registry: it answers the manifest request
at once with its headers, then sends one byte of the body every 0.2 s.
"""

from __future__ import annotations

import http.server
import threading
import time
from collections.abc import Iterator

import pytest

from tuwunel_guard.adapters.registry import RegistryClient
from tuwunel_guard.core.reference import ImageReference
from tuwunel_guard.errors import RegistryUnavailable

BODY = b'{"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json"}' * 10


class _Drip(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/vnd.oci.image.manifest.v1+json")
        self.send_header("Content-Length", str(len(BODY)))
        self.end_headers()
        for byte in BODY:
            try:
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
            except OSError:
                return
            time.sleep(0.2)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def drip_registry() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Drip)
    server.daemon_threads = True
    server.block_on_close = False
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_dripping_manifest_is_cut_off(drip_registry: str) -> None:
    """With a 2 s timeout the read ends after about 2 s with a clear, temporary error."""
    client = RegistryClient(insecure_registries=[drip_registry], timeout=2.0)
    reference = ImageReference.parse(f"{drip_registry}/matrix-construct/tuwunel", "latest")
    began = time.monotonic()
    try:
        with pytest.raises(RegistryUnavailable, match="not read within 2s"):
            client.get_manifest(reference, "latest")
    finally:
        client.close()
    assert time.monotonic() - began < 6
