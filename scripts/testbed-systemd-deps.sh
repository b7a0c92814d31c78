#!/bin/sh
# Install the Debian 12 packages that the systemd and journal tests need (run as root).
#
# systemd-container provides systemd-nspawn, which boots a real systemd 252 for
# tests/systemd/. --no-install-recommends keeps out libnss-mymachines, which edits
# /etc/nsswitch.conf. systemd-journald, journalctl, unshare and nsenter come with the base
# systemd and util-linux packages.
set -eu

if command -v systemd-nspawn >/dev/null 2>&1; then
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update
apt-get install -y --no-install-recommends systemd-container
