"""Registry credentials read from a file in Docker's ``config.json`` format.

Only credentials stored in the file itself are supported: the ``auths`` map, whose entries hold
``auth`` (base64 of ``user:password``), ``username`` and ``password``, or ``identitytoken`` (an
OAuth2 refresh token that ``docker login`` stores for some registries). A file that delegates to
a credential helper (``credsStore`` or ``credHelpers``) is rejected, because running helper
programs from a root daemon is out of scope.

Secrets never appear in ``repr()``, in error messages or in logs.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from tuwunel_guard.errors import ConfigError

# Docker writes Docker Hub credentials under the legacy v1 index URL.
_DOCKER_HUB_KEYS = frozenset(
    {"docker.io", "index.docker.io", "registry-1.docker.io", "registry.hub.docker.com"}
)
DOCKER_HUB_KEY = "docker.io"


@dataclass(frozen=True, repr=False)
class RegistryCredential:
    """A user name with a password (or access token), or an identity token.

    ``identity_token`` is an OAuth2 refresh token. When it is set the token service is asked
    with ``grant_type=refresh_token`` instead of Basic authentication.
    """

    username: str
    password: str = field(default="")
    identity_token: str = field(default="")

    def __repr__(self) -> str:
        secret = "identity_token=<redacted>" if self.identity_token else "password=<redacted>"
        return f"RegistryCredential(username={self.username!r}, {secret})"

    __str__ = __repr__


def normalize_registry_key(key: str) -> str:
    """Reduce an ``auths`` key or a registry host to a host name (with port), lowercased.

    ``https://index.docker.io/v1/`` and the other spellings of Docker Hub become ``docker.io``.
    """
    text = key.strip()
    host = urlsplit(text).netloc if "://" in text else text.split("/", 1)[0]
    host = host.lower()
    return DOCKER_HUB_KEY if host in _DOCKER_HUB_KEYS else host


class CredentialStore:
    """Credentials per registry host; ``path`` names their source in messages."""

    def __init__(
        self, credentials: Mapping[str, RegistryCredential] | None = None, path: str = ""
    ) -> None:
        self._by_host = {normalize_registry_key(k): v for k, v in (credentials or {}).items()}
        self.path = path

    def __repr__(self) -> str:
        return f"CredentialStore(path={self.path!r}, hosts={sorted(self._by_host)!r})"

    def for_host(self, host: str) -> RegistryCredential | None:
        """Return the credential for ``host`` (any spelling of it), or ``None``."""
        return self._by_host.get(normalize_registry_key(host))

    @property
    def hosts(self) -> tuple[str, ...]:
        """Hosts that have a credential, normalized and sorted."""
        return tuple(sorted(self._by_host))


def _error(path: Path, problem: str) -> ConfigError:
    return ConfigError(str(path), [f"{path}: {problem}"])


def _decode_auth(path: Path, key: str, encoded: str) -> tuple[str, str]:
    try:
        decoded = base64.b64decode(encoded, validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        raise _error(
            path, f"auths.{key}.auth is not valid base64 of 'user:password'; run docker login again"
        ) from None
    username, colon, password = decoded.partition(":")
    if not colon or not username:
        raise _error(path, f"auths.{key}.auth does not decode to 'user:password'")
    return username, password


def _parse_entry(path: Path, key: str, entry: object) -> RegistryCredential | None:
    if not isinstance(entry, Mapping):
        raise _error(path, f"auths.{key} is not an object")
    values = {name: entry.get(name, "") for name in ("auth", "username", "password")}
    values["identitytoken"] = entry.get("identitytoken", "")
    for name, value in values.items():
        if not isinstance(value, str):
            raise _error(path, f"auths.{key}.{name} is not a string")
    username, password = values["username"], values["password"]
    if values["auth"]:
        username, password = _decode_auth(path, key, values["auth"])
    if values["identitytoken"]:
        return RegistryCredential(username or "<token>", identity_token=values["identitytoken"])
    if not username:
        # docker login leaves an empty entry when a credential helper stores the secret.
        return None
    return RegistryCredential(username, password)


def _reject_helpers(path: Path, data: Mapping[str, object]) -> None:
    helpers = [name for name in ("credsStore", "credHelpers") if data.get(name)]
    if helpers:
        raise _error(
            path,
            f"{' and '.join(helpers)} (credential helper programs) are not supported: remove "
            f"{' and '.join(repr(name) for name in helpers)} from the file and run "
            f"'DOCKER_CONFIG={path.parent} docker login REGISTRY' so that the credential is "
            "stored in the file itself (readable by root only)",
        )


def load_docker_config(path: Path) -> CredentialStore:
    """Read credentials from a Docker ``config.json`` file.

    Raises:
        ConfigError: when the file cannot be read, is not valid JSON, uses a credential helper
            or contains a malformed entry. The message names the file and the entry, never a
            secret.
    """
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise _error(path, f"cannot read the credentials file: {error.strerror}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise _error(path, f"the credentials file is not valid JSON ({error})") from None
    if not isinstance(data, Mapping):
        raise _error(path, "the credentials file does not contain a JSON object")
    _reject_helpers(path, data)
    auths = data.get("auths", {})
    if not isinstance(auths, Mapping):
        raise _error(path, "'auths' is not an object")
    credentials = {}
    for key, entry in auths.items():
        credential = _parse_entry(path, key, entry)
        if credential is not None:
            credentials[key] = credential
    return CredentialStore(credentials, path=str(path))
