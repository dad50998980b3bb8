"""``ramdiscard serve``: a scenario machine served over QMP until ``quit``."""

from __future__ import annotations

import asyncio
import contextlib
import os
import struct
import threading
import time
import zlib
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile
from qemu.qmp import EventListener, QMPClient

from ramdiscard.cli.serve import cli_main
from ramdiscard.units import MiB

SCENARIO = """
name = "qmp-serve"
boot-ram = "16M"

[[devices]]
id = "vm0"
size = "128M"
block-size = "2M"
backing = "anonymous"

[[consumers]]
type = "vfio"
backend = "auto"
coordinate-discards = true
"""


def test_serve_scenario_resize_status_quit(tmp_path: Path, sock_path: str) -> None:
    scenario = tmp_path / "s.toml"
    scenario.write_text(SCENARIO)
    result: list[int] = []
    server = threading.Thread(
        target=lambda: result.append(cli_main([str(scenario), "--qmp", f"unix:{sock_path}"])), daemon=True
    )
    server.start()
    deadline = time.monotonic() + 30
    while not os.path.exists(sock_path):
        assert server.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)

    async def drive() -> None:
        qmp = QMPClient("serve-test")
        await qmp.connect(sock_path)
        with qmp.listen(events := EventListener("MEMORY_DEVICE_SIZE_CHANGE")):
            await qmp.execute("qom-set", {"path": "vm0", "property": "requested-size", "value": 64 * MiB})
            while (await events.get())["data"]["size"] != 64 * MiB:
                pass
        (dev,) = await qmp.execute("query-memory-devices")
        assert dev["data"]["size"] == dev["data"]["requested-size"] == 64 * MiB
        assert dev["data"]["memdev"] == "/objects/vm0-mem"
        status = await qmp.execute("x-ramdiscard-status")
        assert status["plugged"] == 64 * MiB
        # The vfio consumer pins the boot RAM and exactly what is plugged.
        assert status["pinned"] == BOOT + 64 * MiB
        assert [d["id"] for d in status["devices"]] == ["vm0"]
        addr = dev["data"]["memaddr"]
        assert isinstance(await qmp.execute("x-ramdiscard-dump", {"path": str(tmp_path / "core")}), dict)
        # The guest plugs lowest blocks first: one run at the start of the device.
        assert _load_segments(tmp_path / "core") == [(0, BOOT), (addr, 64 * MiB)]
        uri = f"file:{tmp_path / 'snap'}"
        assert isinstance(await qmp.execute("x-ramdiscard-migrate", {"uri": uri}), dict)
        regions, page_bytes = _snapshot_summary(tmp_path / "snap")
        assert sorted(regions) == [(0, BOOT, 0), (1, 128 * MiB, addr)]
        assert page_bytes == BOOT + 64 * MiB
        assert await qmp.execute("quit") == {}
        with contextlib.suppress(EOFError):
            await qmp.disconnect()

    asyncio.run(asyncio.wait_for(drive(), 60))
    server.join(30)
    assert not server.is_alive() and result == [0]
    assert not os.path.exists(sock_path)


BOOT = 16 * MiB


def _load_segments(path: Path) -> list[tuple[int, int]]:
    with path.open("rb") as f:
        elf = ELFFile(f)
        assert elf.header.e_type == "ET_CORE"
        return [
            (seg.header.p_paddr, seg.header.p_filesz)
            for seg in elf.iter_segments()
            if seg.header.p_type == "PT_LOAD"
        ]


def _snapshot_summary(path: Path) -> tuple[list[tuple[int, int, int]], int]:
    """(kind, size, gpa) of each REGION and END's page-byte count, per
    docs/migration-format.md, checking the header and every section-header CRC."""
    data = path.read_bytes()
    magic, version, _flags, _alg, crc = struct.unpack_from("<8sHHII", data)
    assert (magic, version, crc) == (b"RDMIGRAT", 1, zlib.crc32(data[:16]))
    pos, regions = 20, []
    while True:
        stype, _f, length, _sum, hcrc = struct.unpack_from("<IIQQI", data, pos)
        assert hcrc == zlib.crc32(data[pos : pos + 24])
        payload = data[pos + 28 : pos + 28 + length]
        if stype == 1:
            _index, kind, size, gpa = struct.unpack_from("<IIQQ", payload)
            regions.append((kind, size, gpa))
        elif stype == 5:
            _sections, _page_sections, page_bytes = struct.unpack("<QQQ", payload)
            return regions, page_bytes
        pos += 28 + length


def test_bad_address_fails_before_building_anything(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    scenario = tmp_path / "s.toml"
    scenario.write_text(SCENARIO)
    assert cli_main([str(scenario), "--qmp", "udp:1.2.3.4:5"]) == 1
    assert "expected unix:PATH or tcp:HOST:PORT" in capsys.readouterr().err
