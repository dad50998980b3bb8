"""The guest's kernel and initramfs, built from Debian packages and cached.

Rules: :func:`guest_image` returns (kernel, initramfs) paths under
``/var/cache/ramdiscard/guest-<kernel version>/``, building them on first use: the stock
Debian cloud kernel package (bookworm-backports) and ``busybox-static`` are fetched with
``apt-get download`` and extracted (nothing is installed); the initramfs is a newc cpio
written here holding busybox, the kernel's ``virtio_mem`` module (decompressed) and the
:data:`INIT` script. Files are written to a temporary name and renamed, so a cache entry
is either complete or absent. Failures raise :class:`GuestImageError` (one line).
"""

from __future__ import annotations

import lzma
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from ramdiscard.errors import HostError

KERNEL_PACKAGE = "linux-image-6.12.95+deb12-cloud-amd64-unsigned"
KERNEL_SUITE = "bookworm-backports"
KERNEL_VERSION = "6.12.95+deb12-cloud-amd64"
CACHE_ROOT = Path("/var/cache/ramdiscard")

INIT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mkdir -p /tmp && mount -t tmpfs -o size=95% tmp /tmp
insmod /lib/virtio_mem.ko
memtotal() { awk '/^MemTotal:/ {print $2}' /proc/meminfo; }
(
    last=""
    while true; do
        m=$(memtotal)
        if [ "$m" != "$last" ]; then echo "RAMDISCARD-MEMTOTAL $m"; last=$m; fi
        sleep 0.2
    done
) &
echo "RAMDISCARD-READY"
while read -r cmd arg; do
    case "$cmd" in
        touch) dd if=/dev/zero of=/tmp/fill bs=1M count="$arg" 2>/dev/null; echo "RAMDISCARD-TOUCHED $arg";;
        free) rm -f /tmp/fill; echo "RAMDISCARD-FREED";;
        memtotal) echo "RAMDISCARD-MEMTOTAL $(memtotal)";;
        poweroff) poweroff -f;;
    esac
done
"""


class GuestImageError(HostError):
    """The guest kernel or initramfs could not be fetched or built."""


def _newc(entries: list[tuple[str, int, bytes]]) -> bytes:
    """A newc cpio archive of (path, mode, data) entries."""
    out = bytearray()
    ino = 1
    for name, mode, data in [*entries, ("TRAILER!!!", 0, b"")]:
        encoded = name.encode() + b"\0"
        fields = [ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(encoded), 0]
        out += b"070701" + b"".join(f"{f:08X}".encode() for f in fields) + encoded
        out += b"\0" * (-len(out) % 4)
        out += data
        out += b"\0" * (-len(out) % 4)
        ino += 1
    return bytes(out)


def _download(package: str, workdir: Path) -> Path:
    try:
        subprocess.run(
            ["apt-get", "download", "-q", package], cwd=workdir, check=True, capture_output=True, timeout=600
        )
        deb = next(workdir.glob("*.deb"))
        target = workdir / package.split("/")[0]
        cmd = ["dpkg-deb", "-x", str(deb), str(target)]
        subprocess.run(cmd, check=True, capture_output=True, timeout=600)
        deb.unlink()
    except (OSError, subprocess.SubprocessError, StopIteration) as exc:
        detail = getattr(exc, "stderr", b"") or b""
        last = detail.decode(errors="replace").strip().splitlines()[-1:] if detail else []
        raise GuestImageError(
            f"cannot fetch Debian package {package} ({last[0] if last else exc}); "
            f"does apt know {KERNEL_SUITE} (run scripts/build-qemu.sh once)?"
        ) from None
    return target


def guest_image(cache_root: Path = CACHE_ROOT) -> tuple[Path, Path]:
    """(kernel, initramfs), built on first use; see the module rules."""
    cache = cache_root / f"guest-{KERNEL_VERSION}"
    kernel, initramfs = cache / "vmlinuz", cache / "initramfs.cpio"
    if kernel.is_file() and initramfs.is_file():
        return kernel, initramfs
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="ramdiscard-guest-", dir=cache) as tmp:
        work = Path(tmp)
        kroot = _download(f"{KERNEL_PACKAGE}/{KERNEL_SUITE}", work)
        broot = _download("busybox-static", work)
        try:
            vmlinuz = next((kroot / "boot").glob("vmlinuz-*"))
            module = next(kroot.glob("lib/modules/*/kernel/drivers/virtio/virtio_mem.ko*"))
            busybox = (broot / "bin" / "busybox").read_bytes()
        except (StopIteration, OSError) as exc:
            raise GuestImageError(f"unexpected package contents: {exc}") from None
        ko = module.read_bytes()
        if module.suffix == ".xz":
            ko = lzma.decompress(ko)
        archive = _newc(
            [
                ("bin", 0o40755, b""),
                ("dev", 0o40755, b""),
                ("proc", 0o40755, b""),
                ("sys", 0o40755, b""),
                ("lib", 0o40755, b""),
                ("bin/busybox", 0o100755, busybox),
                ("lib/virtio_mem.ko", 0o100644, ko),
                ("init", 0o100755, INIT.encode()),
            ]
        )
        (work / "initramfs.cpio").write_bytes(archive)
        shutil.copyfile(vmlinuz, work / "vmlinuz")
        os.replace(work / "vmlinuz", kernel)
        os.replace(work / "initramfs.cpio", initramfs)
    return kernel, initramfs
