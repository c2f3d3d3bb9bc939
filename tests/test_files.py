"""`write_atomically`: a whole file or none, and never a regular file over a device or a pipe."""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

import pytest

from enrichment.errors import OutputError
from enrichment.files import write_atomically


def test_a_device_is_written_through_and_stays_a_device() -> None:
    """As root a rename over /dev/null would replace the device node with a file."""
    write_atomically(Path("/dev/null"), b"discarded")
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)
    with pytest.raises(OutputError, match="cannot write /dev/full"):
        write_atomically(Path("/dev/full"), b"x")
    assert stat.S_ISCHR(os.stat("/dev/full").st_mode)


def test_a_fifo_gets_the_bytes_and_stays_a_fifo(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    received: list[bytes] = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_bytes()))
    reader.start()
    write_atomically(fifo, "through é")
    reader.join(timeout=10)
    assert received == ["through é".encode()] and stat.S_ISFIFO(fifo.stat().st_mode)


def test_a_symlink_stays_a_link_to_the_new_content(tmp_path: Path) -> None:
    real = tmp_path / "real.json"
    real.write_text("old")
    link = tmp_path / "link.json"
    link.symlink_to(real)
    write_atomically(link, "new")
    assert link.is_symlink() and real.read_text() == "new"


def test_a_path_under_a_file_is_one_error_naming_it(tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.write_text("a file, not a directory")
    with pytest.raises(OutputError, match=r"cannot write .*plain/report\.html: Not a directory"):
        write_atomically(plain / "report.html", b"<html>")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["plain"]
