"""Release tracking against a real Distribution registry: list every tag page, then pick.

The registry holds a few hundred tags shaped like Tuwunel's: releases with and without ``v``,
pre-releases, per-platform build tags and rolling tags. They all point at one small manifest,
pushed once per tag. Distribution 2.8.2 ignores ``n`` and returns every tag at once, so the
stand-in token service from ``token_server.py`` pages the list in front of it, either sorted
by name (its own order) or oldest first, as GHCR does.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
from token_server import AuthProxy, ProxySettings

from testbed.registry import Registry
from tuwunel_guard.adapters.registry import RegistryClient
from tuwunel_guard.core.platforms import OCI_MANIFEST
from tuwunel_guard.core.reference import ImageReference
from tuwunel_guard.core.versions import pick_release

pytestmark = pytest.mark.testbed

REPOSITORY = "tracking/tuwunel"
PAGE_SIZE = 25
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
PLATFORM_SUFFIXES = (
    "-release-all-x86_64-v1-linux-gnu",
    "-release-all-x86_64-v3-linux-gnu",
    "-release-all-aarch64-v8-linux-gnu",
)


def tags_oldest_first() -> list[str]:
    """Return the test tags in the order a project would push them, oldest first.

    Each release comes with its per-platform tags; the rolling tags were pushed long ago and
    moved since, so they come early. The highest release, ``1.12.6``, has no ``v`` and comes
    last but for the pre-releases of the next version.
    """
    tags = ["main", "preview", "latest", "v1", "v1.12"]
    for minor in range(13):
        for patch in range(6):
            release = f"v1.{minor}.{patch}"
            tags.append(release)
            tags.extend(release + suffix for suffix in PLATFORM_SUFFIXES)
    tags.append("1.12.6")
    tags.extend(["v1.13.0-rc.1", "v1.13.0-rc.2", "v1.13.0-rc.2-release-all-x86_64-v3-linux-gnu"])
    tags.extend(["v2.0.0-beta.1", "v2.0.0-rc.1"])
    return tags


TAGS = tags_oldest_first()
# Expected picks, worked out by hand from the list above.
PICKS = [
    (">=1.9,<2", False, "1.12.6"),
    (">=1.9,<2", True, "v1.13.0-rc.2"),
    (">=1,<3", True, "v2.0.0-rc.1"),
    ("~=1.4.0", False, "v1.4.5"),
    ("<1.10", False, "v1.9.5"),
    (">=2", False, None),
]


def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def push_tags(registry: Registry, repository: str, tags: list[str]) -> str:
    """Push one empty OCI image manifest under every tag in ``tags``; return its digest."""
    base = f"{registry.url}/v2/{repository}"
    config = b'{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}'
    with requests.Session() as session:
        started = session.post(f"{base}/blobs/uploads/", timeout=10)
        assert started.status_code == HTTPStatus.ACCEPTED, started.text
        location = requests.compat.urljoin(f"{base}/", started.headers["Location"])
        separator = "&" if "?" in location else "?"
        finished = session.put(
            f"{location}{separator}digest={_sha256(config)}",
            data=config,
            headers={"Content-Type": "application/octet-stream"},
            timeout=10,
        )
        assert finished.status_code == HTTPStatus.CREATED, finished.text
        manifest = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": _sha256(config), "size": len(config)},
            "layers": [],
        }
        body = json.dumps(manifest).encode()
        for tag in tags:
            response = session.put(
                f"{base}/manifests/{tag}",
                data=body,
                headers={"Content-Type": OCI_MANIFEST},
                timeout=10,
            )
            assert response.status_code == HTTPStatus.CREATED, f"{tag}: {response.text}"
    return _sha256(body)


class OldestFirstProxy(AuthProxy):
    """The stand-in token service, paging tag lists in push order (oldest first) as GHCR does.

    ``push_order`` gives the order; the tags themselves still come from the registry, so a tag
    missing from the registry is missing from the pages too.
    """

    def __init__(self, upstream: str, push_order: list[str], settings: ProxySettings) -> None:
        super().__init__(upstream, settings)
        position = {tag: index for index, tag in enumerate(push_order)}
        # The server builds its handler class in AuthProxy.__init__; replace it with one that
        # overrides only the tag paging.
        base_handler: Any = self._server.RequestHandlerClass

        class Handler(base_handler):  # type: ignore[misc]
            def _tag_page(self) -> None:
                split = urlsplit(self.path)
                upstream_tags = requests.get(f"http://{upstream}{split.path}", timeout=10).json()[
                    "tags"
                ]
                ordered = sorted(upstream_tags, key=lambda tag: (position.get(tag, 1 << 30), tag))
                query = parse_qs(split.query)
                last = query.get("last", [""])[0]
                start = ordered.index(last) + 1 if last else 0
                size = min(int(query.get("n", [PAGE_SIZE])[0]), PAGE_SIZE)
                page = ordered[start : start + size]
                headers = {}
                if start + size < len(ordered):
                    headers["Link"] = f'<{split.path}?last={page[-1]}&n={size}>; rel="next"'
                self._send_json(200, {"name": REPOSITORY, "tags": page}, headers)

        self._server.RequestHandlerClass = Handler


@pytest.fixture(scope="module")
def pushed(registry: Registry) -> str:
    """Push the test tags once for the module and return the manifest digest."""
    return push_tags(registry, REPOSITORY, TAGS)


@dataclass(frozen=True)
class Listing:
    """What the guard's registry client listed, and the tag pages the proxy served for it."""

    tags: list[str]
    page_requests: list[str]


def list_through(proxy: AuthProxy) -> Listing:
    """List the repository's tags through ``proxy`` with the guard's registry client."""
    client = RegistryClient(insecure_registries=[proxy.host], timeout=10.0)
    with client:
        tags = client.list_tags(ImageReference.parse(f"{proxy.host}/{REPOSITORY}", "latest"))
    paths = [path for _, path in proxy.counters.registry_requests if "/tags/list" in path]
    # The first request has no token yet and gets 401.
    return Listing(tags, paths[1:])


@pytest.fixture(scope="module")
def sorted_listing(registry: Registry, pushed: str) -> Listing:
    """The tags as listed through pages sorted by name, PAGE_SIZE per page."""
    proxy = AuthProxy(registry.host, ProxySettings(tag_page_size=PAGE_SIZE)).start()
    try:
        return list_through(proxy)
    finally:
        proxy.stop()


@pytest.fixture(scope="module")
def oldest_first_listing(registry: Registry, pushed: str) -> Listing:
    """The tags as listed through pages in push order, PAGE_SIZE per page."""
    proxy = OldestFirstProxy(registry.host, TAGS, ProxySettings(tag_page_size=PAGE_SIZE))
    proxy.start()
    try:
        return list_through(proxy)
    finally:
        proxy.stop()


def test_tags_pushed_cheaply(registry: Registry, pushed: str) -> None:
    """The registry itself returns every pushed tag in one unpaged response."""
    response = requests.get(f"{registry.url}/v2/{REPOSITORY}/tags/list?n=10", timeout=10)

    assert len(TAGS) > 300
    assert len(set(TAGS)) == len(TAGS)
    assert sorted(response.json()["tags"]) == sorted(TAGS), "Distribution 2.8.2 ignores n"


def test_sorted_pages_listed(sorted_listing: Listing) -> None:
    """Every name-sorted page is read: all tags, in page order, one request per page."""
    assert sorted_listing.tags == sorted(TAGS)
    assert len(sorted_listing.page_requests) == math.ceil(len(TAGS) / PAGE_SIZE)
    assert (
        sorted_listing.page_requests[1]
        == f"/v2/{REPOSITORY}/tags/list?n={PAGE_SIZE}&last=" + (sorted(TAGS)[PAGE_SIZE - 1])
    )


@pytest.mark.parametrize(("release_range", "prereleases", "expected"), PICKS)
def test_pick_across_sorted_pages(
    sorted_listing: Listing, release_range: str, prereleases: bool, expected: str | None
) -> None:
    """The pick over name-sorted pages is the highest release in range."""
    assert pick_release(sorted_listing.tags, release_range, prereleases=prereleases) == expected


def test_oldest_first_pages_listed(oldest_first_listing: Listing) -> None:
    """Oldest-first pages come back in push order, and the newest tags are on the last page."""
    assert oldest_first_listing.tags == TAGS
    assert len(oldest_first_listing.page_requests) == math.ceil(len(TAGS) / PAGE_SIZE)
    assert "1.12.6" not in TAGS[: len(TAGS) - PAGE_SIZE], "the newest release is on the last page"
    assert pick_release(TAGS[:PAGE_SIZE], ">=1.9,<2", prereleases=False) is None


@pytest.mark.parametrize(("release_range", "prereleases", "expected"), PICKS)
def test_pick_across_oldest_first_pages(
    oldest_first_listing: Listing, release_range: str, prereleases: bool, expected: str | None
) -> None:
    """The pick over oldest-first pages equals the expected pick."""
    tags = oldest_first_listing.tags

    assert pick_release(tags, release_range, prereleases=prereleases) == expected
