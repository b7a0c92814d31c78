#!/usr/bin/env bash
# Install tuwunel-guard as a systemd service on a Debian 12 host. Run as root from a checkout.
#
#   scripts/install.sh [--wheelhouse DIR] [--podman] [--enable]
#
# --wheelhouse DIR  install offline from wheels in DIR: the tuwunel-guard wheel and every
#                   dependency, made with `pip wheel /path/to/checkout -w DIR` on a machine with
#                   the same Python version (3.11 on Debian 12). Without it, pip builds the
#                   checkout and downloads the dependencies from PyPI.
# --podman          also install the drop-in that the podman strategy needs (systemd/podman.conf),
#                   which relaxes the unit's sandbox; see the file for what and why.
# --enable          also run `systemctl enable --now tuwunel-guard`.
#
# What it installs:
#   /opt/tuwunel-guard                          virtual environment with the tuwunel-guard command
#   /etc/systemd/system/tuwunel-guard.service   the unit
#   /usr/lib/systemd/catalog/tuwunel-guard.catalog  journal explanations (`journalctl -x`)
#   /etc/tuwunel-guard/config.toml              the example config, only if no config exists
#   /etc/systemd/system/tuwunel-guard.service.d/podman.conf   with --podman only
# Running it again upgrades the program and the unit, and never touches an existing config.
# A copy of podman.conf always goes to /opt/tuwunel-guard/share/systemd/ for reference.
set -euo pipefail

PREFIX=/opt/tuwunel-guard
UNIT_PATH=/etc/systemd/system/tuwunel-guard.service
PODMAN_DROPIN_PATH=/etc/systemd/system/tuwunel-guard.service.d/podman.conf
CATALOG_PATH=/usr/lib/systemd/catalog/tuwunel-guard.catalog
CONFIG_DIR=/etc/tuwunel-guard
CONFIG_PATH=$CONFIG_DIR/config.toml
PYTHON=${PYTHON:-/usr/bin/python3}

checkout=$(cd "$(dirname "$0")/.." && pwd)
wheelhouse=""
enable=no
podman=no

usage() {
    sed -n '3,12p' "$0" | sed 's/^# \{0,1\}//'
}

fail() {
    echo "install.sh: $*" >&2
    exit 1
}

while [ $# -gt 0 ]; do
    case "$1" in
        --wheelhouse)
            [ $# -ge 2 ] || fail "--wheelhouse needs a folder"
            wheelhouse=$(cd "$2" && pwd) || fail "wheelhouse folder $2 not found"
            shift 2
            ;;
        --podman)
            podman=yes
            shift
            ;;
        --enable)
            enable=yes
            shift
            ;;
        -h | --help)
            usage
            exit 0
            ;;
        *)
            usage >&2
            fail "unknown argument: $1"
            ;;
    esac
done

[ "$(id -u)" -eq 0 ] || fail "run as root: it writes to /opt, /etc and /usr/lib"
[ -x "$PYTHON" ] || fail "$PYTHON not found; install python3 (Debian: apt-get install python3)"
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || fail "$PYTHON is older than 3.11; tuwunel-guard needs Python 3.11 or later"
"$PYTHON" -c 'import ensurepip, venv' 2>/dev/null \
    || fail "the venv module is missing; install it with: apt-get install python3-venv"
for file in systemd/tuwunel-guard.service systemd/tuwunel-guard.catalog systemd/podman.conf; do
    [ -f "$checkout/$file" ] || fail "$checkout/$file not found; run the script from a checkout"
done

echo "Installing tuwunel-guard into $PREFIX"
if [ ! -x "$PREFIX/bin/python" ]; then
    "$PYTHON" -m venv "$PREFIX"
fi
pip_options=(--quiet --disable-pip-version-check --no-cache-dir)
if [ -n "$wheelhouse" ]; then
    # --no-index: nothing is downloaded, so a missing wheel fails here instead of at run time.
    "$PREFIX/bin/pip" install "${pip_options[@]}" --no-index --find-links "$wheelhouse" \
        --upgrade tuwunel-guard
else
    "$PREFIX/bin/pip" install "${pip_options[@]}" --upgrade "$checkout"
fi
"$PREFIX/bin/tuwunel-guard" --version

install -D --mode=0644 "$checkout/docs/systemd.md" "$PREFIX/share/doc/systemd.md" 2>/dev/null \
    || echo "Note: $checkout/docs/systemd.md not found; the unit's Documentation= link is missing"

echo "Installing the unit to $UNIT_PATH and the journal catalog to $CATALOG_PATH"
install -D --mode=0644 "$checkout/systemd/tuwunel-guard.service" "$UNIT_PATH"
install -D --mode=0644 "$checkout/systemd/tuwunel-guard.catalog" "$CATALOG_PATH"
journalctl --update-catalog
install -D --mode=0644 "$checkout/systemd/podman.conf" "$PREFIX/share/systemd/podman.conf"
if [ "$podman" = yes ]; then
    echo "Installing the podman strategy's drop-in to $PODMAN_DROPIN_PATH"
    install -D --mode=0644 "$checkout/systemd/podman.conf" "$PODMAN_DROPIN_PATH"
fi

install -d --mode=0755 "$CONFIG_DIR"
if [ -e "$CONFIG_PATH" ]; then
    echo "Keeping the existing config $CONFIG_PATH"
elif [ -f "$checkout/config/config.example.toml" ]; then
    install --mode=0640 "$checkout/config/config.example.toml" "$CONFIG_PATH"
    echo "Installed the example config to $CONFIG_PATH; edit it before starting the service"
else
    echo "Note: $checkout/config/config.example.toml not found; write $CONFIG_PATH yourself"
fi

if [ -d /run/systemd/system ]; then
    systemctl daemon-reload
else
    echo "Note: systemd is not running here, so systemctl daemon-reload was skipped"
fi

if [ "$enable" = yes ]; then
    systemctl enable --now tuwunel-guard.service
    systemctl --no-pager status tuwunel-guard.service || true
else
    echo
    echo "Next: check the config, then start the service and enable it at boot:"
    echo "  $PREFIX/bin/tuwunel-guard --config $CONFIG_PATH check"
    echo "  systemctl enable --now tuwunel-guard"
fi
