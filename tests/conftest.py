"""Shared fixtures: the real test bed (engines, registry, stand-in images, compose project)."""

from tests.testbed_fixtures import *  # noqa: F403
