"""Real-guest launcher: a QEMU (software emulation) runs a stock Linux guest whose
virtio-mem device is ramdiscard's, served over vhost-user (see docs and real-guest spec)."""
