"""Writing output files: one at a time, so that a reader sees the old version or the new.

Model directories, harvest sets, run reports and the review app's image cache
are all read while they may be rewritten (a worker loading `model.json`, a
browser on a report, a resumed harvest), so each of them is written here: into
a temporary file beside the target, renamed over it once complete. A target
that is a pipe, a device or an open descriptor (`/dev/stdout`) is written
through instead: renamed over, it would be replaced by a regular file (as
root, a device node in /dev). Exports, which stream to several files, have
their own writer (`enrichment.publish.pages.AtomicFiles`) on `output_target`.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
from pathlib import Path

from enrichment.errors import OutputError


def make_directory(directory: Path) -> None:
    """Make an output directory and its parents, or say in one line which one could not be."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        # mkdir names the first directory it could not make, which may be a parent.
        raise OutputError(
            f"cannot create the directory {directory}: {error.strerror}: {error.filename}"
        ) from None


def output_target(path: Path) -> tuple[Path, bool]:
    """Where to write for `path`, and whether through a temporary file and a rename.

    A new path or a regular file: atomically, at the path (or, for a symlink,
    at the file it points to, so the link stays). A FIFO, a device, or a name
    for an open descriptor (`/dev/stdout`, `/dev/fd/N`, `/proc/self/fd/N`):
    written through, as it is.
    """
    if _names_a_descriptor(path):
        return path, False
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return (Path(os.path.realpath(path)) if path.is_symlink() else path), True
    except OSError as error:
        raise OutputError(f"cannot write {path}: {error.strerror or error}") from None
    if stat.S_ISDIR(mode):
        raise OutputError(f"cannot write {path}: {os.strerror(errno.EISDIR)}")
    if not stat.S_ISREG(mode):
        return path, False
    return (Path(os.path.realpath(path)) if path.is_symlink() else path), True


def _names_a_descriptor(path: Path) -> bool:
    text = os.path.abspath(path)
    if text.startswith(("/proc/", "/dev/fd/")):
        return True
    return path.is_symlink() and os.readlink(path).startswith("/proc/")


def write_atomically(path: Path, data: bytes | str) -> None:
    """Write `data` (text as UTF-8) to `path` through a temporary file and a rename.

    The temporary name is unique, so two writers of one path (two reports of a
    run, two harvest threads storing one image) never mix their bytes; it is
    opened with "x", so it gets the permissions of any new file. A failed write
    leaves nothing behind and is one `OutputError` naming the path. A pipe or a
    device is written through (`output_target`).
    """
    payload = data.encode("utf-8") if isinstance(data, str) else data
    target, atomic = output_target(path)
    if not atomic:
        try:
            with open(target, "wb") as file:
                file.write(payload)
        except OSError as error:
            raise OutputError(f"cannot write {path}: {error.strerror or error}") from None
        return
    temporary = target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(temporary, "xb") as file:
            file.write(payload)
        os.replace(temporary, target)
    except OSError as error:
        # Under a file rather than a directory, even the clean-up fails: nothing was made.
        with contextlib.suppress(OSError):
            temporary.unlink(missing_ok=True)
        raise OutputError(f"cannot write {path}: {error.strerror or error}") from None
