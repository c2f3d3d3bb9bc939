"""The review web app: server-rendered pages, a small JSON API, and the guards around them.

Flask, because the app is a handful of synchronous pages over the same
SQLAlchemy code the rest of the project uses, with Jinja2 templates
(autoescaped: titles and providers are third-party text) and no build step;
`enrich review` serves it with waitress, a production WSGI server in pure
Python. Every asset ships in the package and the Content-Security-Policy
allows the app's own origin only, so the page works offline and cannot leak.

Guards:

- bound to loopback, requests must name a loopback host (a DNS-rebinding page
  would name its own) and no login is needed; bound elsewhere, the app needs
  ENRICH_REVIEW_TOKEN: browsers log in with it (a SameSite=Strict session
  cookie), scripts send `Authorization: Bearer TOKEN`;
- cross-site request forgery: a state-changing request whose Origin is not
  the app's own is refused; one without Origin (a script) is accepted on
  loopback, and needs the bearer token when there is one. API writes must be
  JSON, which no cross-site form can send without a preflight.
"""

from __future__ import annotations

import hmac
import ipaddress
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from flask import (
    Flask,
    Response,
    abort,
    g,
    jsonify,
    redirect,
    render_template,
    request,
    session,
    url_for,
)

from enrichment.config import Settings
from enrichment.review.images import SIZES, ImageCache
from enrichment.review.queue import (
    MAX_LIMIT,
    SIDES,
    STATES,
    DecisionIn,
    QueueFilter,
    ReviewError,
    image_url,
    model_classes,
    queue,
    record_decisions,
    record_view,
    undo,
)
from enrichment.review.stats import class_stats
from enrichment.store.database import Database

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
LOOPBACK_NAMES = frozenset({"localhost", "localhost.", "127.0.0.1", "::1"})
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)
PAGE_SIZE = 48


def is_loopback(host: str) -> bool:
    """True for loopback names and addresses (127.0.0.0/8, ::1, localhost)."""
    name = host.strip("[]").lower()
    if name in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def create_app(
    db: Database,
    settings: Settings,
    cache_dir: Path,
    bound_to: str = "127.0.0.1",
) -> Flask:
    """The app over `db`; `bound_to` is the address it listens on, which decides the guards."""
    loopback = is_loopback(bound_to)
    token = settings.review_token
    if not loopback and not token:
        raise ReviewError(
            f"binding to {bound_to} (not loopback) needs a login: set ENRICH_REVIEW_TOKEN"
        )
    app = Flask(__name__)
    app.config.update(
        SECRET_KEY=secrets.token_bytes(32),
        SESSION_COOKIE_NAME="enrich_review",
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Strict",
        MAX_CONTENT_LENGTH=4 * 1024 * 1024,
    )
    images = ImageCache(settings, cache_dir)
    app.extensions["enrich_review_images"] = images

    def bearer_ok() -> bool:
        header = request.headers.get("Authorization", "")
        scheme, _, given = header.partition(" ")
        return (
            bool(token)
            and scheme.lower() == "bearer"
            and hmac.compare_digest(given.strip().encode(), token.encode())
        )

    def api_error(status: int, message: str) -> Response:
        response = jsonify(error=message)
        response.status_code = status
        return response

    @app.before_request
    def guard() -> Any:
        host = urlsplit("//" + request.host).hostname or ""
        if loopback and not is_loopback(host):
            return api_error(403, "this app answers to loopback host names only")
        api = request.path.startswith("/api/")
        if request.method not in SAFE_METHODS:
            origin = request.headers.get("Origin")
            own = f"{request.scheme}://{request.host}"
            if origin is not None and origin != own:
                return api_error(403, f"cross-origin request refused (Origin {origin})")
            fetch_site = request.headers.get("Sec-Fetch-Site")
            if origin is None and fetch_site not in (None, "same-origin", "none"):
                return api_error(403, "cross-site request refused")
            if origin is None and token and not bearer_ok():
                return api_error(401, "a request without Origin needs Authorization: Bearer")
            if api and not request.is_json:
                return api_error(415, "send JSON (Content-Type: application/json)")
        if not token or request.endpoint in ("login", "login_post", "static") or bearer_ok():
            return None
        if session.get("login") == _login_mark(token):
            return None
        if api:
            return api_error(401, "log in, or send Authorization: Bearer TOKEN")
        return redirect(url_for("login", next=request.full_path))

    @app.after_request
    def headers(response: Response) -> Response:
        response.headers["Content-Security-Policy"] = CSP
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        response.headers["X-Frame-Options"] = "DENY"
        if response.mimetype in ("text/html", "application/json"):
            response.headers["Cache-Control"] = "no-store"
        return response

    @app.errorhandler(ReviewError)
    def review_error(error: ReviewError) -> Any:
        if request.path.startswith("/api/"):
            return api_error(400, str(error))
        return render_template("error.html", message=str(error)), 400

    def connection() -> Any:
        if "connection" not in g:
            g.connection = db.engine.connect()
        return g.connection

    @app.teardown_appcontext
    def close_connection(_: BaseException | None) -> None:
        opened = g.pop("connection", None)
        if opened is not None:
            opened.close()

    @app.get("/login")
    def login() -> Any:
        return render_template("login.html", next=_local(request.args.get("next")), failed=False)

    @app.post("/login")
    def login_post() -> Any:
        given = request.form.get("token", "")
        target = _local(request.form.get("next"))
        if token and hmac.compare_digest(given.encode(), token.encode()):
            session["login"] = _login_mark(token)
            return redirect(target)
        return render_template("login.html", next=target, failed=True), 401

    @app.post("/logout")
    def logout() -> Any:
        session.clear()
        return redirect(url_for("login"))

    @app.get("/")
    def home() -> Any:
        return redirect(url_for("queue_page"))

    @app.get("/queue")
    def queue_page() -> Any:
        filters = _queue_filter(request.args, PAGE_SIZE)
        items, total = queue(connection(), filters)
        models = model_classes(connection())
        classes = sorted({key for model in models.values() for key in model.keys})
        return render_template(
            "queue.html",
            items=items,
            total=total,
            filters=filters,
            classes=classes,
            versions=sorted(models),
            sides=SIDES,
            states=STATES,
            page_size=PAGE_SIZE,
            args=request.args,
        )

    @app.get("/record")
    def record_page() -> Any:
        record_id = request.args.get("id", "")
        view = record_view(connection(), record_id, request.args.get("model_version") or None)
        return render_template("record.html", view=view, audit=request.args.get("audit") == "1")

    @app.get("/stats")
    def stats_page() -> Any:
        stats = class_stats(connection(), _queue_filter(request.args, MAX_LIMIT))
        return render_template("stats.html", stats=stats)

    @app.get("/image")
    def image() -> Any:
        size = request.args.get("size", "thumb")
        if size not in SIZES:
            abort(404)
        url = image_url(
            connection(), request.args.get("record", ""), request.args.get("model_version", "")
        )
        if not url:
            abort(404)
        shrunk = images.get(url, size)
        if shrunk.jpeg is None:
            return Response(f"image unavailable: {shrunk.reason}", 404, mimetype="text/plain")
        response = Response(shrunk.jpeg, mimetype="image/jpeg")
        response.headers["Cache-Control"] = "private, max-age=86400"
        return response

    @app.get("/api/queue")
    def api_queue() -> Any:
        filters = _queue_filter(request.args, 50)
        items, total = queue(connection(), filters)
        return jsonify(
            items=[item.as_json() for item in items],
            total=total,
            limit=filters.limit,
            offset=filters.offset,
        )

    @app.get("/api/record")
    def api_record() -> Any:
        view = record_view(
            connection(), request.args.get("id", ""), request.args.get("model_version") or None
        )
        return jsonify(view.as_json())

    @app.post("/api/decisions")
    def api_decisions() -> Any:
        body = request.get_json(silent=True)
        if isinstance(body, dict) and "decisions" in body:
            body = body["decisions"]
        documents = body if isinstance(body, list) else [body]
        if not documents or len(documents) > MAX_LIMIT:
            raise ReviewError(f"send between 1 and {MAX_LIMIT} decisions")
        decisions = [DecisionIn.from_json(document) for document in documents]
        with db.transaction() as write:
            ids = record_decisions(write, decisions)
        return jsonify(ids=ids), 201

    @app.post("/api/undo")
    def api_undo() -> Any:
        body = request.get_json(silent=True)
        ids = body.get("ids") if isinstance(body, dict) else None
        with db.transaction() as write:
            undone = undo(write, ids if isinstance(ids, list) else [])
        return jsonify(undone=undone)

    @app.get("/api/stats")
    def api_stats() -> Any:
        stats = class_stats(connection(), _queue_filter(request.args, MAX_LIMIT))
        return jsonify(classes=[item.as_json() for item in stats])

    return app


def _login_mark(token: str) -> str:
    """What the session cookie holds: derived from the token, so a new token logs everyone out."""
    return hmac.new(token.encode(), b"enrich review login", "sha256").hexdigest()


def _local(target: str | None) -> str:
    """A redirect target on this app only (a path, never //host or a URL)."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/queue"
    return target


def _number(args: Any, name: str, kind: Callable[[str], Any]) -> Any:
    raw = (args.get(name) or "").strip()
    if not raw:
        return None
    try:
        return kind(raw)
    except ValueError:
        raise ReviewError(f"{name}={raw!r} is not a number") from None


def _queue_filter(args: Any, default_limit: int) -> QueueFilter:
    """A QueueFilter from query parameters, as the API documents them."""
    labels = tuple(value for value in args.getlist("label") if value)
    datasets = tuple(value for value in args.getlist("dataset") if value)
    limit = _number(args, "limit", int)
    return QueueFilter(
        labels=labels,
        datasets=datasets,
        run_id=_number(args, "run", int),
        model_version=args.get("model_version") or None,
        min_score=_number(args, "min_score", float),
        max_score=_number(args, "max_score", float),
        side=args.get("side") or "any",
        state=args.get("state") or "pending",
        audit=args.get("audit") in ("1", "true"),
        limit=default_limit if limit is None else limit,
        offset=_number(args, "offset", int) or 0,
    )
