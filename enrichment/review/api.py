"""The review app's JSON API: the queue, a record, decisions and their undo, the stats.

docs/review.md documents it; scripts call it with the bearer token, the
pages' own script with the session cookie (`guard.py` checks both). What shows labels
(the queue, a record, the stats) also names the model versions whose labels are still
being decided again after new thresholds (`relabelling`), as the pages' notice does: a
script deciding on such a label may see it removed.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, jsonify, request

from enrichment.review.context import review_context
from enrichment.review.params import (
    MAX_REVIEWER,
    ReviewError,
    audit_asked,
    decisions_from_json,
    ids_from_json,
    queue_filter,
    record_ids_from_args,
    reviewer_from_json,
)
from enrichment.review.stats import class_stats
from enrichment.store.decisions import (
    recent_decisions,
    record_decisions,
    standing_on,
    take_back_decisions,
)
from enrichment.store.relabel import relabelling_versions
from enrichment.store.review_queue import MAX_LIMIT, queue_page, queue_progress, record_view

api = Blueprint("api", __name__, url_prefix="/api")


@api.get("/queue")
def queue() -> Any:
    filters = queue_filter(request.args, 50)
    page = queue_page(review_context().db, filters)
    return jsonify(
        items=[item.as_json() for item in page.items],
        total=page.total,
        total_capped=page.total_capped,
        limit=filters.limit,
        offset=filters.offset,
        next_after=page.next_page.as_text() if page.next_page else None,
        relabelling=relabelling_versions(review_context().db),
    )


@api.get("/progress")
def progress() -> Any:
    """How far the queue of these filters is: pending items, decisions made today."""
    return jsonify(queue_progress(review_context().db, queue_filter(request.args, 1)).as_json())


def json_body() -> Any:
    """The request's JSON (None if it is not JSON); too deep a nesting is a 400, not a crash."""
    try:
        return request.get_json(silent=True)
    except RecursionError:
        raise ReviewError("the JSON body is nested too deeply") from None


@api.get("/record")
def record() -> Any:
    db = review_context().db
    audit = audit_asked(request.args)  # as the audit sample shows it
    view = record_view(
        db, request.args.get("id", ""), request.args.get("model_version") or None, audit
    )
    return jsonify(**view.as_json(), relabelling=relabelling_versions(db))


@api.post("/decisions")
def decisions() -> Any:
    made = decisions_from_json(json_body())
    return jsonify(ids=record_decisions(review_context().db, made)), 201


@api.get("/decisions")
def decided() -> Any:
    """The decisions that stand now on some records' classes (`audit=1`: the audit
    decisions, what an audit page shows): a page that was away (another tab, another
    curator) shows them again without losing its place."""
    audit = audit_asked(request.args)
    found = standing_on(review_context().db, record_ids_from_args(request.args), audit)
    return jsonify(decisions=[decision.as_json() for decision in found])


@api.post("/undo")
def undo() -> Any:
    body = json_body()
    ids = ids_from_json(body)
    reviewer = reviewer_from_json(body)
    return jsonify(undone=take_back_decisions(review_context().db, ids, reviewer))


@api.get("/recent")
def recent() -> Any:
    """A reviewer's latest decisions, newest first, each with whether it was taken back."""
    reviewer = (request.args.get("reviewer") or "").strip()
    if not reviewer:
        raise ReviewError("name the reviewer: /api/recent?reviewer=NAME")
    found = recent_decisions(review_context().db, reviewer[:MAX_REVIEWER])
    return jsonify(decisions=[decision.as_json() for decision in found])


@api.get("/stats")
def stats() -> Any:
    db = review_context().db
    figures = class_stats(db, queue_filter(request.args, MAX_LIMIT))
    return jsonify(
        classes=[item.as_json() for item in figures], relabelling=relabelling_versions(db)
    )
