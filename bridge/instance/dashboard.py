"""The instance's web dashboard: MID agents, the ECC queue, discovery runs, the CMDB.

Server-rendered HTML (Jinja2 templates in ``bridge/instance/templates/``, autoescaped),
one small vanilla script for live progress, no build step. ``docs/dashboard.md`` is the
reference.

- **Sign-in** through a form (``POST /login``), passwords checked as the Table API checks
  them (``bridge.instance.auth``: scrypt, the same cost for an unknown user). A
  successful sign-in creates a random server-side session id (``secrets``, 256 bits) in a
  cookie that is ``HttpOnly`` and ``SameSite=Strict`` (and ``Secure`` over HTTPS); the
  session is checked against ``sys_user`` on every request, so deactivating a user,
  marking it web-service-only or changing its password ends its sessions at once.
- **CSRF.** Every form that changes something carries the session's token
  (``csrf_token``), compared in constant time; the sign-in form carries a token bound to
  a short-lived pre-login cookie. No state-changing GET exists.
- **Who sees what.** A ``web_service_access_only`` user is refused (403). A page shows a
  table only to a user the Table API lets read it (``auth.authorize``): admin sees all;
  ``discovery_admin`` the agents, the ECC queue, discovery and the CMDB; ``mid_server``
  the agents and the ECC queue. Agent actions are admin only (as their API); starting
  discovery takes ``discovery_admin`` (as its API).
- **Pages.** ``/`` overview, ``/agents`` (+ actions), ``/ecc`` (filters as query
  parameters) and ``/ecc/<sys_id>``, ``/discovery`` (+ Run, live progress polled from
  ``/discovery/runs.json``), ``/cmdb`` (CIs by class).

``/`` is shared with the Basic-auth page of ``bridge.instance.api``: a request that
carries ``Authorization``, or that does not accept HTML, gets that page (scripts and API
clients keep their 401/403 answers); a browser gets the dashboard.
"""

from __future__ import annotations

import hashlib
import hmac
import importlib.resources
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any
from urllib.parse import urlencode

import jinja2
import orjson
from aiohttp import web

from bridge.instance import agents as agents_module
from bridge.instance import auth
from bridge.instance.api import (
    authenticator_of,
    client_address,
    request_scheme,
    wire_value,
)
from bridge.instance.app_keys import START_RUN, StartRun
from bridge.instance.auth import Principal
from bridge.instance.dashboard_format import (
    age_text,
    agent_actions,
    as_int,
    json_object,
    lanes_text,
    path_segment,
    plural,
    pretty_payload,
    progress_of,
    safe_next,
    short_agent,
    status_kind,
    truthy,
    utc_text,
)
from bridge.instance.dashboard_sessions import DashboardSettings, Session, Sessions, View, may_read
from bridge.instance.query import escape
from bridge.instance.store import TABLES, Record, Store

log = logging.getLogger("midbridge.instance.dashboard")

SESSION_COOKIE = "midbridge_session"
LOGIN_COOKIE = "midbridge_login"
CSRF_FIELD = "csrf_token"
AGENT_ACTIONS = agents_module.ADMIN_ACTIONS  # validate invalidate pause resume drain
ECC_QUEUES = ("output", "input")
ECC_STATES = ("ready", "processing", "processed", "error")
RUN_FINAL_STATES = frozenset({"Completed", "Error", "Cancelled"})
RUN_FIELDS = (
    "sys_id",
    "name",
    "state",
    "progress",
    "addresses",
    "scanned",
    "alive",
    "batches",
    "batches_done",
    "classify_total",
    "classified",
    "cis_created",
    "cis_updated",
    "errors",
    "started",
    "completed",
)
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
        "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}
_PAYLOAD_SHOWN = 256 * 1024  # characters of a payload shown on a record's page
_MAX_CLASSES = 64
_ERRORS: dict[int, type[web.HTTPError]] = {
    400: web.HTTPBadRequest,
    403: web.HTTPForbidden,
    404: web.HTTPNotFound,
    503: web.HTTPServiceUnavailable,
}

AdminAction = Callable[[Store, str, str], Awaitable[Record]]
"""``await admin_action(store, agent_name, action)`` → the SystemCommand output record;
raises ``bridge.instance.agents.AgentActionError`` (``status``, ``message``) to refuse."""


# --- the dashboard -----------------------------------------------------------------------------


class Dashboard:
    """The web UI over ``store``; ``add_routes`` mounts it on the instance's app.

    ``basic_page`` answers ``/`` for API clients (``bridge.instance.api.TableApi.home_page``);
    ``admin_action`` defaults to ``bridge.instance.agents.admin_action``; ``start_run``
    (set it later with :meth:`set_start_run`) starts a discovery run for a schedule.
    """

    def __init__(
        self,
        store: Store,
        *,
        settings: DashboardSettings | None = None,
        basic_page: Callable[[web.Request], Awaitable[web.StreamResponse]] | None = None,
        admin_action: AdminAction | None = None,
        start_run: StartRun | None = None,
        logger: logging.Logger | None = None,
    ) -> None:
        self.settings = settings or DashboardSettings()
        self.store = store
        self.sessions = Sessions(self.settings)
        self.basic_page = basic_page
        self.admin_action: AdminAction = admin_action or agents_module.admin_action
        self.start_run = start_run
        self._log = logger or log
        self._key = secrets.token_bytes(32)  # process-random: tags, login-form tokens
        # Replaced by the app's own in add_routes: one sign-in throttle for API and forms.
        self._authenticator = auth.Authenticator(store)
        self._env = jinja2.Environment(
            loader=jinja2.PackageLoader("bridge.instance", "templates"),
            autoescape=True,  # every {{ value }} is HTML-escaped
            undefined=jinja2.StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self._env.globals["status_kind"] = status_kind
        self._env.filters["path_segment"] = path_segment
        self._env.filters["utc"] = utc_text
        self._env.globals["plural"] = plural
        static = importlib.resources.files("bridge.instance").joinpath("templates", "static")
        self._static = {
            "dashboard.css": (static.joinpath("dashboard.css").read_bytes(), "text/css"),
            "dashboard.js": (static.joinpath("dashboard.js").read_bytes(), "text/javascript"),
        }

    def set_start_run(self, start_run: StartRun | None) -> None:
        """Give the discovery page its Run button (None takes it away)."""
        self.start_run = start_run

    def add_routes(self, app: web.Application) -> None:
        """Mount the pages; at start-up, take the discovery engine's ``start_run`` if the
        instance serves discovery (``bridge.instance.discovery.install``)."""
        app.on_startup.append(self._find_discovery)
        self._authenticator = authenticator_of(app, self.store)
        pages = {
            "/": self.overview, "/login": self.login_form, "/agents": self.agents_page,
            "/ecc": self.ecc_page, "/ecc/{sys_id}": self.ecc_record,
            "/discovery": self.discovery_page, "/discovery/runs.json": self.runs_json,
            "/cmdb": self.cmdb_page, "/static/{name}": self.static,
        }  # fmt: skip
        forms = {
            "/login": self.login, "/logout": self.logout,
            "/agents/{name}/{action}": self.agent_action,
            "/discovery/{sys_id}/run": self.run_discovery,
        }  # fmt: skip
        for path, page in pages.items():
            app.router.add_get(path, page)
        for path, form in forms.items():
            app.router.add_post(path, form)

    async def _find_discovery(self, app: web.Application) -> None:
        if self.start_run is None:
            self.start_run = app.get(START_RUN)

    # --- sessions and users ----------------------------------------------------------------

    def _tag(self, *parts: str) -> bytes:
        return hmac.new(self._key, "\0".join(parts).encode(), hashlib.sha256).digest()

    def _password_tag(self, user: Mapping[str, Any]) -> bytes:
        return self._tag("password", str(user["sys_id"]), str(user.get("user_password") or ""))

    def _login_token(self, nonce: str) -> str:
        return self._tag("login", nonce).hex()

    def _login_nonce_fresh(self, nonce: str) -> bool:
        """``<unix time>.<random>``, made less than ``login_form_ttl`` seconds ago."""
        made, _, rest = nonce.partition(".")
        if not made.isdigit() or not rest:
            return False
        return 0 <= time.time() - int(made) <= self.settings.login_form_ttl

    async def _check_password(self, user_name: str, password: str, address: str) -> Record | None:
        """The active user if ``password`` is right, as the Table API checks it (scrypt; an
        unknown user, an inactive one or one without a password costs the same work and
        gets the same answer); a failure counts in the shared sign-in throttle."""
        return await self._authenticator.check(user_name, password, address)

    async def _principal(self, user: Mapping[str, Any]) -> Principal:
        return await auth.principal_for(self.store, user)

    async def current(self, request: web.Request) -> View | None:
        """The signed-in user of ``request``, checked against ``sys_user`` now."""
        session = self.sessions.get(request.cookies.get(SESSION_COOKIE))
        if session is None:
            return None
        user = await self.store.get("sys_user", session.user_sys_id)
        if (
            user is None
            or not truthy(user.get("active"))
            or truthy(user.get("web_service_access_only"))
            or not hmac.compare_digest(self._password_tag(user), session.password_tag)
        ):
            self.sessions.drop(session.id)
            return None
        return View(session, await self._principal(user))

    async def _require(self, request: web.Request) -> View:
        view = await self.current(request)
        if view is None:
            target = request.path_qs if request.method == "GET" else "/"
            raise web.HTTPSeeOther("/login?" + urlencode({"next": target}))
        return view

    async def _form(self, request: web.Request, view: View) -> Mapping[str, str]:
        """The posted form, once its CSRF token is the session's (403 page otherwise)."""
        form = await request.post()
        token = form.get(CSRF_FIELD)
        if not isinstance(token, str) or not hmac.compare_digest(
            token.encode(), view.session.csrf.encode()
        ):
            raise self._error_page(
                view, 403, "Refused", "The form's security token is missing or stale."
            )
        return {k: v for k, v in form.items() if isinstance(v, str)}

    def _set_cookie(self, request: web.Request, response: web.StreamResponse, name: str,
                    value: str, max_age: int | None = None) -> None:  # fmt: skip
        secure = self.settings.secure_cookie
        response.set_cookie(
            name,
            value,
            path="/",
            httponly=True,
            samesite="Strict",
            secure=request_scheme(request) == "https" if secure is None else secure,
            max_age=max_age,
        )

    # --- rendering ---------------------------------------------------------------------

    def _nav(self, who: Principal) -> list[tuple[str, str]]:
        pages = [
            ("/", "Overview", None),
            ("/agents", "MID agents", "ecc_agent"),
            ("/ecc", "ECC queue", "ecc_queue"),
            ("/discovery", "Discovery", "discovery_status"),
            ("/cmdb", "CMDB", "cmdb_ci"),
        ]
        return [
            (path, label) for path, label, table in pages if table is None or may_read(who, table)
        ]

    def render(
        self,
        template: str,
        view: View | None,
        *,
        title: str,
        active: str = "",
        status: int = 200,
        **context: Any,
    ) -> web.Response:
        flash = None
        if view is not None and view.session.flash is not None:
            flash, view.session.flash = view.session.flash, None
        text = self._env.get_template(template).render(
            title=title,
            active=active,
            who=view.who if view is not None else None,
            nav=self._nav(view.who) if view is not None else [],
            csrf_token=view.session.csrf if view is not None else "",
            is_admin=view is not None and view.who.is_admin,
            flash=flash,
            **context,
        )
        return web.Response(
            text=text,
            status=status,
            content_type="text/html",
            charset="utf-8",
            headers=SECURITY_HEADERS,
        )

    def _error_page(
        self, view: View | None, status: int, title: str, message: str
    ) -> web.HTTPException:
        """An HTML error page as an exception (aiohttp sends it as the response)."""
        page = self.render("error.html", view, title=title, message=message, status=status)
        kind = _ERRORS.get(status, web.HTTPBadRequest)
        return kind(text=page.text, content_type="text/html", headers=SECURITY_HEADERS)

    def _need(self, view: View, table: str) -> None:
        if not view.may_read(table):
            raise self._error_page(
                view, 403, "Not allowed", f"User {view.who.user_name} may not read {table}."
            )

    def _need_admin(self, view: View, what: str) -> None:
        if not view.who.is_admin:
            raise self._error_page(view, 403, "Not allowed", f"{what} requires role admin.")

    # --- sign-in ------------------------------------------------------------------------

    def _login_page(
        self, request: web.Request, *, status: int = 200, message: str = "", user_name: str = "",
        target: str = "/",
    ) -> web.Response:  # fmt: skip
        nonce = f"{int(time.time())}.{secrets.token_urlsafe(24)}"
        page = self.render(
            "login.html",
            None,
            title="Sign in",
            status=status,
            message=message,
            user_name=user_name,
            next=safe_next(target),
            login_token=self._login_token(nonce),
        )
        self._set_cookie(request, page, LOGIN_COOKIE, nonce, int(self.settings.login_form_ttl))
        return page

    async def login_form(self, request: web.Request) -> web.StreamResponse:
        target = safe_next(request.query.get("next"))
        if await self.current(request) is not None:
            raise web.HTTPSeeOther(target)
        return self._login_page(request, target=target)

    async def login(self, request: web.Request) -> web.StreamResponse:
        form = await request.post()
        user_name = form.get("user_name")
        password = form.get("password")
        token = form.get(CSRF_FIELD)
        target = form.get("next")
        target = safe_next(target if isinstance(target, str) else None)
        user_name = user_name.strip()[:255] if isinstance(user_name, str) else ""
        nonce = request.cookies.get(LOGIN_COOKIE, "")
        if (
            not self._login_nonce_fresh(nonce)
            or not isinstance(token, str)
            or not hmac.compare_digest(token.encode(), self._login_token(nonce).encode())
        ):
            return self._login_page(
                request, status=403, user_name=user_name, target=target,
                message="The sign-in form expired; please sign in again.",
            )  # fmt: skip
        if not isinstance(password, str):
            password = ""
        address = client_address(request)
        wait = self._authenticator.throttle.retry_after(user_name, address)
        if wait > 0:
            self._authenticator.throttle.refused += 1
            seconds = auth.SignInThrottled(wait).retry_after
            page = self._login_page(
                request, status=429, user_name=user_name, target=target,
                message=f"Too many failed sign-ins; try again in {seconds} s.",
            )  # fmt: skip
            page.headers["Retry-After"] = str(seconds)
            return page
        user = await self._check_password(user_name, password, address)
        if user is None or not truthy(user.get("active")):
            self._log.info("dashboard: sign-in refused for %r", user_name[:64])
            return self._login_page(
                request, status=401, user_name=user_name, target=target,
                message="Invalid user name or password.",
            )  # fmt: skip
        if truthy(user.get("web_service_access_only")):
            return self._login_page(
                request, status=403, user_name=user_name, target=target,
                message=f"User {user['user_name']} may use web services only.",
            )  # fmt: skip
        session = self.sessions.create(user, self._password_tag(user))
        self._log.info("dashboard: %s signed in", session.user_name)
        response = web.HTTPSeeOther(target)
        self._set_cookie(request, response, SESSION_COOKIE, session.id)
        response.del_cookie(LOGIN_COOKIE, path="/")
        raise response

    async def logout(self, request: web.Request) -> web.StreamResponse:
        view = await self._require(request)
        await self._form(request, view)
        self.sessions.drop(view.session.id)
        response = web.HTTPSeeOther("/login")
        response.del_cookie(SESSION_COOKIE, path="/")
        raise response

    async def static(self, request: web.Request) -> web.StreamResponse:
        found = self._static.get(request.match_info["name"])
        if found is None:
            raise web.HTTPNotFound()
        body, content_type = found
        headers = {"X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"}
        return web.Response(body=body, content_type=content_type, headers=headers)

    # --- pages --------------------------------------------------------------------------

    async def overview(self, request: web.Request) -> web.StreamResponse:
        view = await self.current(request)
        if view is None:
            wants_html = "text/html" in request.headers.get("Accept", "")
            if self.basic_page is not None and (
                "Authorization" in request.headers or not wants_html
            ):
                return await self.basic_page(request)
            view = await self._require(request)
        store = self.store
        cards: dict[str, Any] = {}
        if view.may_read("ecc_agent"):
            cards["agents"] = {
                "total": await store.count("ecc_agent", view.scoped("ecc_agent", "")),
                "up": await store.count("ecc_agent", view.scoped("ecc_agent", "status=Up")),
                "validated": await store.count(
                    "ecc_agent", view.scoped("ecc_agent", "validated=true")
                ),
            }
        if view.may_read("ecc_queue"):
            cards["ecc"] = {
                state: await store.count(
                    "ecc_queue", view.scoped("ecc_queue", f"queue=output^state={state}")
                )
                for state in ECC_STATES
            }
            cards["ecc"]["inputs"] = await store.count(
                "ecc_queue", view.scoped("ecc_queue", "queue=input")
            )
        if view.may_read("discovery_status"):
            runs = await self._runs(5)
            cards["discovery"] = {
                "schedules": await store.count("discovery_schedule"),
                "runs": runs,
            }
        if view.may_read("cmdb_ci"):
            cards["cmdb"] = {"total": await store.count("cmdb_ci")}
        return self.render("overview.html", view, title="Overview", active="/", cards=cards)

    async def agents_page(self, request: web.Request) -> web.StreamResponse:
        view = await self._require(request)
        self._need(view, "ecc_agent")
        now = time.time()
        rows = []
        agents_query = view.scoped("ecc_agent", "ORDERBYname")
        for agent in await self.store.query("ecc_agent", agents_query, limit=1000):
            stats = json_object(agent.get("stats"))
            caps = [c for c in str(agent.get("capabilities") or "").split(",") if c]
            rows.append(
                {
                    "name": str(agent.get("name") or ""),
                    "status": str(agent.get("status") or "Down"),
                    "validated": truthy(agent.get("validated")),
                    "host": str(agent.get("host") or ""),
                    "version": str(agent.get("version") or ""),
                    "capabilities": caps,
                    "fingerprint": str(agent.get("fingerprint") or "")[:16],
                    "last_heartbeat": str(agent.get("last_heartbeat") or ""),
                    "heartbeat_age": age_text(agent.get("last_heartbeat"), now),
                    "started_at": str(agent.get("started_at") or ""),
                    "in_flight": stats.get("in_flight", ""),
                    "lanes": lanes_text(stats),
                    "processed": stats.get("processed", ""),
                    "failed": stats.get("failed", ""),
                    "actionable": agents_module.valid_agent_name(agent.get("name")),
                    "actions": agent_actions(
                        str(agent.get("status") or "Down"),
                        truthy(agent.get("validated")),
                        AGENT_ACTIONS,
                    ),
                }
            )
        return self.render(
            "agents.html", view, title="MID agents", active="/agents", agents=rows,
        )  # fmt: skip

    async def agent_action(self, request: web.Request) -> web.StreamResponse:
        view = await self._require(request)
        await self._form(request, view)
        self._need_admin(view, "An agent action")
        name = request.match_info["name"]
        action = request.match_info["action"]
        if action not in AGENT_ACTIONS:
            raise self._error_page(view, 400, "Bad request", "Unknown agent action.")
        try:
            row = await self.admin_action(self.store, name, action)
        except agents_module.AgentActionError as exc:
            view.session.flash = ("error", f"{action} {name}: {exc.message}")
        else:
            self._log.info("dashboard: %s sent %s to %s", view.who.user_name, action, name)
            view.session.flash = (
                "ok", f"{action} sent to {name} (SystemCommand {row['sys_id']}).",
            )  # fmt: skip
        raise web.HTTPSeeOther("/agents")

    async def ecc_page(self, request: web.Request) -> web.StreamResponse:
        view = await self._require(request)
        self._need(view, "ecc_queue")
        filters = {
            key: request.query.get(key, "").strip()[:200]
            for key in ("agent", "queue", "state", "topic")
        }
        if filters["queue"] not in ("", *ECC_QUEUES):
            filters["queue"] = ""
        if filters["state"] not in ("", *ECC_STATES):
            filters["state"] = ""
        limit = max(1, min(500, as_int(request.query.get("limit")) or self.settings.ecc_rows))
        terms = []
        for key, value in filters.items():
            if value:
                if key == "agent" and not value.startswith(auth.AGENT_PREFIX):
                    value = agents_module.agent_id(value)
                terms.append(f"{key}={escape(value)}")
        query = view.scoped("ecc_queue", "^".join(terms))
        total = await self.store.count("ecc_queue", query)
        # The latest: the last `limit` in insertion order, newest first.
        records = await self.store.query(
            "ecc_queue", query, limit=limit, offset=max(0, total - limit)
        )
        records.reverse()
        handled = await self._handled_inputs(records)
        agent_names: list[str] = []
        topics: set[str] = set()  # what the agents can run: the topic field's suggestions
        agents_query = view.scoped("ecc_agent", "ORDERBYname")
        for agent in await self.store.query("ecc_agent", agents_query, limit=1000):
            agent_names.append(str(agent.get("name") or ""))
            topics.update(c for c in str(agent.get("capabilities") or "").split(",") if c)
        rows = [
            {
                "sys_id": str(r["sys_id"]),
                "created": str(r.get("sys_created_on") or ""),
                "agent": short_agent(r.get("agent")),
                "queue": str(r.get("queue") or ""),
                "topic": str(r.get("topic") or ""),
                "name": str(r.get("name") or ""),
                "state": self._shown_state(r, handled),
                "priority": wire_value(r.get("priority")),
                "attempts": wire_value(r.get("attempts")),
                "sequence": wire_value(r.get("sequence")),
                "complete": truthy(r.get("complete")),
                "response_to": str(r.get("response_to") or ""),
                "error_string": str(r.get("error_string") or "")[:160],
            }
            for r in records
        ]
        return self.render(
            "ecc.html", view, title="ECC queue", active="/ecc", rows=rows, total=total,
            filters=filters, limit=limit, queues=ECC_QUEUES, states=ECC_STATES,
            agent_names=agent_names, topics=sorted(topics),
        )  # fmt: skip

    async def _handled_inputs(self, records: list[Record]) -> set[str]:
        """The outputs (sys_ids) among those ``records``' inputs answer that are closed."""
        waiting = sorted({
            str(r.get("response_to")) for r in records
            if r.get("queue") == "input" and r.get("state") == "ready" and r.get("response_to")
            and "," not in str(r.get("response_to"))
        })  # fmt: skip
        if not waiting:
            return set()
        rows = await self.store.query(
            "ecc_queue",
            "sys_idIN" + ",".join(waiting) + "^queue=output^stateINprocessed,error",
            limit=len(waiting),
        )
        return {str(row["sys_id"]) for row in rows}

    @staticmethod
    def _shown_state(record: Mapping[str, Any], handled: set[str]) -> str:
        """An input's state as ServiceNow shows it: ``processed`` once the output it
        answers is closed (the instance has handled it), ``ready`` while it waits."""
        state = str(record.get("state") or "")
        answered = str(record.get("response_to") or "") in handled
        if record.get("queue") == "input" and state == "ready" and answered:
            return "processed"
        return state

    async def ecc_record(self, request: web.Request) -> web.StreamResponse:
        view = await self._require(request)
        self._need(view, "ecc_queue")
        record = await self.store.get("ecc_queue", request.match_info["sys_id"])
        if record is None or not auth.in_agent_scope(view.who, "ecc_queue", record):
            raise self._error_page(view, 404, "No such record", "No ECC record has that sys_id.")
        table = TABLES["ecc_queue"]
        handled = await self._handled_inputs([record])
        fields = [
            (name, self._shown_state(record, handled) if name == "state"
             else utc_text(wire_value(record.get(name))))
            for name, spec in table.fields.items()
            if name != "payload" and not spec.write_only
        ]  # fmt: skip
        payload = str(record.get("payload") or "")
        shown = pretty_payload(
            payload[:_PAYLOAD_SHOWN] if len(payload) > _PAYLOAD_SHOWN else payload
        )
        answers: list[Record] = []
        if record.get("queue") == "output":
            answers = await self.store.query(
                "ecc_queue",
                view.scoped(
                    "ecc_queue",
                    f"queue=input^response_to={escape(str(record['sys_id']))}^ORDERBYsequence",
                ),
                limit=200,
            )
        return self.render(
            "ecc_record.html", view, title=f"ECC record {record['sys_id']}", active="/ecc",
            record=record, fields=fields, payload=shown, truncated=len(payload) > _PAYLOAD_SHOWN,
            payload_length=len(payload), answers=answers,
        )  # fmt: skip

    async def _runs(self, limit: int) -> list[dict[str, Any]]:
        total = await self.store.count("discovery_status")
        rows = await self.store.query("discovery_status", limit=limit, offset=max(0, total - limit))
        rows.reverse()
        return [self._run_view(r) for r in rows]

    @staticmethod
    def _run_view(row: Mapping[str, Any]) -> dict[str, Any]:
        run: dict[str, Any] = {name: wire_value(row.get(name)) for name in RUN_FIELDS}
        run["progress"] = f"{progress_of(row.get('progress')):.0f}"
        for name in ("started", "completed"):
            run[name] = utc_text(run.get(name))
        run["final"] = str(row.get("state") or "") in RUN_FINAL_STATES
        return run

    async def discovery_page(self, request: web.Request) -> web.StreamResponse:
        view = await self._require(request)
        self._need(view, "discovery_status")
        schedules = await self.store.query("discovery_schedule", "ORDERBYname", limit=500)
        runs = await self._runs(self.settings.runs_shown)
        return self.render(
            "discovery.html", view, title="Discovery", active="/discovery",
            schedules=schedules, runs=runs, can_run=self.start_run is not None,
            may_run=view.who.has_any("discovery_admin"),
        )  # fmt: skip

    async def runs_json(self, request: web.Request) -> web.StreamResponse:
        view = await self.current(request)
        if view is None or not view.may_read("discovery_status"):
            status = 401 if view is None else 403
            return web.json_response(
                {"error": "sign in" if view is None else "not allowed"},
                status=status,
                headers=SECURITY_HEADERS,
            )
        runs = await self._runs(self.settings.runs_shown)
        cis = await self.store.count("cmdb_ci") if view.may_read("cmdb_ci") else None
        return web.json_response(
            {"runs": runs, "cis": cis},
            headers=SECURITY_HEADERS,
            dumps=lambda data: orjson.dumps(data).decode(),
        )

    async def run_discovery(self, request: web.Request) -> web.StreamResponse:
        view = await self._require(request)
        await self._form(request, view)
        if not view.who.has_any("discovery_admin"):  # as POST /api/midbridge/discovery/...
            raise self._error_page(
                view, 403, "Not allowed", "Starting discovery requires role discovery_admin."
            )
        start = self.start_run
        if start is None:
            raise self._error_page(
                view, 503, "Discovery unavailable", "This instance runs no discovery engine."
            )
        schedule = await self.store.get("discovery_schedule", request.match_info["sys_id"])
        if schedule is None:
            raise self._error_page(view, 404, "No such schedule", "No schedule has that sys_id.")
        try:
            run_id = await start(str(schedule["sys_id"]))
        except (ValueError, LookupError) as exc:
            view.session.flash = ("error", f"{schedule['name']}: {exc}")
        else:
            self._log.info(
                "dashboard: %s started discovery %s", view.who.user_name, schedule["name"]
            )
            view.session.flash = (
                "ok",
                f"Discovery {schedule['name']} started (run {run_id}).",
            )
        raise web.HTTPSeeOther("/discovery")

    async def _classes(self) -> list[tuple[str, int]]:
        """(class, count) of every CI class present: one lookup per class, not a scan."""
        seen: list[str] = []
        while len(seen) < _MAX_CLASSES:
            query = "sys_class_nameNOT IN" + escape(",".join(seen)) if seen else ""
            row = await self.store.query("cmdb_ci", query + "^ORDERBYsys_class_name", limit=1)
            if not row:
                break
            name = str(row[0].get("sys_class_name") or "")
            if name in seen or "," in name:  # "" or a name the IN list cannot hold
                break
            seen.append(name)
        return [
            (name, await self.store.count("cmdb_ci", "sys_class_name=" + escape(name)))
            for name in seen
        ]

    async def cmdb_page(self, request: web.Request) -> web.StreamResponse:
        view = await self._require(request)
        self._need(view, "cmdb_ci")
        chosen = request.query.get("class", "").strip()[:100]
        classes = await self._classes()
        query = ("sys_class_name=" + escape(chosen) + "^") if chosen else ""
        query += "ORDERBYsys_class_name^ORDERBYname^ORDERBYip_address"
        total = await self.store.count("cmdb_ci", query)
        cis = await self.store.query("cmdb_ci", query, limit=self.settings.cmdb_rows)
        active_runs = await self.store.count(
            "discovery_status", "stateNOT IN" + ",".join(sorted(RUN_FINAL_STATES))
        ) if view.may_read("discovery_status") else 0  # fmt: skip
        groups: dict[str, list[Record]] = {}
        for ci in cis:
            groups.setdefault(str(ci.get("sys_class_name") or ""), []).append(ci)
        return self.render(
            "cmdb.html", view, title="CMDB", active="/cmdb", classes=classes, chosen=chosen,
            groups=groups, total=total, shown=len(cis), refresh=active_runs > 0,
        )  # fmt: skip


__all__ = [
    "AdminAction",
    "Dashboard",
    "DashboardSettings",
    "Session",
    "Sessions",
    "StartRun",
    "View",
    "age_text",
    "lanes_text",
    "may_read",
    "path_segment",
    "pretty_payload",
    "safe_next",
    "status_kind",
]
