#!/usr/bin/env bash
# The base every image of the project builds FROM: Debian bookworm (minbase) with
# python3, python3-venv and ca-certificates, made from the Debian mirror with mmdebstrap
# and imported into podman (`make base-image`). No registry needs to be reachable.
#
#   hack/base-image.sh [IMAGE]        default localhost/faastube-base:bookworm
#
# Skips the work when IMAGE exists already (FORCE=1 rebuilds it). Docs and man pages are
# left out (copyright files stay); apt's lists are not kept.
set -euo pipefail
image="${1:-localhost/faastube-base:bookworm}"
podman="${PODMAN:-podman}"
suite="${DEBIAN_SUITE:-bookworm}"
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
security="${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}"

if [ "${FORCE:-0}" != 1 ] && "$podman" image exists "$image"; then
    echo "base-image: $image exists (FORCE=1 to rebuild)"
    exit 0
fi
command -v mmdebstrap >/dev/null || { echo "base-image: mmdebstrap missing (make podman-setup)" >&2; exit 1; }

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
start=$(date +%s)
mmdebstrap --variant=minbase --quiet \
    --include=python3,python3-venv,ca-certificates \
    --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --dpkgopt='path-exclude=/usr/share/info/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' \
    "$suite" "$work/rootfs.tar" \
    "deb $mirror $suite main" \
    "deb $mirror $suite-updates main" \
    "deb $security $suite-security main"
"$podman" import --quiet \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["/bin/bash"]' \
    --message "mmdebstrap --variant=minbase $suite + python3 python3-venv ca-certificates" \
    "$work/rootfs.tar" "$image" >/dev/null
echo "base-image: $image ($(( $(date +%s) - start )) s, $("$podman" image inspect --format '{{.Size}}' "$image") bytes)"
