"""Fixtures shared with the virtio-mem device tests (replay drives a real device)."""

from tests.providers.virtio_mem.conftest import make  # noqa: F401 - fixture
