#!/usr/bin/env bash
# For machines with podman but no registry (see docs/deployment.md, "Building without a registry"):
# make a local stand-in for python:3.11-slim-bookworm from Debian's own packages, so the
# Dockerfile builds unchanged. Debian bookworm's python3 is 3.11. Skips what already exists.
# Needs: podman, debootstrap (apt-get install -y podman runc debootstrap). Run as root.
set -Eeuo pipefail
trap 'echo "${0##*/}: line $LINENO: $BASH_COMMAND failed" >&2' ERR

BASE=localhost/debian:bookworm
STANDIN=docker.io/library/python:3.11-slim-bookworm
ROOTFS="${ROOTFS:-/tmp/rootfs/bookworm}"

if podman image exists "$STANDIN"; then
    echo "$STANDIN exists"
    exit 0
fi
if ! podman image exists "$BASE"; then
    rm -rf "$ROOTFS"
    debootstrap --variant=minbase bookworm "$ROOTFS"
    # as slim as the official -slim images: no package caches, lists, docs, man pages or locales
    rm -rf "$ROOTFS"/var/cache/apt/*.bin "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/lib/apt/lists/* \
        "$ROOTFS"/usr/share/doc/* "$ROOTFS"/usr/share/man/* "$ROOTFS"/usr/share/info/*
    find "$ROOTFS/usr/share/locale" -mindepth 1 -maxdepth 1 ! -name locale.alias -exec rm -rf {} +
    mkdir -p "$ROOTFS/etc/dpkg/dpkg.cfg.d"
    printf '%s\n' 'path-exclude /usr/share/doc/*' 'path-include /usr/share/doc/*/copyright' \
        'path-exclude /usr/share/man/*' 'path-exclude /usr/share/info/*' 'path-exclude /usr/share/locale/*' \
        >"$ROOTFS/etc/dpkg/dpkg.cfg.d/docker-slim"
    tar -C "$ROOTFS" -c . | podman import - "$BASE"
fi
ctx="$(mktemp -d)"
trap 'rm -rf "$ctx"' EXIT
cat >"$ctx/Dockerfile" <<'DOCKERFILE'
FROM localhost/debian:bookworm
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-pip ca-certificates \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/* \
 && ln -s /usr/bin/python3 /usr/local/bin/python
DOCKERFILE
podman build --network host -t "$STANDIN" "$ctx"
