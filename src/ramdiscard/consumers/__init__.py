"""Listeners that map or pin guest memory: vfio-style DMA, DMA backends, KVM memslots, block DMA."""
