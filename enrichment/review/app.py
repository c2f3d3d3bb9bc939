"""The review web app: server-rendered pages and a small JSON API, behind guards.

Flask, because the app is a handful of synchronous pages over the store's
reads and writes, with Jinja2 templates and no build step; `enrich review`
serves it with waitress, a production WSGI server in pure Python. Every asset
ships in the package, so the page works offline. `guard.py` decides who may
ask what, `pages.py` and `api.py` answer.
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from flask import Flask, render_template, request
from werkzeug.middleware.proxy_fix import ProxyFix

from enrichment.config import Settings
from enrichment.errors import InvalidValue
from enrichment.review.api import api
from enrichment.review.context import EXTENSION, ReviewContext, review_context
from enrichment.review.guard import Guard, api_error
from enrichment.review.images import ImageCache
from enrichment.review.pages import pages
from enrichment.review.params import QUERY_PARAMETERS, ReviewError, page_query, usable_query
from enrichment.store.database import Database
from enrichment.store.decisions import DecidedMeanwhile
from enrichment.store.relabel import relabelling_versions
from enrichment.thresholds import score_and_threshold


def create_app(
    db: Database,
    settings: Settings,
    cache_dir: Path,
    bound_to: str = "127.0.0.1",
    behind_proxy: bool = False,
) -> Flask:
    """The app over `db`; `bound_to` is the address it listens on, which decides the guards.

    `behind_proxy` trusts one reverse proxy's X-Forwarded-* headers (Werkzeug's ProxyFix),
    so that behind a TLS-terminating proxy the guard compares a POST's Origin with the
    https origin the browser used, not the proxy's plain-HTTP hop. Off by default: without
    a proxy, those headers would be anybody's to forge.
    """
    guard = Guard(bound_to, settings.review_token)
    app = Flask(__name__)
    if behind_proxy:
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=1, x_proto=1, x_host=1, x_port=1, x_prefix=1)
    app.config.update(
        SECRET_KEY=secrets.token_bytes(32),
        SESSION_COOKIE_NAME="enrich_review",
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Strict",
        MAX_CONTENT_LENGTH=4 * 1024 * 1024,
    )
    app.extensions[EXTENSION] = ReviewContext(db, ImageCache(settings, cache_dir))
    app.jinja_env.globals["score_and_threshold"] = score_and_threshold
    # Called by the page (base.html's notices), not here: the login page reads nothing.
    app.context_processor(lambda: {"relabelling_versions": lambda: relabelling_versions(db)})
    guard.install(app)
    app.register_blueprint(pages)
    app.register_blueprint(api)
    app.register_error_handler(ReviewError, refused)
    app.register_error_handler(InvalidValue, refused)
    app.register_error_handler(DecidedMeanwhile, conflict)
    return app


def conflict(error: DecidedMeanwhile) -> Any:
    """Decisions made on a state that changed meanwhile: 409, with what stands now on each
    item (`decision` null: pending again), so the page can show it before the curator
    decides again."""
    conflicts = [
        {"record_id": record_id, "label_key": key, "decision": None}
        | (standing.as_json() if standing else {})
        for record_id, key, standing in error.conflicts
    ]
    return api_error(409, str(error), field="seen", conflicts=conflicts)


def refused(error: ReviewError | InvalidValue) -> Any:
    """A request the app cannot serve as asked: 400, with the message (and the parameter).

    A page names the parameter that was wrong and links back to the queue (or the stats)
    with the curator's other filters kept, so that one typo does not cost them all.
    """
    field = (
        QUERY_PARAMETERS.get(error.field, error.field) if isinstance(error, InvalidValue) else None
    )
    if request.path.startswith("/api/"):
        return api_error(400, str(error), **({"field": field} if field else {}))
    page = request.path if request.path in ("/queue", "/stats") else "/queue"
    own = page == request.path
    kept = usable_query(review_context().db, request.args) if own else []
    left_out = [pair for pair in page_query(request.args) if pair not in kept] if own else []
    return render_template(
        "error.html",
        message=str(error),
        field=field if field in request.args else None,  # as the request named it, if it did
        back=f"{page}?{urlencode(kept)}" if kept else page,
        kept=kept,
        left_out=left_out,
        page=page,
        own=own,
    ), 400
