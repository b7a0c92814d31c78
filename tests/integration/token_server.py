"""A stand-in for a registry's token service, in front of a real Distribution registry.

Public registries put authentication in front of the registry API: ghcr.io responds to every
anonymous request with 401 and ``WWW-Authenticate: Bearer realm="https://ghcr.io/token",...``,
Docker Hub does the same with ``https://auth.docker.io/token``. The Debian ``docker-registry``
package used in the tests runs without authentication, so :class:`AuthProxy` adds it:

* ``GET /token?service=...&scope=...`` issues tokens as the distribution token spec describes:
  anonymously (when allowed), with Basic authentication, or with ``POST`` and
  ``grant_type=refresh_token`` (the OAuth2 form ``docker login`` uses for identity tokens);
* every ``/v2/`` request without a valid token for its repository gets 401 and a Bearer
  challenge; with one, it is forwarded to the upstream registry and the response relayed;
* in ``basic`` mode it asks for Basic authentication instead, as some private registries do;
* with ``tag_page_size`` set it pages tag lists itself, sorted, with ``n``/``last`` queries and
  ``Link: <...>; rel="next"`` headers, because the Distribution 2.8.2 registry from Debian
  ignores ``n`` and returns every tag at once, in no fixed order.

It listens on 127.0.0.1 only and counts what it receives, so that tests can check how many
token requests and registry requests the client sent. Hooks alter responses for failure tests.
It implements only what the tests use and checks no signature: tokens are random strings.
"""

from __future__ import annotations

import base64
import http.client
import json
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Literal
from urllib.parse import parse_qs, urlsplit

BodyFilter = Callable[[str, str, bytes], bytes]
"""Called as ``(method, path, body)`` for each relayed response; returns the body to send."""

_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "transfer-encoding",
        "te",
        "trailer",
        "upgrade",
        "date",
        "server",
        "content-length",
    }
)


@dataclass
class ProxySettings:
    """How the stand-in behaves; tests change fields between requests where needed."""

    username: str | None = None
    password: str | None = None
    identity_token: str | None = None
    allow_anonymous: bool = True
    mode: Literal["bearer", "basic"] = "bearer"
    token_fields: tuple[str, ...] = ("token",)
    expires_in: int | None = 300
    service: str = "stand-in registry, loopback"
    reject_all_tokens: bool = False
    ignore_range: bool = False
    extra_headers: dict[str, str] = field(default_factory=dict)
    body_filter: BodyFilter | None = None
    tag_page_size: int | None = None
    tag_next_link: str | None = None
    """Replaces the computed next link of every tag page, for broken-link tests."""
    redirect_blobs_to: str | None = None
    """``http://HOST:PORT``: respond to authorized blob requests with 307 to the same path there,
    as registries do that serve blobs from a CDN."""


@dataclass
class ProxyCounters:
    """What the stand-in received; ``registry_requests`` lists ``(method, path)`` pairs."""

    token_requests: int = 0
    registry_requests: list[tuple[str, str]] = field(default_factory=list)

    def reset(self) -> None:
        """Forget everything counted so far."""
        self.token_requests = 0
        self.registry_requests.clear()


class AuthProxy:
    """Token service and authenticating proxy for the registry at ``upstream`` (host:port)."""

    def __init__(self, upstream: str, settings: ProxySettings | None = None) -> None:
        self.upstream = upstream
        self.settings = settings or ProxySettings()
        self.counters = ProxyCounters()
        self._tokens: dict[str, str] = {}
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    @property
    def host(self) -> str:
        """``127.0.0.1:PORT``, the registry host clients use."""
        return f"127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> AuthProxy:
        """Serve in a background thread."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def revoke_tokens(self) -> None:
        """Make every token issued so far invalid."""
        with self._lock:
            self._tokens.clear()

    def issue_token(self, scope: str) -> str:
        """Create a token valid for ``scope``."""
        token = secrets.token_urlsafe(24)
        with self._lock:
            self._tokens[token] = scope
        return token

    def token_allows(self, token: str, scope: str) -> bool:
        """Whether ``token`` was issued for ``scope`` and is still valid."""
        if self.settings.reject_all_tokens:
            return False
        with self._lock:
            return self._tokens.get(token) == scope


def _make_handler(proxy: AuthProxy) -> type[BaseHTTPRequestHandler]:
    class Handler(_ProxyHandler):
        pass

    Handler.proxy = proxy
    return Handler


def _repository_of(path: str) -> str | None:
    """Return the repository named in a ``/v2/NAME/{manifests,blobs,tags}/...`` path."""
    parts = urlsplit(path).path.split("/")
    for marker in ("manifests", "blobs", "tags"):
        if marker in parts[3:]:
            return "/".join(parts[2 : parts.index(marker, 3)])
    return None


class _ProxyHandler(BaseHTTPRequestHandler):
    proxy: AuthProxy
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        """Keep test output quiet."""

    # --- Token service ---

    def do_GET(self) -> None:
        """Serve tokens on /token and forward /v2/ requests."""
        if self.path.startswith("/token"):
            self._token_get()
        else:
            self._registry("GET")

    def do_HEAD(self) -> None:
        """Forward HEAD requests."""
        self._registry("HEAD")

    def do_POST(self) -> None:
        """Serve the OAuth2 refresh-token grant on /token."""
        length = int(self.headers.get("Content-Length", "0"))
        form = parse_qs(self.rfile.read(length).decode())
        self.proxy.counters.token_requests += 1
        expected = self.proxy.settings.identity_token
        presented = form.get("refresh_token", [""])[0]
        if form.get("grant_type") != ["refresh_token"] or not expected or presented != expected:
            self._send_json(401, {"errors": [{"code": "UNAUTHORIZED", "message": "bad token"}]})
            return
        self._send_token(form.get("scope", [""])[0])

    def _token_get(self) -> None:
        settings = self.proxy.settings
        self.proxy.counters.token_requests += 1
        query = parse_qs(urlsplit(self.path).query)
        if query.get("service") != [settings.service]:
            self._send_json(400, {"errors": [{"code": "DENIED", "message": "wrong service"}]})
            return
        authorization = self.headers.get("Authorization")
        if authorization is None and not settings.allow_anonymous:
            self._send_json(401, {"errors": [{"code": "UNAUTHORIZED", "message": "login"}]})
            return
        if authorization is not None and authorization != _basic(settings):
            self._send_json(401, {"errors": [{"code": "UNAUTHORIZED", "message": "bad login"}]})
            return
        self._send_token(query.get("scope", [""])[0])

    def _send_token(self, scope: str) -> None:
        settings = self.proxy.settings
        token = self.proxy.issue_token(scope)
        document: dict[str, object] = {name: token for name in settings.token_fields}
        if settings.expires_in is not None:
            document["expires_in"] = settings.expires_in
        self._send_json(200, document)

    # --- Registry proxy ---

    def _registry(self, method: str) -> None:
        self.proxy.counters.registry_requests.append((method, self.path))
        if not self._authorized():
            self._challenge()
            return
        if "/blobs/" in self.path and self.proxy.settings.redirect_blobs_to:
            self.send_response(307)
            self.send_header("Location", self.proxy.settings.redirect_blobs_to + self.path)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if "/tags/list" in self.path and self.proxy.settings.tag_page_size:
            self._tag_page()
            return
        self._forward(method)

    def _tag_page(self) -> None:
        settings = self.proxy.settings
        assert settings.tag_page_size is not None
        split = urlsplit(self.path)
        connection = http.client.HTTPConnection(self.proxy.upstream, timeout=30)
        try:
            connection.request("GET", split.path)
            document = json.loads(connection.getresponse().read())
        finally:
            connection.close()
        query = parse_qs(split.query)
        last = query.get("last", [""])[0]
        size = min(int(query.get("n", [settings.tag_page_size])[0]), settings.tag_page_size)
        remaining = sorted(tag for tag in document["tags"] if tag > last)
        page = remaining[:size]
        headers = {}
        if len(remaining) > size:
            link = settings.tag_next_link or f"{split.path}?n={size}&last={page[-1]}"
            headers["Link"] = f'<{link}>; rel="next"'
        self._send_json(200, {"name": document["name"], "tags": page}, headers)

    def _authorized(self) -> bool:
        settings = self.proxy.settings
        authorization = self.headers.get("Authorization", "")
        if settings.mode == "basic":
            return authorization == _basic(settings)
        repository = _repository_of(self.path)
        scope = f"repository:{repository}:pull"
        token = authorization.removeprefix("Bearer ")
        return authorization.startswith("Bearer ") and self.proxy.token_allows(token, scope)

    def _challenge(self) -> None:
        settings = self.proxy.settings
        if settings.mode == "basic":
            value = 'Basic realm="stand-in registry"'
        else:
            repository = _repository_of(self.path)
            value = (
                f'Bearer realm="http://{self.proxy.host}/token",'
                f'service="{settings.service}"'
                + (f',scope="repository:{repository}:pull"' if repository else "")
            )
        self._send_json(
            401,
            {"errors": [{"code": "UNAUTHORIZED", "message": "authentication required"}]},
            {"WWW-Authenticate": value},
        )

    def _forward(self, method: str) -> None:
        headers = {
            name: value
            for name, value in self.headers.items()
            if name.lower() in ("accept", "range")
            and not (name.lower() == "range" and self.proxy.settings.ignore_range)
        }
        connection = http.client.HTTPConnection(self.proxy.upstream, timeout=30)
        try:
            connection.request(method, self.path, headers=headers)
            upstream = connection.getresponse()
            body = upstream.read()
            status, upstream_headers = upstream.status, upstream.getheaders()
        finally:
            connection.close()
        if method == "GET" and self.proxy.settings.body_filter is not None:
            body = self.proxy.settings.body_filter(method, self.path, body)
        self.send_response(status)
        for name, value in upstream_headers:
            if name.lower() not in _HOP_BY_HOP:
                self.send_header(name, value)
        if method == "HEAD":
            self.send_header("Content-Length", dict(upstream_headers).get("Content-Length", "0"))
        else:
            self.send_header("Content-Length", str(len(body)))
        for name, value in self.proxy.settings.extra_headers.items():
            self.send_header(name, value)
        self.end_headers()
        if method != "HEAD":
            self.wfile.write(body)

    def _send_json(
        self, status: int, document: object, headers: dict[str, str] | None = None
    ) -> None:
        body = json.dumps(document).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)


def _basic(settings: ProxySettings) -> str:
    pair = f"{settings.username}:{settings.password}".encode()
    return "Basic " + base64.b64encode(pair).decode()
