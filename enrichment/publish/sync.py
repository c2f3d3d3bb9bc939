"""Publishing kept in step: Europeana's Annotations API holds exactly the current labels.

`publish` compares two things: the labels the export would write for a
selection (the same `ExportFilter`, the same reads, the same Europeana-profile
annotations and local checks) and the publication ledger (`store.ledger`).
Per (record, label):

- a current label with no held annotation is *created*;
- one whose annotation would now read differently (another model version,
  another classification time) is *updated* by its Europeana id;
- a held annotation whose label is no longer current is *withdrawn*, for
  every record the selection covers (a record re-enriched by a model version
  that no longer gives the label, a label the curators rejected, a label
  below a new minimum confidence);
- everything else is left alone, so publishing twice changes nothing.

Crash safety rests on intents. Before any request, its rows are written to
the ledger as `creating`, `updating` or `withdrawing` and committed; the answer
settles them (`published`, `withdrawn`, `rejected`). Each of these changes is
a named operation of `store.publications`; this module decides which to make.
Rows left unsettled (the publish was killed or stopped with Ctrl-C, which
cuts off the calls in flight, or an answer was lost) are resolved before the
next writes, and again at the end (`publish.unsettled`):
a `creating` row is looked up with the search endpoint and adopted when the
server holds it, forgotten when it does not. New annotations go in pages
(`POST .../annotations/`, no duplicate check), which is safe because a page
is never re-sent blind: only a page the server surely did not carry out is retried,
any other is resolved through the search. Updates go in pages too (items with their
id), retried like any idempotent request; withdrawals are one DELETE each. A page
the server rejects (one bad item rejects it all, and then nothing was stored)
is split in halves until the bad item is alone; it is reported with the
server's message and every other item is published.

A precision gate (`--min-precision P`, `model.compare.PrecisionGate`) refuses classes below P:
nothing of them is created, updated or withdrawn; the report lists them.

Only the owner may update or withdraw an annotation: rows whose recorded owner
is not this publish's account (learned from the server's answers) are left
alone and reported.

Nothing is recorded that the server did not clearly say (`annotations_api`
checks every answer): an answer that cannot be used (an id that is no
annotation id, one id given to two annotations of this publish) is reported
for its item, whose row stays an intent: a create is then looked up by the
closing resolve, an update is sent again next time. So the ledger only ever
holds ids a later publish or `--withdraw` can act on.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import asdict
from typing import Any

from enrichment.errors import InvalidValue
from enrichment.model.compare import PrecisionGate
from enrichment.publish.annotations import PROFILES, CheckedAnnotations
from enrichment.publish.annotations_api import (
    AnnotationsAPI,
    Duplicate,
    Rejected,
    Stored,
    Unsettled,
    Unusable,
)
from enrichment.publish.export import ExportFilter, check_filter, iter_label_rows
from enrichment.publish.planned import (
    PlannedWrite,
    PublishReport,
    UpdateOutcome,
    Wanted,
    content_sha256,
)
from enrichment.publish.unsettled import Account, publish_lock, resolve_unsettled
from enrichment.store.database import Database
from enrichment.store.ledger import PublicationState
from enrichment.store.publications import (
    ChangeIntent,
    Created,
    CreateIntent,
    LedgerEntry,
    PublicationOutcome,
    Refused,
    Updated,
    Withdrawn,
    count_unsettled,
    entries_of_current_records,
    entries_published_by,
    known_account,
    record_intents,
    record_outcomes,
)
from enrichment.store.relabel import finish_relabelling
from enrichment.store.selection import count_left_out_by_reviews

PAGE_SIZE = 100
CONCURRENCY = 4
S = PublicationState


class Publisher:
    """One publish of one selection to one Annotations API.

    `api` may be None for a dry run, which reads and plans and writes nothing.
    """

    def __init__(
        self,
        db: Database,
        api_url: str,
        api: AnnotationsAPI | None,
        concurrency: int = CONCURRENCY,
        page_size: int = PAGE_SIZE,
    ) -> None:
        self.db = db
        self.api_url = api_url
        self.api = api
        self.concurrency = concurrency
        self.page_size = page_size
        self.report = PublishReport(dry_run=api is None)
        # The ledger's last owner (`known_account`) until this publish's answers say.
        self.account = known_account(db, api_url)
        self._account_sure = False
        self._unwritten: list[PublicationOutcome] = []
        # Ids the server gave this publish, and the row each went to: one id, one row.
        self._assigned: dict[str, int] = {}
        self.gate: PrecisionGate | None = None

    # -- the whole publish ---------------------------------------------------------------

    def publish(
        self,
        filters: ExportFilter,
        withdraw_all: bool = False,
        list_changes: bool = False,
        min_precision: float | None = None,
    ) -> PublishReport:
        """Make the server hold exactly the current labels of the selection, or none.

        A dry run (no `api`) only plans: with `list_changes`, each planned
        change is in the report's `changes`. `min_precision`: the gate above.
        """
        check_filter(self.db, filters)
        finish_relabelling(self.db)  # no label of a recalibrated version by its old thresholds
        if min_precision is not None:
            if withdraw_all:
                raise InvalidValue("min_precision", "gates publishing, not withdrawing")
            self.gate = PrecisionGate.of(self.db, min_precision, filters.model_version)
        if not withdraw_all:
            self.report.left_out_by_reviews = count_left_out_by_reviews(
                self.db, filters.selection()
            )
        if self.api is None:
            self.report.unsettled = count_unsettled(self.db, self.api_url)
            for op in self._plan(filters, withdraw_all):
                self._count_dry(op)
                if list_changes:
                    self.report.changes.append(op.change())
            return self.report
        with (
            publish_lock(self.db, self.api_url),
            ThreadPoolExecutor(self.concurrency, thread_name_prefix="publish") as pool,
            self.api.aborting(),  # left first: a Ctrl-C waits for no answer in flight
        ):
            self._resolve(pool)
            self._execute(pool, self._plan(filters, withdraw_all))
            self._resolve(pool)
        return self.report

    def _resolve(self, pool: ThreadPoolExecutor) -> None:
        """Settle what an interrupted publish (or a lost answer) left (`publish.unsettled`)."""
        assert self.api is not None
        account = Account(self.account if self._account_sure else None, self.account)
        resolved = resolve_unsettled(self.db, self.api, self.api_url, account, pool)
        self.report.adopted += resolved.adopted
        self.report.forgotten += resolved.forgotten
        self.report.withdrawn += resolved.withdrawn
        if resolved.undecided:
            self.report.problem(
                f"{resolved.undecided} labels left unsettled: the server holds their tag, but "
                "whether as this publish's account is not known until the server has answered "
                "one of its creates; a publish that creates a label settles them"
            )

    def _count_dry(self, op: PlannedWrite) -> None:
        if op.kind == "create":
            self.report.created += 1
        elif op.kind == "update":
            self.report.updated += 1
        else:
            self.report.withdrawn += 1

    # -- planning ------------------------------------------------------------------------

    def _plan(self, filters: ExportFilter, withdraw_all: bool) -> Iterator[PlannedWrite]:
        """Creates and updates while the selection streams by; then the withdrawals."""
        held = self._ledger(filters, withdraw_all)
        if not withdraw_all:
            for wanted in self._wanted(filters):
                entry = held.pop((wanted.row.record_id, wanted.row.label_key), None)
                if self.gate and not self.gate.admits(
                    wanted.row.model_version, wanted.row.label_key
                ):
                    self.report.held_back += 1
                    continue
                op = self._decide(wanted, entry)
                if op is not None:
                    yield op
        for entry in held.values():
            if self.gate is not None and self.gate.refuses_key(entry.label_key):
                continue
            if entry.state in (S.PUBLISHED, S.UPDATING) and self._may_change(entry):
                yield PlannedWrite("withdraw", None, entry)
        if self.gate is not None:
            self.report.refused_classes = [asdict(item) for item in self.gate.refused]

    def _decide(self, wanted: Wanted, entry: LedgerEntry | None) -> PlannedWrite | None:
        if entry is None or entry.state in (S.WITHDRAWN, S.REJECTED):
            return PlannedWrite("create", wanted, entry)
        if entry.state == S.PUBLISHED and entry.content_sha256 == wanted.sha256:
            self.report.unchanged += 1
            return None
        if entry.state in (S.PUBLISHED, S.UPDATING) and self._may_change(entry):
            return PlannedWrite("update", wanted, entry)
        return None  # unsettled (a dry run) or not ours

    def _may_change(self, entry: LedgerEntry) -> bool:
        if entry.owner is None or self.account is None or entry.owner == self.account:
            return True
        self.report.not_owned += 1
        self.report.problem(
            f"{entry.record_id} ({entry.label_key}): {entry.annotation_id} belongs to "
            f"{entry.owner}, not to this account: left as it is"
        )
        return False

    def _wanted(self, filters: ExportFilter) -> Iterator[Wanted]:
        """The export's selection as Europeana-profile annotations, each checked locally."""
        checked = CheckedAnnotations(PROFILES["europeana"])
        for row in iter_label_rows(self.db, filters):
            for annotation in checked.build((row,)):
                yield Wanted(row, annotation, content_sha256(annotation))
        self.report.invalid = checked.skipped
        for problem in checked.problems:
            self.report.problem(f"not valid, not published: {problem}")

    def _ledger(
        self, filters: ExportFilter, withdraw_all: bool
    ) -> dict[tuple[str, str], LedgerEntry]:
        """The ledger rows of the records the selection covers (for `withdraw_all`, its filters)."""
        if withdraw_all:
            return entries_published_by(self.db, self.api_url, filters.selection())
        return entries_of_current_records(self.db, self.api_url, filters.selection())

    # -- writing -------------------------------------------------------------------------

    def _execute(self, pool: ThreadPoolExecutor, ops: Iterable[PlannedWrite]) -> None:
        """Intents for a chunk committed, its requests run `concurrency` at a time, settled."""
        in_flight: set[Future] = set()
        buffers: dict[str, list[PlannedWrite]] = {"create": [], "update": [], "withdraw": []}
        tasks = {"create": self._create_page, "update": self._update_page}

        def drain(limit: int) -> None:
            """Settle what is done (raising what a request raised), waiting while over `limit`."""
            while in_flight:
                done = {future for future in in_flight if future.done()}
                if not done and len(in_flight) <= limit:
                    return
                if not done:
                    done, _ = wait(in_flight, return_when=FIRST_COMPLETED)
                for future in done:
                    in_flight.discard(future)
                    future.result()()  # settles in this thread

        def flush(kind: str) -> None:
            """Creates and updates go as one page, withdrawals one DELETE each."""
            chunk = list(buffers[kind])
            buffers[kind].clear()
            self._intend(chunk)
            if kind in tasks:
                in_flight.add(pool.submit(tasks[kind], chunk))
                drain(self.concurrency)
                return
            for op in chunk:
                in_flight.add(pool.submit(self._withdraw, op))
                drain(self.concurrency)

        try:
            for op in ops:
                buffers[op.kind].append(op)
                if len(buffers[op.kind]) >= self.page_size:
                    flush(op.kind)
            for kind, buffer in buffers.items():
                if buffer:
                    flush(kind)
            drain(0)
        except BaseException:
            for future in in_flight:
                future.cancel()
            raise
        finally:
            self._write_settled()

    def _intend(self, ops: list[PlannedWrite]) -> None:
        """Write the rows' intents and commit them before any request goes out."""
        intents: list[CreateIntent | ChangeIntent] = []
        for op in ops:
            if op.kind == "create":
                assert op.wanted is not None
                row = op.wanted.row
                intents.append(
                    CreateIntent(
                        op.entry.id if op.entry is not None else None,
                        row.record_id,
                        row.label_key,
                        row.concept,
                        row.model_version,
                        op.wanted.sha256,
                    )
                )
            else:
                assert op.entry is not None
                state = S.UPDATING if op.kind == "update" else S.WITHDRAWING
                intents.append(ChangeIntent(op.entry.id, state))
        for op, row_id in zip(ops, record_intents(self.db, self.api_url, intents), strict=True):
            op.row_id = row_id

    def _settled(self, outcomes: list[PublicationOutcome], now: bool = False) -> None:
        """Record answers; written at once (`now`, the ids of new annotations) or in batches.

        An update or withdrawal settled late costs nothing after a crash: its
        row is still an intent, and PUT and DELETE are idempotent.
        """
        self._unwritten.extend(outcomes)
        if now or len(self._unwritten) >= self.page_size:
            self._write_settled()

    def _write_settled(self) -> None:
        if self._unwritten:
            record_outcomes(self.db, self._unwritten)
            self._unwritten = []

    def _learn(self, stored: Stored) -> None:
        if stored.owner is not None:
            self.account = stored.owner
            self._account_sure = True

    def _create_page(self, ops: list[PlannedWrite]) -> Callable[[], None]:
        """Runs in a pool thread: post the page, split it where the server rejects it."""
        api = self.api
        assert api is not None
        outcomes: list[tuple[PlannedWrite, Stored | Unusable | Rejected | Unsettled]] = []

        def post(part: list[PlannedWrite]) -> None:
            try:
                stored = api.create_page([op.annotation for op in part])
            except Rejected as error:
                if len(part) == 1:
                    outcomes.append((part[0], error))
                    return
                middle = len(part) // 2
                post(part[:middle])
                post(part[middle:])
                return
            except Unsettled as error:
                outcomes.extend((op, error) for op in part)
                return
            outcomes.extend(zip(part, stored, strict=True))

        post(ops)

        def settle() -> None:
            settled: list[PublicationOutcome] = []
            unknown = [op for op, outcome in outcomes if isinstance(outcome, Unsettled)]
            if unknown:
                reason = next(o for _, o in outcomes if isinstance(o, Unsettled))
                self.report.problem(
                    f"{len(unknown)} new annotations, outcome unknown ({reason}): "
                    "looked up on the server"
                )
            for op, outcome in outcomes:
                if isinstance(outcome, Stored):
                    outcome = self._assign(op, outcome)
                if isinstance(outcome, Stored):
                    self._learn(outcome)
                    self.report.created += 1
                    settled.append(Created(op.row_id, outcome.id, outcome.owner))
                elif isinstance(outcome, Unusable):
                    self._unusable(op, outcome)
                elif isinstance(outcome, Rejected):
                    self._rejected(op, outcome)
                    settled.append(Refused(op.row_id, outcome.message, kept=False))
                # Unsettled or unusable: the row stays `creating`; the closing settle
                # looks it up.
            self._settled(settled, now=True)

        return settle

    def _assign(self, op: PlannedWrite, stored: Stored) -> Stored | Unusable:
        """The id for this row, unless this publish already gave it to another row."""
        holder = self._assigned.setdefault(stored.id, op.row_id)
        if holder != op.row_id:
            return Unusable(f"the server answered the id {stored.id}, given to another label")
        return stored

    def _unusable(self, op: PlannedWrite, error: Unusable) -> None:
        self.report.unusable += 1
        assert op.wanted is not None
        row = op.wanted.row
        self.report.problem(
            f"{row.record_id} ({row.label_key}): answer not recorded: {error.reason}"
        )

    def _rejected(self, op: PlannedWrite, error: Rejected) -> None:
        self.report.rejected += 1
        assert op.wanted is not None
        row = op.wanted.row
        self.report.problem(
            f"{row.record_id} ({row.label_key}): refused by the server: {error.message}"
        )

    def _update_page(self, ops: list[PlannedWrite]) -> Callable[[], None]:
        """Runs in a pool thread: a page of updates by id, split where the server rejects it.

        Updates cannot duplicate anything, so a page of them is retried like
        any idempotent request, and one whose outcome is unknown goes again
        item by item (PUT).
        """
        api = self.api
        assert api is not None
        outcomes: list[UpdateOutcome] = []

        def post(part: list[PlannedWrite]) -> None:
            try:
                stored = api.update_page([(op.annotation_id, op.annotation) for op in part])
            except Rejected as error:
                if len(part) == 1:
                    outcomes.append(self._update_one(part[0], error))
                    return
                middle = len(part) // 2
                post(part[:middle])
                post(part[middle:])
                return
            except Unsettled:
                outcomes.extend(self._update_one(op) for op in part)
                return
            outcomes.extend(UpdateOutcome(op, one) for op, one in zip(part, stored, strict=True))

        post(ops)

        def settle() -> None:
            settled: list[PublicationOutcome] = []
            for op, outcome, adopted, created in outcomes:
                if isinstance(outcome, Stored):
                    outcome = self._assign(op, outcome)
                if isinstance(outcome, Unusable):
                    # Stays `updating` (sent again next time), or `creating` (looked up).
                    self._unusable(op, outcome)
                    continue
                if isinstance(outcome, Rejected):
                    self._rejected(op, outcome)
                    # A refused update leaves the annotation as it was; a refused create
                    # of one gone, nothing (the label is created again next time).
                    settled.append(Refused(op.row_id, outcome.message, kept=not created))
                    continue
                if not adopted:
                    self._learn(outcome)
                self.report.updated += 1
                assert op.wanted is not None
                row = op.wanted.row
                settled.append(
                    Updated(
                        op.row_id,
                        outcome.id,
                        outcome.owner,
                        adopted,
                        op.wanted.sha256,
                        row.model_version,
                        row.concept,
                    )
                )
            # A created annotation's id at once, as every create's (its row is an intent).
            self._settled(settled, now=any(one.created for one in outcomes))

        return settle

    def _update_one(self, op: PlannedWrite, refused: Rejected | None = None) -> UpdateOutcome:
        """PUT one update (unless the page already refused it); one gone is created again.

        Before that create goes out, its row becomes a create's intent, committed: killed
        before the answer, the next publish (`--withdraw` too) looks the new annotation up
        by its tag, as it does any create's, where the gone id would name nothing."""
        assert self.api is not None
        outcome: Stored | Unusable | Rejected | None = refused
        if outcome is None:
            try:
                outcome = self.api.update(op.annotation_id, op.annotation)
            except (Rejected, Unusable) as error:
                outcome = error
        if not (isinstance(outcome, Rejected) and outcome.status in (404, 410)):
            return UpdateOutcome(op, outcome)
        assert op.wanted is not None
        row = op.wanted.row
        intent = CreateIntent(
            op.row_id,
            row.record_id,
            row.label_key,
            row.concept,
            row.model_version,
            op.wanted.sha256,
        )
        record_intents(self.db, self.api_url, [intent])
        try:
            created, adopted = self._create_one(op.annotation)
        except (Rejected, Unusable) as error:
            return UpdateOutcome(op, error, created=True)
        return UpdateOutcome(op, created, adopted, created=True)

    def _create_one(self, annotation: dict[str, Any]) -> tuple[Stored, bool]:
        """A duplicate-checked single create; the same annotation already there is adopted."""
        assert self.api is not None
        try:
            return self.api.create(annotation), False
        except Duplicate as duplicate:
            existing = self.api.get(duplicate.ids[0])
            return self.api.stored(existing, duplicate.ids[0]), True

    def _withdraw(self, op: PlannedWrite) -> Callable[[], None]:
        assert self.api is not None
        self.api.withdraw(op.annotation_id)

        def settle() -> None:
            self.report.withdrawn += 1
            self._settled([Withdrawn(op.row_id)])

        return settle
