"""Read manifests, blob heads and tag lists from an OCI registry (distribution API v2).

Transport rules:

* HTTPS with certificate verification for every host, plain HTTP only for hosts listed in
  ``insecure_registries`` (the same meaning as the Docker daemon's setting);
* redirects are followed by hand so that each hop obeys that rule, and the ``Authorization``
  header is dropped when a redirect leaves the host (blob downloads often go to a CDN);
* authentication responds to the registry's challenge: ``Bearer`` (the distribution token spec,
  anonymous, Basic-authenticated or with an OAuth2 refresh token) or ``Basic``. Tokens are cached
  per registry host and scope until ``expires_in`` (60 s when absent or lower, as the token spec
  and Docker's client do) runs out. A request that still gets 401 with a fresh token fails at
  once: repeated failed logins make Docker Hub return ``toomanyrequests``.

Quota: on Docker Hub a manifest ``GET`` counts as a pull, a ``HEAD``, a blob download and a token
request do not. :func:`probe_image` therefore sends only a ``HEAD`` while the tag's digest stays
the same.

Every ``requests`` exception is translated here: connection failures and timeouts into
:class:`RegistryUnavailable`, error statuses and invalid content into :class:`RegistryError`.
Messages name the URL (without user information) and what to do; they never contain a secret.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode, urljoin, urlsplit, urlunsplit

import requests
import structlog

from tuwunel_guard.adapters.credentials import CredentialStore, RegistryCredential
from tuwunel_guard.core.image import ImageFacts, Platform
from tuwunel_guard.core.platforms import (
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    INDEX_MEDIA_TYPES,
    MANIFEST_MEDIA_TYPES,
    OCI_INDEX,
    OCI_MANIFEST,
    IndexEntry,
    compression_of,
    config_digest,
    find_requirements,
    parse_layers,
    resolve,
    variant_rank,
)
from tuwunel_guard.core.reference import ImageReference, validate_digest, validate_tag
from tuwunel_guard.errors import (
    DigestMismatch,
    GuardError,
    InvalidReference,
    RegistryError,
    RegistryUnavailable,
)

log = structlog.get_logger(__name__)

ACCEPTED_MANIFEST_TYPES = (OCI_INDEX, OCI_MANIFEST, DOCKER_MANIFEST_LIST, DOCKER_MANIFEST)
ACCEPT_HEADER = ", ".join(ACCEPTED_MANIFEST_TYPES)
SCHEMA1_TYPES = frozenset(
    {
        "application/vnd.docker.distribution.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.v1+prettyjws",
    }
)
# The distribution registry rejects manifests above 4 MiB; a larger body is not a manifest.
MAX_MANIFEST_BYTES = 4 * 1024 * 1024
# Tokens without expires_in, or with less, live 60 s (distribution token spec).
MIN_TOKEN_LIFETIME = 60.0
# A cached token is dropped this many seconds before it expires, so that it cannot expire in
# flight.
TOKEN_EXPIRY_MARGIN = 5.0
MAX_REDIRECTS = 5
MAX_TAG_PAGES = 10_000
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})

_TCHARS = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_CHALLENGE_PARAM = re.compile(rf'\s*({_TCHARS})\s*=\s*("(?:[^"\\]|\\.)*"|{_TCHARS})\s*')
_CHALLENGE_SCHEME = re.compile(rf"\s*({_TCHARS})\s*")
_QUOTED_ESCAPE = re.compile(r"\\(.)")
_TOKEN68 = re.compile(r"([A-Za-z0-9._~+/-]+=*)\s*(?=,|$)")


# --- Results -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ManifestHead:
    """Result of a ``HEAD`` request on a manifest.

    ``digest`` is ``None`` when the registry sent no ``Docker-Content-Digest`` header.
    ``ratelimit_remaining`` is the pull count left in the current window, from Docker Hub's
    ``ratelimit-remaining`` header (for example ``76;w=21600``), or ``None`` without it.
    """

    digest: str | None
    media_type: str
    ratelimit_remaining: int | None = None


@dataclass(frozen=True)
class Manifest:
    """A manifest or index fetched with ``GET``, its body verified against ``digest``."""

    digest: str
    media_type: str
    document: dict[str, Any]
    size: int


@dataclass(frozen=True)
class Challenge:
    """One challenge of a ``WWW-Authenticate`` header; ``scheme`` is lowercased."""

    scheme: str
    params: dict[str, str]


# --- WWW-Authenticate --------------------------------------------------------------------------


def parse_www_authenticate(header: str) -> list[Challenge]:
    """Parse a ``WWW-Authenticate`` header into its challenges (RFC 9110 section 11.6.1).

    Quoted values may contain commas and backslash escapes. Parameter names are lowercased.
    A challenge in the token68 form (``Negotiate abc==``) stores its value as ``token68``.
    """
    challenges: list[Challenge] = []
    position = 0
    while position < len(header):
        if header[position] in ", \t":
            position += 1
            continue
        param = _CHALLENGE_PARAM.match(header, position)
        token68 = _TOKEN68.match(header, position)
        if param is None and token68 is not None and challenges and not challenges[-1].params:
            challenges[-1].params["token68"] = token68.group(1)
            position = token68.end()
            continue
        if param is not None and challenges:
            name, value = param.groups()
            if value.startswith('"'):
                value = _QUOTED_ESCAPE.sub(r"\1", value[1:-1])
            challenges[-1].params[name.lower()] = value
            position = param.end()
            continue
        scheme = _CHALLENGE_SCHEME.match(header, position)
        if scheme is None:
            # A character that fits no rule: skip it rather than fail on a header from the wild.
            position += 1
            continue
        challenges.append(Challenge(scheme.group(1).lower(), {}))
        position = scheme.end()
    return challenges


def _parse_ratelimit(value: str | None) -> int | None:
    if not value:
        return None
    count = value.split(";", 1)[0].strip()
    return int(count) if count.isdigit() else None


def redact_url(url: str) -> str:
    """Drop user information (``user:password@``) from ``url`` for messages."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


def _media_type(response: requests.Response) -> str:
    return response.headers.get("Content-Type", "").split(";", 1)[0].strip().lower()


def _registry_error_codes(response: requests.Response) -> str:
    try:
        errors = response.json().get("errors", [])
        codes = [f"{item.get('code')}: {item.get('message')}" for item in errors]
    except (ValueError, AttributeError, TypeError):
        return ""
    return f" ({'; '.join(codes)})" if codes else ""


def _status_error(response: requests.Response, url: str, what: str) -> GuardError:
    status = response.status_code
    detail = "" if response.request.method == "HEAD" else _registry_error_codes(response)
    where = redact_url(url)
    if status == 404:
        return RegistryError(
            f"{what} not found at {where} (HTTP 404{detail}): check the image name and tag"
        )
    if status == 429:
        remaining = response.headers.get("ratelimit-remaining", "unknown")
        return RegistryError(
            f"the registry rate-limited {where} (HTTP 429{detail}, ratelimit-remaining "
            f"{remaining}): the guard tries again next cycle; log in to raise the limit"
        )
    if status in (502, 503, 504):
        return RegistryUnavailable(
            f"the registry is unavailable at {where} (HTTP {status}): the guard tries again "
            "next cycle"
        )
    return RegistryError(f"{what} request to {where} failed with HTTP {status}{detail}")


def _digest_from_header(response: requests.Response, url: str) -> str | None:
    value = response.headers.get("Docker-Content-Digest")
    if value is None:
        return None
    try:
        return validate_digest(value.strip())
    except InvalidReference as error:
        raise RegistryError(
            f"invalid Docker-Content-Digest header from {redact_url(url)}: {error}"
        ) from None


@dataclass
class _CachedAuthorization:
    header: str
    expires_at: float | None


# --- Client ------------------------------------------------------------------------------------


class RegistryClient:
    """Read-only client for the registry API, with the authentication and checks above.

    ``timeout`` (seconds) applies to connecting and to each read. ``clock`` returns monotonic
    seconds and exists so that tests can expire tokens without sleeping.
    """

    def __init__(
        self,
        *,
        insecure_registries: Iterable[str] = (),
        credentials: CredentialStore | None = None,
        timeout: float = 30.0,
        user_agent: str = "tuwunel-guard",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._insecure = frozenset(host.strip().lower() for host in insecure_registries)
        self._credentials = credentials or CredentialStore()
        self._timeout = timeout
        self._clock = clock
        self._user_agent = user_agent
        self._session = requests.Session()
        self._session.headers["User-Agent"] = user_agent
        self._session.trust_env = False
        self._authorizations: dict[tuple[str, str], _CachedAuthorization] = {}

    def close(self) -> None:
        """Close the pooled connections."""
        self._session.close()

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # --- API methods ---

    def head_manifest(self, ref: ImageReference) -> ManifestHead:
        """Send ``HEAD`` for the tag's manifest; on Docker Hub this does not count as a pull.

        Raises:
            RegistryUnavailable: when the registry cannot be reached or times out.
            RegistryError: on an error status or a media type the guard does not accept.
        """
        url = self._manifest_url(ref, ref.tag)
        response = self._send("HEAD", url, ref, headers={"Accept": ACCEPT_HEADER})
        with response:
            if response.status_code != 200:
                raise _status_error(response, url, "manifest")
            media_type = _media_type(response)
            self._check_manifest_type(media_type, url)
            head = ManifestHead(
                digest=_digest_from_header(response, url),
                media_type=media_type,
                ratelimit_remaining=_parse_ratelimit(response.headers.get("ratelimit-remaining")),
            )
        log.debug(
            "registry_manifest_headed",
            url=url,
            digest=head.digest,
            ratelimit_remaining=head.ratelimit_remaining,
        )
        return head

    def get_manifest(self, ref: ImageReference, digest_or_tag: str) -> Manifest:
        """``GET`` a manifest or index by digest or tag and verify its body.

        The body's sha256 must equal the requested digest (when fetched by digest) and the
        ``Docker-Content-Digest`` header (when sent).

        Raises:
            InvalidReference: when ``digest_or_tag`` is neither a valid tag nor a sha256 digest.
            DigestMismatch: when the body does not hash to the expected digest.
            RegistryUnavailable: when the registry cannot be reached or times out.
            RegistryError: on an error status, a body above 4 MiB, invalid JSON or a media
                type the guard does not accept.
        """
        by_digest = ":" in digest_or_tag
        if by_digest:
            validate_digest(digest_or_tag)
        else:
            validate_tag(digest_or_tag)
        url = self._manifest_url(ref, digest_or_tag)
        response = self._send("GET", url, ref, headers={"Accept": ACCEPT_HEADER}, stream=True)
        with response:
            if response.status_code != 200:
                raise _status_error(response, url, "manifest")
            body = _read_limited(response, MAX_MANIFEST_BYTES, url, self._timeout)
            header_digest = _digest_from_header(response, url)
            content_type = _media_type(response)
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        for expected in (digest_or_tag if by_digest else None, header_digest):
            if expected is not None and expected != digest:
                raise DigestMismatch(
                    f"the manifest from {redact_url(url)} hashes to {digest}, not {expected}: "
                    "the registry or a proxy on the way altered it; the guard does not use it"
                )
        document = _decode_json_object(body, url)
        media_type = self._document_media_type(content_type, document, url)
        return Manifest(digest=digest, media_type=media_type, document=document, size=len(body))

    def blob_first_bytes(self, ref: ImageReference, digest: str, n: int = 4) -> bytes:
        """Read the first ``n`` bytes of a blob with ``Range: bytes=0-(n-1)``.

        A registry that ignores the range and returns 200 is read for ``n`` bytes only, then
        the connection is closed. An empty blob (HTTP 416) gives ``b""``.

        Raises:
            InvalidReference: when ``digest`` is not a valid sha256 digest.
            RegistryUnavailable: when the registry cannot be reached or times out.
            RegistryError: on an error status or a range that does not start at byte 0.
        """
        if n < 1:
            raise ValueError(f"n must be at least 1, got {n}")
        url = f"{self._base(ref)}/blobs/{validate_digest(digest)}"
        headers = {"Range": f"bytes=0-{n - 1}", "Accept-Encoding": "identity"}
        response = self._send("GET", url, ref, headers=headers, stream=True)
        with response:
            if response.status_code == 416:
                return b""
            if response.status_code not in (200, 206):
                raise _status_error(response, url, "blob")
            content_range = response.headers.get("Content-Range", "bytes 0-")
            if response.status_code == 206 and not content_range.startswith("bytes 0-"):
                raise RegistryError(
                    f"blob request to {redact_url(url)} returned range {content_range!r}, "
                    "not one that starts at byte 0"
                )
            return _read_raw(response, n, url, self._timeout)

    @contextmanager
    def open_blob(self, ref: ImageReference, digest: str) -> Iterator[BlobReader]:
        """Open a blob for streaming and yield a reader of its bytes as the registry stores them.

        The caller verifies what it reads: this method checks only the status, so a blob that is
        shorter, longer or other than ``digest`` reads without an error here. The connection
        closes when the context exits.

        Raises:
            InvalidReference: when ``digest`` is not a valid sha256 digest.
            RegistryUnavailable: when the registry cannot be reached, times out, or the
                connection breaks during a read.
            RegistryError: on an error status.
        """
        url = f"{self._base(ref)}/blobs/{validate_digest(digest)}"
        headers = {"Accept-Encoding": "identity"}
        response = self._send("GET", url, ref, headers=headers, stream=True)
        with response:
            if response.status_code != 200:
                raise _status_error(response, url, "blob")
            yield BlobReader(response, url)

    def list_tags(self, ref: ImageReference, page_size: int | None = None) -> list[str]:
        """List every tag of the repository, following each ``Link: <...>; rel="next"`` page.

        ``page_size`` is sent as ``n``; registries may cap it. Tags keep the registry's order.

        Raises:
            RegistryUnavailable: when the registry cannot be reached or times out.
            RegistryError: on an error status, invalid JSON, or a next link that leaves the
                registry or repeats a page.
        """
        url = f"{self._base(ref)}/tags/list" + (f"?n={page_size}" if page_size else "")
        tags: list[str] = []
        seen: set[str] = set()
        while url:
            if url in seen or len(seen) >= MAX_TAG_PAGES:
                raise RegistryError(f"the tag list at {redact_url(url)} links back to itself")
            seen.add(url)
            page_tags, url = self._tag_page(ref, url)
            tags.extend(page_tags)
        return tags

    # --- Helpers for the API methods ---

    def _base(self, ref: ImageReference) -> str:
        return ref.api_base(insecure=self._is_insecure(ref.registry_host))

    def _manifest_url(self, ref: ImageReference, digest_or_tag: str) -> str:
        return f"{self._base(ref)}/manifests/{digest_or_tag}"

    def _is_insecure(self, host: str) -> bool:
        return host.lower() in self._insecure

    def _check_manifest_type(self, media_type: str, url: str) -> None:
        if media_type in ACCEPTED_MANIFEST_TYPES:
            return
        hint = (
            " (Docker schema 1, which the guard does not read)"
            if media_type in SCHEMA1_TYPES
            else ""
        )
        raise RegistryError(
            f"the registry returned media type {media_type or 'none'!r}{hint} for "
            f"{redact_url(url)}; expected one of {', '.join(ACCEPTED_MANIFEST_TYPES)}"
        )

    def _document_media_type(self, content_type: str, document: Mapping[str, Any], url: str) -> str:
        declared = document.get("mediaType")
        if content_type in ACCEPTED_MANIFEST_TYPES:
            if (
                isinstance(declared, str)
                and declared in ACCEPTED_MANIFEST_TYPES
                and declared != content_type
            ):
                raise RegistryError(
                    f"the manifest at {redact_url(url)} was sent as {content_type} but its "
                    f"mediaType field says {declared}"
                )
            return content_type
        # Some registries send application/json; then the document's own field decides.
        media_type = declared if isinstance(declared, str) else content_type
        self._check_manifest_type(media_type, url)
        return media_type

    def _tag_page(self, ref: ImageReference, url: str) -> tuple[list[str], str]:
        response = self._send("GET", url, ref, headers={"Accept": "application/json"})
        with response:
            if response.status_code != 200:
                raise _status_error(response, url, "tag list")
            document = _decode_json_object(response.content, url)
            next_link = response.links.get("next", {}).get("url", "")
        tags = document.get("tags") or []
        if not isinstance(tags, list) or not all(isinstance(tag, str) for tag in tags):
            raise RegistryError(f"the tag list at {redact_url(url)} has no list of strings")
        if not next_link:
            return tags, ""
        next_url = urljoin(url, next_link)
        if urlsplit(next_url)[:2] != urlsplit(url)[:2]:
            raise RegistryError(
                f"the tag list at {redact_url(url)} links to another host: {redact_url(next_url)}"
            )
        return tags, next_url

    # --- Authentication ---

    def _send(
        self,
        method: str,
        url: str,
        ref: ImageReference,
        headers: Mapping[str, str],
        stream: bool = False,
    ) -> requests.Response:
        """Send a request, and respond to one authentication challenge if the registry sends one."""
        scope = f"repository:{ref.repository}:pull"
        key = (ref.registry_host, scope)
        cached = self._cached_authorization(key)
        response = self._request(method, url, _with_auth(headers, cached), stream)
        if response.status_code != 401:
            return response
        challenges = parse_www_authenticate(response.headers.get("WWW-Authenticate", ""))
        response.close()
        self._authorizations.pop(key, None)
        authorization = self._answer_challenge(challenges, ref, scope, url)
        response = self._request(method, url, _with_auth(headers, authorization.header), stream)
        if response.status_code == 401:
            response.close()
            raise self._rejected_error(ref, url)
        self._authorizations[key] = authorization
        return response

    def _cached_authorization(self, key: tuple[str, str]) -> str | None:
        cached = self._authorizations.get(key)
        if cached is None:
            return None
        if cached.expires_at is not None and self._clock() >= cached.expires_at:
            del self._authorizations[key]
            return None
        return cached.header

    def _answer_challenge(
        self, challenges: list[Challenge], ref: ImageReference, scope: str, url: str
    ) -> _CachedAuthorization:
        by_scheme = {challenge.scheme: challenge for challenge in challenges}
        credential = self._credentials.for_host(ref.registry_host)
        if "bearer" in by_scheme:
            return self._fetch_token(by_scheme["bearer"], ref, scope, credential)
        if "basic" in by_scheme:
            if credential is None or credential.identity_token:
                raise RegistryError(
                    f"{redact_url(url)} requires a user name and password (Basic "
                    f"authentication): add an entry for {ref.registry_host} to the "
                    "credentials file"
                )
            basic = _basic_authorization(credential)
            return _CachedAuthorization(basic, None)
        raise RegistryError(
            f"{redact_url(url)} returned 401 without a Bearer or Basic challenge "
            f"(WWW-Authenticate schemes: {', '.join(by_scheme) or 'none'}); the guard cannot "
            "authenticate to this registry"
        )

    def _rejected_error(self, ref: ImageReference, url: str) -> RegistryError:
        credential = self._credentials.for_host(ref.registry_host)
        if credential is None:
            return RegistryError(
                f"{redact_url(url)} rejected anonymous access (HTTP 401): add credentials for "
                f"{ref.registry_host} to the credentials file if the repository is private"
            )
        return RegistryError(
            f"{redact_url(url)} rejected the credentials of user {credential.username!r} for "
            f"{ref.registry_host} from {self._credentials.path or 'the credentials file'} "
            "(HTTP 401 right after authenticating): fix them there; each check tries them only once"
        )

    def _fetch_token(
        self,
        challenge: Challenge,
        ref: ImageReference,
        scope: str,
        credential: RegistryCredential | None,
    ) -> _CachedAuthorization:
        realm = challenge.params.get("realm", "")
        if urlsplit(realm).scheme not in ("http", "https"):
            raise RegistryError(
                f"the registry {ref.registry_host} sent a Bearer challenge without a valid "
                f"realm URL ({realm!r})"
            )
        service = challenge.params.get("service", "")
        response = self._token_request(realm, service, scope, credential)
        with response:
            if response.status_code in (401, 403):
                raise self._token_rejected_error(ref, realm, scope, credential)
            if response.status_code != 200:
                raise _status_error(response, realm, "token")
            document = _decode_json_object(response.content, realm)
        token = document.get("token") or document.get("access_token")
        if not isinstance(token, str) or not token:
            raise RegistryError(
                f"the token service at {redact_url(realm)} returned no 'token' or 'access_token'"
            )
        lifetime = _token_lifetime(document.get("expires_in"))
        log.debug(
            "registry_token_fetched",
            realm=redact_url(realm),
            service=service,
            scope=scope,
            expires_in=lifetime,
            authenticated=credential is not None,
        )
        return _CachedAuthorization(
            f"Bearer {token}", self._clock() + lifetime - TOKEN_EXPIRY_MARGIN
        )

    def _token_request(
        self, realm: str, service: str, scope: str, credential: RegistryCredential | None
    ) -> requests.Response:
        params = {"scope": scope} | ({"service": service} if service else {})
        if credential is not None and credential.identity_token:
            form = params | {
                "grant_type": "refresh_token",
                "refresh_token": credential.identity_token,
                "client_id": self._user_agent,
            }
            return self._request("POST", realm, {}, stream=False, data=form)
        query = urlencode(params)
        separator = "&" if urlsplit(realm).query else "?"
        headers = {}
        if credential is not None:
            headers["Authorization"] = _basic_authorization(credential)
        return self._request("GET", f"{realm}{separator}{query}", headers, stream=False)

    def _token_rejected_error(
        self, ref: ImageReference, realm: str, scope: str, credential: RegistryCredential | None
    ) -> RegistryError:
        where = redact_url(realm)
        if credential is None:
            return RegistryError(
                f"the token service at {where} rejected an anonymous token request for "
                f"{scope}: the repository may be private or missing; add credentials for "
                f"{ref.registry_host} to the credentials file"
            )
        return RegistryError(
            f"the token service at {where} rejected the credentials of user "
            f"{credential.username!r} for {ref.registry_host} from "
            f"{self._credentials.path or 'the credentials file'}: fix them there; each check "
            "tries them only once"
        )

    # --- Transport ---

    def _request(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str],
        stream: bool,
        data: Mapping[str, str] | None = None,
    ) -> requests.Response:
        """Send one request, following redirects by hand under the HTTPS rule."""
        current_headers = dict(headers)
        for _ in range(MAX_REDIRECTS + 1):
            self._check_scheme(url)
            response = self._transport(method, url, current_headers, stream, data)
            if response.status_code not in _REDIRECT_STATUSES:
                return response
            location = response.headers.get("Location", "")
            response.close()
            next_url = urljoin(url, location)
            if urlsplit(next_url).netloc != urlsplit(url).netloc:
                current_headers.pop("Authorization", None)
            if response.status_code == 303 and method != "HEAD":
                method, data = "GET", None
            url = next_url
        raise RegistryError(f"more than {MAX_REDIRECTS} redirects, last to {redact_url(url)}")

    def _check_scheme(self, url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme == "https":
            return
        if parts.scheme == "http" and self._is_insecure(parts.netloc):
            return
        raise RegistryError(
            f"refusing to send a request to {redact_url(url)}: only HTTPS is allowed unless the "
            f"host is listed in insecure_registries"
        )

    def _transport(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str],
        stream: bool,
        data: Mapping[str, str] | None,
    ) -> requests.Response:
        try:
            return self._session.request(
                method,
                url,
                headers=dict(headers),
                data=data,
                timeout=self._timeout,
                stream=stream,
                allow_redirects=False,
                verify=True,
            )
        except requests.exceptions.SSLError as error:
            host = urlsplit(url).netloc
            raise RegistryUnavailable(
                f"TLS connection to {redact_url(url)} failed ({_reason(error)}): if {host} "
                "serves plain HTTP on purpose, list it in insecure_registries"
            ) from None
        except requests.exceptions.Timeout:
            raise RegistryUnavailable(
                f"request to {redact_url(url)} timed out after {self._timeout:g} s: the guard "
                "tries again next cycle"
            ) from None
        except requests.exceptions.ConnectionError as error:
            raise RegistryUnavailable(
                f"cannot connect to {redact_url(url)} ({_reason(error)}): check the network "
                "and the registry host; the guard tries again next cycle"
            ) from None
        except requests.exceptions.RequestException as error:
            raise RegistryError(f"request to {redact_url(url)} failed: {_reason(error)}") from None


def _reason(error: Exception) -> str:
    text = str(error)
    return text if len(text) <= 200 else text[:200] + "…"


def _basic_authorization(credential: RegistryCredential) -> str:
    pair = f"{credential.username}:{credential.password}".encode()
    return "Basic " + base64.b64encode(pair).decode("ascii")


def _with_auth(headers: Mapping[str, str], authorization: str | None) -> dict[str, str]:
    result = dict(headers)
    if authorization is not None:
        result["Authorization"] = authorization
    return result


def _token_lifetime(value: object) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return max(float(value), MIN_TOKEN_LIFETIME)
    return MIN_TOKEN_LIFETIME


def _decode_json_object(body: bytes, url: str) -> dict[str, Any]:
    try:
        document = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise RegistryError(f"invalid JSON from {redact_url(url)}: {error}") from None
    if not isinstance(document, dict):
        raise RegistryError(f"invalid JSON from {redact_url(url)}: expected an object")
    return document


def _read_limited(response: requests.Response, limit: int, url: str, seconds: float) -> bytes:
    """Read at most ``limit`` bytes of the body, within ``seconds`` in all.

    requests applies its timeout to each read only, so a registry that sends a byte now and
    then could hold a cycle for ever: the body is read with ``read1``, one receive at a time,
    and the deadline is checked between receives.
    """
    deadline = time.monotonic() + seconds
    chunks: list[bytes] = []
    size = 0
    try:
        while chunk := response.raw.read1(65536, decode_content=True):
            size += len(chunk)
            if size > limit:
                raise RegistryError(
                    f"the manifest at {redact_url(url)} is larger than {limit} bytes"
                )
            chunks.append(chunk)
            if time.monotonic() > deadline:
                raise _DeadlinePassed
    except _DeadlinePassed:
        raise _unavailable(url, f"not read within {seconds:.0f}s") from None
    except RegistryError:
        raise
    except Exception as error:  # urllib3 raises several unrelated types on a broken read.
        raise _unavailable(url, _reason(error)) from None
    return b"".join(chunks)


def _read_raw(response: requests.Response, n: int, url: str, seconds: float) -> bytes:
    deadline = time.monotonic() + seconds
    data = b""
    try:
        while len(data) < n:
            chunk = response.raw.read1(n - len(data), decode_content=False)
            if not chunk:
                break
            data += chunk
            if time.monotonic() > deadline:
                raise _DeadlinePassed
    except _DeadlinePassed:
        raise _unavailable(url, f"not read within {seconds:.0f}s") from None
    except Exception as error:  # urllib3 raises several unrelated types on a broken read.
        raise _unavailable(url, _reason(error)) from None
    return data


class _DeadlinePassed(Exception):
    """Reading a body took longer than the client's timeout; handled in this module only."""


def _unavailable(url: str, reason: str) -> RegistryUnavailable:
    return RegistryUnavailable(
        f"reading {redact_url(url)} failed ({reason}): the guard tries again next cycle"
    )


class BlobReader(io.RawIOBase):
    """A blob's raw bytes from an open response; a failed read raises RegistryUnavailable."""

    def __init__(self, response: requests.Response, url: str) -> None:
        super().__init__()
        self._response = response
        self._url = url

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        try:
            data = self._response.raw.read(len(buffer), decode_content=False)
        except Exception as error:  # urllib3 raises several unrelated types on a broken read.
            raise RegistryUnavailable(
                f"reading {redact_url(self._url)} failed ({_reason(error)}): the guard tries "
                "again next cycle"
            ) from None
        buffer[: len(data)] = data
        return len(data)


# --- Probe -------------------------------------------------------------------------------------


def _unchanged(
    previous: ImageFacts, ref: ImageReference, digest: str | None, platform: Platform
) -> bool:
    return (
        digest is not None
        and previous.tag_digest == digest
        and previous.reference == str(ref)
        and variant_rank(previous.platform, platform) is not None
    )


def _fetch_nested(
    client: RegistryClient, ref: ImageReference, tag: Manifest, platform: Platform
) -> tuple[dict[str, dict[str, Any]], IndexEntry | None]:
    nested: dict[str, dict[str, Any]] = {}
    resolution = resolve(tag.document, tag.media_type, platform, nested)
    while resolution.pending is not None:
        child = client.get_manifest(ref, resolution.pending.digest)
        if child.media_type not in INDEX_MEDIA_TYPES:
            raise RegistryError(
                f"{resolution.pending.describe()} of {ref} is listed as an index but the "
                f"registry returned {child.media_type}"
            )
        nested[child.digest] = child.document
        resolution = resolve(tag.document, tag.media_type, platform, nested)
    return nested, resolution.manifest_entry


def probe_image(
    client: RegistryClient,
    ref: ImageReference,
    platform: Platform,
    previous: ImageFacts | None,
) -> ImageFacts:
    """Find what the image behind ``ref`` needs to run on ``platform``.

    Sends a ``HEAD`` for the tag first. When the tag's digest equals ``previous.tag_digest``
    (same reference, and the previous platform still serves ``platform``), returns ``previous``
    unchanged without any ``GET``, so that a steady state costs no Docker Hub pull. Otherwise
    fetches the tag's document by digest, resolves the host's manifest through nested indexes,
    fetches it by digest and reads the first 4 bytes of every layer.

    Raises:
        RegistryUnavailable: when the registry cannot be reached or times out.
        RegistryError: on an error status, invalid content, or when no index entry serves
            ``platform`` (the message lists the platforms the index has).
        DigestMismatch: when fetched content does not hash to its digest.
    """
    head = client.head_manifest(ref)
    if previous is not None and _unchanged(previous, ref, head.digest, platform):
        log.debug("image_probe_skipped", reference=str(ref), tag_digest=head.digest)
        return previous

    tag = client.get_manifest(ref, head.digest or ref.tag)
    nested, entry = _fetch_nested(client, ref, tag, platform)
    # NOTE: when the tag points at a single manifest, or the chosen entry has no platform, the
    # config's os and architecture are not compared with ``platform``.
    manifest = tag if entry is None else client.get_manifest(ref, entry.digest)
    if manifest.media_type not in MANIFEST_MEDIA_TYPES:
        raise RegistryError(
            f"expected an image manifest for {ref} at {manifest.digest}, got {manifest.media_type}"
        )
    layers = parse_layers(manifest.document)
    heads = [client.blob_first_bytes(ref, layer.digest) for layer in layers]
    requirements = find_requirements(
        tag.document,
        tag.media_type,
        platform,
        nested_indexes=nested,
        manifest=manifest.document,
        layer_heads=heads,
    )
    facts = ImageFacts(
        reference=str(ref),
        tag_digest=tag.digest,
        tag_media_type=tag.media_type,
        manifest_digest=manifest.digest,
        manifest_media_type=manifest.media_type,
        config_digest=config_digest(manifest.document),
        # A single manifest, or an entry without a platform, names no variant of its own.
        platform=(
            entry.platform
            if entry is not None and entry.platform
            else Platform(platform.os, platform.architecture)
        ),
        layer_compressions=tuple(compression_of(head) for head in heads),
        requirements=requirements,
    )
    log.info(
        "image_probed",
        reference=facts.reference,
        tag_digest=facts.tag_digest,
        manifest_digest=facts.manifest_digest,
        platform=str(facts.platform),
        requirements=[str(item.requirement) for item in requirements],
    )
    return facts
