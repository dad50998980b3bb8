"""Guest memory dumps (QEMU's ``dump-guest-memory``) that contain only populated memory.

* :func:`dump_guest_memory` writes an ELF core file readable by ``readelf``, gdb, crash
  and pyelftools: one PT_LOAD per guest-physical block, ``p_paddr`` = guest address.
* :mod:`ramdiscard.dump.mapping` decides what is dumped (qemu-ram-discard §4.3);
  :mod:`ramdiscard.dump.elf` writes the file.
"""

from __future__ import annotations

import os
from contextlib import ExitStack, suppress
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ramdiscard.dump.elf import elf_headers, write_core
from ramdiscard.dump.mapping import GuestPhysBlock, guest_phys_blocks
from ramdiscard.errors import RamDiscardError
from ramdiscard.interfaces import MappedMemory

if TYPE_CHECKING:
    from ramdiscard.memory import AddressSpace
    from ramdiscard.rdm import RamDiscardManager


class DumpError(RamDiscardError):
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
        rdm = section.mr.ram_discard_manager if section.mr.is_ram else None
        if rdm is not None:
            seen.setdefault(id(rdm), rdm)
    return list(seen.values())


def dump_guest_memory(address_space: AddressSpace, path: str | os.PathLike[str]) -> DumpInfo:
    """Dump the populated guest memory of ``address_space`` to an ELF core file at ``path``.

    While the dump runs, state changes are held off: a virtio-mem device answers BUSY
    (its busy predicate), any other manager is locked. Discarded memory is neither read
    nor populated. Raises DumpError for a RAM region without a memory view, OSError from
    the file (a partial file is removed).
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
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            size = write_core(fd, headers, segments, views)
        except BaseException:
            os.close(fd)
            fd = -1
            with suppress(OSError):
                os.unlink(path)
            raise
        finally:
            if fd >= 0:
                os.close(fd)
    return DumpInfo(os.fspath(path), len(blocks), sum(b.size for b in blocks), size)


def _view(block: GuestPhysBlock) -> memoryview:
    ram = block.mr.ram
    if not isinstance(ram, MappedMemory):
        raise DumpError(f"RAM region {block.mr.name!r} has no host memory view to dump")
    return ram.view[block.offset : block.offset + block.size]


__all__ = ["DumpError", "DumpInfo", "GuestPhysBlock", "dump_guest_memory", "guest_phys_blocks"]
