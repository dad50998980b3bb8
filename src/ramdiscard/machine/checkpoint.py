"""Snapshot, restore, migrate and dump of a machine, each checked for integrity.

Rules (every function: the caller holds ``m.lock`` and ``m`` is open):

* The guest model's state (drivers, workload) stands for what lives in guest memory: it
  is captured with a snapshot or a migration (:func:`capture_guest`, a copy with the
  :func:`fingerprint` of memory) and continues on the target (:func:`adopt_guest`).
* :func:`check_integrity` raises MigrationError unless every populated run of every RAM
  block has the captured checksum and the workload's patterns are intact; a dump is
  checked to hold exactly boot RAM plus plugged memory.
* Snapshots this machine took are remembered by path (:class:`Snapshots`); restoring a
  file it did not write restores memory and devices, and the guest model restarts (fresh
  drivers that find memory plugged and send UNPLUG_ALL first).
* Figures are returned as dicts of bytes, counts and seconds.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from pathlib import Path
from typing import Any

from ramdiscard.dump import DumpInfo, dump_guest_memory
from ramdiscard.errors import InvalidArgument
from ramdiscard.fileio import create_output, open_input
from ramdiscard.guest import GuestDriver, TouchWorkload
from ramdiscard.hostmem import RamBlock
from ramdiscard.machine.parts import Fingerprint, GuestState, MachineParts
from ramdiscard.machine.scenario import Transport
from ramdiscard.migration import MigrationError, MigrationStats, load, migrate_to, receive_from, save
from ramdiscard.migration.checksum import default as default_checksum
from ramdiscard.migration.checksum import digest


def fingerprint(m: MachineParts) -> Fingerprint:
    """Checksums of every populated run of every RAM block (boot RAM whole, device RAM
    per plugged run). Reads memory in place; never touches discarded memory."""
    algo = default_checksum()
    out: Fingerprint = {}
    if m.boot is not None and m.boot.ram is not None:
        view = m.blocks[0].view
        out["pc.ram"] = [(0, len(view), digest(algo, view))]
    for dev_id, dev in m.devices.items():
        ram = dev.region.ram
        assert isinstance(ram, RamBlock)
        out[dev_id] = [(o, n, digest(algo, ram.view[o : o + n])) for o, n in dev.plugged_ranges()]
    return out


def _clone_guest(
    m: MachineParts, drivers: dict[str, GuestDriver], workload: TouchWorkload | None
) -> GuestState:
    """A copy of ``drivers`` and ``workload`` bound to ``m``'s devices and memory."""
    clones = {i: d.clone(m.devices[i], workload=None) for i, d in drivers.items()}
    wl = workload.clone(m.memory) if workload is not None else None
    for d in clones.values():
        d.workload = wl
    return GuestState(clones, wl)


def capture_guest(m: MachineParts) -> GuestState:
    """A copy of ``m``'s guest model with the fingerprint of its memory now."""
    state = _clone_guest(m, m.drivers, m.workload)
    state.fingerprint = fingerprint(m)
    return state


def adopt_guest(m: MachineParts, state: GuestState) -> None:
    """Continue with a copy of ``state``'s guest (drivers and workload) on ``m``."""
    adopted = _clone_guest(m, state.drivers, state.workload)
    m.drivers = adopted.drivers
    m.workload = adopted.workload


def check_integrity(m: MachineParts, want: Fingerprint, what: str) -> None:
    """MigrationError naming ``what`` unless ``m``'s memory and patterns are as captured."""
    got = fingerprint(m)
    if got != want:
        bad = sorted(k for k in set(got) | set(want) if got.get(k) != want.get(k))
        raise MigrationError(f"{what}: memory differs from the source in {', '.join(bad)}")
    if m.workload is not None:
        broken = m.workload.verify()
        if broken:
            raise MigrationError(f"{what}: {len(broken)} chunk(s) the guest wrote lost their content")


def stats_figures(stats: MigrationStats) -> dict[str, Any]:
    return {
        "page_bytes": stats.page_bytes,
        "page_sections": stats.page_sections,
        "stream_bytes": stats.stream_bytes,
        "seconds": round(stats.seconds, 4),
    }


def snapshot(m: MachineParts, path: str | None) -> dict[str, Any]:
    """Save ``m`` to ``path`` (default: in ``m.files.files_dir()``); remember its guest."""
    target = Path(path) if path else m.files.files_dir() / f"{m.scenario.name}.snap"
    state = capture_guest(m)
    with create_output(target, "snapshot file", durable=bool(path)) as f:
        stats = save(m.space_or_fail(), list(m.devices.values()), f)
    m.snapshots.by_path[str(target)] = state
    m.snapshots.latest = str(target)
    st = os.stat(target)
    return {"path": str(target), **stats_figures(stats), "file_size": st.st_size,
            "file_allocated": st.st_blocks * 512}  # fmt: skip


def restore(m: MachineParts, path: str | None) -> dict[str, Any]:
    """Reset every device, load ``path`` (default the latest snapshot) into ``m`` and
    continue the guest from it (module rules). MigrationError / InvalidArgument."""
    key = path if path is not None else m.snapshots.latest
    if key is None:
        raise InvalidArgument("restore: no snapshot taken and no path given")
    state = m.snapshots.by_path.get(str(Path(key)))
    for dev in m.devices.values():
        dev.system_reset()
    with open_input(key, "snapshot file") as f:
        stats = load(m.space_or_fail(), list(m.devices.values()), f)
    if state is not None:
        adopt_guest(m, state)
        check_integrity(m, state.fingerprint, "restore")
    else:
        for dev_id in m.devices:
            m.new_driver(dev_id)
        if m.workload is not None:
            m.workload.unplugged_all()
    return {"path": key, **stats_figures(stats)}


def transfer(m: MachineParts, dest: MachineParts, transport: Transport, path: str | None) -> dict[str, Any]:
    """Move ``m``'s memory, device states and guest to the fresh ``dest`` through a file
    (``path``, default a temporary one, removed after) or a loopback TCP connection;
    check integrity on ``dest``. ``m`` is unchanged; ``dest`` is the caller's to close on
    failure."""
    state = capture_guest(m)
    if transport is Transport.FILE:
        target = Path(path) if path else m.files.files_dir() / f"{m.scenario.name}-migration.bin"
        with create_output(target, "migration file", durable=bool(path)) as f:
            save(m.space_or_fail(), list(m.devices.values()), f)
            f.seek(0)
            stats = load(dest.space_or_fail(), list(dest.devices.values()), f)
        if not path:
            with contextlib.suppress(OSError):
                target.unlink()
    else:
        stats = _transfer_tcp(m, dest)
    adopt_guest(dest, state)
    check_integrity(dest, state.fingerprint, "migrate")
    return {"transport": transport.value, **stats_figures(stats)}


def _transfer_tcp(m: MachineParts, dest: MachineParts) -> MigrationStats:
    result: dict[str, Any] = {}
    with socket.create_server(("127.0.0.1", 0)) as ls:
        port = ls.getsockname()[1]

        def receive() -> None:
            try:
                result["stats"] = receive_from(
                    ls, dest.space_or_fail(), list(dest.devices.values()), accept_timeout=30
                )
            except BaseException as exc:  # re-raised in the caller's thread
                result["error"] = exc

        t = threading.Thread(target=receive, name="ramdiscard-migrate-receive", daemon=True)
        t.start()
        try:
            migrate_to("127.0.0.1", port, m.space_or_fail(), list(m.devices.values()))
        finally:
            t.join()
    if "error" in result:
        raise result["error"]
    stats: MigrationStats = result["stats"]
    return stats


def dump(m: MachineParts, path: str, *, durable: bool) -> dict[str, Any]:
    """Write an ELF core of ``m``'s populated memory to ``path``; check its size."""
    info: DumpInfo = dump_guest_memory(m.space_or_fail(), path, durable=durable)
    want = m.scenario.boot_ram + sum(d.plugged_size for d in m.devices.values())
    if info.bytes != want:
        raise MigrationError(f"dump: {info.bytes:#x} bytes dumped, {want:#x} populated")
    return {"path": info.path, "segments": info.segments, "bytes": info.bytes, "file_size": info.file_size}
