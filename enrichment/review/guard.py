"""The guards around every request of the review app: who may ask, from where, with what.

- Bound to loopback, requests must name a loopback host (a DNS-rebinding page
  would name its own) and no login is needed; bound elsewhere, the app needs
  ENRICH_REVIEW_TOKEN: browsers log in with it (a SameSite=Strict session
  cookie), scripts send `Authorization: Bearer TOKEN`. The cookie names a login
  this process keeps (`Logins`): logging out ends it for whoever still holds a
  copy of the cookie, and none lasts beyond `LOGIN_LIFETIME`.
- Cross-site request forgery: a state-changing request whose Origin is not
  the app's own is refused; one without Origin (a script) is accepted on
  loopback, and needs the bearer token when there is one. API writes must be
  JSON, which no cross-site form can send without a preflight. Pages are
  served with `Referrer-Policy: same-origin`, so a browser names the app's
  origin on its own form posts (under `no-referrer` Chromium sends
  `Origin: null`); an `Origin: null` is still accepted when the browser's own
  `Sec-Fetch-Site: same-origin` vouches for it (no page can set that header),
  and refused otherwise.
- Every answer carries a Content-Security-Policy that allows the app's own
  origin only, so a page cannot leak what a curator looks at, nor be framed.
"""

from __future__ import annotations

import hmac
import ipaddress
import secrets
import threading
import time
from typing import Any
from urllib.parse import urlsplit

from flask import (
    Blueprint,
    Flask,
    Response,
    jsonify,
    redirect,
    render_template,
    request,
    session,
    url_for,
)

from enrichment.review.params import ReviewError

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
LOOPBACK_NAMES = frozenset({"localhost", "localhost.", "127.0.0.1", "::1"})
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)
# What a visitor may reach before logging in.
OPEN_ENDPOINTS = frozenset({"guard.login", "guard.login_post", "static"})
# A working day: a login left open on a shared machine does not outlive it.
LOGIN_LIFETIME = 12 * 3600.0


def is_loopback(host: str) -> bool:
    """True for loopback names and addresses (127.0.0.0/8, ::1, localhost)."""
    name = host.strip("[]").lower()
    if name in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def api_error(status: int, message: str, **extra: object) -> Response:
    """A JSON error answer: {"error": message, ...}."""
    response = jsonify(error=message, **extra)
    response.status_code = status
    return response


class Logins:
    """The logins this process has given, by the random id a session cookie carries.

    The cookie is signed, so nobody can make one, but a signed cookie alone stays good for
    as long as the process runs: after "Log out" a copy of it (another tab, a cookie taken
    from a shared machine) still acted as a curator. A login ends here instead. The app's
    signing key is made anew at each start, so keeping logins in memory loses nothing a
    restart did not already end.
    """

    def __init__(self, lifetime: float = LOGIN_LIFETIME) -> None:
        self.lifetime = lifetime
        self._started: dict[str, float] = {}
        self._lock = threading.Lock()

    def begin(self) -> str:
        login = secrets.token_urlsafe(24)
        with self._lock:
            now = time.monotonic()
            self._started = {
                known: at for known, at in self._started.items() if now - at < self.lifetime
            }
            self._started[login] = now
        return login

    def live(self, login: object) -> bool:
        with self._lock:
            started = self._started.get(login) if isinstance(login, str) else None
            return started is not None and time.monotonic() - started < self.lifetime

    def end(self, login: object) -> None:
        if isinstance(login, str):
            with self._lock:
                self._started.pop(login, None)


class Guard:
    """The checks for an app bound to `bound_to`, with the login token (None: no login)."""

    def __init__(self, bound_to: str, token: str | None) -> None:
        self.loopback = is_loopback(bound_to)
        self.token = token or None
        self.logins = Logins()
        if not self.loopback and not self.token:
            raise ReviewError(
                f"binding to {bound_to} (not loopback) needs a login: set ENRICH_REVIEW_TOKEN"
            )

    def install(self, app: Flask) -> None:
        """Check every request before it is served, and set the headers on every answer."""
        app.before_request(self.check)
        app.jinja_env.globals["login_required"] = self.token is not None
        app.after_request(headers)
        app.register_blueprint(self.login_pages())

    def bearer_ok(self) -> bool:
        header = request.headers.get("Authorization", "")
        scheme, _, given = header.partition(" ")
        return (
            self.token is not None
            and scheme.lower() == "bearer"
            and hmac.compare_digest(given.strip().encode(), self.token.encode())
        )

    def check(self) -> Any:
        """None to serve the request; otherwise the answer that refuses it."""
        host = urlsplit("//" + request.host).hostname or ""
        if self.loopback and not is_loopback(host):
            return api_error(403, "this app answers to loopback host names only")
        api = request.path.startswith("/api/")
        if request.method not in SAFE_METHODS:
            refused = self.forged(api)
            if refused is not None:
                return refused
        if self.token is None or request.endpoint in OPEN_ENDPOINTS or self.bearer_ok():
            return None
        if self.logins.live(session.get("login")):
            return None
        if api:
            return api_error(401, "log in, or send Authorization: Bearer TOKEN")
        return redirect(url_for("guard.login", next=request.full_path))

    def forged(self, api: bool) -> Response | None:
        """The refusal of a state-changing request another site may have sent, or None."""
        origin = request.headers.get("Origin")
        own = f"{request.scheme}://{request.host}"
        fetch_site = request.headers.get("Sec-Fetch-Site")
        if fetch_site not in (None, "same-origin", "none"):
            return api_error(403, f"cross-site request refused (Sec-Fetch-Site {fetch_site})")
        vouched = origin == "null" and fetch_site == "same-origin"
        if origin is not None and origin != own and not vouched:
            return api_error(403, f"cross-origin request refused (Origin {origin})")
        if origin is None and self.token is not None and not self.bearer_ok():
            return api_error(401, "a request without Origin needs Authorization: Bearer")
        if api and not request.is_json:
            return api_error(415, "send JSON (Content-Type: application/json)")
        return None

    def login_pages(self) -> Blueprint:
        """Log in with the token (a session cookie), log out."""
        pages = Blueprint("guard", __name__)
        token = self.token
        logins = self.logins
        loopback = self.loopback

        @pages.get("/login")
        def login() -> Any:
            target = local_target(request.args.get("next"))
            return render_template("login.html", next=target, failed=False, loopback=loopback)

        @pages.post("/login")
        def login_post() -> Any:
            given = request.form.get("token", "")
            target = local_target(request.form.get("next"))
            if token and hmac.compare_digest(given.encode(), token.encode()):
                session["login"] = logins.begin()
                return redirect(target)
            return (
                render_template("login.html", next=target, failed=True, loopback=loopback),
                401,
            )

        @pages.post("/logout")
        def logout() -> Any:
            logins.end(session.get("login"))
            session.clear()
            return redirect(url_for("guard.login"))

        return pages


def headers(response: Response) -> Response:
    response.headers["Content-Security-Policy"] = CSP
    response.headers["X-Content-Type-Options"] = "nosniff"
    # same-origin, not no-referrer: under no-referrer Chromium sends `Origin: null` on the
    # app's own form posts; same-origin still tells other sites nothing.
    response.headers["Referrer-Policy"] = "same-origin"
    response.headers["X-Frame-Options"] = "DENY"
    if response.mimetype in ("text/html", "application/json"):
        response.headers["Cache-Control"] = "no-store"
    return response


def local_target(target: str | None) -> str:
    """A redirect target on this app only: a plain path, judged as a browser would read it.

    Browsers drop tabs and newlines from a URL and read a backslash as a slash, so
    `/\t/evil.com` becomes `//evil.com`, another host: anything with a control
    character, a backslash, or a scheme or host of its own is refused.
    """
    if (
        not target
        or len(target) > 2000
        or any(ord(character) < 0x20 or ord(character) == 0x7F for character in target)
        or "\\" in target
        or not target.startswith("/")
        or target.startswith("//")
    ):
        return "/queue"
    parts = urlsplit(target)
    if parts.scheme or parts.netloc:
        return "/queue"
    return target
