"""A digest of a machine's populated memory, to compare both ends of a migration.

Rules: per RAM region (:func:`~ramdiscard.migration.layout.collect_regions`, in that
order) a SHA-256 over each populated run's offset, length and content; the whole digest
is a SHA-256 over the regions' hex digests. Only populated memory is read (discarded
memory is never touched). The caller keeps the memory still meanwhile (guest stopped)
and holds the lock under which plug and unplug happen.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ramdiscard.migration.layout import collect_regions

if TYPE_CHECKING:
    from ramdiscard.memory import AddressSpace
    from ramdiscard.providers.virtio_mem import VirtioMem


def memory_digest(address_space: AddressSpace, devices: Sequence[VirtioMem]) -> dict[str, Any]:
    """``{"regions": [{"name", "runs": [[offset, length], ...], "sha256"}], "sha256"}``."""
    out = []
    total = hashlib.sha256()
    for r in collect_regions(address_space, list(devices)):
        h = hashlib.sha256()
        runs = r.populated_runs()
        view = r.view
        for s, n in runs:
            h.update(s.to_bytes(8, "little") + n.to_bytes(8, "little"))
            h.update(view[s : s + n])
        digest = h.hexdigest()
        total.update(digest.encode())
        out.append({"name": r.mr.name, "runs": [[s, n] for s, n in runs], "sha256": digest})
    return {"regions": out, "sha256": total.hexdigest()}
