"""Migration between two processes over loopback TCP, and socket failures."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading

import pytest

from ramdiscard import faults, migration
from ramdiscard.cli import migrate as migrate_cli
from ramdiscard.faults import Op
from ramdiscard.units import MiB
from tests.migration.conftest import Machines, assert_fresh

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_two_processes_cli(backing: str, capsys: pytest.CaptureFixture[str]) -> None:
    common = ["--size", "128M", "--block-size", "2M", "--backing", backing, "--low", "4M", "--seed", "7"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.join(ROOT, "src"), ROOT])}
    code = "import sys; from ramdiscard.cli.migrate import main; sys.exit(main(sys.argv[1:]))"
    receiver = subprocess.Popen(
        [sys.executable, "-c", code, "receive", "--port", "0", "--json", "--timeout", "60", *common],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert receiver.stderr is not None
        line = receiver.stderr.readline()
        assert line.startswith("listening on"), line
        port = int(line.rsplit(":", 1)[1])
        assert migrate_cli.main(["send", "--port", str(port), "--plugged", "40M", "--json", *common]) == 0
        out, err = receiver.communicate(timeout=60)
    finally:
        if receiver.poll() is None:
            receiver.kill()
            receiver.wait()
    assert receiver.returncode == 0, err
    dest = json.loads(out)
    source = json.loads(capsys.readouterr().out)
    assert dest["bad_blocks"] == 0 and dest["resident_outside_plugged"] == 0
    assert dest["page_bytes"] == source["page_bytes"] == 44 * MiB
    assert source["plug_after_migration"] == "ACK"


@pytest.mark.parametrize("op", [Op.SOCK_SEND, Op.SOCK_RECV])
def test_socket_fault_fails_both_sides_cleanly(machines: Machines, op: Op) -> None:
    src = machines(16 * MiB, low=1 * MiB)
    src.plug_blocks([0, 1, 4])
    src.fill(1)
    dst = machines(16 * MiB, low=1 * MiB)
    for nth in (1, 3, 6):
        errors: list[BaseException] = []
        with socket.create_server(("127.0.0.1", 0)) as ls:
            port = ls.getsockname()[1]

            def receive(errors: list[BaseException] = errors) -> None:
                try:
                    migration.receive_from(ls, dst.space, dst.devices, accept_timeout=30)
                except BaseException as exc:
                    errors.append(exc)

            t = threading.Thread(target=receive)
            t.start()
            with faults.inject(op, nth), pytest.raises((OSError, migration.MigrationError)):
                migration.migrate_to(
                    "127.0.0.1", port, src.space, src.devices, chunk_size=1 * MiB, timeout=10
                )
            t.join(30)
        assert not t.is_alive()
        if errors:
            assert isinstance(errors[0], (migration.MigrationError, OSError))
            assert_fresh(dst)
        else:
            # Faults are process-wide: the fault hit the source reading the destination's
            # "OK", after a complete load. The source still fails (it cannot know).
            assert op is Op.SOCK_RECV
            assert dst.digests() == src.digests()
            dst.dev.unplug_all()
            assert dst.low is not None
            dst.low.discard_range(0, dst.low.size)
        assert not src.dev.is_busy()
        assert src.plugged_blocks() == [0, 1, 4]


@pytest.mark.parametrize("error", [None, "no room for vmem0", ""])
def test_a_status_reads_the_same_from_a_socket_and_from_received_bytes(error: str | None) -> None:
    """recv_status (a socket) and parse_status (bytes already read, the precopy return
    path) give the same verdict for what send_status wrote."""
    from ramdiscard.migration.transport import parse_status, recv_status, send_status

    a, b = socket.socketpair()
    with a, b:
        a.settimeout(10)
        b.settimeout(10)
        send_status(a, error)
        a.shutdown(socket.SHUT_WR)
        raw = b.recv(8192, socket.MSG_PEEK)
        assert recv_status(b) == error
    assert parse_status(raw) == error


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"OK\x00", "without a status"),
        (b"ER\x05\x00\x00\x00ab", "without a status"),
        (b"OK\x01\x00\x00\x00x", "malformed status"),
        (b"XX\x00\x00\x00\x00", "malformed status"),
        (b"ER\x01\x10\x00\x00", "malformed status"),
    ],
)  # fmt: skip
def test_a_short_or_malformed_status_is_a_one_line_migration_error(raw: bytes, message: str) -> None:
    from ramdiscard.migration.transport import parse_status

    with pytest.raises(migration.MigrationError, match=message) as info:
        parse_status(raw)
    assert "\n" not in str(info.value)
