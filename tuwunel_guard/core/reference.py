"""Image references: parse and validate ``image`` and ``tag`` before any request is sent.

The grammar is the one of the distribution project's ``reference`` package (the code behind
``docker pull NAME:TAG``)::

    name       := [domain "/"] path-component ("/" path-component)*
    domain     := host [":" port]
    path-component := [a-z0-9]+ (([._] | "__" | "-"+) [a-z0-9]+)*
    tag        := [A-Za-z0-9_][A-Za-z0-9_.-]{0,127}
    digest     := "sha256:" [a-f0-9]{64}

As in the Docker command line, the first component is a domain only when it contains ``.`` or
``:`` or is ``localhost``. Otherwise the image is on Docker Hub: its domain is ``docker.io``, its
API host ``registry-1.docker.io``, and a one-component name gets the ``library/`` prefix.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from tuwunel_guard.errors import InvalidReference

DOCKER_HUB_DOMAIN = "docker.io"
DOCKER_HUB_API_HOST = "registry-1.docker.io"
# Other spellings of Docker Hub's domain that the Docker command line accepts.
_DOCKER_HUB_ALIASES = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})

# The distribution reference package limits the whole name (domain and path) to 255 characters.
NAME_MAX_LENGTH = 255

_PATH_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_SHA256_HEX = re.compile(r"[a-f0-9]{64}")
_DIGEST_SHAPE = re.compile(r"([a-z0-9]+(?:[.+_-][a-z0-9]+)*):([A-Za-z0-9=_-]+)")
_DOMAIN_COMPONENT = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?")
_IPV6_HOST = re.compile(r"\[[0-9A-Fa-f:.]+\]")
_PORT = re.compile(r"[1-9][0-9]{0,4}")


def validate_digest(text: str) -> str:
    """Return ``text`` if it is a ``sha256:`` digest of 64 lowercase hex digits.

    Raises:
        InvalidReference: for any other form, including a valid digest of another algorithm
            (the guard verifies content with SHA-256 only).
    """
    shape = _DIGEST_SHAPE.fullmatch(text)
    if shape is None:
        raise InvalidReference(
            f"invalid digest {text!r}: expected 'sha256:' followed by 64 lowercase hex digits"
        )
    algorithm, encoded = shape.groups()
    if algorithm != "sha256":
        raise InvalidReference(
            f"unsupported digest algorithm {algorithm!r} in {text!r}: "
            "the guard verifies content with sha256 only, so use the image's sha256 digest"
        )
    if _SHA256_HEX.fullmatch(encoded) is None:
        raise InvalidReference(
            f"invalid sha256 digest {text!r}: expected exactly 64 lowercase hex digits after "
            f"'sha256:', got {len(encoded)} characters"
        )
    return text


def validate_tag(tag: str) -> str:
    """Return ``tag`` if it matches the tag grammar, else raise :class:`InvalidReference`."""
    if _TAG.fullmatch(tag) is not None:
        return tag
    if len(tag) > 128:
        raise InvalidReference(
            f"invalid tag {tag[:40]!r}... ({len(tag)} characters): a tag has at most 128"
        )
    raise InvalidReference(
        f"invalid tag {tag!r}: a tag starts with a letter, digit or '_' and contains only "
        "letters, digits, '_', '.' and '-' (for example 'latest' or 'v1.9.0')"
    )


def _validate_domain(domain: str) -> None:
    if domain.startswith("["):
        host, port = _split_ipv6(domain)
    else:
        host, _, port = domain.partition(":")
    if domain.endswith(":") or (port and (_PORT.fullmatch(port) is None or int(port) > 65535)):
        raise InvalidReference(
            f"invalid registry port {port!r} in {domain!r}: expected a number from 1 to 65535"
        )
    if _IPV6_HOST.fullmatch(host) is not None:
        return
    if host and all(_DOMAIN_COMPONENT.fullmatch(part) for part in host.split(".")):
        return
    raise InvalidReference(
        f"invalid registry host {host!r}: expected a DNS name, an IPv4 address or an IPv6 "
        "address in brackets, optionally followed by ':PORT' (for example 'ghcr.io' or "
        "'localhost:5000')"
    )


def _split_ipv6(domain: str) -> tuple[str, str]:
    host, bracket, rest = domain.partition("]")
    if not bracket or (rest and not rest.startswith(":")):
        return domain, ""
    return host + "]", rest[1:]


def _validate_path(path: str, image: str) -> None:
    for component in path.split("/"):
        if _PATH_COMPONENT.fullmatch(component) is not None:
            continue
        if component and _PATH_COMPONENT.fullmatch(component.lower()) is not None:
            raise InvalidReference(
                f"invalid repository {path!r} in image {image!r}: repository names must be "
                f"lowercase, so write {path.lower()!r}"
            )
        raise InvalidReference(
            f"invalid repository component {component!r} in image {image!r}: each '/'-separated "
            "part consists of lowercase letters and digits, joined by single '.' or '_', "
            "by '__' or by dashes (for example 'matrix-construct/tuwunel')"
        )


def _split_domain(image: str) -> tuple[str, str]:
    first, slash, rest = image.partition("/")
    if slash and ("." in first or ":" in first or first == "localhost"):
        return first, rest
    return DOCKER_HUB_DOMAIN, image


def _reject_tag_or_digest(image: str) -> None:
    if "@" in image:
        digest = image.partition("@")[2]
        validate_digest(digest)
        raise InvalidReference(
            f"image {image!r} contains a digest: set 'image' to the name only and 'tag' to the "
            "tag to follow, because the guard pins the digest itself"
        )
    last_component = image.rpartition("/")[2]
    if ":" in last_component:
        raise InvalidReference(
            f"image {image!r} contains a tag: set 'image' to the name only "
            f"({image.rpartition(':')[0]!r}) and put the tag in 'tag'"
        )


@dataclass(frozen=True)
class ImageReference:
    """A validated image name and tag.

    ``domain`` is the registry as people write it (``docker.io`` for Docker Hub) and
    ``repository`` the path inside it, with ``library/`` added for official Docker Hub images.
    Build instances with :meth:`parse`, which validates both parts.
    """

    domain: str
    repository: str
    tag: str

    @classmethod
    def parse(cls, image: str, tag: str) -> ImageReference:
        """Parse and validate ``image`` (a name without tag or digest) and ``tag``.

        Raises:
            InvalidReference: naming the invalid value and how to write it instead.
        """
        if not image or image != image.strip() or any(c.isspace() for c in image):
            raise InvalidReference(
                f"invalid image {image!r}: an image name is not empty and contains no spaces"
            )
        _reject_tag_or_digest(image)
        domain, path = _split_domain(image)
        _validate_domain(domain)
        if domain.lower() in _DOCKER_HUB_ALIASES:
            domain = DOCKER_HUB_DOMAIN
        _validate_path(path, image)
        if domain == DOCKER_HUB_DOMAIN and "/" not in path:
            path = "library/" + path
        if len(domain) + 1 + len(path) > NAME_MAX_LENGTH:
            raise InvalidReference(
                f"image name {image[:40]!r}... is too long: "
                f"registry and repository together have at most {NAME_MAX_LENGTH} characters"
            )
        return cls(domain=domain, repository=path, tag=validate_tag(tag))

    @property
    def registry_host(self) -> str:
        """Host (and port) that serves the registry API, ``registry-1.docker.io`` for Docker Hub."""
        return DOCKER_HUB_API_HOST if self.domain == DOCKER_HUB_DOMAIN else self.domain

    @property
    def name(self) -> str:
        """Full name without tag, for example ``ghcr.io/matrix-construct/tuwunel``."""
        return f"{self.domain}/{self.repository}"

    def __str__(self) -> str:
        return f"{self.name}:{self.tag}"

    def with_digest(self, digest: str) -> str:
        """Return ``domain/repository@digest``, the form that pins an image in a compose file.

        Raises:
            InvalidReference: if ``digest`` is not a valid sha256 digest.
        """
        return f"{self.name}@{validate_digest(digest)}"

    def api_base(self, insecure: bool) -> str:
        """Return the repository's API URL, ``https://HOST/v2/REPOSITORY``.

        ``insecure`` selects plain HTTP; the caller decides it from its list of insecure
        registries.
        """
        scheme = "http" if insecure else "https"
        return f"{scheme}://{self.registry_host}/v2/{self.repository}"
