"""``ramdiscard run examples/real-guest.toml``: the shipped real-guest scenario, one boot,
through the real command line. Skipped (with the one-line reason) without the QEMU of
scripts/build-qemu.sh."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import time
from pathlib import Path

from ramdiscard.machine.scenario import GuestScenario, load_any_scenario
from ramdiscard.units import MiB
from tests.realguest.needs_qemu import BOOT_MARKS

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "real-guest.toml"

pytestmark = BOOT_MARKS


def test_the_example_boots_and_plays_its_steps() -> None:
    started = time.monotonic()
    r = subprocess.run(
        [sys.executable, "-m", "ramdiscard.cli.main", "run", str(EXAMPLE), "--json", "--quiet"],
        capture_output=True, text=True, timeout=840,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    out = json.loads(r.stdout)
    steps = out["steps"]
    print(f"scenario run in {time.monotonic() - started:.1f} s", file=sys.stderr)
    for s in steps:
        print(
            f"{s['step']:>16}: MemTotal {s['guest_memtotal']}  plugged {s['plugged']}  VmPin {s['vm_pin']}  "
            f"memfd resident {s['resident']}  ({s['seconds']} s)",
            file=sys.stderr,
        )
    labels = [s["step"] for s in steps]
    assert labels == ["boot", "run touch 300", "-> 1 GiB", "-> 256 MiB", "system_reset", "-> 0 B"]
    wanted = [512, 512, 1024, 256, 256, 0]
    for s, mib in zip(steps, wanted, strict=True):
        assert s["requested"] == s["plugged"] == s["pinned"] == s["vm_pin"] == mib * MiB, s
        assert s["resident"] <= s["plugged"], s
    assert steps[-1]["resident"] == 0
    # MemTotal moves by exactly the plugged size within one boot of the guest (the
    # rebooted kernel may reserve a page more or less for itself than the first one).
    first_boot, second_boot = steps[:4], steps[4:]
    for run in (first_boot, second_boot):
        for a, b in itertools.pairwise(run):
            assert a["guest_memtotal"] - b["guest_memtotal"] == a["plugged"] - b["plugged"], (a, b)
    assert any("plugged 0 bytes when system_reset returned" in n for n in steps[4]["notes"]), steps[4]
    # With nothing plugged the guest sees its normal RAM only (the device region is not
    # System RAM until plugged), less what the kernel keeps for itself.
    sc = load_any_scenario(EXAMPLE)
    assert isinstance(sc, GuestScenario)
    assert sc.guest.ram // 2 < steps[-1]["guest_memtotal"] <= sc.guest.ram
