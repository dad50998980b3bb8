"""Replaying QEMU virtio-mem traces against ramdiscard's device (``ramdiscard replay``)."""
