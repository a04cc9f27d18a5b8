"""ServiceNow's Attachment API on the built-in instance (``sys_attachment``).

- ``POST /api/now/attachment/file?table_name=&table_sys_id=&file_name=``: the raw body is
  the file (its ``Content-Type`` is the file's); 201 with the attachment's metadata.
- ``GET /api/now/attachment?sysparm_query=..&sysparm_limit=..&sysparm_offset=..``: the
  metadata of the attachments the user may see (of records it may see).
- ``GET /api/now/attachment/{sys_id}``: one's metadata; ``.../{sys_id}/file``: its content.
- ``DELETE /api/now/attachment/{sys_id}``: 204.

Who may do what (``admin`` everything): an attachment is read by whoever may see the
record it is attached to; attaching and deleting need the right to write that record,
and for a ``mid_server`` account that is narrower than ServiceNow's ACLs make it by
default: only ``ecc_queue`` *input* records of its own agents (``sys_user.mid_agents``),
where a MID puts a payload too large for the field (``<see_attachment/>``). Content is
kept base64 in ``sys_attachment.content`` (write-only: the Table API never returns it).
Metadata answers carry ``size_bytes`` as text and a ``download_link``, as ServiceNow's do.
"""

from __future__ import annotations

import base64
import hashlib
import re
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from bridge.instance import auth
from bridge.instance.api import (
    ApiError,
    authenticate,
    authenticator_of,
    public_base,
    to_wire,
)
from bridge.instance.api_access import context, read_query, sees, table_for
from bridge.instance.api_http import read_body, respond
from bridge.instance.api_params import Params
from bridge.instance.auth import AuthError, Principal
from bridge.instance.query import escape
from bridge.instance.store import TABLES, Record, Store

TABLE = "sys_attachment"
FILE_ROUTE = "/api/now/attachment/file"
# File names: no path, no control characters; ServiceNow caps them at 100 characters.
_FILE_NAME = re.compile(r"[^/\\\x00-\x1f\x7f]{1,100}\Z")
_CONTENT_TYPE = re.compile(r"[A-Za-z0-9!#$&^_.+-]{1,64}/[A-Za-z0-9!#$&^_.+-]{1,64}\Z")
_META = (
    "sys_id", "file_name", "content_type", "size_bytes", "table_name", "table_sys_id",
    "hash", "sys_created_on", "sys_created_by", "sys_updated_on", "sys_updated_by",
    "sys_mod_count",
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class AttachmentSettings:
    max_bytes: int = 32 * 1024 * 1024  # one file (a MID's payload cap is 20,000,000)
    max_per_record: int = 16  # files on one record (bounds what one account can pile up)


class AttachmentApi:
    def __init__(self, store: Store, app: web.Application, settings: AttachmentSettings) -> None:
        self.store = store
        self.settings = settings
        self.authenticator = authenticator_of(app, store)

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post(FILE_ROUTE, self.upload)
        app.router.add_get("/api/now/attachment", self.list)
        app.router.add_get("/api/now/attachment/{sys_id}", self.meta)
        app.router.add_get("/api/now/attachment/{sys_id}/file", self.content)
        app.router.add_delete("/api/now/attachment/{sys_id}", self.delete)

    # --- rules -------------------------------------------------------------------------

    async def _target(self, who: Principal, table_name: str, sys_id: str) -> Record:
        """The record an attachment is (to be) on, once ``who`` may see it (404 otherwise)."""
        table = table_for(self.store, table_name, who)
        auth.authorize(who, table.physical, "read")
        record = await self.store.get(table.name, sys_id) if sys_id else None
        if record is None or not sees(who, table, record):
            raise ApiError(
                404, "No Record found", f"no {table_name[:80]} record {sys_id[:64]!r} to attach to"
            )
        return record

    @staticmethod
    def _may_change(who: Principal, table_name: str, record: Record) -> None:
        """Attach to / delete from ``record``: admin; a mid_server account only on an
        ecc_queue input of its own agents; nobody else."""
        if who.is_admin:
            return
        if not who.has_any("mid_server") or table_name != "ecc_queue":
            raise AuthError(403, f"attachments on {table_name[:80]} are changed by admin only")
        agent = auth.agent_of(record.get("agent"))
        if record.get("queue") != "input" or not who.acts_for(agent):
            raise AuthError(
                403,
                f"user {who.user_name} may attach only to ecc_queue input records of its own "
                f"agents (sys_user.mid_agents); {record.get('sys_id')} is an "
                f"{str(record.get('queue'))[:16]} record of {str(record.get('agent'))[:120]!r}",
            )

    async def _attachment(self, who: Principal, sys_id: str) -> Record:
        row = await self.store.get(TABLE, sys_id)
        if row is not None:
            try:
                await self._target(who, str(row["table_name"]), str(row["table_sys_id"]))
            except (ApiError, AuthError):
                row = None
        if row is None:
            raise ApiError(404, "No Record found", f"no attachment {sys_id[:64]!r}")
        return row

    def _shape(self, request: web.Request, row: Record) -> dict[str, Any]:
        shaped = to_wire(TABLES[TABLE], {k: row.get(k) for k in _META})
        shaped["size_bytes"] = str(row.get("size_bytes") or 0)
        base = public_base(request)
        shaped["download_link"] = f"{base}/api/now/attachment/{row['sys_id']}/file"
        return shaped

    # --- handlers ----------------------------------------------------------------------

    async def upload(self, request: web.Request) -> web.Response:
        who = await authenticate(request, self.authenticator)
        query = request.query
        table_name, sys_id = query.get("table_name", ""), query.get("table_sys_id", "")
        file_name = query.get("file_name", "")
        for name, value in (("table_name", table_name), ("table_sys_id", sys_id),
                            ("file_name", file_name)):  # fmt: skip
            if not value:
                raise ApiError(400, f"Missing parameter {name!r}", "table_name, table_sys_id "
                               "and file_name are required")  # fmt: skip
        if not _FILE_NAME.fullmatch(file_name) or file_name.strip() in ("", ".", ".."):
            raise ApiError(
                400,
                "Invalid parameter 'file_name'",
                "1 to 100 characters, no path separators or control characters",
            )
        content_type = request.content_type or "application/octet-stream"
        if not _CONTENT_TYPE.fullmatch(content_type):
            raise ApiError(
                400, "Invalid Content-Type", f"{content_type[:80]!r} is not type/subtype"
            )
        record = await self._target(who, table_name, sys_id)
        self._may_change(who, table_name, record)
        on_record = await self.store.count(
            TABLE, f"table_name={escape(table_name)}^table_sys_id={escape(sys_id)}"
        )
        if on_record >= self.settings.max_per_record:
            raise ApiError(
                403, "Too many attachments",
                f"record {sys_id[:64]} has {on_record} (at most {self.settings.max_per_record})",
            )  # fmt: skip
        content = await read_body(request, self.settings.max_bytes)
        row = await self.store.insert(
            TABLE,
            {"file_name": file_name, "content_type": content_type, "size_bytes": len(content),
             "table_name": table_name, "table_sys_id": sys_id,
             "hash": hashlib.sha256(content).hexdigest(),
             "content": base64.b64encode(content).decode("ascii")},
            actor=who.user_name,
        )  # fmt: skip
        location = f"{public_base(request)}/api/now/attachment/{row['sys_id']}"
        return respond(request, {"result": self._shape(request, row)}, 201, {"Location": location})

    async def list(self, request: web.Request) -> web.Response:
        who = await authenticate(request, self.authenticator)
        params = Params.of(request)
        table = TABLES[TABLE]
        query = read_query(self.store, who, table, params)
        limit = params.integer("sysparm_limit", 1000, 10_000, clamp=True)
        offset = params.integer("sysparm_offset", 0, 2**62)
        found: list[dict[str, Any]] = []
        skipped = 0
        # Every candidate is checked against its record (the rule is per record), in
        # pages, until the page asked for is full.
        page, start = 500, 0
        while len(found) < limit:
            rows = await self.store.query(
                TABLE, query, limit=page, offset=start, hidden=["content"], invalid="ignore",
                context=context(who),
            )  # fmt: skip
            for row in rows:
                try:
                    await self._target(who, str(row["table_name"]), str(row["table_sys_id"]))
                except (ApiError, AuthError):
                    continue
                if skipped < offset:
                    skipped += 1
                    continue
                found.append(self._shape(request, row))
                if len(found) >= limit:
                    break
            if len(rows) < page:
                break
            start += page
        return respond(request, {"result": found})

    async def meta(self, request: web.Request) -> web.Response:
        who = await authenticate(request, self.authenticator)
        row = await self._attachment(who, request.match_info["sys_id"])
        return respond(request, {"result": self._shape(request, row)})

    async def content(self, request: web.Request) -> web.Response:
        who = await authenticate(request, self.authenticator)
        row = await self._attachment(who, request.match_info["sys_id"])
        body = base64.b64decode(str(row.get("content") or ""))
        disposition = 'attachment; filename="{}"'.format(
            str(row.get("file_name")).replace('"', "_").replace("\\", "_")
        )
        return web.Response(
            body=body,
            content_type=str(row.get("content_type") or "application/octet-stream"),
            headers={
                "Content-Disposition": disposition,
                "X-Content-Type-Options": "nosniff",
                "X-Attachment-Metadata": row["sys_id"],
            },
        )

    async def delete(self, request: web.Request) -> web.Response:
        who = await authenticate(request, self.authenticator)
        row = await self._attachment(who, request.match_info["sys_id"])
        record = await self._target(who, str(row["table_name"]), str(row["table_sys_id"]))
        self._may_change(who, str(row["table_name"]), record)
        await self.store.delete(TABLE, row["sys_id"])
        return web.Response(status=204)


async def attachment_of(store: Store, table_name: str, sys_id: str) -> bytes | None:
    """The content of the newest attachment on a record (a payload ``<see_attachment/>``
    points at), or None."""
    rows = await store.query(
        TABLE,
        f"table_name={escape(table_name)}^table_sys_id={escape(sys_id)}^ORDERBYDESCsys_created_on",
        limit=1,
    )
    if not rows:
        return None
    return base64.b64decode(str(rows[0].get("content") or ""))


def add_routes(
    app: web.Application, store: Store, settings: AttachmentSettings | None = None
) -> AttachmentApi:
    api = AttachmentApi(store, app, settings or AttachmentSettings())
    api.add_routes(app)
    return api
