#!/bin/bash
# Install the real test bed on Debian 12 (bookworm). Run it as root. A second run only checks and is fast.
#
# - Debian 12 packages: docker.io (Docker Engine 20.10), docker-registry, skopeo,
#   busybox-static, zstd, git. No service is started while they install.
# - Docker Engine 26.1 from Debian 13 (trixie): docker.io, containerd, docker-cli and
#   docker-compose, fetched with a private apt state so the system's apt sources stay
#   untouched, cached in $CACHE_DIR and unpacked into $DOCKER26_ROOT.
# - Compose v2 (from trixie's docker-compose) at $BIN_DIR/docker-compose.
#
# Environment: TESTBED_DEBIAN_MIRROR overrides the Debian mirror (default
# http://deb.debian.org/debian, the one the project's CI machines use).
set -euo pipefail

MIRROR="${TESTBED_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg
CACHE_DIR=/var/cache/tuwunel-guard-testbed
PREFIX=/opt/tuwunel-guard-testbed
DOCKER26_ROOT="$PREFIX/docker26"
BIN_DIR="$PREFIX/bin"
SYSTEM_PACKAGES=(docker.io docker-registry skopeo busybox-static zstd git ca-certificates)
TRIXIE_PACKAGES=(docker.io containerd docker-cli docker-compose)

log() { printf 'testbed/install.sh: %s\n' "$*" >&2; }

if [[ $EUID -ne 0 ]]; then
    log "must run as root (it installs packages and writes $PREFIX)"
    exit 1
fi

missing_system_packages() {
    local package status
    for package in "${SYSTEM_PACKAGES[@]}"; do
        status=$(dpkg-query -W -f='${db:Status-Status}' "$package" 2>/dev/null || true)
        if [[ $status != installed ]]; then
            printf '%s\n' "$package"
        fi
    done
}

# A policy-rc.d that exits with 101 makes invoke-rc.d skip every service start, so the
# docker.io postinst does not start a system dockerd. A policy-rc.d that was already there
# is restored afterwards.
POLICY=/usr/sbin/policy-rc.d
POLICY_BACKUP=""
restore_policy() {
    if [[ -n $POLICY_BACKUP ]]; then
        mv -f "$POLICY_BACKUP" "$POLICY"
    else
        rm -f "$POLICY"
    fi
}

install_system_packages() {
    local -a missing
    mapfile -t missing < <(missing_system_packages)
    if [[ ${#missing[@]} -eq 0 ]]; then
        log "Debian 12 packages already installed"
        return
    fi
    log "installing ${missing[*]}"
    if [[ -e $POLICY ]]; then
        POLICY_BACKUP=$(mktemp /usr/sbin/policy-rc.d.testbed-backup.XXXXXX)
        cp -p "$POLICY" "$POLICY_BACKUP"
    fi
    trap restore_policy EXIT
    printf '#!/bin/sh\nexit 101\n' >"$POLICY"
    chmod 0755 "$POLICY"

    export DEBIAN_FRONTEND=noninteractive
    apt-get update
    apt-get install -y --no-install-recommends "${missing[@]}"

    restore_policy
    trap - EXIT
}

# The private apt state: its own sources file, lists and cache, so "apt-get update" here
# neither reads nor changes /etc/apt/sources.list*.
APT_STATE="$CACHE_DIR/apt-trixie"
trixie_apt() {
    apt-get \
        -o Dir::Etc::sourcelist="$APT_STATE/sources.list" \
        -o Dir::Etc::sourceparts=- \
        -o Dir::State::Lists="$APT_STATE/lists" \
        -o Dir::Cache="$APT_STATE/cache" \
        -o Dir::Cache::pkgcache="$APT_STATE/cache/pkgcache.bin" \
        -o Dir::Cache::srcpkgcache="$APT_STATE/cache/srcpkgcache.bin" \
        "$@"
}

cached_trixie_debs() {
    local package
    for package in "${TRIXIE_PACKAGES[@]}"; do
        # apt-get download names files PACKAGE_VERSION_ARCH.deb.
        compgen -G "$CACHE_DIR/debs/${package}_*.deb" | head -n 1
    done
}

download_trixie_debs() {
    local -a debs
    mapfile -t debs < <(cached_trixie_debs)
    if [[ ${#debs[@]} -eq ${#TRIXIE_PACKAGES[@]} ]]; then
        log "Debian 13 packages already cached in $CACHE_DIR/debs"
        return
    fi
    log "downloading ${TRIXIE_PACKAGES[*]} from $MIRROR trixie"
    mkdir -p "$APT_STATE/lists/partial" "$APT_STATE/cache/archives/partial" "$CACHE_DIR/debs"
    printf 'deb [signed-by=%s] %s trixie main\n' "$KEYRING" "$MIRROR" >"$APT_STATE/sources.list"
    trixie_apt update
    # apt-get download writes into the current folder. Download into a scratch folder and
    # move the complete set, so an interrupted run leaves no half-filled cache behind.
    local scratch
    scratch=$(mktemp -d "$CACHE_DIR/download.XXXXXX")
    chown _apt "$scratch" 2>/dev/null || true
    (cd "$scratch" && trixie_apt download "${TRIXIE_PACKAGES[@]}")
    rm -f "$CACHE_DIR"/debs/*.deb
    mv "$scratch"/*.deb "$CACHE_DIR/debs/"
    rmdir "$scratch"
}

unpack_docker26() {
    local -a debs
    mapfile -t debs < <(cached_trixie_debs)
    # The stamp lists the unpacked .deb files, so a new download triggers a fresh unpack.
    local stamp="$DOCKER26_ROOT/.testbed-unpacked"
    local expected
    expected=$(printf '%s\n' "${debs[@]##*/}")
    if [[ -f $stamp && $(cat "$stamp") == "$expected" ]]; then
        log "Docker 26 already unpacked in $DOCKER26_ROOT"
        return
    fi
    log "unpacking into $DOCKER26_ROOT"
    rm -rf "$DOCKER26_ROOT"
    mkdir -p "$DOCKER26_ROOT"
    local deb
    for deb in "${debs[@]}"; do
        dpkg-deb -x "$deb" "$DOCKER26_ROOT"
    done
    printf '%s\n' "$expected" >"$stamp"
}

link_compose() {
    mkdir -p "$BIN_DIR"
    local compose=""
    local candidate
    for candidate in \
        "$DOCKER26_ROOT/usr/libexec/docker/cli-plugins/docker-compose" \
        "$DOCKER26_ROOT/usr/bin/docker-compose"; do
        if [[ -x $candidate && ! -L $candidate ]]; then
            compose=$candidate
            break
        fi
    done
    if [[ -z $compose ]]; then
        log "compose v2 binary not found in $DOCKER26_ROOT (checked usr/libexec/docker/cli-plugins and usr/bin)"
        exit 1
    fi
    ln -sfn "$compose" "$BIN_DIR/docker-compose"
}

install_system_packages
download_trixie_debs
unpack_docker26
link_compose

dockerd26="$DOCKER26_ROOT/usr/sbin/dockerd"
for required in /usr/sbin/dockerd /usr/bin/containerd /usr/sbin/runc /usr/bin/docker-init \
    /usr/bin/docker-registry /usr/bin/skopeo /bin/busybox "$dockerd26" \
    "$DOCKER26_ROOT/usr/bin/containerd" "$BIN_DIR/docker-compose"; do
    if [[ ! -x $required ]]; then
        log "missing after install: $required"
        exit 1
    fi
done

cat <<EOF
Docker Engine 20.10 dockerd:  /usr/sbin/dockerd ($(/usr/sbin/dockerd --version))
Docker Engine 26.1 root:      $DOCKER26_ROOT
Docker Engine 26.1 dockerd:   $dockerd26 ($("$dockerd26" --version))
containerd for Engine 26.1:   $DOCKER26_ROOT/usr/bin/containerd ($("$DOCKER26_ROOT/usr/bin/containerd" --version))
runc (Debian 12, both):       /usr/sbin/runc
docker-init (Debian 12):      /usr/bin/docker-init
compose v2:                   $BIN_DIR/docker-compose ($("$BIN_DIR/docker-compose" version --short))
registry:                     /usr/bin/docker-registry
skopeo:                       /usr/bin/skopeo ($(/usr/bin/skopeo --version))
busybox:                      /bin/busybox
cached Debian 13 packages:    $CACHE_DIR/debs
EOF
