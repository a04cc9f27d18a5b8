"""The instance's HTTP face: ServiceNow's REST Table API, Aggregate API, Batch API, and
one web page (``docs/instance.md`` is the reference).

- ``GET /api/now/table/<table>``: list (``sysparm_query`` or ``field=value`` pairs,
  ``sysparm_limit``, ``sysparm_offset``, ``sysparm_fields``, ``sysparm_display_value``,
  ``sysparm_exclude_reference_link``, ``sysparm_no_count``,
  ``sysparm_suppress_pagination_header``); ``X-Total-Count`` and ``Link`` headers.
- ``POST /api/now/table/<table>``: insert (201, ``Location``).
- ``GET|PATCH|PUT|DELETE /api/now/table/<table>/<sys_id>``.
- The same under ``/api/now/v1/table`` and ``/api/now/v2/table`` (v1: an empty list is
  a 404, as ServiceNow documents).
- ``GET /api/now/stats/<table>`` (``bridge.instance.api_stats``), ``POST
  /api/now/v1/batch`` (``bridge.instance.api_batch``).
- ``GET /`` (and ``/nav``): a small HTML page for users who may use web pages.

Tables come from the store's schema (``Store.schema``), CI class tables included
(``/api/now/table/cmdb_ci_linux_server`` reads and writes that class). Answers are JSON,
or XML with ``Accept: application/xml``; bodies JSON or XML. Unknown ``sysparm_*``
parameters, unknown fields and system fields in a body are ignored, as ServiceNow does.
"""

from __future__ import annotations

import asyncio
import html
import inspect
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, NoReturn

from aiohttp import web

from bridge.instance import api_xml, auth
from bridge.instance.api_access import (
    context,
    hidden,
    lineage,
    may_read,
    read_query,
    sees,
    table_for,
    visible,
)
from bridge.instance.api_batch import BatchApi
from bridge.instance.api_format import Shaper, to_wire, wire_value
from bridge.instance.api_http import (
    API_SETTINGS,
    ApiError,
    ApiSettings,
    authenticate,
    client_address,
    error_middleware,
    error_response,
    json_object_body,
    origin_middleware,
    parse_json_body,
    public_base,
    read_body,
    request_scheme,
    respond,
)
from bridge.instance.api_params import Params, lookup_fields, restrict
from bridge.instance.api_stats import StatsApi
from bridge.instance.auth import Authenticator, AuthError, Principal
from bridge.instance.query import QueryError, escape
from bridge.instance.store import TABLES, Record, Store, Table, UnknownTable, same_answer

log = logging.getLogger("midbridge.instance.api")

API_PREFIX = "/api/now/table"
VERSIONED_PREFIX = "/api/now/{version:v[12]}/table"
# Fields holding JSON text: a JSON object or array given for one is stored as its text.
JSON_TEXT_FIELDS = frozenset(
    {("ecc_queue", "payload"), ("ecc_agent", "stats"), ("discovery_credentials", "secret")}
)


@dataclass(slots=True)
class Write:
    """What a before-write hook sees, and may change (``fields`` is what will be stored)."""

    table: str
    op: Literal["insert", "update"]
    fields: dict[str, Any]
    previous: Record | None  # the record before an update
    user: Principal


BeforeWrite = Callable[[Write], Awaitable[None] | None]
"""Runs after access checks, before the store; may change ``write.fields``; raise
``ApiError`` (or ``ValueError``, answered 400 with its text) to refuse the write. A hook of
a table runs for the tables that extend it too."""


@dataclass
class Hooks:
    before_write: dict[str, list[BeforeWrite]] = field(default_factory=dict)

    def add_before_write(self, table: str, hook: BeforeWrite) -> Callable[[], None]:
        if table not in TABLES:
            raise UnknownTable(table)
        hooks = self.before_write.setdefault(table, [])
        hooks.append(hook)

        def remove() -> None:
            if hook in hooks:
                hooks.remove(hook)

        return remove


# --- the Table API ------------------------------------------------------------------------


class TableApi:
    def __init__(self, store: Store, settings: ApiSettings, hooks: Hooks) -> None:
        self.store = store
        self.settings = settings
        self.hooks = hooks
        self.authenticator = Authenticator(store, auth.SignInThrottle(settings.throttle))
        self.hooks.add_before_write("sys_user", _hash_password_hook)
        self.hooks.add_before_write("sys_user", _mid_agents_hook)
        self.stats_api = StatsApi(store, self.authenticator)
        self.batch_api = BatchApi(self.authenticator)

    def add_routes(self, app: web.Application, *, root_page: bool = True) -> None:
        """The Table, Aggregate and Batch APIs and the Basic page at ``/nav`` (and ``/``
        unless ``root_page`` is False: the dashboard then serves ``/``, and hands API
        clients to ``home_page``)."""
        for prefix in (API_PREFIX, VERSIONED_PREFIX):
            app.router.add_get(prefix + "/{table}", self.list_records)
            app.router.add_post(prefix + "/{table}", self.create_record)
            one = prefix + "/{table}/{sys_id}"
            app.router.add_get(one, self.get_record)
            app.router.add_patch(one, self.update_record)
            app.router.add_put(one, self.update_record)
            app.router.add_delete(one, self.delete_record)
        self.stats_api.add_routes(app)
        self.batch_api.add_routes(app)
        if root_page:
            app.router.add_get("/", self.home_page)
        app.router.add_get("/nav", self.home_page)

    # --- request pieces -------------------------------------------------------------------

    async def _who(self, request: web.Request) -> Principal:
        return await authenticate(request, self.authenticator)

    def _table(self, request: web.Request, who: Principal) -> Table:
        return table_for(self.store, request.match_info["table"], who)

    def _shaper(self, request: web.Request, who: Principal, table: Table, params: Params) -> Shaper:
        return Shaper(
            self.store,
            who,
            table,
            display=params.display_value(),
            links=not params.flag("sysparm_exclude_reference_link"),
            base=public_base(request),
            fields=params.names("sysparm_fields"),
        )

    @staticmethod
    def _prefix(request: web.Request) -> str:
        version = request.match_info.get("version")
        return f"/api/now/{version}/table" if version else API_PREFIX

    async def _body(self, request: web.Request, table: Table) -> dict[str, Any]:
        """The fields a write sets: JSON or XML; fields the table does not have and system
        fields are ignored, as ServiceNow ignores them."""
        content_type = request.content_type
        if content_type != "application/json" and content_type not in api_xml.XML_TYPES:
            raise ApiError(
                415,
                "Unsupported Media Type",
                f"send application/json or application/xml, not {content_type or 'nothing'}",
            )
        raw = await read_body(request, self.settings.max_body_bytes)
        body: Any
        if content_type == "application/json":
            body = parse_json_body(raw)
            if isinstance(body, list) and body and isinstance(body[0], dict):
                body = body[0]  # ServiceNow processes the first record of a list
            if not isinstance(body, dict):
                raise ApiError(400, "The request body must be a JSON object", "")
        else:
            try:
                body = api_xml.parse_body(raw)
            except api_xml.XmlBodyError as exc:
                raise ApiError(400, "Invalid XML in the request body", str(exc)) from None
        fields: dict[str, Any] = {}
        for name, value in body.items():
            spec = table.fields.get(name)
            if spec is None or spec.read_only:
                continue
            if isinstance(value, dict | list) and (table.physical, name) not in JSON_TEXT_FIELDS:
                raise ApiError(400, f"Field {name!r}: expected a string, number or boolean", "")
            fields[name] = value
        return fields

    async def _resolve_references(
        self, who: Principal, table: Table, body: dict[str, Any], by_display: bool
    ) -> None:
        """Reference fields: a sys_id, or (``sysparm_input_display_value=true``) the
        referenced record's display value. A reference whose record is deleted with it
        (``cascade_delete``) must name an existing record."""
        schema = self.store.schema
        for name, value in list(body.items()):
            spec = table.fields[name]
            target = schema.get(spec.reference or "")
            if target is None or value in (None, ""):
                continue
            text = str(value)
            if by_display and may_read(who, target):
                found = await self._by_display(who, target, text)
                if found is not None:
                    body[name] = found
                    continue
            if not spec.cascade_delete or await self.store.get(target.name, text) is not None:
                continue
            if by_display:
                detail = f"no {target.name} record with {target.display_field} or sys_id {text!r}"
            else:
                detail = (
                    f"no {target.name} record with sys_id {text!r} (to give a "
                    f"{target.display_field}, add sysparm_input_display_value=true)"
                )
            raise ApiError(400, f"Invalid reference in field {name!r}", detail)

    async def _by_display(self, who: Principal, target: Table, text: str) -> str | None:
        """The sys_id of the ``target`` record ``who`` may see whose display value (or an
        extra lookup field's, ``lookup_fields``) is ``text``; None if there is none."""
        for lookup in lookup_fields(target):
            rows = await self.store.query(target.name, f"{lookup}={escape(text)}", limit=1)
            if rows and sees(who, target, rows[0]):
                return str(rows[0]["sys_id"])
        return None

    async def _run_hooks(self, write: Write, table: Table) -> None:
        for name in lineage(self.store.schema, table):
            for hook in list(self.hooks.before_write.get(name, [])):
                try:
                    result = hook(write)
                    if inspect.isawaitable(result):
                        await result
                except ValueError as exc:
                    raise ApiError(400, str(exc), f"table {write.table}") from None

    @staticmethod
    def _answer(
        request: web.Request,
        result: dict[str, Any],
        status: int,
        headers: Mapping[str, str] | None = None,
    ) -> web.Response:
        """A write's answer; none with ``X-no-response-body: true`` (ServiceNow's header)."""
        if request.headers.get("X-no-response-body", "").strip().lower() == "true":
            return web.Response(status=status, headers=headers)
        return respond(request, {"result": result}, status, headers)

    # --- handlers ---------------------------------------------------------------------------

    async def list_records(self, request: web.Request) -> web.Response:
        who = await self._who(request)
        table = self._table(request, who)
        auth.authorize(who, table.physical, "read")
        params = Params.of(request)
        query = read_query(self.store, who, table, params)
        shaper = self._shaper(request, who, table, params)
        settings = self.settings
        limit = params.integer(
            "sysparm_limit", settings.default_limit, settings.max_limit, clamp=True
        )
        offset = params.integer("sysparm_offset", 0, 2**62)
        suppress_links = params.flag("sysparm_suppress_pagination_header")
        options: dict[str, Any] = {
            "hidden": hidden(table),
            "invalid": "ignore",
            "context": context(who),
        }
        records = await self.store.query(table.name, query, limit=limit, offset=offset, **options)
        if not records and request.match_info.get("version") == "v1":
            raise ApiError(
                404,
                "No Record found",
                "Records matching query not found. Check query parameter or offset parameter",
            )
        headers: dict[str, str] = {}
        total: int | None = None
        if not params.flag("sysparm_no_count"):
            total = await self.store.count(table.name, query, **options)
            headers["X-Total-Count"] = str(total)
        links = _links(request, limit, offset, total, len(records))
        if links and not suppress_links:
            headers["Link"] = links
        result = await shaper.records(records)
        return respond(request, {"result": result}, headers=headers)

    async def get_record(self, request: web.Request) -> web.Response:
        who = await self._who(request)
        table = self._table(request, who)
        auth.authorize(who, table.physical, "read")
        shaper = self._shaper(request, who, table, Params.of(request))
        record = visible(who, table, await self.store.get(table.name, request.match_info["sys_id"]))
        if record is None:
            raise _not_found()
        return respond(request, {"result": await shaper.record(record)})

    async def _write_request(
        self, request: web.Request
    ) -> tuple[Principal, Table, Params, Shaper, dict[str, Any]]:
        """A create's or update's writer, table, parameters, answer's shape, and body."""
        who = await self._who(request)
        table = self._table(request, who)
        params = Params.of(request)
        shaper = self._shaper(request, who, table, params)
        body = await self._body(request, table)
        return who, table, params, shaper, body

    async def create_record(self, request: web.Request) -> web.Response:
        who, table, params, shaper, body = await self._write_request(request)
        auth.authorize(who, table.physical, "create", fields=body)
        _check_agent_name(table, body)
        is_input = table.physical == "ecc_queue" and str(body.get("queue") or "input") == "input"
        if is_input and not who.is_admin:
            stored = await self._check_mid_input(who, body)
            if stored is not None:  # a repeat of an answer already stored: as idempotent
                return self._answer(request, await shaper.record(stored), 200)
        await self._resolve_references(who, table, body, params.flag("sysparm_input_display_value"))
        write = Write(table.name, "insert", body, None, who)
        await self._run_hooks(write, table)
        status = 201
        if (
            is_input
            and table.name == "ecc_queue"
            and str(write.fields.get("queue") or "input") == "input"
        ):
            record, inserted = await self.store.insert_input_once(write.fields, actor=who.user_name)
            status = 201 if inserted else 200
        else:
            record = await self.store.insert(table.name, write.fields, actor=who.user_name)
        location = f"{public_base(request)}{self._prefix(request)}/{table.name}/{record['sys_id']}"
        return self._answer(
            request, await shaper.record(record), status, headers={"Location": location}
        )

    async def update_record(self, request: web.Request) -> web.Response:
        who, table, params, shaper, body = await self._write_request(request)
        body.pop("sys_id", None)  # a record keeps its sys_id
        sys_id = request.match_info["sys_id"]
        previous = await self.store.get(table.name, sys_id)
        if visible(who, table, previous) is None:
            auth.authorize(who, table.physical, "read")
            raise _not_found()
        assert previous is not None
        auth.authorize(who, table.physical, "write", fields=body, record=previous)
        _check_agent_name(table, body)
        await self._resolve_references(who, table, body, params.flag("sysparm_input_display_value"))
        write = Write(table.name, "update", body, previous, who)
        await self._run_hooks(write, table)
        record = await self.store.update(table.name, sys_id, write.fields, actor=who.user_name)
        if record is None:  # deleted meanwhile
            raise _not_found()
        return self._answer(request, await shaper.record(record), 200)

    async def _check_mid_input(self, who: Principal, body: dict[str, Any]) -> Record | None:
        """A mid_server account's input record must answer an output sent to its own agent
        that still awaits an answer (ready or processing). Sets ``agent`` to that output's
        agent when missing. Returns the stored record when this is a repeat of an input
        already stored for a closed output (at-least-once delivery); ApiError otherwise."""
        response_to = body.get("response_to")
        if not isinstance(response_to, str) or not response_to:
            self._refuse_input(who, body, 400, "Field 'response_to' is required",
                               "an input record of role mid_server answers an output record "
                               "of its agent: give that output's sys_id")  # fmt: skip
        output = await self.store.get("ecc_queue", str(response_to))
        agent = auth.agent_of(output.get("agent")) if output is not None else None
        if output is None or output.get("queue") != "output" or not who.acts_for(agent):
            self._refuse_input(who, body, 403, "User Not Authorized",
                               f"response_to {str(response_to)[:64]!r} is not an output sent "
                               f"to an agent of user {who.user_name}")  # fmt: skip
        assert output is not None
        if body.setdefault("agent", output["agent"]) != output["agent"]:
            self._refuse_input(who, body, 403, "User Not Authorized",
                               f"an answer to {output['sys_id']!r} must have agent "
                               f"{output['agent']!r}")  # fmt: skip
        if output.get("state") in ("ready", "processing"):
            return None
        stored = await self._stored_input(body)
        if stored is None:
            self._refuse_input(who, body, 403, "User Not Authorized",
                               f"output {output['sys_id']!r} is {output.get('state')}: it awaits "
                               "no answer any more")  # fmt: skip
        return stored

    async def _stored_input(self, body: Mapping[str, Any]) -> Record | None:
        sys_id = body.get("sys_id")
        if isinstance(sys_id, str) and sys_id:
            found = await self.store.get("ecc_queue", sys_id)
            if found is not None and same_answer(found, body):
                return found
        sequence = body.get("sequence")
        if sequence is None or sequence == "":
            return None
        try:
            rows = await self.store.query(
                "ecc_queue",
                f"queue=input^response_to={escape(str(body['response_to']))}"
                f"^run={escape(str(body.get('run') or ''))}^sequence={int(sequence)}",
                limit=1,
            )
        except (QueryError, ValueError, TypeError):
            return None
        return rows[0] if rows else None

    @staticmethod
    def _refuse_input(
        who: Principal, body: Mapping[str, Any], status: int, message: str, detail: str
    ) -> NoReturn:
        log.warning(
            "refused an ecc_queue input from %s (agent %r, response_to %r): %s",
            who.user_name, str(body.get("agent"))[:120], str(body.get("response_to"))[:64], detail,
        )  # fmt: skip
        raise ApiError(status, message, detail)

    async def delete_record(self, request: web.Request) -> web.Response:
        who = await self._who(request)
        table = self._table(request, who)
        auth.authorize(who, table.physical, "delete")
        sys_id = request.match_info["sys_id"]
        if visible(who, table, await self.store.get(table.name, sys_id)) is None:
            raise _not_found()
        if not await self.store.delete(table.name, sys_id):
            raise _not_found()
        return web.Response(status=204)

    async def home_page(self, request: web.Request) -> web.Response:
        try:
            who = await self._who(request)
        except AuthError as exc:
            return _page(401, "Sign in", f"<p>{html.escape(exc.detail)}.</p>", auth_prompt=True)
        if who.web_service_access_only:
            return _page(
                403,
                "Web access refused",
                f"<p>User {html.escape(who.user_name)} may use web services only.</p>",
            )
        roles = ", ".join(sorted(who.roles)) or "none"
        readable = [
            name for name, table in sorted(self.store.schema.items()) if may_read(who, table)
        ]
        items = "".join(
            f'<li><a href="{API_PREFIX}/{html.escape(name)}?sysparm_limit=20">'
            f"{html.escape(name)}</a></li>"
            for name in readable
        )
        body = (
            f"<p>Signed in as <b>{html.escape(who.user_name)}</b>"
            f" (roles: {html.escape(roles)}).</p>"
            f"<p>Tables (Table API, JSON):</p><ul>{items}</ul>"
        )
        return _page(200, "midbridge instance", body)


def _check_agent_name(table: Table, body: Mapping[str, Any]) -> None:
    """An agent's name (``ecc_agent.name``) in the safe alphabet, whoever writes it."""
    if table.physical != "ecc_agent" or "name" not in body:
        return
    try:
        auth.check_agent_name(body["name"], "ecc_agent.name")
    except ValueError as exc:
        raise ApiError(400, f"Invalid value for field 'name': {exc}", "table ecc_agent") from None


def _not_found() -> ApiError:
    return ApiError(
        404, "No Record found", "Record doesn't exist or ACL restricts the record retrieval"
    )


def _links(request: web.Request, limit: int, offset: int, total: int | None, returned: int) -> str:
    """ServiceNow's Link header: first, prev, next and last pages, absolute URLs. Without
    a count (``sysparm_no_count``): no last page, and a next one when this page is full."""
    if total is None:
        total = offset + returned + (1 if returned >= limit else 0)
        last_known = False
    else:
        last_known = True
    if limit <= 0 or (offset == 0 and total <= limit):
        return ""
    base = public_base(request)

    def at(start: int, rel: str) -> str:
        url = request.rel_url.update_query(sysparm_limit=str(limit), sysparm_offset=str(start))
        return f'<{base}{url}>;rel="{rel}"'

    last = max(0, (total - 1) // limit * limit)
    parts = [at(0, "first")]
    if offset > 0:
        parts.append(at(max(0, offset - limit), "prev"))
    if offset + limit < total:
        parts.append(at(offset + limit, "next"))
    if last_known:
        parts.append(at(last, "last"))
    return ",".join(parts)


def _page(status: int, title: str, body: str, *, auth_prompt: bool = False) -> web.Response:
    text = (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title></head>"
        f"<body><h1>{html.escape(title)}</h1>{body}</body></html>"
    )
    headers = {"WWW-Authenticate": 'Basic realm="midbridge"'} if auth_prompt else {}
    headers["X-Content-Type-Options"] = "nosniff"
    headers["Content-Security-Policy"] = "default-src 'none'"
    return web.Response(
        text=text, status=status, content_type="text/html", charset="utf-8", headers=headers
    )


async def _hash_password_hook(write: Write) -> None:
    """``user_password`` arrives in clear over the API and is stored hashed."""
    if "user_password" not in write.fields:
        return
    password = write.fields["user_password"]
    if password in (None, ""):
        write.fields["user_password"] = ""  # no password: the user cannot sign in
        return
    if not isinstance(password, str):
        raise ApiError(400, "Field 'user_password' must be a string", "")
    try:
        auth.check_password(password)
    except auth.PasswordError as exc:
        raise ApiError(400, "Invalid user_password", str(exc)) from None
    write.fields["user_password"] = await asyncio.to_thread(auth.hash_password, password)


def _mid_agents_hook(write: Write) -> None:
    """``mid_agents``: MID names in the safe alphabet, stored sorted and comma-joined."""
    if "mid_agents" not in write.fields:
        return
    value = write.fields["mid_agents"]
    if value is None:
        value = ""
    if not isinstance(value, str):
        raise ApiError(400, "Field 'mid_agents' must be a comma list of MID names", "")
    try:
        write.fields["mid_agents"] = auth.mid_agents_text(value)
    except ValueError as exc:
        raise ApiError(400, "Invalid value for field 'mid_agents'", str(exc)) from None


TABLE_API = web.AppKey("midbridge_table_api", TableApi)


def make_app(
    store: Store,
    settings: ApiSettings | None = None,
    hooks: Hooks | None = None,
    *,
    root_page: bool = True,
) -> web.Application:
    """The aiohttp application serving ``store`` (its ``TableApi`` is ``app[TABLE_API]``)."""
    settings = settings or ApiSettings()
    app = web.Application(
        middlewares=[error_middleware, origin_middleware], client_max_size=settings.max_body_bytes
    )
    table_api = TableApi(store, settings, hooks or Hooks())
    table_api.add_routes(app, root_page=root_page)
    app[TABLE_API] = table_api
    app[API_SETTINGS] = settings
    return app


def authenticator_of(app: web.Application, store: Store) -> Authenticator:
    """The app's one Authenticator (so every endpoint shares one sign-in throttle); a new
    one for an app without the Table API."""
    table_api = app.get(TABLE_API)
    return table_api.authenticator if table_api is not None else Authenticator(store)


__all__ = [
    "TABLE_API",
    "ApiError",
    "ApiSettings",
    "BeforeWrite",
    "Hooks",
    "TableApi",
    "Write",
    "authenticate",
    "authenticator_of",
    "client_address",
    "error_response",
    "json_object_body",
    "make_app",
    "parse_json_body",
    "public_base",
    "request_scheme",
    "restrict",
    "to_wire",
    "wire_value",
]
