"""Laying annotations out as files: one collection, paged files, or JSON Lines.

Layouts, for a stream of annotations of one profile:

- `jsonld`, one document. W3C profile: an AnnotationCollection whose embedded
  `first` page holds every annotation. Europeana profile: one AnnotationPage,
  the body of a bulk POST /annotations/.
- `jsonld`, split into pages of N (`--split N`). Every page is its own file,
  `<stem>-00001.jsonld`, ...; in the W3C profile pages carry `partOf`,
  `startIndex`, `prev` and `next`, and the output file itself holds the
  AnnotationCollection (`total`, `first`, `last`) that links them. Europeana
  pages hold only `@context`, `type` and `items`, as its bulk endpoint takes.
- `jsonl`: one annotation per line, each with its own `@context`; split, N lines
  per file.

Everything is written as it streams in: one annotation is in memory at a time,
and a page's `next` link needs only one annotation of look-ahead. `total` and
`last` are written after the items, where they are known (JSON-LD does not care
about key order). Files are written under a temporary name and renamed only
when the whole export has succeeded.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol

from enrichment.errors import OutputError
from enrichment.files import output_target
from enrichment.publish.annotations import Profile

FORMATS = ("jsonld", "jsonl")
PAGE_START = b'{"@context"'  # how every page file begins (`_open_page`, `_line`)


def dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


@dataclass(frozen=True)
class Layout:
    """What the output looks like: the profile, the format, and the collection's identity."""

    profile: Profile
    format: str
    collection_id: str
    label: str
    base_url: str | None = None

    @property
    def collection(self) -> bool:
        """Whether a collection document links the pages (W3C JSON-LD only)."""
        return self.format == "jsonld" and self.profile.name == "w3c"

    def page_id(self, number: int, path: Path | None) -> str:
        if self.base_url and path is not None:
            return self.base_url + path.name
        return f"{self.collection_id}#page-{number}"


class AtomicFiles:
    """Files that appear under their own names only once the whole export has succeeded.

    Each regular file (or new path) is written as `NAME.partial` and renamed at
    the end, in the order they were created (pages before the collection that
    links them); if anything fails, the partial files are removed and earlier
    exports stay. A partial file is locked until renamed: a second export to
    the same path meanwhile is refused. A path that is not a regular file is
    written through instead, since renaming over it would replace the node
    itself: a FIFO or a character device (`/dev/stdout`, a pipe's reader) gets
    the bytes as they come, and a symlink keeps pointing where it did while its
    target is replaced. Problems writing are one `OutputError` naming the path.
    """

    def __init__(self) -> None:
        self._pending: list[tuple[Path, Path]] = []
        self._finals: list[Path] = []
        self._locks: list[int] = []

    @contextmanager
    def create(self, path: Path) -> Iterator[Writable]:
        final, atomic = output_target(path)
        self._finals.append(path)
        target = final
        try:
            if atomic:
                target = final.with_name(final.name + ".partial")
                final.parent.mkdir(parents=True, exist_ok=True)
                self._locks.append(_lock_partial(target, path))
                self._pending.append((target, final))
            handle = target.open("w", encoding="utf-8")
        except OSError as error:
            raise _output_error(path, error) from None
        try:
            yield _Checked(handle, path)
        except BaseException:
            with suppress(OSError):
                handle.close()
            raise
        try:
            handle.close()  # the last buffered bytes: a full disk says so here
        except OSError as error:
            raise _output_error(path, error) from None

    def __enter__(self) -> AtomicFiles:
        return self

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        try:
            if kind is not None:
                for partial, _final in self._pending:
                    partial.unlink(missing_ok=True)
                return
            for partial, final in self._pending:
                try:
                    partial.replace(final)
                except OSError as error:
                    for left, _final in self._pending:
                        left.unlink(missing_ok=True)
                    raise _output_error(final, error) from None
        finally:
            for descriptor in self._locks:
                os.close(descriptor)

    @property
    def paths(self) -> list[Path]:
        return list(self._finals)


class Writable(Protocol):
    def write(self, text: str, /) -> int: ...


class _Checked:
    """A file whose write errors (a full disk, a closed pipe) are one OutputError naming it."""

    def __init__(self, handle: IO[str], path: Path) -> None:
        self._handle, self._path = handle, path

    def write(self, text: str) -> int:
        try:
            return self._handle.write(text)
        except OSError as error:
            raise _output_error(self._path, error) from None


def _lock_partial(partial: Path, path: Path) -> int:
    """A descriptor holding `partial` (flock) until the export has renamed it: a second
    export to the same path at once would write into the same file, or rename it away
    under the first, so it is refused instead."""
    descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(descriptor)
        raise OutputError(f"another export is writing {path} right now") from None
    return descriptor


def _output_error(path: Path, error: OSError) -> OutputError:
    return OutputError(f"cannot write {path}: {error.strerror or error}")


def write_document(annotations: Iterable[dict[str, Any]], out: Writable, layout: Layout) -> None:
    """The whole export as one document (or JSON Lines) on `out`."""
    if layout.format == "jsonl":
        for annotation in annotations:
            out.write(_line(annotation, layout.profile))
        return
    if not layout.collection:
        out.write(_open_page({"type": "AnnotationPage"}, layout.profile))
        _write_items(annotations, out)
        out.write("\n]}\n")
        return
    page_id = layout.page_id(1, None)
    head = {
        "@context": layout.profile.context,
        "id": layout.collection_id,
        "type": "AnnotationCollection",
        "label": layout.label,
    }
    page = {"id": page_id, "type": "AnnotationPage", "partOf": layout.collection_id}
    out.write(dumps(head)[:-1] + ', "first": ' + dumps({**page, "startIndex": 0})[:-1])
    out.write(', "items": [\n')
    count = _write_items(annotations, out)
    out.write(f"\n]}}, {dumps('last')}: {dumps(page_id)}, {dumps('total')}: {count}}}\n")


def page_path(out_path: Path, number: int, fmt: str) -> Path:
    suffix = out_path.suffix or f".{fmt}"
    return out_path.with_name(f"{out_path.stem}-{number:05d}{suffix}")


def write_split(
    annotations: Iterable[dict[str, Any]], out_path: Path, size: int, layout: Layout
) -> list[Path]:
    """Pages of `size` annotations in files beside `out_path`; returns the files written.

    The pages are new files named after `out_path`, so it must be a file path
    (not `/dev/stdout` or a FIFO); a symlink's pages go beside its target.
    """
    out_path, atomic = output_target(out_path)
    if not atomic:
        raise OutputError(
            f"a split export writes page files beside {out_path}: "
            "give a file path, not a pipe or a device"
        )

    def path_of(number: int) -> Path:
        return page_path(out_path, number, layout.format)

    def id_of(number: int) -> str:
        return layout.page_id(number, path_of(number))

    iterator = iter(annotations)
    upcoming = next(iterator, None)
    count = 0
    number = 0
    with AtomicFiles() as files:
        while upcoming is not None:
            number += 1
            with files.create(path_of(number)) as out:
                if layout.collection:
                    page = {
                        "id": id_of(number),
                        "type": "AnnotationPage",
                        "partOf": layout.collection_id,
                        "startIndex": count,
                    }
                    out.write(_open_page({**page, **_prev(number, id_of)}, layout.profile))
                elif layout.format == "jsonld":
                    out.write(_open_page({"type": "AnnotationPage"}, layout.profile))
                written = 0
                while upcoming is not None and written < size:
                    out.write(_item(upcoming, layout, first=written == 0))
                    written += 1
                    upcoming = next(iterator, None)
                count += written
                if layout.collection and upcoming is not None:
                    out.write(f"\n], {dumps('next')}: {dumps(id_of(number + 1))}}}\n")
                elif layout.format == "jsonld":
                    out.write("\n]}\n")
        if layout.collection:
            with files.create(out_path) as out:
                out.write(_collection(layout, number, count, id_of))
        written_files = files.paths
    _remove_stale_pages(out_path, number, layout.format)
    return written_files


def _line(annotation: dict[str, Any], profile: Profile) -> str:
    """A JSON Lines record: the annotation with its own context, so each line stands alone."""
    return dumps({"@context": profile.context, **annotation}) + "\n"


def _write_items(annotations: Iterable[dict[str, Any]], out: Writable) -> int:
    count = 0
    for annotation in annotations:
        out.write((",\n" if count else "") + dumps(annotation))
        count += 1
    return count


def _item(annotation: dict[str, Any], layout: Layout, first: bool) -> str:
    if layout.format == "jsonl":
        return _line(annotation, layout.profile)
    return ("" if first else ",\n") + dumps(annotation)


def _open_page(page: dict[str, Any], profile: Profile) -> str:
    return dumps({"@context": profile.context, **page})[:-1] + ', "items": [\n'


def _prev(number: int, id_of: Callable[[int], str]) -> dict[str, str]:
    return {"prev": id_of(number - 1)} if number > 1 else {}


def _collection(layout: Layout, pages: int, total: int, id_of: Callable[[int], str]) -> str:
    document: dict[str, Any] = {
        "@context": layout.profile.context,
        "id": layout.collection_id,
        "type": "AnnotationCollection",
        "label": layout.label,
        "total": total,
    }
    if pages:
        document["first"] = id_of(1)
        document["last"] = id_of(pages)
    return json.dumps(document, ensure_ascii=False, indent=1) + "\n"


def _remove_stale_pages(out_path: Path, pages: int, fmt: str) -> None:
    """Pages of an earlier, longer export under the same name would read as part of this one.

    Only that export's pages: numbered on from this one's without a gap, and each a page
    this project writes. A file that merely fits the name (`labels-20261201.jsonld`, a
    nightly archive) is someone's data.
    """
    number = pages + 1
    while _is_page(path := page_path(out_path, number, fmt)):
        path.unlink()
        number += 1


def _is_page(path: Path) -> bool:
    """Whether `path` is a regular file that starts as this project's pages do (JSON-LD
    and JSON Lines alike: `{"@context"`)."""
    try:
        with path.open("rb") as handle:
            return path.is_file() and handle.read(len(PAGE_START)) == PAGE_START
    except OSError:
        return False
