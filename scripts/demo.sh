#!/usr/bin/env bash
# Run the upgrade scenario on a throwaway machine: the guard keeps Synapse on Docker 20.10,
# the engine is upgraded in place to 26.1, the guard switches to Tuwunel. Run as root.
set -euo pipefail
cd "$(dirname "$0")/.."

bash testbed/install.sh

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/pip install --quiet --disable-pip-version-check -e .

exec .venv/bin/python -m testbed.demo "$@"
