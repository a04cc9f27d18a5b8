"""The instance's HTTP face: ServiceNow's REST Table API (a subset) and one web page.

Routes (``docs/instance.md`` is the reference):

- ``GET /api/now/table/<table>``: list (``sysparm_query``, ``sysparm_limit``,
  ``sysparm_offset``, ``sysparm_fields``, ``sysparm_no_count``, or ``field=value`` pairs);
  ``X-Total-Count`` and ``Link`` headers.
- ``POST /api/now/table/<table>``: insert (201).
- ``GET|PATCH|PUT|DELETE /api/now/table/<table>/<sys_id>``.
- ``GET /api/now/table/<CI class>[/<sys_id>]`` (``cmdb_ci_linux_server``, ...): the
  ``cmdb_ci`` records of that class and its subclasses (``bridge.instance.cmdb.CI_CLASSES``),
  read-only.
- ``GET /`` (and ``/nav``): a small HTML page for users who may use web pages.

Every value is returned as a string, as ServiceNow does; input takes strings or JSON
types. Errors are ServiceNow-shaped: ``{"error": {"message", "detail"}, "status":
"failure"}``.
"""

from __future__ import annotations

import asyncio
import html
import inspect
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, NoReturn

import orjson
from aiohttp import web
from yarl import URL

from bridge.instance import auth
from bridge.instance.auth import Authenticator, AuthError, Principal
from bridge.instance.cmdb import CI_TABLE, class_view
from bridge.instance.query import MAX_TERMS, QueryError, escape, parse
from bridge.instance.store import (
    TABLES,
    Conflict,
    FieldError,
    Record,
    Store,
    Table,
    UnknownTable,
    same_answer,
)

log = logging.getLogger("midbridge.instance.api")

API_PREFIX = "/api/now/table"
JSON_TEXT_FIELDS = frozenset(
    {("ecc_queue", "payload"), ("ecc_agent", "stats"), ("discovery_credentials", "secret")}
)
IGNORED_PARAMS = frozenset(
    {
        "sysparm_exclude_reference_link",  # references are always plain sys_ids here
        "sysparm_suppress_pagination_header",
        "sysparm_view",
        "sysparm_query_no_domain",
        "sysparm_query_category",
    }
)
LIST_PARAMS = frozenset(
    {
        "sysparm_query",
        "sysparm_limit",
        "sysparm_offset",
        "sysparm_fields",
        "sysparm_no_count",
        "sysparm_display_value",
        "sysparm_input_display_value",
    }
)


MAX_JSON_DEPTH = 64  # nesting of arrays/objects in a request body (orjson writes ~254 at most)
UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_WRITE_PARAMS = frozenset(
    {"sysparm_fields", "sysparm_input_display_value", "sysparm_display_value"}
)


@dataclass(frozen=True, slots=True)
class ApiSettings:
    max_body_bytes: int = 1_048_576
    default_limit: int = 1_000
    max_limit: int = 10_000
    # Behind a TLS proxy: take the client's address from the last X-Forwarded-For entry and
    # HTTPS from X-Forwarded-Proto. Off by default: anyone could send those headers.
    trust_forwarded: bool = False
    throttle: auth.ThrottleSettings = field(default_factory=auth.ThrottleSettings)


class ApiError(Exception):
    """An error answered in ServiceNow's shape with ``status``."""

    def __init__(self, status: int, message: str, detail: str = "") -> None:
        super().__init__(f"{message}: {detail}" if detail else message)
        self.status = status
        self.message = message
        self.detail = detail


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
``ApiError`` (or ``ValueError``, answered 400 with its text) to refuse the write."""


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


# --- shaping ------------------------------------------------------------------------------


def wire_value(value: Any) -> str:
    """A stored value as ServiceNow returns it: always a string."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def to_wire(table: Table, record: Record, fields: list[str] | None = None) -> dict[str, str]:
    names = fields if fields is not None else list(table.fields)
    return {
        name: wire_value(record.get(name))
        for name in names
        if name in record and not table.fields[name].write_only
    }


def _json(data: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.Response(
        body=orjson.dumps(data),
        status=status,
        content_type="application/json",
        charset="utf-8",
        headers=headers,
    )


def error_response(status: int, message: str, detail: str = "") -> web.Response:
    headers = {"WWW-Authenticate": 'Basic realm="midbridge"'} if status == 401 else None
    body = {"error": {"message": message, "detail": detail}, "status": "failure"}
    return _json(body, status, headers)


_HTTP_MESSAGES = {
    404: "Requested URI does not represent any resource",
    405: "Method not Supported",
    413: "Request body too large",
    415: "Unsupported Media Type",
}


@web.middleware
async def error_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as exc:
        return error_response(exc.status, exc.message, exc.detail)
    except auth.SignInThrottled as exc:
        response = error_response(exc.status, exc.message, exc.detail)
        response.headers["Retry-After"] = str(exc.retry_after)
        return response
    except AuthError as exc:
        return error_response(exc.status, exc.message, exc.detail)
    except QueryError as exc:
        return error_response(400, exc.message, "invalid encoded query")
    except (FieldError, UnknownTable) as exc:
        return error_response(400, exc.message, "invalid field or value")
    except Conflict as exc:
        return error_response(409, "Operation Failed", exc.message)
    except web.HTTPException as exc:
        if exc.status < 400 or not request.path.startswith("/api/"):
            raise
        message = _HTTP_MESSAGES.get(exc.status, exc.reason)
        detail = exc.reason
        if exc.status == 405:
            detail = f"{request.method} is not allowed on {request.path}"
        elif exc.status == 404:
            detail = f"no resource at {request.path}"
        response = error_response(exc.status, message, detail)
        if exc.status == 405 and "Allow" in exc.headers:
            response.headers["Allow"] = exc.headers["Allow"]
        return response
    except Exception:
        log.exception("internal error on %s %s", request.method, request.path)
        return error_response(500, "Internal server error", "see the instance's log")


@web.middleware
async def origin_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """CSRF: a state-changing request whose ``Origin`` is present and not this instance's
    own is refused with 403 before anything else (credentials included) is looked at."""
    if request.method in UNSAFE_METHODS:
        origin = request.headers.get("Origin")
        if origin is not None and not same_origin(request, origin):
            raise ApiError(
                403,
                "Cross-origin request refused",
                f"Origin {origin[:100]!r} is not this instance ({request.host[:100]})",
            )
    return await handler(request)


def same_origin(request: web.Request, origin: str) -> bool:
    """Is ``origin`` (an ``Origin`` header) the host and port this request was sent to?
    The scheme is not compared: behind a TLS proxy the browser's is https, ours http."""
    try:
        theirs = URL(origin)
        ours = URL(f"{theirs.scheme}://{request.host}")
    except ValueError:
        return False
    if theirs.scheme not in ("http", "https") or not theirs.host or theirs.path not in ("", "/"):
        return False
    return (theirs.host.lower(), theirs.port) == ((ours.host or "").lower(), ours.port)


def settings_of(request: web.Request) -> ApiSettings:
    table_api = request.app.get(TABLE_API)
    return table_api.settings if table_api is not None else ApiSettings()


def _last_entry(header: str | None) -> str:
    return (header or "").rpartition(",")[2].strip()


def request_scheme(request: web.Request) -> str:
    """``https`` or ``http``: as the client sent it (X-Forwarded-Proto when trusted)."""
    if settings_of(request).trust_forwarded:
        forwarded = _last_entry(request.headers.get("X-Forwarded-Proto")).lower()
        if forwarded in ("http", "https"):
            return forwarded
    return "https" if request.secure else "http"


def client_address(request: web.Request) -> str:
    """The client's address (the last X-Forwarded-For entry when trusted)."""
    if settings_of(request).trust_forwarded:
        forwarded = _last_entry(request.headers.get("X-Forwarded-For"))
        if forwarded:
            return forwarded[:64]
    return request.remote or ""


async def authenticate(request: web.Request, authenticator: Authenticator) -> Principal:
    """Basic authentication of ``request``, throttled per user and client address."""
    return await authenticator.authenticate(
        request.headers.get("Authorization"), client_address(request)
    )


def json_depth_exceeded(value: Any, limit: int = MAX_JSON_DEPTH) -> bool:
    """Does ``value`` (parsed JSON) nest arrays/objects deeper than ``limit``?"""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


def parse_json_body(raw: bytes) -> Any:
    """A request body's JSON, or ApiError 400 (not JSON, or nested too deep)."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, "Invalid JSON in the request body", str(exc)) from None
    if json_depth_exceeded(body):
        raise ApiError(
            400,
            "The request body is nested too deeply",
            f"at most {MAX_JSON_DEPTH} levels of arrays and objects",
        )
    return body


async def json_object_body(request: web.Request, limit: int = 65_536) -> dict[str, Any]:
    """The body of a POST to an action endpoint: JSON only (``{}`` when there is nothing to
    say), so that a browser cannot send it from another site without a CORS preflight."""
    if request.content_type != "application/json":
        raise ApiError(
            415,
            "Unsupported Media Type",
            f"send application/json (at least {{}}), not {request.content_type or 'nothing'}",
        )
    if request.content_length is not None and request.content_length > limit:
        raise ApiError(413, "Request body too large", f"the limit is {limit} bytes")
    raw = await request.content.read(limit + 1)
    if len(raw) > limit:
        raise ApiError(413, "Request body too large", f"the limit is {limit} bytes")
    body = parse_json_body(raw or b"{}")
    if not isinstance(body, dict):
        raise ApiError(400, "The request body must be a JSON object", "")
    return body


# --- the Table API ------------------------------------------------------------------------


class TableApi:
    def __init__(self, store: Store, settings: ApiSettings, hooks: Hooks) -> None:
        self.store = store
        self.settings = settings
        self.hooks = hooks
        self.authenticator = Authenticator(store, auth.SignInThrottle(settings.throttle))
        self.hooks.add_before_write("sys_user", _hash_password_hook)
        self.hooks.add_before_write("sys_user", _mid_agents_hook)

    def add_routes(self, app: web.Application, *, root_page: bool = True) -> None:
        """The Table API and the Basic page at ``/nav`` (and ``/`` unless ``root_page`` is
        False: the dashboard then serves ``/``, and hands API clients to ``home_page``)."""
        app.router.add_get(API_PREFIX + "/{table}", self.list_records)
        app.router.add_post(API_PREFIX + "/{table}", self.create_record)
        one = API_PREFIX + "/{table}/{sys_id}"
        app.router.add_get(one, self.get_record)
        app.router.add_patch(one, self.update_record)
        app.router.add_put(one, self.update_record)
        app.router.add_delete(one, self.delete_record)
        if root_page:
            app.router.add_get("/", self.home_page)
        app.router.add_get("/nav", self.home_page)

    # --- request pieces -------------------------------------------------------------------

    async def _who(self, request: web.Request) -> Principal:
        return await authenticate(request, self.authenticator)

    @staticmethod
    def _table(request: web.Request, who: Principal) -> Table:
        """The table named in the path, once ``who`` may use it (400 / 403 otherwise)."""
        name = request.match_info["table"]
        table = TABLES.get(name)
        if table is None:
            if class_view(name) is not None:
                auth.authorize_table(who, CI_TABLE)
                raise ApiError(
                    405,
                    "Method not Supported",
                    f"{name} is a read-only view of {CI_TABLE}: write {CI_TABLE} "
                    "(sys_class_name holds the class)",
                )
            raise ApiError(400, f"Invalid table {name}", "")
        auth.authorize_table(who, table.name)
        return table

    @classmethod
    def _readable(cls, request: web.Request, who: Principal) -> tuple[Table, tuple[str, ...]]:
        """The table to read, and the CI classes it is limited to (a class view) or ()."""
        classes = class_view(request.match_info["table"])
        if classes is None:
            return cls._table(request, who), ()
        auth.authorize_table(who, CI_TABLE)
        return TABLES[CI_TABLE], classes

    @staticmethod
    def _hidden(table: Table) -> list[str]:
        return [name for name, spec in table.fields.items() if spec.write_only]

    def _params(
        self, request: web.Request, allowed: frozenset[str], *, filters: bool = False
    ) -> dict[str, str]:
        """The query parameters; ``filters``: other names are ``field=value`` filters."""
        params: dict[str, str] = {}
        for key, value in request.query.items():
            if key in IGNORED_PARAMS:
                continue
            if key not in allowed and (key.startswith("sysparm_") or not filters):
                raise ApiError(400, f"Unsupported parameter {key}", "see docs/instance.md")
            if key in params:
                raise ApiError(400, f"Parameter {key} given more than once", "")
            params[key] = value
        display = params.pop("sysparm_display_value", "false").lower()
        if display != "false":
            raise ApiError(
                400,
                f"sysparm_display_value={display} is not supported",
                "values are returned as stored (references as sys_ids)",
            )
        return params

    @staticmethod
    def _flag(params: Mapping[str, str], name: str) -> bool:
        value = params.get(name, "false").lower()
        if value not in ("true", "false"):
            raise ApiError(400, f"{name} must be true or false, not {value!r}", "")
        return value == "true"

    @staticmethod
    def _fields_param(table: Table, params: Mapping[str, str]) -> list[str] | None:
        text = params.get("sysparm_fields")
        if text is None or not text.strip():
            return None
        names = [name.strip() for name in text.split(",") if name.strip()]
        for name in names:
            if name not in table.fields:
                raise ApiError(
                    400, f"Unknown field {name!r} in sysparm_fields", f"table {table.name}"
                )
        return names

    def _int_param(self, params: Mapping[str, str], name: str, default: int, high: int) -> int:
        text = params.get(name)
        if text is None:
            return default
        try:
            value = int(text)
        except ValueError:
            raise ApiError(400, f"{name} must be an integer, not {text!r}", "") from None
        if not 0 <= value <= high:
            raise ApiError(400, f"{name} must be between 0 and {high}, not {value}", "")
        return value

    async def _body(self, request: web.Request, table: Table) -> dict[str, Any]:
        limit = self.settings.max_body_bytes
        if request.content_length is not None and request.content_length > limit:
            raise ApiError(413, "Request body too large", f"the limit is {limit} bytes")
        if request.content_type != "application/json":
            raise ApiError(
                415,
                "Unsupported Media Type",
                f"send application/json, not {request.content_type or 'nothing'}",
            )
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise ApiError(413, "Request body too large", f"the limit is {limit} bytes") from None
        if len(raw) > limit:
            raise ApiError(413, "Request body too large", f"the limit is {limit} bytes")
        body = parse_json_body(raw)
        if not isinstance(body, dict):
            raise ApiError(400, "The request body must be a JSON object", "")
        for name, value in body.items():
            spec = table.fields.get(name)
            if spec is None:
                raise ApiError(
                    400, f"Unknown field {name!r} for table {table.name}", "see docs/instance.md"
                )
            if spec.read_only:
                raise ApiError(400, f"Field {name!r} is read-only", f"table {table.name}")
            if isinstance(value, dict | list) and (table.name, name) not in JSON_TEXT_FIELDS:
                raise ApiError(400, f"Field {name!r}: expected a string, number or boolean", "")
        return body

    async def _resolve_references(
        self, table: Table, body: dict[str, Any], by_display: bool
    ) -> None:
        """Reference fields: a sys_id, or (``sysparm_input_display_value=true``) a name."""
        for name, value in list(body.items()):
            spec = table.fields[name]
            if spec.reference is None or not spec.cascade_delete or value in (None, ""):
                continue
            target = TABLES[spec.reference]
            text = str(value)
            if by_display and target.display_field != "sys_id":
                rows = await self.store.query(
                    target.name, f"{target.display_field}={escape(text)}", limit=1
                )
                if rows:
                    body[name] = rows[0]["sys_id"]
                    continue
            if await self.store.get(target.name, text) is not None:
                continue
            if by_display:
                detail = f"no {target.name} record with {target.display_field} or sys_id {text!r}"
            else:
                detail = (
                    f"no {target.name} record with sys_id {text!r} (to give a "
                    f"{target.display_field}, add sysparm_input_display_value=true)"
                )
            raise ApiError(400, f"Invalid reference in field {name!r}", detail)

    async def _run_hooks(self, write: Write) -> None:
        for hook in list(self.hooks.before_write.get(write.table, [])):
            try:
                result = hook(write)
                if inspect.isawaitable(result):
                    await result
            except ValueError as exc:
                raise ApiError(400, str(exc), f"table {write.table}") from None

    # --- handlers ---------------------------------------------------------------------------

    async def list_records(self, request: web.Request) -> web.Response:
        who = await self._who(request)
        table, classes = self._readable(request, who)
        auth.authorize(who, table.name, "read")
        params = self._params(request, LIST_PARAMS, filters=True)
        query = params.pop("sysparm_query", "")
        filters = {k: v for k, v in params.items() if not k.startswith("sysparm_")}
        if filters:
            if query:
                raise ApiError(
                    400, "Give either sysparm_query or field=value parameters, not both", ""
                )
            for key in filters:
                if key not in table.fields:
                    raise ApiError(
                        400, f"Unknown field {key!r} in the query parameters", f"table {table.name}"
                    )
            query = "^".join(f"{k}={escape(v)}" for k, v in filters.items())
        _check_client_query(query, "field=value parameters" if filters else "sysparm_query")
        if classes:
            query = restrict(query, "sys_class_nameIN" + ",".join(classes))
        scope = auth.agent_scope(who, table.name)
        if scope is not None:
            query = restrict(query, scope)
        fields = self._fields_param(table, params)
        limit = self._int_param(
            params, "sysparm_limit", self.settings.default_limit, self.settings.max_limit
        )
        offset = self._int_param(params, "sysparm_offset", 0, 2**62)
        hidden = self._hidden(table)
        records = await self.store.query(
            table.name, query, limit=limit, offset=offset, hidden=hidden
        )
        headers: dict[str, str] = {}
        if not self._flag(params, "sysparm_no_count"):
            total = await self.store.count(table.name, query, hidden=hidden)
            headers["X-Total-Count"] = str(total)
            links = _links(request, limit, offset, total)
            if links:
                headers["Link"] = links
        result = [to_wire(table, r, fields) for r in records]
        return _json({"result": result}, headers=headers)

    async def get_record(self, request: web.Request) -> web.Response:
        who = await self._who(request)
        table, classes = self._readable(request, who)
        auth.authorize(who, table.name, "read")
        params = self._params(request, frozenset({"sysparm_fields", "sysparm_display_value"}))
        fields = self._fields_param(table, params)
        record = await self.store.get(table.name, request.match_info["sys_id"])
        if record is None or (classes and record.get("sys_class_name") not in classes):
            raise _not_found()
        if not auth.in_agent_scope(who, table.name, record):
            raise _not_found()
        return _json({"result": to_wire(table, record, fields)})

    async def _write_request(
        self, request: web.Request
    ) -> tuple[Principal, Table, dict[str, str], list[str] | None, dict[str, Any]]:
        """A create's or update's writer, table, parameters, fields to answer, and body."""
        who = await self._who(request)
        table = self._table(request, who)
        params = self._params(request, _WRITE_PARAMS)
        fields = self._fields_param(table, params)
        body = await self._body(request, table)
        return who, table, params, fields, body

    async def create_record(self, request: web.Request) -> web.Response:
        who, table, params, fields, body = await self._write_request(request)
        auth.authorize(who, table.name, "create", fields=body)
        _check_agent_name(table, body)
        is_input = table.name == "ecc_queue" and str(body.get("queue") or "input") == "input"
        if is_input and not who.is_admin:
            stored = await self._check_mid_input(who, body)
            if stored is not None:  # a repeat of an answer already stored: as idempotent
                return _json({"result": to_wire(table, stored, fields)}, 200)
        await self._resolve_references(
            table, body, self._flag(params, "sysparm_input_display_value")
        )
        write = Write(table.name, "insert", body, None, who)
        await self._run_hooks(write)
        status = 201
        if is_input and str(write.fields.get("queue") or "input") == "input":
            record, inserted = await self.store.insert_input_once(write.fields)
            status = 201 if inserted else 200
        else:
            record = await self.store.insert(table.name, write.fields)
        location = f"{request.url.origin()}{API_PREFIX}/{table.name}/{record['sys_id']}"
        return _json(
            {"result": to_wire(table, record, fields)}, status, headers={"Location": location}
        )

    async def update_record(self, request: web.Request) -> web.Response:
        who, table, params, fields, body = await self._write_request(request)
        if "sys_id" in body:
            raise ApiError(400, "Field 'sys_id' is read-only", f"table {table.name}")
        sys_id = request.match_info["sys_id"]
        previous = await self.store.get(table.name, sys_id)
        if previous is None or not auth.in_agent_scope(who, table.name, previous):
            auth.authorize(who, table.name, "read")
            raise _not_found()
        auth.authorize(who, table.name, "write", fields=body, record=previous)
        _check_agent_name(table, body)
        await self._resolve_references(
            table, body, self._flag(params, "sysparm_input_display_value")
        )
        write = Write(table.name, "update", body, previous, who)
        await self._run_hooks(write)
        record = await self.store.update(table.name, sys_id, write.fields)
        if record is None:  # deleted meanwhile
            raise _not_found()
        return _json({"result": to_wire(table, record, fields)})

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
        self._params(request, frozenset())
        auth.authorize(who, table.name, "delete")
        if not await self.store.delete(table.name, request.match_info["sys_id"]):
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
            name
            for name in TABLES
            if who.is_admin
            or (name in ("ecc_queue", "ecc_agent") and who.has_any("mid_server", "discovery_admin"))
        ]
        items = "".join(
            f'<li><a href="{API_PREFIX}/{name}?sysparm_limit=20">{name}</a></li>'
            for name in readable
        )
        body = (
            f"<p>Signed in as <b>{html.escape(who.user_name)}</b>"
            f" (roles: {html.escape(roles)}).</p>"
            f"<p>Tables (Table API, JSON):</p><ul>{items}</ul>"
        )
        return _page(200, "midbridge instance", body)


def _check_client_query(query: str, parameter: str) -> None:
    """A client's query within ``MAX_TERMS`` terms: 400 naming the parameter otherwise."""
    try:
        parse(query, max_terms=MAX_TERMS)
    except QueryError as exc:
        message = f"Invalid {parameter}: {exc.message}"
        raise ApiError(400, message, "invalid encoded query") from None


def _check_agent_name(table: Table, body: Mapping[str, Any]) -> None:
    """An agent's name (``ecc_agent.name``) in the safe alphabet, whoever writes it."""
    if table.name != "ecc_agent" or "name" not in body:
        return
    try:
        auth.check_agent_name(body["name"], "ecc_agent.name")
    except ValueError as exc:
        raise ApiError(400, f"Invalid value for field 'name': {exc}", "table ecc_agent") from None


def restrict(query: str, condition: str) -> str:
    """``query`` (an encoded query) with ``condition`` AND-ed into each of its ``^NQ``
    branches; a syntax error in ``query`` raises ``QueryError`` as it would alone."""
    parse(query)
    terms: list[str] = []
    current: list[str] = []
    i = 0
    while i < len(query):
        if query.startswith("^^", i):
            current.append("^^")  # a caret inside a value: kept as it is
            i += 2
        elif query[i] == "^":
            terms.append("".join(current))
            current = []
            i += 1
        else:
            current.append(query[i])
            i += 1
    terms.append("".join(current))
    out = [condition]
    for term in terms:
        if term.startswith("NQ"):
            out += ["NQ" + condition, term[2:]]
        else:
            out.append(term)
    return "^".join(out)


def _not_found() -> ApiError:
    return ApiError(
        404, "No Record found", "Record doesn't exist or ACL restricts the record retrieval"
    )


def _links(request: web.Request, limit: int, offset: int, total: int) -> str:
    if limit <= 0 or (offset == 0 and total <= limit):
        return ""

    def at(start: int, rel: str) -> str:
        url = request.url.update_query(sysparm_limit=str(limit), sysparm_offset=str(start))
        return f'<{url}>;rel="{rel}"'

    last = max(0, (total - 1) // limit * limit)
    parts = [at(0, "first")]
    if offset > 0:
        parts.append(at(max(0, offset - limit), "prev"))
    if offset + limit < total:
        parts.append(at(offset + limit, "next"))
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
    "request_scheme",
    "restrict",
    "to_wire",
    "wire_value",
]
