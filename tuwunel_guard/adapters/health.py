"""Health probes over HTTP: does a URL answer, and as which homeserver?

A URL answers *as Tuwunel* when ``/_tuwunel/server_version`` returns ``{"name": "Tuwunel"}`` or
``/_matrix/federation/v1/version`` returns ``{"server": {"name": "Tuwunel"}}``; the same holds
for Synapse with its own name, and Synapse's ``/health`` answers the text ``OK``. Any other path
counts when it answers with status 200.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

import requests

from tuwunel_guard.core.decision import Side

_TUWUNEL_VERSION_PATH = "/_tuwunel/server_version"
_FEDERATION_VERSION_PATH = "/_matrix/federation/v1/version"
_SYNAPSE_HEALTH_PATH = "/health"
_MAX_BODY = 65536


@dataclass(frozen=True)
class HealthAnswer:
    """The result of one request to a health URL."""

    url: str
    answered: bool
    server_name: str | None
    detail: str

    def serves(self, side: Side) -> bool:
        """Tell whether the response shows ``side`` serving."""
        if not self.answered:
            return False
        return self.server_name is None or self.server_name.lower() == side.value


def display_url(url: str) -> str:
    """Return ``url`` without user information and query, which may carry secrets, for logs."""
    parts = urlsplit(url)
    netloc = parts.netloc.rpartition("@")[2]
    query = "..." if parts.query else ""
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))


def probe(url: str, timeout: float) -> HealthAnswer:
    """Request ``url`` once and classify the answer; never raises for network errors."""
    try:
        response = requests.get(url, timeout=timeout, allow_redirects=False, stream=True)
        body = response.raw.read(_MAX_BODY, decode_content=True)
        response.close()
    except (requests.RequestException, OSError) as error:
        # requests puts the URL, query included, into its messages: keep only the reason.
        reason = type(error).__name__
        if isinstance(error, requests.ConnectionError) and "refused" in str(error).lower():
            reason = "connection refused"
        elif isinstance(error, requests.Timeout):
            reason = f"no answer within {timeout:.0f}s"
        return HealthAnswer(url, answered=False, server_name=None, detail=reason)

    if response.status_code != 200:
        return HealthAnswer(url, False, None, f"status {response.status_code}")

    return _classify(url, body)


def _classify(url: str, body: bytes) -> HealthAnswer:
    path = urlsplit(url).path.rstrip("/")
    if path.endswith(_SYNAPSE_HEALTH_PATH):
        text = body.decode("utf-8", "replace").strip()
        answered = text == "OK"
        return HealthAnswer(url, answered, "Synapse" if answered else None, f"body {text[:40]!r}")

    if path.endswith(_TUWUNEL_VERSION_PATH):
        name = _json_field(body, ("name",))
        return HealthAnswer(url, name is not None, name, f"name {name!r}")

    if path.endswith(_FEDERATION_VERSION_PATH):
        name = _json_field(body, ("server", "name"))
        return HealthAnswer(url, name is not None, name, f"server.name {name!r}")

    return HealthAnswer(url, answered=True, server_name=None, detail="status 200")


def _json_field(body: bytes, keys: tuple[str, ...]) -> str | None:
    try:
        value = json.loads(body)
    except ValueError:
        return None
    for key in keys:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value if isinstance(value, str) else None
