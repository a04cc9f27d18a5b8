"""The instance's REST APIs as the MID's user: the Table API and the Attachment API.

Written for a real ServiceNow instance: every Table API call sends
``sysparm_exclude_reference_link=true`` so reference fields come back as bare sys_ids,
and :func:`value_of` still reads the ``{"link", "value"}`` and ``{"display_value",
"value"}`` objects an instance may answer anyway. Writes are retried with back-off on
transient failures (no answer, 5xx, 429), never on another 4xx.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import ssl
from collections.abc import Mapping
from typing import Any

import aiohttp
import orjson

from bridge.relay.settings import ATTACHMENT_PATH, RelayError

log = logging.getLogger("midbridge.relay")

QueryParams = Mapping[str, str]  # a request's query string, name → value
Row = dict[str, Any]  # a Table API record as answered
_PLAIN = {"sysparm_exclude_reference_link": "true"}


def basic_auth(user: str, password: str) -> str:
    """An ``Authorization: Basic`` header value (UTF-8)."""
    token = base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
    return f"Basic {token}"


def value_of(value: Any) -> str:
    """A field as text, whatever shape the instance gave it: a reference object
    (``{"link", "value"}``), a display-value pair (``{"display_value", "value"}``),
    a number, a boolean or ``None`` (``""``)."""
    if isinstance(value, dict):
        value = value.get("value", "")
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return value if isinstance(value, str) else str(value)


def plain(row: Mapping[str, Any]) -> Row:
    """A record with every field as text (:func:`value_of`)."""
    return {key: value_of(value) for key, value in row.items()}


class InstanceClient:
    """One aiohttp session to the instance (``open``/``close``), Basic authentication."""

    def __init__(
        self,
        base: str,
        user: str,
        password: str,
        *,
        verify_tls: bool = True,
        ca_file: str | None = None,
        timeout: float = 30.0,
        retries: int = 4,
        logger: logging.Logger | None = None,
    ) -> None:
        self.base = base.rstrip("/")
        self._auth = basic_auth(user, password)
        # Verify with the system CAs, or only with ``ca_file`` when given; or not at all.
        self._verify: ssl.SSLContext | bool = verify_tls
        if verify_tls and ca_file:
            try:
                self._verify = ssl.create_default_context(cafile=ca_file)
            except (OSError, ssl.SSLError) as exc:
                raise RelayError(f"--ca-file {ca_file}: {exc}", field="ca_file") from None
        self._timeout = timeout
        self.retries = max(1, retries)
        self._log = logger or log
        self._http: aiohttp.ClientSession | None = None

    async def open(self) -> None:
        self._http = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self._timeout),
            connector=aiohttp.TCPConnector(ssl=self._verify),
            headers={"Accept": "application/json", "Authorization": self._auth},
        )

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None

    async def request(
        self,
        method: str,
        path: str,
        *,
        body: Mapping[str, Any] | None = None,
        params: QueryParams | None = None,
        data: bytes | None = None,
        content_type: str | None = None,
    ) -> Any:
        """One request; the answer's ``result`` (``None`` for an empty answer)."""
        if self._http is None:
            raise RelayError(f"{method} {path}: the relay's HTTP client is not open")
        url = self.base + path
        headers: dict[str, str] = {}
        if body is not None:
            data = orjson.dumps(dict(body))
            headers["Content-Type"] = "application/json"
        elif content_type is not None:
            headers["Content-Type"] = content_type
        try:
            async with self._http.request(
                method, url, params=params, data=data, headers=headers or None
            ) as response:
                raw = await response.read()
                status = response.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise RelayError(f"{method} {path}: {type(exc).__name__}: {exc}") from None
        if status >= 400:
            raise RelayError(f"{method} {path}: HTTP {status}: {_detail(raw)}", status=status)
        if not raw:
            return None
        try:
            answer = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise RelayError(f"{method} {path}: the answer is not JSON", status=status) from None
        return answer.get("result") if isinstance(answer, dict) else None

    async def write(
        self,
        method: str,
        path: str,
        *,
        body: Mapping[str, Any] | None = None,
        params: QueryParams | None = None,
        data: bytes | None = None,
        content_type: str | None = None,
    ) -> Any:
        """:meth:`request`, tried again with back-off on transient failures."""
        delay = 0.2
        for attempt in range(self.retries):
            try:
                return await self.request(
                    method, path, body=body, params=params, data=data, content_type=content_type
                )
            except RelayError as exc:
                if not exc.transient or attempt == self.retries - 1:
                    raise
                self._log.warning("%s; retrying in %.1f s", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
        return None  # pragma: no cover - the loop returns or raises

    # --- the Table API --------------------------------------------------------------

    async def query(
        self, table: str, query: str, *, limit: int, fields: str | None = None
    ) -> list[Row]:
        params = {**_PLAIN, "sysparm_query": query, "sysparm_limit": str(limit)}
        if fields:
            params["sysparm_fields"] = fields
        result = await self.request("GET", f"/api/now/table/{table}", params=params)
        return [plain(row) for row in result or [] if isinstance(row, dict)]

    async def get(self, table: str, sys_id: str, *, fields: str | None = None) -> Row | None:
        params = dict(_PLAIN)
        if fields:
            params["sysparm_fields"] = fields
        try:
            result = await self.request("GET", f"/api/now/table/{table}/{sys_id}", params=params)
        except RelayError as exc:
            if exc.status == 404:
                return None
            raise
        return plain(result) if isinstance(result, dict) else None

    async def insert(self, table: str, body: Mapping[str, Any], *, retry: bool = True) -> Row:
        call = self.write if retry else self.request
        result = await call("POST", f"/api/now/table/{table}", body=body, params=_PLAIN)
        return plain(result) if isinstance(result, dict) else {}

    async def update(
        self, table: str, sys_id: str, body: Mapping[str, Any], *, retry: bool = True
    ) -> Row:
        call = self.write if retry else self.request
        result = await call("PATCH", f"/api/now/table/{table}/{sys_id}", body=body, params=_PLAIN)
        return plain(result) if isinstance(result, dict) else {}

    # --- the Attachment API -----------------------------------------------------------

    async def attach(
        self, table: str, sys_id: str, file_name: str, content: bytes, content_type: str
    ) -> Row:
        """``POST /api/now/attachment/file?table_name=..&table_sys_id=..&file_name=..``."""
        params = {"table_name": table, "table_sys_id": sys_id, "file_name": file_name}
        result = await self.write(
            "POST", ATTACHMENT_PATH, params=params, data=content, content_type=content_type
        )
        return plain(result) if isinstance(result, dict) else {}


def _detail(raw: bytes) -> str:
    """A ServiceNow error body's message and detail, or the start of the body."""
    try:
        error = orjson.loads(raw).get("error", {})
        return f"{error.get('message', '')} {error.get('detail', '')}".strip()
    except (orjson.JSONDecodeError, AttributeError):
        return raw[:200].decode(errors="replace")
