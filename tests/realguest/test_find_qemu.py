"""find_qemu: environment override first, then the cached build, else a one-line error."""

from __future__ import annotations

from pathlib import Path

import pytest

from ramdiscard.realguest import qemu
from ramdiscard.realguest.qemu import QemuNotFound, find_qemu

ROOT = Path(__file__).resolve().parents[2]


def _exe(path: Path) -> Path:
    path.write_text("#!/bin/sh\nexit 0\n")
    path.chmod(0o755)
    return path


def test_env_override_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    binary = _exe(tmp_path / "my-qemu")
    monkeypatch.setenv("RAMDISCARD_QEMU", str(binary))
    assert find_qemu() == binary


def test_env_override_not_executable_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    plain = tmp_path / "plain"
    plain.write_text("")
    monkeypatch.setenv("RAMDISCARD_QEMU", str(plain))
    with pytest.raises(QemuNotFound, match="RAMDISCARD_QEMU") as info:
        find_qemu()
    assert "\n" not in str(info.value)


def test_cached_build_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RAMDISCARD_QEMU", raising=False)
    binary = _exe(tmp_path / "qemu-system-x86_64")
    monkeypatch.setattr(qemu, "QEMU_CACHE_BINARY", binary)
    assert find_qemu() == binary


def test_missing_names_the_script(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RAMDISCARD_QEMU", raising=False)
    monkeypatch.setattr(qemu, "QEMU_CACHE_BINARY", tmp_path / "absent")
    with pytest.raises(QemuNotFound) as info:
        find_qemu()
    message = str(info.value)
    assert "\n" not in message
    assert "scripts/build-qemu.sh" in message and "vhost-user-device-pci" in message


def test_cli_guest_without_qemu_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from ramdiscard.cli.main import main

    monkeypatch.delenv("RAMDISCARD_QEMU", raising=False)
    monkeypatch.setattr(qemu, "QEMU_CACHE_BINARY", tmp_path / "absent")
    status = main(["guest", "--qmp", f"unix:{tmp_path / 'q.sock'}"])
    err = capsys.readouterr().err
    assert status == 1
    assert err.count("\n") == 1 and "scripts/build-qemu.sh" in err
    assert not (tmp_path / "q.sock").exists()


def test_readme_quotes_the_error_a_user_without_the_build_gets(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from ramdiscard.cli.main import main

    monkeypatch.delenv("RAMDISCARD_QEMU", raising=False)
    monkeypatch.setattr(qemu, "_usable", lambda _path: False)  # as on a machine without the build
    assert main(["run", str(ROOT / "examples" / "real-guest.toml"), "--quiet"]) == 1
    line = capsys.readouterr().err.strip()
    assert str(qemu.QEMU_CACHE_BINARY) in line
    readme = (ROOT / "README.md").read_text()
    assert line in readme.splitlines(), line
