"""vhost-user backend: ramdiscard's virtio-mem device served to a QEMU frontend.

Modules, one concern each: :mod:`.wire` (sans-I/O message codec), :mod:`.memtable`
(SET_MEM_TABLE regions and address translation), :mod:`.split_ring` (a split virtqueue
over guest memory, the real :class:`~ramdiscard.interfaces.Virtqueue`), :mod:`.server`
(one frontend over a UNIX socket).
"""
