"""Writing output files: one at a time, so that a reader sees the old version or the new.

Model directories, harvest sets, run reports and the review app's image cache
are all read while they may be rewritten (a worker loading `model.json`, a
browser on a report, a resumed harvest), so each of them is written here: into
a temporary file beside the target, renamed over it once complete. Exports,
whose targets may be pipes or devices, have their own writer
(`enrichment.publish.pages.AtomicFiles`).
"""

from __future__ import annotations

import os
import secrets
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


def write_atomically(path: Path, data: bytes | str) -> None:
    """Write `data` (text as UTF-8) to `path` through a temporary file and a rename.

    The temporary name is unique, so two writers of one path (two reports of a
    run, two harvest threads storing one image) never mix their bytes; it is
    opened with "x", so it gets the permissions of any new file. A failed write
    leaves nothing behind and is one `OutputError` naming the path.
    """
    payload = data.encode("utf-8") if isinstance(data, str) else data
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(temporary, "xb") as file:
            file.write(payload)
        os.replace(temporary, path)
    except OSError as error:
        temporary.unlink(missing_ok=True)
        raise OutputError(f"cannot write {path}: {error.strerror or error}") from None
