"""Tests of image reference parsing and validation."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tuwunel_guard.core.reference import ImageReference, validate_digest, validate_tag
from tuwunel_guard.errors import InvalidReference

SHA = "sha256:" + "ab" * 32


@pytest.mark.parametrize(
    ("image", "domain", "repository", "api_host"),
    [
        ("ghcr.io/matrix-construct/tuwunel", "ghcr.io", "matrix-construct/tuwunel", "ghcr.io"),
        ("jevolk/tuwunel", "docker.io", "jevolk/tuwunel", "registry-1.docker.io"),
        ("docker.io/jevolk/tuwunel", "docker.io", "jevolk/tuwunel", "registry-1.docker.io"),
        ("index.docker.io/jevolk/tuwunel", "docker.io", "jevolk/tuwunel", "registry-1.docker.io"),
        ("registry-1.docker.io/a/b", "docker.io", "a/b", "registry-1.docker.io"),
        ("nginx", "docker.io", "library/nginx", "registry-1.docker.io"),
        ("docker.io/nginx", "docker.io", "library/nginx", "registry-1.docker.io"),
        ("localhost/app", "localhost", "app", "localhost"),
        ("localhost:5000/app", "localhost:5000", "app", "localhost:5000"),
        ("127.0.0.1:5000/a/b/c", "127.0.0.1:5000", "a/b/c", "127.0.0.1:5000"),
        ("[::1]:5000/app", "[::1]:5000", "app", "[::1]:5000"),
        ("[fe80::1]/app", "[fe80::1]", "app", "[fe80::1]"),
        ("Registry.Example.COM/app", "Registry.Example.COM", "app", "Registry.Example.COM"),
        (
            "example.com/a.b/c_d/e__f/g-h/i---j",
            "example.com",
            "a.b/c_d/e__f/g-h/i---j",
            "example.com",
        ),
        ("my-host.example:65535/x", "my-host.example:65535", "x", "my-host.example:65535"),
    ],
)
def test_parse_valid_names(image: str, domain: str, repository: str, api_host: str) -> None:
    """Valid names parse into domain, repository and API host."""
    reference = ImageReference.parse(image, "latest")

    assert reference.domain == domain
    assert reference.repository == repository
    assert reference.registry_host == api_host
    assert reference.tag == "latest"


@pytest.mark.parametrize(
    ("image", "fragment"),
    [
        ("", "not empty"),
        (" ghcr.io/a/b", "no spaces"),
        ("ghcr.io/a b", "no spaces"),
        ("ghcr.io/a\tb", "no spaces"),
        ("ghcr.io/a/../b", "invalid repository component '..'"),
        ("ghcr.io/a..b", "invalid repository component 'a..b'"),
        ("ghcr.io/Matrix/Tuwunel", "must be lowercase, so write 'matrix/tuwunel'"),
        ("Jevolk/tuwunel", "must be lowercase"),
        ("ghcr.io/a/b;rm -rf", "no spaces"),
        ("ghcr.io/a/b;rm", "invalid repository component 'b;rm'"),
        ("ghcr.io/a/$(id)", "invalid repository component '$(id)'"),
        ("ghcr.io/a/`id`", "invalid repository component '`id`'"),
        ("ghcr.io/a/b|c", "invalid repository component 'b|c'"),
        ("ghcr.io/a/b&&c", "invalid repository component 'b&&c'"),
        ("ghcr.io//a", "invalid repository component ''"),
        ("ghcr.io/a/", "invalid repository component ''"),
        ("ghcr.io/-a", "invalid repository component '-a'"),
        ("ghcr.io/a-", "invalid repository component 'a-'"),
        ("ghcr.io/a___b", "invalid repository component 'a___b'"),
        ("ghcr.io/a._b", "invalid repository component 'a._b'"),
        ("ghcr.io/a/b:latest", "contains a tag"),
        ("ghcr.io:443/a/b:v1", "contains a tag"),
        ("ghcr.io/a/b@" + SHA, "contains a digest"),
        ("ghcr.io/a/b@sha512:" + "ab" * 64, "unsupported digest algorithm 'sha512'"),
        ("ghcr.io/a/b@sha256:abc", "exactly 64 lowercase hex digits"),
        ("-ghcr.io/a", "invalid registry host '-ghcr.io'"),
        ("ghcr..io/a", "invalid registry host 'ghcr..io'"),
        ("gh_cr.io/a", "invalid registry host 'gh_cr.io'"),
        ("ghcr.io:0/a", "invalid registry port '0'"),
        ("ghcr.io:65536/a", "invalid registry port '65536'"),
        ("ghcr.io:http/a", "invalid registry port 'http'"),
        ("localhost:/a", "invalid registry port ''"),
        ("ghcr.io/" + "a" * 250, "too long"),
    ],
)
def test_parse_rejects_invalid_names(image: str, fragment: str) -> None:
    """Invalid names raise InvalidReference naming the bad part."""
    with pytest.raises(InvalidReference) as caught:
        ImageReference.parse(image, "latest")

    assert fragment in str(caught.value)


@pytest.mark.parametrize(
    "tag",
    ["latest", "v1.9.0", "_x", "0", "v1.9.0-release-all-x86_64-v3-linux-gnu", "A" * 128, "a.b-c_d"],
)
def test_tag_valid(tag: str) -> None:
    """Tags that match the grammar are returned unchanged."""
    assert validate_tag(tag) == tag
    assert ImageReference.parse("ghcr.io/a/b", tag).tag == tag


@pytest.mark.parametrize(
    ("tag", "fragment"),
    [
        ("", "invalid tag ''"),
        ("A" * 129, "129 characters"),
        ("-latest", "invalid tag '-latest'"),
        (".latest", "invalid tag '.latest'"),
        ("la test", "invalid tag 'la test'"),
        ("latest;id", "invalid tag 'latest;id'"),
        ("$(id)", "invalid tag '$(id)'"),
        ("v1/x", "invalid tag 'v1/x'"),
        ("v1:x", "invalid tag 'v1:x'"),
        ("v1@x", "invalid tag 'v1@x'"),
        ("latest\n", "invalid tag 'latest\\n'"),
        ("tägg", "invalid tag 'tägg'"),
    ],
)
def test_tag_invalid(tag: str, fragment: str) -> None:
    """Invalid tags raise InvalidReference that names the tag."""
    with pytest.raises(InvalidReference) as caught:
        ImageReference.parse("ghcr.io/a/b", tag)

    assert fragment in str(caught.value)


@pytest.mark.parametrize(
    ("digest", "fragment"),
    [
        ("sha512:" + "ab" * 64, "unsupported digest algorithm 'sha512'"),
        ("sha384:" + "ab" * 48, "unsupported digest algorithm 'sha384'"),
        ("sha256:" + "AB" * 32, "exactly 64 lowercase hex digits"),
        ("sha256:" + "ab" * 31, "got 62 characters"),
        ("sha256:" + "ab" * 33, "got 66 characters"),
        ("sha256:" + "g" * 64, "exactly 64 lowercase hex digits"),
        ("sha256" + "ab" * 32, "invalid digest"),
        ("", "invalid digest"),
        ("sha256:", "invalid digest"),
        (" " + SHA, "invalid digest"),
    ],
)
def test_digest_invalid(digest: str, fragment: str) -> None:
    """Digests other than sha256 with 64 lowercase hex digits are rejected."""
    with pytest.raises(InvalidReference) as caught:
        validate_digest(digest)

    assert fragment in str(caught.value)


def test_with_digest_pins_domain_name() -> None:
    """with_digest returns the name people write, not the API host."""
    hub = ImageReference.parse("nginx", "latest")
    ghcr = ImageReference.parse("ghcr.io/matrix-construct/tuwunel", "v1.9.0")

    assert hub.with_digest(SHA) == f"docker.io/library/nginx@{SHA}"
    assert ghcr.with_digest(SHA) == f"ghcr.io/matrix-construct/tuwunel@{SHA}"


def test_with_digest_rejects_invalid() -> None:
    """with_digest validates the digest it pins."""
    reference = ImageReference.parse("ghcr.io/a/b", "latest")

    with pytest.raises(InvalidReference, match="sha512"):
        reference.with_digest("sha512:" + "ab" * 64)


def test_api_base_schemes() -> None:
    """api_base uses HTTPS unless the caller asks for plain HTTP."""
    hub = ImageReference.parse("jevolk/tuwunel", "latest")
    local = ImageReference.parse("localhost:5000/a", "latest")

    assert hub.api_base(insecure=False) == "https://registry-1.docker.io/v2/jevolk/tuwunel"
    assert local.api_base(insecure=True) == "http://localhost:5000/v2/a"
    assert local.api_base(insecure=False) == "https://localhost:5000/v2/a"


def test_str_and_name() -> None:
    """str() gives name:tag with the docker.io domain and library/ prefix."""
    reference = ImageReference.parse("nginx", "1.27")

    assert str(reference) == "docker.io/library/nginx:1.27"
    assert reference.name == "docker.io/library/nginx"


_component = st.from_regex(r"[a-z0-9]{1,5}(?:(?:[._]|__|-{1,3})[a-z0-9]{1,5}){0,2}", fullmatch=True)


@given(
    st.lists(_component, min_size=1, max_size=4),
    st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,20}", fullmatch=True),
)
def test_grammar_names_roundtrip(components: list[str], tag: str) -> None:
    """Every name built from the grammar parses and keeps its path."""
    path = "/".join(components)
    reference = ImageReference.parse(f"example.com/{path}", tag)

    assert reference.repository == path
    assert str(reference) == f"example.com/{path}:{tag}"


@given(st.text(min_size=1, max_size=30))
def test_arbitrary_tags_never_crash(tag: str) -> None:
    """Any text is either a valid tag or raises InvalidReference, nothing else."""
    try:
        assert validate_tag(tag) == tag
    except InvalidReference as error:
        assert "tag" in str(error)
