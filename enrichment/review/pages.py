"""The review app's server-rendered pages: the queue, a record, the stats, and the images.

Jinja2 templates, autoescaped: titles and providers are third-party text.
Images come from the app itself (`images.py`), never hot-linked.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlencode

from flask import Blueprint, Response, abort, redirect, render_template, request, url_for

from enrichment.review.context import review_context
from enrichment.review.images import SIZES
from enrichment.review.params import audit_asked, page_query, queue_filter
from enrichment.review.stats import MIN_DECISIONS, class_stats
from enrichment.store.decisions import recent_decisions
from enrichment.store.review_queue import (
    MAX_LIMIT,
    SIDES,
    STATES,
    image_url,
    queue_page,
    queue_progress,
    record_view,
    registered_models,
)

PAGE_SIZE = 48

pages = Blueprint("pages", __name__)


@pages.get("/")
def home() -> Any:
    """The queue, with the query kept: `enrich model compare --disagreements` and
    docs/rollout.md hand curators `/?disagree=A,B`."""
    query = urlencode(list(request.args.items(multi=True)))
    return redirect(url_for("pages.queue") + (f"?{query}" if query else ""))


@pages.get("/queue")
def queue() -> Any:
    db = review_context().db
    filters = queue_filter(request.args, PAGE_SIZE)
    page = queue_page(db, filters)
    models = registered_models(db)
    classes = sorted({key for model in models.values() for key in model.keys})
    names = {
        key: name
        for model in models.values()
        for key, name in zip(model.keys, model.names, strict=True)
    }
    base = url_for("pages.queue")
    after = page.next_page.as_text() if page.next_page else None
    return render_template(
        "queue.html",
        items=page.items,
        total=page.total,
        total_capped=page.total_capped,
        class_names=names,
        progress=queue_progress(db, filters),
        next_link=f"{base}?{urlencode(page_query(request.args, after=after))}" if after else None,
        first_link=f"{base}?{urlencode(page_query(request.args, after=None))}",
        progress_query=urlencode(page_query(request.args, after=None)),
        whole_queue_link=f"{base}?{urlencode(page_query(request.args, after=None, disagree=None))}",
        filters=filters,
        classes=classes,
        versions=sorted(models),
        sides=SIDES,
        states=STATES,
        page_size=PAGE_SIZE,
    )


@pages.get("/record")
def record() -> Any:
    record_id = request.args.get("id", "")
    audit = audit_asked(request.args)
    view = record_view(
        review_context().db, record_id, request.args.get("model_version") or None, audit
    )
    return render_template("record.html", view=view, audit=audit)


@pages.get("/recent")
def recent() -> Any:
    """A reviewer's recent decisions, to take one back after leaving its page (the script
    fills in the reviewer from the name the browser remembers)."""
    reviewer = (request.args.get("reviewer") or "").strip()[:200]
    found = recent_decisions(review_context().db, reviewer) if reviewer else []
    return render_template("recent.html", reviewer=reviewer, decisions=found)


@pages.get("/stats")
def stats() -> Any:
    figures = class_stats(review_context().db, queue_filter(request.args, MAX_LIMIT))
    return render_template("stats.html", stats=figures, min_decisions=MIN_DECISIONS)


@pages.get("/image")
def image() -> Any:
    size = request.args.get("size", "thumb")
    if size not in SIZES:
        abort(404)
    context = review_context()
    url = image_url(
        context.db, request.args.get("record", ""), request.args.get("model_version", "")
    )
    if not url:
        abort(404)
    shrunk = context.images.get(url, size)
    if shrunk.jpeg is None:
        return Response(f"image unavailable: {shrunk.reason}", 404, mimetype="text/plain")
    response = Response(shrunk.jpeg, mimetype="image/jpeg")
    response.headers["Cache-Control"] = "private, max-age=86400"
    return response
