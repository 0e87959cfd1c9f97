"""The guard's web side: pages that carry the collector script, which reports
the browser's fingerprint with each action the page asks the guard about.

An aiohttp application in the server's own process and event loop serves the
collector script, three demo pages (register, log in, join a room) and JSON
endpoints that run the very same Guard calls as the gRPC API (Evaluate,
EndLogin, LeaveRoom), for the configured demo service only. Production
front-ends keep their own pages and call the gRPC API with an internal
credential; they can reuse collector.js as it is.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError

from tether.server import errors, logs
from tether.server.guard import policies
from tether.server.guard.service import EvaluateCall, Guard
from tether.server.guard.web import connections, payload
from tether.server.guard.web.addresses import client_ip, parse_networks
from tether.server.settings import Settings
from tether.server.transport import tls

log = logs.get(__name__)

STATIC = Path(__file__).parent / "static"
# The static files by name, read once: a handful, small, and no request's
# path ever reaches the file system.
_TYPES = {".js": "text/javascript", ".css": "text/css"}
_STATIC_FILES = {
    path.name: (path.read_bytes(), _TYPES.get(path.suffix, "text/plain"))
    for path in STATIC.iterdir()
    if path.is_file()
}
MAX_BODY = 64 * 1024


def demo_policy(service_id: str) -> policies.Policy:
    """Small limits, so a newcomer sees a refusal after a few clicks."""
    return policies.Policy(
        service_id,
        register_limit=3,
        register_window_seconds=86_400,
        login_limit=3,
        login_session_seconds=1800,
        collaborate_limit=2,
        room_membership_seconds=3600,
    )


@dataclass(frozen=True)
class Page:
    title: str
    button: str
    # The button that frees the slot again, and the endpoint it posts to.
    release: tuple[str, str] | None = None


PAGES = {
    "register": Page("Create an account", "Register"),
    "login": Page("Log in", "Log in", ("Log out", "/guard/logout")),
    "collaborate": Page("Join a room", "Join", ("Leave room", "/guard/leave")),
}
_STATUS = {
    errors.InvalidArgument: 400,
    errors.NotFound: 404,
    errors.Unavailable: 503,
}

# A JSON endpoint's work: the parsed body and the request in, the answer out.
JsonWork = Callable[[Any, web.Request], Awaitable[dict[str, Any]]]


class WebSide:
    def __init__(self, settings: Settings, guard: Guard) -> None:
        self._settings = settings
        self._guard = guard
        self._trusted = parse_networks(settings.guard_trusted_proxies)
        self._runner: web.AppRunner | None = None
        self._server: asyncio.Server | None = None
        # HTTPS with the gRPC port's certificate and key when TLS is on.
        self._tls = tls.TlsFiles.from_settings(settings)
        self.port = 0

    @property
    def url(self) -> str:
        host = self._settings.http_listen.rsplit(":", 1)[0]
        scheme = "http" if self._tls is None else "https"
        return f"{scheme}://{host}:{self.port}"

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY)
        app.router.add_get("/", self._index)
        app.router.add_get("/demo/{action}", self._page)
        app.router.add_post("/guard/evaluate", _json_endpoint(self._evaluate))
        app.router.add_post("/guard/logout", _json_endpoint(self._logout))
        app.router.add_post("/guard/leave", _json_endpoint(self._leave))
        app.router.add_get("/guard/static/{name}", self._static)
        return app

    async def start(self) -> None:
        if not self._settings.http_listen:
            return
        await self._ensure_demo_policy()
        host, _, port = self._settings.http_listen.rpartition(":")
        connections.quiet_client_mistakes()
        self._runner = web.AppRunner(self.app(), access_log=None)
        await self._runner.setup()
        handlers = self._runner.server
        assert handlers is not None
        bounds = connections.Bounds(
            handlers,
            self._trusted,
            limit=connections.connection_limit(self._settings.guard_web_max_connections),
            idle=self._settings.guard_web_idle_seconds,
        )
        try:
            self._server = await asyncio.get_running_loop().create_server(
                bounds,
                host,
                int(port),
                ssl=None if self._tls is None else tls.web_context(self._tls),
                reuse_address=True,
            )
        except OSError as exc:
            # Say which setting to change (e.g. 8080 taken), not a traceback.
            await self.stop()
            raise SystemExit(
                f"cannot listen on {self._settings.http_listen} for the guard's web side: "
                f"{exc.strerror}; set TETHER_HTTP_LISTEN"
            ) from exc
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("guard web side listening", url=self.url, demo=self.url + "/demo/register")
        if self._tls is None and not tls.is_loopback(self._settings.http_listen):
            log.warning(
                "the guard's web side serves plain HTTP beyond loopback: set "
                "TETHER_TLS_CERT_FILE and TETHER_TLS_KEY_FILE, or put a TLS proxy in front "
                "(listed in TETHER_GUARD_TRUSTED_PROXIES)"
            )

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        if self._runner is not None:
            await self._runner.cleanup()

    async def _ensure_demo_policy(self) -> None:
        service_id = self._settings.guard_demo_service
        async with self._guard.db.sessions() as session:
            existing = await policies.find(session, service_id)
        if existing is None:
            await self._guard.set_policy(demo_policy(service_id))

    async def _index(self, request: web.Request) -> web.Response:
        links = "".join(
            f'<li><a href="/demo/{action}">{page.title}</a></li>' for action, page in PAGES.items()
        )
        return web.Response(
            text=_shell("Tether guard demo", f"<ul>{links}</ul>"), content_type="text/html"
        )

    async def _static(self, request: web.Request) -> web.Response:
        found = _STATIC_FILES.get(request.match_info["name"])
        if found is None:
            raise web.HTTPNotFound()
        body, content_type = found
        return web.Response(
            body=body, content_type=content_type, headers={"Cache-Control": "max-age=300"}
        )

    async def _page(self, request: web.Request) -> web.Response:
        action = request.match_info["action"]
        if action not in PAGES:
            raise web.HTTPNotFound()
        page = PAGES[action]
        room = (
            '<label>Room <input id="room" name="room" value="room-1" required></label>'
            if action == "collaborate"
            else ""
        )
        release = (
            f'<button id="release" type="button" data-endpoint="{page.release[1]}">'
            f"{page.release[0]}</button>"
            if page.release
            else ""
        )
        body = f"""
<form id="guard-form" data-action="{action}">
  <label>Account <input id="account" name="account" required autocomplete="off"></label>
  {room}
  <button id="submit" type="submit">{page.button}</button>
  {release}
</form>
<p id="result" role="status" hidden></p>
<div id="refusal" role="alert" hidden>
  <strong>Service refused.</strong>
  <span id="refusal-text"></span>
</div>
<script src="/guard/static/fp.min.js"></script>
<script src="/guard/static/collector.js"></script>"""
        return web.Response(text=_shell(page.title, body), content_type="text/html")

    async def _evaluate(self, data: Any, request: web.Request) -> dict[str, Any]:
        call = payload.parse(data)
        # Every line, in order: a proxy may add a line of its own rather
        # than append to the client's, and the right-most hops are the proxies'.
        forwarded = ",".join(request.headers.getall("X-Forwarded-For", ()))
        verdict = await self._guard.evaluate(
            EvaluateCall(
                self._settings.guard_demo_service,
                call.action,
                call.account,
                call.room_id,
                call.components,
                client_ip(request.remote, forwarded, self._trusted),
            )
        )
        return payload.verdict_json(verdict)

    async def _logout(self, data: Any, request: web.Request) -> dict[str, Any]:
        slot = payload.parse_slot(data, room=False)
        ended = await self._guard.end_login(
            self._settings.guard_demo_service, slot.identity, slot.account
        )
        return {"ended": ended}

    async def _leave(self, data: Any, request: web.Request) -> dict[str, Any]:
        slot = payload.parse_slot(data, room=True)
        left = await self._guard.leave_room(
            self._settings.guard_demo_service, slot.room_id, slot.identity, slot.account
        )
        return {"left": left}


def _json_endpoint(work: JsonWork) -> Callable[[web.Request], Awaitable[web.Response]]:
    """A JSON POST handler: the body must be JSON; the guard's errors become
    problems (an HTTP status, the message, every field violation)."""

    async def handle(request: web.Request) -> web.Response:
        try:
            data: Any = await request.json()
        except (ValueError, LookupError):
            # Not JSON, not text in its charset, or a charset Python does not know.
            return _problem(400, "the body must be a JSON object, in UTF-8")
        except RecursionError:
            return _problem(400, "the body must be a JSON object, nested at most a few levels")
        except RequestPayloadError as exc:
            # A body its Content-Encoding does not decode (aiohttp says 400 too).
            return _problem(400, f"the body could not be read: {exc}")
        try:
            answer = await work(data, request)
        except errors.TetherError as exc:
            status = next((s for cls, s in _STATUS.items() if isinstance(exc, cls)), 500)
            return _problem(status, exc.message, {v.field: v.description for v in exc.violations})
        return web.json_response(answer)

    return handle


def _problem(status: int, message: str, violations: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": message, "violations": violations or {}}, status=status)


def _shell(title: str, body: str) -> str:
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title><link rel="stylesheet" href="/guard/static/demo.css"></head>
<body><main><h1>{title}</h1>{body}
<nav><a href="/demo/register">Register</a> · <a href="/demo/login">Log in</a> ·
<a href="/demo/collaborate">Join a room</a></nav></main></body></html>"""
