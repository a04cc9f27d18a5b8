"""ServiceNow's Batch API: ``POST /api/now/v1/batch`` (and ``/api/now/batch``).

Request (JSON)::

    {"batch_request_id": "1", "enforce_order": false,
     "rest_requests": [{"id": "11", "method": "GET", "url": "/api/now/table/x?sysparm_limit=1",
                        "headers": [{"name": "Accept", "value": "application/json"}],
                        "body": "<base64>", "exclude_response_headers": false}]}

Answer (200)::

    {"batch_request_id": "1",
     "serviced_requests": [{"id": "11", "status_code": 200, "status_text": "OK",
                            "headers": [{"name", "value"}], "body": "<base64>",
                            "execution_time": 3}],
     "unserviced_requests": []}

Each sub-request runs in order, as the batch's user, through the application's own router
and middlewares (so every access rule of the API it calls applies): a clone of the batch
request with the sub-request's method, URL, headers and body. Only ``/api/`` URLs other
than the Batch API itself are served (a batch in a batch is refused). The sub-request's
own ``Authorization``, ``Cookie``, ``Origin``, ``Host`` and forwarding headers are not
used: the batch's count. Limits (``ApiSettings``): sub-requests per batch, bytes of the
batch request, bytes of the answers in all and seconds; once a limit is reached the
requests not run yet are listed in ``unserviced_requests``, as ServiceNow does.
"""

from __future__ import annotations

import base64
import binascii
import re
import time
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from bridge.instance.api_http import (
    BATCH_BODY,
    BATCH_PRINCIPAL,
    ApiError,
    authenticate,
    error_response,
    json_response,
    parse_json_body,
    read_body,
    settings_of,
)
from bridge.instance.auth import Authenticator, Principal

BATCH_PATH = re.compile(r"/api/now(?:/v[0-9]+)?/batch/?")
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,64}")
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"})
# Headers of the batch request every sub-request runs with (who, where from).
_FROM_BATCH = frozenset(
    {"authorization", "host", "origin", "x-forwarded-for", "x-forwarded-proto",
     "x-forwarded-host", "forwarded", "user-agent"}
)  # fmt: skip
# Headers a sub-request may not set: those above, and what framing the body takes.
_NOT_FROM_ITEM = _FROM_BATCH | {
    "cookie", "content-length", "transfer-encoding", "expect", "connection", "upgrade",
    "te", "trailer", "keep-alive", "proxy-authorization", "content-encoding",
}  # fmt: skip
MAX_ID = 256


@dataclass(frozen=True, slots=True)
class SubRequest:
    id: str
    method: str
    url: str
    headers: tuple[tuple[str, str], ...]
    body: bytes
    exclude_headers: bool


def _bad(index: int, name: str, detail: str) -> ApiError:
    return ApiError(400, f"Invalid rest_requests[{index}].{name}", detail)


def _text_id(value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, str | int):
        return None
    return str(value)[:MAX_ID]


def _sub_request(index: int, item: Any, limit: int) -> SubRequest:
    if not isinstance(item, dict):
        raise ApiError(400, f"Invalid rest_requests[{index}]", "expected an object")
    sub_id = _text_id(item.get("id"))
    if sub_id is None:
        raise _bad(index, "id", "required: a string")
    method = item.get("method")
    if not isinstance(method, str) or method.upper() not in _METHODS:
        raise _bad(index, "method", f"expected one of {', '.join(sorted(_METHODS))}")
    url = item.get("url")
    if not isinstance(url, str) or not url:
        raise _bad(index, "url", "required: the relative URL of the request")
    headers: list[tuple[str, str]] = []
    raw_headers = item.get("headers") or []
    if not isinstance(raw_headers, list):
        raise _bad(index, "headers", "expected a list of {name, value}")
    for header in raw_headers:
        name = header.get("name") if isinstance(header, dict) else None
        value = header.get("value") if isinstance(header, dict) else None
        if not isinstance(name, str) or not _TOKEN.fullmatch(name):
            raise _bad(index, "headers", "each header needs a name (an HTTP token)")
        if not isinstance(value, str) or any(c in value for c in "\r\n\0"):
            raise _bad(index, "headers", f"header {name!r}: a value is text on one line")
        headers.append((name, value))
    body = b""
    encoded = item.get("body")
    if encoded not in (None, ""):
        if not isinstance(encoded, str):
            raise _bad(index, "body", "expected base64 text")
        try:
            body = base64.b64decode("".join(encoded.split()), validate=True)
        except (binascii.Error, ValueError):
            raise _bad(index, "body", "not base64") from None
        if len(body) > limit:
            raise _bad(index, "body", f"larger than {limit} bytes")
    exclude = item.get("exclude_response_headers", False)
    return SubRequest(
        sub_id, method.upper(), url, tuple(headers), body, exclude in (True, "true", "True")
    )


def _relative(url: str) -> URL | None:
    """The sub-request's path and query, when it is an API URL this batch may call."""
    try:
        parsed = URL(url)
    except ValueError:
        return None
    relative = URL.build(path=parsed.raw_path, query_string=parsed.raw_query_string, encoded=True)
    segments = relative.raw_path.split("/")
    if not relative.raw_path.startswith("/api/") or "." in segments or ".." in segments:
        return None
    if "" in segments[1:-1] or BATCH_PATH.fullmatch(relative.path):
        return None
    return relative


class BatchApi:
    """The Batch API's handler."""

    def __init__(self, authenticator: Authenticator) -> None:
        self.authenticator = authenticator

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post("/api/now/batch", self.batch)
        app.router.add_post("/api/now/{version:v1}/batch", self.batch)

    async def batch(self, request: web.Request) -> web.Response:
        who = await authenticate(request, self.authenticator)
        if request.get(BATCH_PRINCIPAL) is not None:
            raise ApiError(400, "A batch request cannot contain a batch request", "")
        settings = settings_of(request)
        if request.content_type != "application/json":
            raise ApiError(
                415,
                "Unsupported Media Type",
                f"send application/json, not {request.content_type or 'nothing'}",
            )
        body = parse_json_body(await read_body(request, settings.batch_max_bytes))
        if not isinstance(body, dict):
            raise ApiError(400, "The request body must be a JSON object", "")
        items = body.get("rest_requests")
        if not isinstance(items, list):
            raise ApiError(400, "Invalid rest_requests", "required: a list of requests")
        if len(items) > settings.batch_max_requests:
            raise ApiError(
                400,
                "Invalid rest_requests",
                f"at most {settings.batch_max_requests} requests in one batch, not {len(items)}",
            )
        subs = [_sub_request(i, item, settings.max_body_bytes) for i, item in enumerate(items)]
        batch_id = _text_id(body.get("batch_request_id"))
        deadline = time.monotonic() + settings.batch_timeout
        budget = settings.batch_max_output_bytes
        serviced: list[dict[str, Any]] = []
        unserviced: list[str] = []
        for index, sub in enumerate(subs):
            if unserviced or budget <= 0 or time.monotonic() > deadline:
                unserviced.append(sub.id)
                continue
            started = time.perf_counter()
            status, reason, headers, content = await self._run(request, who, sub, index)
            if sub.method == "HEAD":
                content = b""
            if len(content) > budget and sub.method in ("GET", "HEAD"):
                unserviced.append(sub.id)  # not changed anything: the client may ask again
                continue
            budget -= len(content)
            serviced.append(
                {
                    "id": sub.id,
                    "status_code": status,
                    "status_text": reason,
                    "headers": [] if sub.exclude_headers else headers,
                    "body": base64.b64encode(content).decode("ascii"),
                    "execution_time": round((time.perf_counter() - started) * 1000),
                }
            )
        return json_response(
            {
                "batch_request_id": batch_id if batch_id is not None else "",
                "serviced_requests": serviced,
                "unserviced_requests": unserviced,
            }
        )

    async def _run(
        self, request: web.Request, who: Principal, sub: SubRequest, index: int
    ) -> tuple[int, str, list[dict[str, str]], bytes]:
        """(status, reason, headers, body) of one sub-request (``rest_requests[index]``)."""
        relative = _relative(sub.url)
        if relative is None:
            answer = error_response(
                400,
                f"Invalid rest_requests[{index}].url",
                f"{sub.url[:200]!r}: a batch runs /api/ requests of this instance, "
                "other than the Batch API itself",
            )
            return self._parts(answer)
        headers: CIMultiDict[str] = CIMultiDict()
        for name, value in request.headers.items():
            if name.lower() in _FROM_BATCH:
                headers.add(name, value)
        for name, value in sub.headers:
            if name.lower() not in _NOT_FROM_ITEM:
                headers.add(name, value)
        if sub.body:
            headers["Content-Length"] = str(len(sub.body))
        clone = request.clone(method=sub.method, rel_url=relative, headers=headers)
        clone[BATCH_PRINCIPAL] = who
        clone[BATCH_BODY] = sub.body
        try:
            # The application's own dispatch: its router, then every middleware.
            response = await request.app._handle(clone)
        except web.HTTPException as exc:
            return exc.status, exc.reason, [], (exc.text or "").encode()
        return self._parts(response)

    @staticmethod
    def _parts(response: web.StreamResponse) -> tuple[int, str, list[dict[str, str]], bytes]:
        if not isinstance(response, web.Response) or not isinstance(
            response.body, bytes | bytearray | None
        ):
            answer = error_response(
                500, "Internal server error", "a streamed answer cannot be part of a batch"
            )
            return BatchApi._parts(answer)
        content = bytes(response.body or b"")
        headers = [{"name": k, "value": v} for k, v in response.headers.items()]
        if "Content-Length" not in response.headers:
            headers.append({"name": "Content-Length", "value": str(len(content))})
        return response.status, response.reason, headers, content


__all__ = ["BATCH_PATH", "BatchApi"]
