"""Files other processes read are written whole or not at all, and locks keep two processes apart."""

import errno
from pathlib import Path

import pytest

from sft_cli import disk


def test_write_atomic_replaces_a_file_whole(tmp_path: Path):
    target = tmp_path / "report.html"
    target.write_text("old")
    disk.write_atomic(target, "new ✓")
    disk.write_atomic(tmp_path / "blob", b"\x00\x01")
    assert target.read_text(encoding="utf-8") == "new ✓" and (tmp_path / "blob").read_bytes() == b"\x00\x01"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blob", "report.html"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary_file(tmp_path: Path, monkeypatch):
    target = tmp_path / "summary.csv"
    target.write_text("old")

    def full_disk(self, *args, **kwargs):
        Path.write_bytes(self, b"half")  # something reached the disk before it filled up
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full_disk)
    with pytest.raises(OSError, match="No space left"):
        disk.write_atomic(target, "new")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["summary.csv"]


def test_a_held_lock_is_refused_without_waiting_and_free_once_closed(tmp_path: Path):
    first = disk.lock(tmp_path / "run.lock", wait=False)
    assert first is not None
    assert disk.lock(tmp_path / "run.lock", wait=False) is None  # another open file: refused at once
    first.close()
    second = disk.lock(tmp_path / "run.lock", wait=False)
    assert second is not None
    second.close()
