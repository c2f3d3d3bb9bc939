"""Record images for the review pages: fetched server-side with the SSRF-safe fetcher, cached.

The browser only ever loads images from the app itself: a page that
hot-linked providers' images would tell every provider what a curator looks
at, break offline, and fail under the page's own Content-Security-Policy.
Each image is fetched once, shrunk to the sizes the pages show, and kept as
JPEG files named by the SHA-256 of its URL; a failure is remembered for a few
minutes so that a dead host is not asked again for every tile.
"""

from __future__ import annotations

import hashlib
import io
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from enrichment.config import Settings
from enrichment.errors import OutputError
from enrichment.files import make_directory, write_atomically
from enrichment.media.decode import ImageError, load_rgb
from enrichment.media.fetch import Fetcher

SIZES = {"thumb": 320, "large": 900}
FAILURE_SECONDS = 300.0


@dataclass(frozen=True)
class Shrunk:
    """A cached JPEG, or why there is none."""

    jpeg: bytes | None
    reason: str | None = None


class ImageCache:
    def __init__(self, settings: Settings, directory: Path) -> None:
        self.settings = settings
        self.directory = directory
        make_directory(directory)
        try:  # refused at startup, not at the first image
            with tempfile.NamedTemporaryFile(dir=directory):
                pass
        except OSError as error:
            raise OutputError(
                f"cannot write the image cache {directory}: {error.strerror}"
            ) from None
        self.fetcher = Fetcher(settings)
        self._failures: dict[str, tuple[float, str]] = {}
        self._lock = threading.Lock()

    def close(self) -> None:
        self.fetcher.close()

    def _path(self, url: str, size: str) -> Path:
        return self.directory / f"{hashlib.sha256(url.encode()).hexdigest()}-{size}.jpg"

    def get(self, url: str, size: str) -> Shrunk:
        path = self._path(url, size)
        if path.exists():
            return Shrunk(path.read_bytes())
        with self._lock:
            failed = self._failures.get(url)
        if failed is not None and time.monotonic() - failed[0] < FAILURE_SECONDS:
            return Shrunk(None, failed[1])
        fetched = self.fetcher.fetch(url)
        if fetched.content is None:
            return self._failed(url, fetched.error_reason or "fetch_error")
        try:
            image = load_rgb(fetched.content, SIZES["large"], self.settings.max_image_pixels)
        except ImageError as error:
            return self._failed(url, error.reason)
        for name, side in SIZES.items():  # every size from the one download
            copy = image.copy()
            copy.thumbnail((side, side))
            buffer = io.BytesIO()
            copy.save(buffer, format="JPEG", quality=85)
            write_atomically(self._path(url, name), buffer.getvalue())
        return Shrunk(path.read_bytes())

    def _failed(self, url: str, reason: str) -> Shrunk:
        with self._lock:
            self._failures[url] = (time.monotonic(), reason)
        return Shrunk(None, reason)
