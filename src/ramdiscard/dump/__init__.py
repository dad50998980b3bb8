"""Guest memory dumps (QEMU's ``dump-guest-memory``) that contain only populated memory.

* :func:`dump_guest_memory` writes an ELF core file readable by ``readelf``, gdb, crash
  and pyelftools: one PT_LOAD per guest-physical block, ``p_paddr`` = guest address.
* :mod:`ramdiscard.dump.mapping` decides what is dumped (qemu-ram-discard §4.3);
  :mod:`ramdiscard.dump.elf` writes the file.
"""

from __future__ import annotations

import os
from contextlib import ExitStack
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ramdiscard.dump.elf import elf_headers, write_core
from ramdiscard.dump.mapping import GuestPhysBlock, guest_phys_blocks
from ramdiscard.errors import InvalidState
from ramdiscard.fileio import create_output
from ramdiscard.interfaces import MappedMemory
from ramdiscard.rdm.manager import manager_of

if TYPE_CHECKING:
    from ramdiscard.memory import AddressSpace
    from ramdiscard.rdm import RamDiscardManager


class DumpError(InvalidState):
    """The dump could not be written (a region without host memory view)."""


@dataclass(frozen=True, slots=True)
class DumpInfo:
    path: str
    segments: int
    bytes: int
    file_size: int


def _managers(space: AddressSpace) -> list[RamDiscardManager]:
    seen: dict[int, RamDiscardManager] = {}
    for section in space.flatview():
        rdm = manager_of(section.mr) if section.mr.is_ram else None
        if rdm is not None:
            seen.setdefault(id(rdm), rdm)
    return list(seen.values())


def dump_guest_memory(
    address_space: AddressSpace, path: str | os.PathLike[str], *, durable: bool = True
) -> DumpInfo:
    """Dump the populated guest memory of ``address_space`` to an ELF core file at ``path``.

    While the dump runs, state changes are held off: a virtio-mem device answers BUSY
    (its busy predicate), any other manager is locked. Discarded memory is neither read
    nor populated. The file is written by :func:`ramdiscard.fileio.create_output`: mode
    0600, renamed over ``path`` only when complete (fsynced if ``durable``); an existing
    ``path`` that is not a regular file, or that backs guest memory, is refused with
    :class:`~ramdiscard.fileio.FileRefused` before anything is read or written. Raises
    DumpError for a RAM region without a memory view, OSError from the file (then ``path``
    is as it was).
    """
    with ExitStack() as stack:
        busy_devices = []
        for rdm in _managers(address_space):
            if hasattr(rdm, "set_busy_predicate"):
                busy_devices.append(rdm)
            else:
                stack.enter_context(rdm.lock)
        if busy_devices:
            from ramdiscard.migration.busy import frozen

            stack.enter_context(frozen(busy_devices))  # type: ignore[arg-type]
        blocks = guest_phys_blocks(address_space)
        views = [_view(b) for b in blocks]
        headers, segments = elf_headers([(b.gpa, b.size) for b in blocks])
        with create_output(path, "dump file", durable=durable) as f:
            size = write_core(f.fileno(), headers, segments, views)
    return DumpInfo(os.fspath(path), len(blocks), sum(b.size for b in blocks), size)


def _view(block: GuestPhysBlock) -> memoryview:
    ram = block.mr.ram
    if not isinstance(ram, MappedMemory):
        raise DumpError(f"RAM region {block.mr.name!r} has no host memory view to dump")
    return ram.view[block.offset : block.offset + block.size]


__all__ = ["DumpError", "DumpInfo", "GuestPhysBlock", "dump_guest_memory", "guest_phys_blocks"]
