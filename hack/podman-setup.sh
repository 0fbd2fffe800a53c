#!/usr/bin/env bash
# Rootful podman for building and running the project's images (`make podman-setup`).
#
# Debian packages only: podman and buildah build and run, runc is the runtime that works
# on our machines (crun fails with cgroup errors there), mmdebstrap builds the base image
# from the Debian mirror (no registry holds one we can pull). Then the two settings the
# defaults get wrong on these machines go into /etc/containers/containers.conf.
# Idempotent: safe to run again. Needs root (apt-get and /etc).
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(podman buildah runc mmdebstrap)
if [ "$(id -u)" != 0 ]; then
    echo "podman-setup: run as root (apt-get install, /etc/containers)" >&2
    exit 1
fi
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    apt-get update -q
    # With recommends: netavark (bridge networking for builds), catatonit, uidmap.
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
fi
python3 hack/containers_conf.py /etc/containers/containers.conf
podman --version
podman info --format '{{.Host.OCIRuntime.Name}} {{.Store.GraphDriverName}}'
