#!/bin/bash
# Install Podman from Debian 12 for the podman strategy route's tests. Run it as root; a second
# run only checks and is fast.
#
# The tests run podman as root with a private storage root and the vfs storage driver, and they
# never start a Podman container (the route only pulls, creates, commits and saves). So podman
# 4.3.1 needs only its Depends: conmon, golang-github-containers-common and an OCI runtime
# (runc, already there for Docker). The Recommends (uidmap, slirp4netns, fuse-overlayfs,
# buildah, catatonit, dbus-user-session) serve rootless use, overlay storage and networking, so
# --no-install-recommends leaves them out.
#
# Environment: none. apt-get uses the system's sources.
set -euo pipefail

PACKAGES=(podman)

log() { printf 'testbed/podman.sh: %s\n' "$*" >&2; }

if [[ $EUID -ne 0 ]]; then
    log "must run as root (it installs packages)"
    exit 1
fi

missing_packages() {
    local package status
    for package in "${PACKAGES[@]}"; do
        status=$(dpkg-query -W -f='${db:Status-Status}' "$package" 2>/dev/null || true)
        if [[ $status != installed ]]; then
            printf '%s\n' "$package"
        fi
    done
}

mapfile -t missing < <(missing_packages)
if [[ ${#missing[@]} -eq 0 ]]; then
    log "podman already installed"
else
    log "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update
    apt-get install -y --no-install-recommends "${missing[@]}"
fi

if [[ ! -x /usr/bin/podman ]]; then
    log "missing after install: /usr/bin/podman"
    exit 1
fi
printf 'podman:                       /usr/bin/podman (%s)\n' "$(/usr/bin/podman --version)"
