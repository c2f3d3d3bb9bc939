"""Running batches in this process: the embedded default, with no broker.

The same stages a Celery worker runs (`enrichment.runs.pipeline`), overlapped
across batches so that the model never waits on the network or the database:

    dispatch -> [starter] count the attempt, submit the images (fetch + decode)
             -> [model]   classify as images become ready
             -> [writer]  commit, mark done, maybe complete the run

Each stage is one thread joined to the next by a short queue. The starter
runs up to `AHEAD` batches ahead of the model, so while one batch is
classified the next ones are downloading and decoding; the writer commits
behind the model, so a commit never holds up a forward pass.

`dispatch` only queues the batch ids and returns: the scheduler keeps paging
meanwhile. Leaving the context waits for every dispatched batch; leaving it
with an exception (Ctrl-C) stops at once and leaves unfinished batches for
`enrich resume`. A batch that raises is retried until it has used its attempts
(`ENRICH_MAX_ATTEMPTS`), then given up with an error result per record, so the
run still ends with every record accounted for.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from tqdm import tqdm

from enrichment.media.fetch import Fetcher
from enrichment.model.classifier import Classifier
from enrichment.runs.lifecycle import fail_batch
from enrichment.runs.pipeline import (
    DEFAULT_INFERENCE_BATCH,
    IN_THREAD,
    Classified,
    Decoding,
    StartedBatch,
    begin_batch,
    classify_started,
    commit_batch,
)
from enrichment.store.batches import AttemptsExhausted, note_batch_error
from enrichment.store.database import Database

AHEAD = 2  # batches started (images downloading) beyond the one being classified
_STOP = object()


class InProcessDispatcher:
    """Runs dispatched batches on a three-stage pipeline in this process; a context manager.

    It owns the fetcher and the decoding (feeder processes) it is given: closing
    the dispatcher closes them.
    """

    def __init__(
        self,
        classifier: Classifier,
        fetcher: Fetcher,
        max_attempts: int,
        inference_batch: int = DEFAULT_INFERENCE_BATCH,
        show_progress: bool = True,
        decoding: Decoding = IN_THREAD,
    ) -> None:
        self.max_attempts = max_attempts
        self.decoding = decoding
        self.inference_batch = inference_batch
        self.classifier = classifier
        self.fetcher = fetcher
        self.show_progress = show_progress
        # Made at the first dispatch, so it starts on a line of its own after whatever
        # the command printed first ("run 1 started ..."), never run into it.
        self.progress: tqdm | None = None
        self._incoming: queue.Queue[Any] = queue.Queue()
        self._started: queue.Queue[Any] = queue.Queue(maxsize=AHEAD - 1)
        self._classified: queue.Queue[Any] = queue.Queue(maxsize=2)
        self._tries: dict[int, int] = {}
        self._outstanding = 0
        self._idle = threading.Condition()
        self._stopping = threading.Event()
        self._failure: BaseException | None = None
        self._threads = [
            threading.Thread(target=self._guard(stage), name=f"batches-{stage.__name__}")
            for stage in (self._starter, self._model, self._writer)
        ]
        for thread in self._threads:
            thread.daemon = True
            thread.start()

    def __enter__(self) -> InProcessDispatcher:
        return self

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        interrupted = kind is not None
        try:
            if not interrupted:
                self.wait()  # Ctrl-C usually lands here, while the last batches run
        except BaseException:
            interrupted = True
            raise
        finally:
            self.close(wait=not interrupted)

    def dispatch(self, db: Database, queue: str, batch_ids: list[int]) -> None:
        """Queue the batches for the stages and return; `queue` is the broker's concern."""
        if self.progress is None:
            # On a terminal only (None): in a cron job's log its redraws are noise.
            self.progress = tqdm(
                unit=" records", desc="classified", disable=None if self.show_progress else True
            )
        with self._idle:
            self._outstanding += len(batch_ids)
        for batch_id in batch_ids:
            self._incoming.put((db, batch_id))

    def wait(self) -> None:
        """Until every dispatched batch is finished (done, given up, or left for resume)."""
        with self._idle:
            while self._outstanding and self._failure is None:
                self._idle.wait(0.5)
        if self._failure is not None:
            raise self._failure

    def close(self, wait: bool = True) -> None:
        """Stop the stages; without `wait` (an interrupt), downloads in flight are abandoned."""
        self._stopping.set()
        self._incoming.put(_STOP)
        self.fetcher.close(wait=wait)
        self.decoding.close()
        deadline = time.monotonic() + 5  # a stage stuck in a download is a daemon: left behind
        for thread in self._threads:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
        if self.progress is not None:
            self.progress.close()

    # The stages. Each passes (db, batch_id, payload) on; a failure goes to `_retry`.

    def _starter(self) -> None:
        while not self._stopping.is_set():
            item = self._get(self._incoming)
            if item is _STOP:
                self._put(self._started, _STOP)
                return
            db, batch_id = item
            try:
                started = begin_batch(
                    db,
                    batch_id,
                    self.classifier,
                    self.fetcher,
                    self.max_attempts,
                    decoding=self.decoding,
                )
            except AttemptsExhausted as error:
                self._give_up(db, batch_id, error)
                continue
            except Exception as error:
                self._retry(db, batch_id, error)
                continue
            if started is None:
                self._finished(0)
                continue
            self._put(self._started, (db, batch_id, started))

    def _model(self) -> None:
        while True:
            item = self._get(self._started)
            if item is _STOP or self._stopping.is_set():
                self._put(self._classified, _STOP)
                return
            db, batch_id, started = item
            try:
                classified = classify_started(db, started, self.classifier, self.inference_batch)
            except Exception as error:
                self._retry(db, batch_id, error)
                continue
            self._put(self._classified, (db, batch_id, (started, classified)))

    def _writer(self) -> None:
        while True:
            item = self._get(self._classified)
            if item is _STOP or self._stopping.is_set():
                return
            db, batch_id, (started, classified) = item
            try:
                report = self._commit(db, started, classified)
            except Exception as error:
                self._retry(db, batch_id, error)
                continue
            self._finished(sum(report.outcomes.values()))

    def _commit(self, db: Database, started: StartedBatch, classified: Classified):
        return commit_batch(db, started, self.classifier, classified)

    def _give_up(self, db: Database, batch_id: int, poison: AttemptsExhausted) -> None:
        """Mark a batch that used up its attempts failed; a database that fails meanwhile
        sends it round again (it is given up on the next pass), not the run down."""
        try:
            fail_batch(db, batch_id, "batch_failed", str(poison))
        except Exception as error:
            self._retry(db, batch_id, error)
            return
        self._finished(0)

    def _retry(self, db: Database, batch_id: int, error: Exception) -> None:
        """Send a batch that raised round again; the database's attempts counter ends it.

        A batch that cannot even start (its attempts are never counted) is left
        unfinished for `enrich resume` rather than retried forever.
        """
        # If the database is what failed, the retry below meets it again.
        with contextlib.suppress(Exception):
            note_batch_error(db, batch_id, f"{type(error).__name__}: {error}")
        tries = self._tries[batch_id] = self._tries.get(batch_id, 0) + 1
        if tries > self.max_attempts or self._stopping.is_set():
            self._finished(0)
            return
        self._incoming.put((db, batch_id))

    def _finished(self, records: int) -> None:
        if self.progress is not None:  # set by `dispatch`, which comes first
            self.progress.update(records)
        with self._idle:
            self._outstanding -= 1
            self._idle.notify_all()

    def _get(self, source: queue.Queue[Any]) -> Any:
        """The next item from the stage before, or _STOP once the dispatcher stops."""
        while not self._stopping.is_set():
            try:
                return source.get(timeout=0.2)
            except queue.Empty:
                continue
        return _STOP

    def _put(self, target: queue.Queue[Any], item: Any) -> None:
        """Hand on to the next stage, giving up when the dispatcher stops."""
        while not self._stopping.is_set():
            try:
                target.put(item, timeout=0.2)
                return
            except queue.Full:
                continue
        if item is _STOP:
            with contextlib.suppress(queue.Full):
                target.put_nowait(item)

    def _guard(self, stage: Callable[[], None]) -> Callable[[], None]:
        """A stage that dies of a bug ends the run with that error, rather than hanging it."""

        def run() -> None:
            try:
                stage()
            except BaseException as error:
                self._failure = error
                with self._idle:
                    self._idle.notify_all()

        run.__name__ = stage.__name__
        return run
