#!/usr/bin/env bash
# Builds the QEMU that real-guest runs need and caches it outside the repository:
#   /var/cache/ramdiscard/qemu-10.0.2-vhostdev/bin/qemu-system-x86_64
# Debian's qemu 10.0.2 source package (bookworm-backports) with one change: the generic
# vhost-user-device(-pci) is made user-creatable. x86_64-softmmu only.
# Idempotent: does nothing when the binary is already there. Needs root (apt-get).
# Environment: RAMDISCARD_QEMU_PREFIX overrides the install directory (for tests of this
# script); JOBS the build parallelism (default: number of CPUs).
set -euo pipefail

QEMU_VERSION=10.0.2
PREFIX=${RAMDISCARD_QEMU_PREFIX:-/var/cache/ramdiscard/qemu-${QEMU_VERSION}-vhostdev}
BIN=$PREFIX/bin/qemu-system-x86_64
JOBS=${JOBS:-$(nproc)}

# What the build is made of; a cached binary built differently is rebuilt. NUMA policy
# support is on as in Debian's own package (the differential QMP tests compare memory
# backend properties such as policy and host-nodes with QEMU's answers).
CONFIG="qemu ${QEMU_VERSION}; patch: vhost-user-device user_creatable; configure: x86_64-softmmu tcg vhost-user pixman fdt numa"
STAMP=$PREFIX/build-config

if [ -x "$BIN" ] && [ "$(cat "$STAMP" 2>/dev/null)" = "$CONFIG" ] &&
    "$BIN" -device help 2>/dev/null | grep -q '"vhost-user-device-pci"'; then
    echo "build-qemu: $BIN already built"
    exit 0
fi

if [ "$(id -u)" != 0 ]; then
    echo "build-qemu: error: needs root to install Debian build dependencies (apt-get)" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
SRC_LIST=/etc/apt/sources.list.d/ramdiscard-bookworm-backports-src.sources
if [ ! -f "$SRC_LIST" ]; then
    cat >"$SRC_LIST" <<'EOF'
Types: deb deb-src
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
fi
apt-get -o DPkg::Lock::Timeout=900 update -q
# Build dependencies (Debian packages), then run-time firmware: SeaBIOS and the option
# ROMs (linuxboot_dma.bin, kvmvapic.bin) of qemu-system-data.
apt-get -o DPkg::Lock::Timeout=900 install -y -q --no-install-recommends \
    gcc g++ make pkg-config ninja-build libglib2.0-dev libpixman-1-dev libfdt-dev libnuma-dev flex bison \
    python3-venv dpkg-dev xz-utils bzip2 ca-certificates \
    seabios qemu-system-data

WORK=$(mktemp -d /var/tmp/ramdiscard-qemu-build.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
cd "$WORK"

# Source package, pinned to the bookworm-backports suite. apt verifies every file against
# the signed Sources index. When the archive no longer serves that revision's .dsc and
# Debian patch tarball (only the upstream +ds tarball), the build proceeds from the
# verified +ds tarball alone: Debian's patches are packaging and bug fixes that the
# vhost-user device does not depend on.
apt-get source -q --only-source "qemu/bookworm-backports" >source.log 2>&1 || true
SRC=$(find . -maxdepth 1 -type d -name "qemu-${QEMU_VERSION}*" | head -1)
if [ -z "$SRC" ]; then
    ORIG=$(find . -maxdepth 1 -type f -name "qemu_${QEMU_VERSION}+ds.orig.tar.*" | head -1)
    if [ -z "$ORIG" ]; then
        tail -5 source.log >&2
        echo "build-qemu: error: apt-get source qemu/bookworm-backports did not fetch qemu ${QEMU_VERSION}" >&2
        exit 1
    fi
    echo "build-qemu: Debian patch set unavailable from the archive; building the verified $ORIG"
    tar xf "$ORIG"
    SRC=$(find . -maxdepth 1 -type d -name "qemu-${QEMU_VERSION}*" | head -1)
fi
cd "$SRC"

# The one functional change: make the generic vhost-user device user-creatable.
for f in hw/virtio/vhost-user-device-pci.c hw/virtio/vhost-user-device.c; do
    sed -i 's/user_creatable = false;/user_creatable = true;/' "$f"
    grep -q 'user_creatable = true;' "$f" || {
        echo "build-qemu: error: could not patch $f" >&2
        exit 1
    }
done
# The +ds tarball lacks the edk2 .bz2 images that pc-bios/meson.build would unpack.
sed -i 's/^\(\s*\)if unpack_edk2_blobs/\1if false and unpack_edk2_blobs/' pc-bios/meson.build

python3 -m venv "$WORK/venv"
"$WORK/venv/bin/pip" install -q 'meson>=1.5,<2' 'pycotap==1.3.1'

mkdir build
cd build
../configure --prefix="$PREFIX" --python="$WORK/venv/bin/python3" \
    --target-list=x86_64-softmmu --without-default-features \
    --enable-tcg --enable-vhost-user --enable-pixman --enable-fdt=system --enable-numa \
    --disable-docs --disable-install-blobs --disable-werror >configure.log 2>&1 || {
    tail -20 configure.log >&2
    echo "build-qemu: error: configure failed" >&2
    exit 1
}
ninja -j"$JOBS" qemu-system-x86_64 >ninja.log 2>&1 || {
    tail -30 ninja.log >&2
    echo "build-qemu: error: build failed" >&2
    exit 1
}

# Install: the binary, and a data directory of links to Debian's firmware so the binary
# finds bios-256k.bin and the option ROMs without -L.
mkdir -p "$PREFIX/bin" "$PREFIX/share/qemu"
for f in /usr/share/qemu/*; do
    ln -sfn "$f" "$PREFIX/share/qemu/$(basename "$f")"
done
for f in /usr/share/seabios/*.bin; do
    ln -sfn "$f" "$PREFIX/share/qemu/$(basename "$f")"
done
install -m 0755 qemu-system-x86_64 "$BIN.tmp"
mv -f "$BIN.tmp" "$BIN"
"$BIN" -device help | grep -q '"vhost-user-device-pci"' || {
    echo "build-qemu: error: built binary does not offer vhost-user-device-pci" >&2
    exit 1
}
printf '%s\n' "$CONFIG" >"$STAMP"
echo "build-qemu: installed $BIN"
