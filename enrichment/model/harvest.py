"""Writing a harvested training set: each image downloaded once, checked, stored by its content.

This is the model side of `enrich harvest` (the Search API side, which records
with which labels, is `enrichment.sources.harvest`). It lives with the model
because what it makes is a labelled set in the format `enrich model train`
reads (`enrichment.model.labelled`), and because it checks each image the way
training will read it.

- Images come through the runs' `Fetcher` (SSRF guard, byte and time limits,
  per-host politeness) and are decoded once (`enrichment.media.decode`) to
  prove they are usable; a failure is listed with its reason, never fatal.
- Files are named by their SHA-256, so identical images of different records
  are stored once; the first record (in id order) keeps the row, with the
  union of their labels, and the others are flagged in `duplicates`.
- Everything needed to continue is in `DIR/.harvest/`: the selection, written
  before any download, and a journal with one line per finished download,
  appended right after its file is in place. Started again, a harvest reuses
  the selection and fetches only the images the journal does not have (and
  those that failed for a reason that may pass, such as a timeout).
"""

from __future__ import annotations

import csv
import fcntl
import io
import json
import re
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, wait
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from itertools import combinations
from pathlib import Path
from typing import Any

from tqdm import tqdm

from enrichment.errors import EnrichError, InvalidValue
from enrichment.files import make_directory, write_atomically
from enrichment.media.decode import ImageError, load_rgb, open_image
from enrichment.media.fetch import PASSING, Fetcher
from enrichment.sources.harvest import reusability_of

STATE_DIR = ".harvest"
SELECTION = "selection.json"
JOURNAL = "downloads.jsonl"
LOCK = "lock"
FORMAT_VERSION = 1
EXTENSIONS = {
    "JPEG": "jpg",
    "PNG": "png",
    "GIF": "gif",
    "TIFF": "tif",
    "WEBP": "webp",
    "BMP": "bmp",
}
UNKNOWN_EXTENSION = "img"  # an image format without an extension of its own here
STORED_EXTENSIONS = (*EXTENSIONS.values(), UNKNOWN_EXTENSION)
SHA256 = re.compile(r"[0-9a-f]{64}")
CHECK_SIDE = 32  # decoded at least this large to prove the file is a usable image
COLUMNS = ("image", "labels", "group", "europeana_id", "provider", "rights", "title", "duplicates")


@dataclass(frozen=True)
class Download:
    """One record's image: where it is stored (relative to DIR), or why there is none."""

    record_id: str
    image: str | None = None
    sha256: str | None = None
    reason: str | None = None
    message: str | None = None

    @property
    def usable(self) -> bool:
        return self.image is not None


class HarvestDir:
    """DIR: the labelled set (labels.csv, images/, summary.json) and the state to resume it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.state = root / STATE_DIR
        self.images = root / "images"
        self._lock = threading.Lock()
        make_directory(self.state)
        make_directory(self.images)

    @contextmanager
    def writing(self) -> Iterator[None]:
        """Held while a harvest writes DIR: a second harvest into it at once is refused.

        Two at once each chose a selection and wrote it over the other's (with other
        options, one set silently became the other's), or fetched every image twice. An
        flock, so a killed harvest leaves nothing held.
        """
        with (self.state / LOCK).open("w") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise EnrichError(
                    f"another harvest is writing {self.root} right now: wait for it to end, "
                    "or choose another directory"
                ) from None
            yield

    def plan(
        self, identity: Mapping[str, Any], make: Callable[[], dict[str, Any]]
    ) -> dict[str, Any]:
        """The stored selection when `identity` (options, vocabulary) matches, else a new one."""
        path = self.state / SELECTION
        if path.exists():
            stored = read_selection(path)
            if stored.get("identity") != dict(identity):
                raise OtherOptions(
                    "out",
                    f"{self.root} holds a harvest made with other options or another "
                    "vocabulary: start it again with the same ones, or choose a new directory",
                )
            return stored
        plan = {"format": FORMAT_VERSION, "identity": dict(identity), **make()}
        write_atomically(path, json.dumps(plan, indent=1, ensure_ascii=False))
        return plan

    def downloads(self) -> dict[str, Download]:
        """The journal; a line torn by a kill mid-write is ignored (its image is fetched again)."""
        path = self.state / JOURNAL
        if not path.exists():
            return {}
        done: dict[str, Download] = {}
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                download = Download(**json.loads(line))
            except (json.JSONDecodeError, TypeError):
                continue
            if not confined(download):
                continue  # not a line this harvest wrote: its record is fetched again
            done[download.record_id] = download
        return done

    def keep(self, download: Download) -> Download:
        """Append one finished download to the journal, at once, so a kill loses none."""
        with self._lock, (self.state / JOURNAL).open("a", encoding="utf-8") as journal:
            journal.write(json.dumps(asdict(download), ensure_ascii=False) + "\n")
        return download

    def store(self, data: bytes, sha256: str, image_format: str) -> str:
        """Write an image under its content hash (once), atomically; its path relative to DIR."""
        name = f"images/{sha256}.{EXTENSIONS.get(image_format, UNKNOWN_EXTENSION)}"
        target = self.root / name
        if not target.exists():
            write_atomically(target, data)
        return name


def confined(download: Download) -> bool:
    """A journal line as `keep` writes it: an image only ever as `images/<sha256>.<ext>`.

    The journal is read back into labels.csv, which training opens: a path that
    leaves DIR (`../x`, `/etc/passwd`) or names another file is never taken from it.
    """
    if not isinstance(download.record_id, str):
        return False
    if download.image is None:
        return all(isinstance(text, str | None) for text in (download.reason, download.message))
    if not (isinstance(download.sha256, str) and SHA256.fullmatch(download.sha256)):
        return False
    names = {f"images/{download.sha256}.{extension}" for extension in STORED_EXTENSIONS}
    return download.image in names


class OtherOptions(InvalidValue):
    """OUT holds a harvest begun with other options or another vocabulary: the command is
    wrong, not the directory (a usage error, where a damaged selection is not)."""


def read_selection(path: Path) -> dict[str, Any]:
    """A stored selection, checked whole: a damaged one is one line naming the way out."""
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
        problem = selection_problem(stored)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        problem = f"cannot be read ({type(error).__name__})"
    if problem:
        raise InvalidValue(
            "out",
            f"{path} is damaged ({problem}): remove it to select the records again "
            "(images already downloaded are kept)",
        )
    return stored


def selection_problem(stored: Any) -> str | None:
    """What is wrong with a selection document, or None when every field is as `plan` wrote it."""
    if not isinstance(stored, dict) or stored.get("format") != FORMAT_VERSION:
        return f"not a format {FORMAT_VERSION} selection"
    if not isinstance(stored.get("identity"), dict) or not isinstance(
        stored.get("candidates"), int
    ):
        return "no identity or candidate count"
    for name in ("found", "left_out"):
        counts = stored.get(name)
        if not isinstance(counts, dict) or not all(
            isinstance(n, int) and not isinstance(n, bool) for n in counts.values()
        ):
            return f"{name} is not a count per key"
    records = stored.get("records")
    if not isinstance(records, list):
        return "records is not a list"
    for record in records:
        if not (
            isinstance(record, dict)
            and all(isinstance(record.get(name), str) for name in ("id", "dataset", "image_url"))
            and isinstance(record.get("labels"), list)
            and all(isinstance(label, str) for label in record["labels"])
            and all(
                isinstance(record.get(name), str | None) for name in ("provider", "title", "rights")
            )
        ):
            return f"a record is not as written: {json.dumps(record)[:80]}"
    return None


def still_needed(download: Download | None, root: Path) -> bool:
    """No journal line, a file that has gone, or a failure that may pass on another try."""
    if download is None:
        return True
    if download.usable:
        return not (root / str(download.image)).is_file()
    return download.reason in PASSING


def download_images(
    directory: HarvestDir,
    records: Sequence[Mapping[str, Any]],
    fetcher: Fetcher,
    max_pixels: int,
    progress: bool = True,
) -> dict[str, Download]:
    """Every selected record's image, fetched and checked unless the journal has it already.

    Records that share an image URL share one download.
    """
    done = directory.downloads()
    todo: dict[str, list[str]] = {}
    for record in records:
        if still_needed(done.get(record["id"]), directory.root):
            todo.setdefault(record["image_url"], []).append(record["id"])
    window = 4 * fetcher.settings.fetch_concurrency
    pending: set[Future[list[Download]]] = set()
    queue = iter(todo.items())
    with tqdm(
        total=len(records),
        initial=len(records) - sum(map(len, todo.values())),
        desc="images",
        unit=" images",
        disable=None if progress else True,  # None: on a terminal only
    ) as bar:
        try:
            while True:
                for url, record_ids in queue:
                    pending.add(
                        fetcher.submit(_fetch, directory, fetcher, url, record_ids, max_pixels)
                    )
                    if len(pending) >= window:
                        break
                if not pending:
                    break
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    for download in future.result():
                        done[download.record_id] = download
                    bar.update(len(future.result()))
        finally:
            for future in pending:
                future.cancel()
    return done


def _fetch(
    directory: HarvestDir, fetcher: Fetcher, url: str, record_ids: list[str], max_pixels: int
) -> list[Download]:
    """On a fetcher's worker thread: download once, decode once, store, journal each record."""
    fetched = fetcher.fetch(url)
    if fetched.content is None or fetched.sha256 is None:
        outcome = Download("", reason=fetched.error_reason, message=fetched.error_message)
    else:
        try:
            image_format = str(open_image(fetched.content, max_pixels).format)
            load_rgb(fetched.content, CHECK_SIDE, max_pixels)
        except ImageError as error:
            outcome = Download(
                "", sha256=fetched.sha256, reason=error.reason, message=error.message
            )
        else:
            name = directory.store(fetched.content, fetched.sha256, image_format)
            outcome = Download("", name, fetched.sha256)
    return [directory.keep(replace(outcome, record_id=record_id)) for record_id in record_ids]


def write_set(
    directory: HarvestDir,
    plan: Mapping[str, Any],
    downloads: Mapping[str, Download],
    order: Sequence[str],
) -> dict[str, Any]:
    """labels.csv and summary.json from the selection and its downloads; returns the summary."""
    records = {record["id"]: record for record in plan["records"]}
    by_image: dict[str, list[str]] = {}
    for record_id in sorted(records):
        download = downloads.get(record_id)
        if download is not None and download.usable:
            by_image.setdefault(str(download.image), []).append(record_id)
    rows: list[dict[str, str]] = []
    image_labels: list[set[str]] = []
    duplicates: list[dict[str, str]] = []
    for image, record_ids in sorted(by_image.items(), key=lambda item: item[1][0]):
        first, *others = record_ids
        record = records[first]
        labels = set().union(*(records[rid]["labels"] for rid in record_ids))
        image_labels.append(labels)
        duplicates.extend({"record": other, "same_image_as": first} for other in others)
        rows.append(
            {
                "image": image,
                "labels": " ".join(key for key in order if key in labels),
                "group": record["dataset"],
                "europeana_id": first,
                "provider": record.get("provider") or "",
                "rights": record.get("rights") or "",
                "title": record.get("title") or "",
                "duplicates": " ".join(others),
            }
        )
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_atomically(directory.root / "labels.csv", buffer.getvalue())
    summary = _summary(plan, records, downloads, image_labels, duplicates, order)
    write_atomically(
        directory.root / "summary.json", json.dumps(summary, indent=1, ensure_ascii=False)
    )
    return summary


def _summary(
    plan: Mapping[str, Any],
    records: Mapping[str, Mapping[str, Any]],
    downloads: Mapping[str, Download],
    image_labels: Iterable[set[str]],
    duplicates: list[dict[str, str]],
    order: Sequence[str],
) -> dict[str, Any]:
    image_labels = list(image_labels)
    failed = [
        {
            "record": record_id,
            "image_url": records[record_id]["image_url"],
            "reason": download.reason or "not_fetched",
            "message": download.message or "",
        }
        for record_id in sorted(records)
        if not (download := downloads.get(record_id, Download(record_id))).usable
    ]
    usable_records = [rid for rid in records if downloads.get(rid, Download(rid)).usable]
    pairs: Counter[str] = Counter()
    for labels in image_labels:
        ordered = [key for key in order if key in labels]
        pairs.update(f"{a}+{b}" for a, b in combinations(ordered, 2))
    rights = Counter(str(records[rid].get("rights")) for rid in usable_records)
    return {
        "harvested_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "options": plan["identity"]["options"],
        "vocabulary": plan["identity"]["vocabulary"],
        "records": {
            "candidates": plan["candidates"],
            "selected": len(records),
            "with_image": len(usable_records),
            "left_out": plan["left_out"],
        },
        "images": {
            "files": len(image_labels),
            "duplicates": len(duplicates),
            "failed": len(failed),
            "multilabel": sum(1 for labels in image_labels if len(labels) > 1),
        },
        "classes": {
            key: {
                "found": plan["found"].get(key, 0),
                "records": sum(1 for record in records.values() if key in record["labels"]),
                "images": sum(1 for labels in image_labels if key in labels),
            }
            for key in order
        },
        "co_occurrence": dict(pairs.most_common()),
        "failures_by_reason": dict(Counter(item["reason"] for item in failed).most_common()),
        "reusability": dict(Counter(reusability_of(uri) for uri in rights.elements())),
        "rights": dict(rights.most_common()),
        "duplicates": duplicates,
        "failed": failed,
    }


def summary_table(summary: Mapping[str, Any]) -> list[str]:
    """The printed summary: per class, co-occurrence, failures, reusability."""
    lines = [f"  {'class':<22}{'found':>9}{'records':>9}{'images':>8}"]
    for key, counts in summary["classes"].items():
        lines.append(f"  {key:<22}{counts['found']:>9}{counts['records']:>9}{counts['images']:>8}")
    records, images = summary["records"], summary["images"]
    lines.append(
        f"  {records['selected']} records selected of {records['candidates']} candidates, "
        f"{images['files']} image files ({images['multilabel']} multilabel), "
        f"{images['duplicates']} duplicate images, {images['failed']} failed"
    )
    if records["left_out"]:
        left_out = ", ".join(f"{reason} {n}" for reason, n in records["left_out"].items())
        lines.append(f"  left out before selection: {left_out}")
    pairs = list(summary["co_occurrence"].items())
    if pairs:
        shown = ", ".join(f"{pair} {n}" for pair, n in pairs[:10])
        lines.append(f"  co-occurrence: {shown}" + (" ..." if len(pairs) > 10 else ""))
    if summary["failures_by_reason"]:
        failures = ", ".join(f"{reason} {n}" for reason, n in summary["failures_by_reason"].items())
        lines.append(f"  failures: {failures}")
    reuse = ", ".join(f"{group} {n}" for group, n in summary["reusability"].items()) or "none"
    lines.append(f"  reusability: {reuse}")
    return lines
