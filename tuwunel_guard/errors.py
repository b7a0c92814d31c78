"""Exceptions of tuwunel-guard.

Every error the guard raises on purpose derives from :class:`GuardError`. Adapters translate the
errors of the libraries they wrap (docker, requests, subprocess) into this tree, so the core and
the command line never see a third-party exception::

    GuardError
    ├── ConfigError            the config file is missing or invalid (exit status 78)
    ├── InvalidReference       an image reference, tag or digest is malformed
    ├── EngineUnavailable      the Docker engine did not respond (an expected state, retried)
    ├── EngineError            the engine answered with an error
    ├── RegistryUnavailable    the registry could not be reached or timed out
    ├── RegistryError          the registry answered, but with an error or invalid content
    │   └── DigestMismatch     downloaded bytes do not hash to the digest they were asked by
    ├── ComposeError           a compose command failed or no compose command was found
    ├── HealthCheckFailed      Tuwunel did not prove healthy within the health timeout
    ├── SwitchError            a switch step failed; the message says what was undone
    │   └── SwitchRefused      preflight failed; nothing was stopped
    └── ConvertError           the convert route failed on this host (disk space, scratch files)
"""

from __future__ import annotations


class GuardError(Exception):
    """Root of every error that tuwunel-guard raises on purpose."""


class ConfigError(GuardError):
    """The config file is missing, unreadable or invalid.

    ``problems`` contains one line per invalid key, each naming the file and the dotted key path.
    """

    def __init__(self, path: str, problems: list[str]) -> None:
        self.path = path
        self.problems = problems
        super().__init__(f"{path}: {len(problems)} error(s) in the config file")


class InvalidReference(GuardError):
    """An image reference, tag or digest does not match its grammar."""


class EngineUnavailable(GuardError):
    """The Docker engine did not respond on its socket."""


class EngineError(GuardError):
    """The Docker engine returned an error for a request."""


class RegistryUnavailable(GuardError):
    """The registry could not be reached, or a request to it timed out."""


class RegistryError(GuardError):
    """The registry returned an error status or invalid content."""


class DigestMismatch(RegistryError):
    """Downloaded content does not hash to the digest it was requested by."""


class ComposeError(GuardError):
    """A compose command failed, or no usable compose command was found."""


class HealthCheckFailed(GuardError):
    """A homeserver did not answer its health URLs as expected within the timeout."""


class SwitchError(GuardError):
    """A switch step failed. The message names the step and what was undone."""


class SwitchRefused(SwitchError):
    """A preflight check failed, so the switch stopped before anything was stopped."""


class ConvertError(GuardError):
    """The convert route failed on the guard's own host, for example for lack of disk space."""
