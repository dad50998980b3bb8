"""``ramdiscard serve``: a scenario machine served over QMP until ``quit``."""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from pathlib import Path

import pytest
from qemu.qmp import EventListener, QMPClient

from ramdiscard.qmp import cli_main
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
        assert status["pinned"] >= 64 * MiB  # the vfio consumer pins what is plugged
        assert [d["id"] for d in status["devices"]] == ["vm0"]
        for cmd, args, out in (
            ("x-ramdiscard-dump", {"path": str(tmp_path / "core")}, tmp_path / "core"),
            ("x-ramdiscard-migrate", {"uri": f"file:{tmp_path / 'snap'}"}, tmp_path / "snap"),
        ):
            assert isinstance(await qmp.execute(cmd, args), dict)
            assert out.stat().st_size > 0
        assert await qmp.execute("quit") == {}
        with contextlib.suppress(EOFError):
            await qmp.disconnect()

    asyncio.run(asyncio.wait_for(drive(), 60))
    server.join(30)
    assert not server.is_alive() and result == [0]
    assert not os.path.exists(sock_path)


def test_bad_address_fails_before_building_anything(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    scenario = tmp_path / "s.toml"
    scenario.write_text(SCENARIO)
    assert cli_main([str(scenario), "--qmp", "udp:1.2.3.4:5"]) == 1
    assert "expected unix:PATH or tcp:HOST:PORT" in capsys.readouterr().err
