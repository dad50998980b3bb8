"""Providers of populated/discarded state: virtio-mem and guest_memfd attributes."""
