#!/usr/bin/env bash
# Install the test bed and the project's virtual environment, then run the checks and tests.
# Run as root on a Debian 12 machine: the tests start real Docker engines, a registry and
# systemd containers. Extra arguments go to pytest, e.g. scripts/test.sh tests/unit -x
set -euo pipefail
cd "$(dirname "$0")/.."

bash testbed/install.sh
bash testbed/podman.sh
bash scripts/testbed-systemd-deps.sh

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/pip install --quiet --disable-pip-version-check -e '.[dev]'

.venv/bin/ruff check tuwunel_guard tests testbed bench
.venv/bin/mypy
exec .venv/bin/pytest "$@"
