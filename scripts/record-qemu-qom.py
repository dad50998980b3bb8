#!/usr/bin/env python3
"""Record the QOM interface of a real QEMU's virtio-mem-pci device and memory backends.

Usage: record-qemu-qom.py QEMU_BINARY OUT.json

Starts QEMU with ``-S`` (no guest runs), a 1 GiB memory-backend-ram behind a
virtio-mem-pci device ``vm0`` plus a memfd and a file backend, and writes, per QOM type:
every property (name, type, the value qom-get returned or its error) and what qom-set of
a different value answered; qom-list-properties and device-list-properties. The device
id ``vm0`` and the backend ids are replaced by ``{id}`` / ``{memdev}`` in texts.
ramdiscard.qmp.qom loads the result (src/ramdiscard/qmp/qemu-qom.json) as its property
tables; rerun this against a new QEMU release to follow it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import tempfile
from typing import Any

from qemu.qmp import QMPClient

TYPES = {
    "virtio-mem-pci": "/machine/peripheral/vm0",
    "virtio-mem": "/machine/peripheral/vm0/virtio-backend",
    "virtio-pci-bus": "/machine/peripheral/vm0/virtio-bus",
    "memory-region": "/objects/mem0/mem0[0]",
    "memory-backend-ram": "/objects/mem0",
    "memory-backend-memfd": "/objects/mem1",
    "memory-backend-file": "/objects/mem2",
}


def _template(text: str) -> str:
    for raw, tpl in (("'vm0'", "'{id}'"), ("mem0", "{memdev}"), ("mem1", "{memdev}"), ("mem2", "{memdev}")):
        text = text.replace(raw, tpl)
    return text


async def record(qemu: str, out: str) -> None:
    work = tempfile.mkdtemp(prefix="record-qom-")
    sock = f"{work}/qmp.sock"
    proc = subprocess.Popen([
        qemu, "-S", "-nodefaults", "-display", "none", "-accel", "tcg", "-m", "256M,maxmem=4G",
        "-object", "memory-backend-ram,id=mem0,size=1G",
        "-object", "memory-backend-memfd,id=mem1,size=64M",
        "-object", f"memory-backend-file,id=mem2,size=64M,mem-path={work}/file",
        "-device", "virtio-mem-pci,id=vm0,memdev=mem0,block-size=2M,requested-size=128M",
        "-qmp", f"unix:{sock},server=on,wait=off",
    ])  # fmt: skip
    try:
        for _ in range(200):
            if os.path.exists(sock):
                break
            await asyncio.sleep(0.05)
        qmp = QMPClient("record")
        await qmp.connect(sock)

        async def ex(name: str, args: dict[str, Any]) -> dict[str, Any]:
            try:
                return {"ok": await asyncio.wait_for(qmp.execute(name, args), 10)}
            except Exception as exc:  # an error reply is what is recorded
                return {"error": _template(str(exc))}

        schema: dict[str, Any] = {"qemu": (await ex("query-version", {}))["ok"], "types": {}}
        for typename, path in TYPES.items():
            props = []
            for p in (await ex("qom-list", {"path": path}))["ok"]:
                entry: dict[str, Any] = {"name": p["name"], "type": p["type"]}
                got = await ex("qom-get", {"path": path, "property": p["name"]})
                entry["get"] = got if "error" in got else {"ok": got["ok"]}
                if not p["type"].startswith("child<") and p["name"] not in ("requested-size", "realized"):
                    v = got.get("ok", 0)
                    v = (not v) if isinstance(v, bool) else (v + 4096 if isinstance(v, int) else v)
                    entry["set"] = await ex("qom-set", {"path": path, "property": p["name"], "value": v})
                props.append(entry)
            schema["types"][typename] = props
        regions: dict[str, dict[str, Any]] = {}
        owners = ["/machine/peripheral/vm0", "/objects/pc.ram", "/objects/mem0"]
        for owner in owners:
            for p in (await ex("qom-list", {"path": owner}))["ok"]:
                if p["type"] == "child<memory-region>":
                    path = f"{owner}/{p['name']}"
                    regions[path.replace("vm0", "{id}").replace("mem0", "{memdev}")] = {
                        k: (await ex("qom-get", {"path": path, "property": k}))["ok"]
                        for k in ("container", "addr", "size", "priority")
                    }
        schema["memory-regions"] = regions
        schema["qom-list-properties"] = {
            t: (await ex("qom-list-properties", {"typename": t}))["ok"]
            for t in (
                "virtio-mem-pci",
                "virtio-mem",
                "memory-backend-ram",
                "memory-backend-memfd",
                "memory-backend-file",
            )
        }
        schema["device-list-properties"] = {
            "virtio-mem-pci": (await ex("device-list-properties", {"typename": "virtio-mem-pci"}))["ok"]
        }
        await ex("quit", {})
        with contextlib.suppress(Exception):
            await qmp.disconnect()
    finally:
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
    with open(out, "w", encoding="utf-8") as f:
        json.dump(schema, f, indent=1, sort_keys=True)
        f.write("\n")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    asyncio.run(record(sys.argv[1], sys.argv[2]))
