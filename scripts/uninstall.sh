#!/usr/bin/env bash
# Remove what scripts/install.sh installed: stop and disable the service, then delete the
# program, the unit and the journal catalog. Run as root.
#
# The config (/etc/tuwunel-guard), the state (/var/lib/tuwunel-guard) and drop-ins written by
# `systemctl edit` (/etc/systemd/system/tuwunel-guard.service.d) stay, so that a reinstall
# continues where the guard stopped. Delete them yourself if you want them gone. The podman
# drop-in that `install.sh --podman` wrote is removed when it is unchanged, and kept otherwise.
set -euo pipefail

PREFIX=/opt/tuwunel-guard
UNIT=tuwunel-guard.service
UNIT_PATH=/etc/systemd/system/$UNIT
CATALOG_PATH=/usr/lib/systemd/catalog/tuwunel-guard.catalog
DROPIN_DIR=/etc/systemd/system/$UNIT.d
PODMAN_DROPIN_PATH=$DROPIN_DIR/podman.conf
PODMAN_DROPIN_COPY=$PREFIX/share/systemd/podman.conf

if [ "$(id -u)" -ne 0 ]; then
    echo "uninstall.sh: run as root: it deletes files under /opt, /etc and /usr/lib" >&2
    exit 1
fi

systemd_running=no
[ -d /run/systemd/system ] && systemd_running=yes

if [ "$systemd_running" = yes ] && [ -e "$UNIT_PATH" ]; then
    echo "Stopping and disabling $UNIT"
    systemctl disable --now "$UNIT"
fi

# Comparing with the reference copy in $PREFIX shows whether the admin changed the drop-in.
if [ -e "$PODMAN_DROPIN_PATH" ] && cmp --quiet "$PODMAN_DROPIN_PATH" "$PODMAN_DROPIN_COPY"; then
    rm -f "$PODMAN_DROPIN_PATH"
    rmdir "$DROPIN_DIR" 2>/dev/null || true
    echo "Removed $PODMAN_DROPIN_PATH"
fi

rm -f "$UNIT_PATH"
rm -rf "$PREFIX"
if [ -e "$CATALOG_PATH" ]; then
    rm -f "$CATALOG_PATH"
    journalctl --update-catalog
fi
if [ "$systemd_running" = yes ]; then
    systemctl daemon-reload
    systemctl reset-failed "$UNIT" 2>/dev/null || true
fi

echo "Removed $PREFIX, $UNIT_PATH and $CATALOG_PATH."
for kept_path in /etc/tuwunel-guard /var/lib/tuwunel-guard "$DROPIN_DIR"; do
    if [ -e "$kept_path" ]; then
        echo "Kept $kept_path; remove it with: rm -r $kept_path"
    fi
done
