"""The HTTP plumbing the instance's REST APIs share: settings, errors, bodies, answers in
JSON or XML, authentication, the instance's public base URL, and the middlewares.

Errors are ServiceNow-shaped: ``{"error": {"message", "detail"}, "status": "failure"}``
(in XML when the client asked for XML).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web
from yarl import URL

from bridge.instance import api_xml, auth
from bridge.instance.auth import Authenticator, AuthError, Principal
from bridge.instance.query import QueryError
from bridge.instance.store import Conflict, FieldError, UnknownTable

log = logging.getLogger("midbridge.instance.api")

MAX_JSON_DEPTH = 64  # nesting of arrays/objects in a request body (orjson writes ~254 at most)
UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


@dataclass(frozen=True, slots=True)
class ApiSettings:
    max_body_bytes: int = 1_048_576
    default_limit: int = 1_000
    max_limit: int = 10_000  # a larger sysparm_limit is lowered to this (Link pages on)
    # Behind a TLS proxy: take the client's address from the last X-Forwarded-For entry,
    # HTTPS from X-Forwarded-Proto and the host from X-Forwarded-Host (for Link and
    # Location). Off by default: anyone could send those headers.
    trust_forwarded: bool = False
    # The instance's address as clients reach it (``https://instance.example.com``): the
    # base of Link, Location and reference links. "": from the request (see above).
    public_url: str = ""
    throttle: auth.ThrottleSettings = field(default_factory=auth.ThrottleSettings)
    # The Batch API (/api/now/v1/batch): sub-requests per batch, bytes of the batch request,
    # bytes of the answers' bodies in all, and seconds; past a limit the requests not run
    # yet are answered in unserviced_requests, as ServiceNow does.
    batch_max_requests: int = 100
    batch_max_bytes: int = 4_194_304
    batch_max_output_bytes: int = 33_554_432
    batch_timeout: float = 30.0

    def __post_init__(self) -> None:
        if self.public_url:
            url = URL(self.public_url)
            if url.scheme not in ("http", "https") or not url.host or url.query_string:
                raise ValueError(
                    f"public_url {self.public_url!r}: expected http(s)://host[:port][/path]"
                )


class ApiError(Exception):
    """An error answered in ServiceNow's shape with ``status``."""

    def __init__(self, status: int, message: str, detail: str = "") -> None:
        super().__init__(f"{message}: {detail}" if detail else message)
        self.status = status
        self.message = message
        self.detail = detail


API_SETTINGS = web.AppKey("midbridge_api_settings", ApiSettings)
# Set on a Batch API sub-request only (never from anything a client sends): the batch's
# authenticated user, and the sub-request's body.
BATCH_PRINCIPAL = web.RequestKey("midbridge_batch_principal", Principal)
BATCH_BODY = web.RequestKey("midbridge_batch_body", bytes)


def settings_of(request: web.Request) -> ApiSettings:
    return request.app.get(API_SETTINGS) or ApiSettings()


# --- answers --------------------------------------------------------------------------------


def wants_xml(request: web.Request) -> bool:
    """Does the Accept header prefer XML (application/xml, text/xml) to JSON?"""
    header = request.headers.get("Accept", "")
    best: dict[str, tuple[float, int]] = {}
    for position, part in enumerate(header.split(",")):
        media, *options = (piece.strip() for piece in part.split(";"))
        quality = 1.0
        for option in options:
            key, _, value = option.partition("=")
            if key.strip().lower() == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
        media = media.lower()
        kind = "xml" if media in api_xml.XML_TYPES else None
        if media in ("application/json", "*/*", "application/*"):
            kind = "json"
        if kind is not None and quality > 0 and (kind not in best or best[kind][0] < quality):
            best[kind] = (quality, -position)
    if "xml" not in best:
        return False
    return "json" not in best or best["xml"] > best["json"]


def json_response(
    data: Any, status: int = 200, headers: Mapping[str, str] | None = None
) -> web.Response:
    return web.Response(
        body=orjson.dumps(data),
        status=status,
        content_type="application/json",
        charset="utf-8",
        headers=headers,
    )


def respond(
    request: web.Request,
    data: Mapping[str, Any],
    status: int = 200,
    headers: Mapping[str, str] | None = None,
) -> web.Response:
    """``data`` in JSON, or in ServiceNow's XML when the client asked for XML."""
    if not wants_xml(request):
        return json_response(data, status, headers)
    return web.Response(
        body=api_xml.render(data),
        status=status,
        content_type="application/xml",
        charset="utf-8",
        headers=headers,
    )


def error_response(
    status: int, message: str, detail: str = "", request: web.Request | None = None
) -> web.Response:
    headers = {"WWW-Authenticate": 'Basic realm="midbridge"'} if status == 401 else None
    body = {"error": {"message": message, "detail": detail}, "status": "failure"}
    if request is not None:
        return respond(request, body, status, headers)
    return json_response(body, status, headers)


_HTTP_MESSAGES = {
    404: "Requested URI does not represent any resource",
    405: "Method not Supported",
    413: "Request body too large",
    415: "Unsupported Media Type",
}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as exc:
        return error_response(exc.status, exc.message, exc.detail, request)
    except auth.SignInThrottled as exc:
        response = error_response(exc.status, exc.message, exc.detail, request)
        response.headers["Retry-After"] = str(exc.retry_after)
        return response
    except AuthError as exc:
        return error_response(exc.status, exc.message, exc.detail, request)
    except QueryError as exc:
        return error_response(400, exc.message, "invalid encoded query", request)
    except (FieldError, UnknownTable) as exc:
        return error_response(400, exc.message, "invalid field or value", request)
    except Conflict as exc:
        return error_response(409, "Operation Failed", exc.message, request)
    except web.HTTPException as exc:
        if exc.status < 400 or not request.path.startswith("/api/"):
            raise
        message = _HTTP_MESSAGES.get(exc.status, exc.reason)
        detail = exc.reason
        if exc.status == 405:
            detail = f"{request.method} is not allowed on {request.path}"
        elif exc.status == 404:
            detail = f"no resource at {request.path}"
        response = error_response(exc.status, message, detail, request)
        if exc.status == 405 and "Allow" in exc.headers:
            response.headers["Allow"] = exc.headers["Allow"]
        return response
    except Exception:
        log.exception("internal error on %s %s", request.method, request.path)
        return error_response(500, "Internal server error", "see the instance's log", request)


@web.middleware
async def origin_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
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


# --- who and where --------------------------------------------------------------------------


def _last_entry(header: str | None) -> str:
    return (header or "").rpartition(",")[2].strip()


def request_scheme(request: web.Request) -> str:
    """``https`` or ``http``: as the client sent it (X-Forwarded-Proto when trusted)."""
    if settings_of(request).trust_forwarded:
        forwarded = _last_entry(request.headers.get("X-Forwarded-Proto")).lower()
        if forwarded in ("http", "https"):
            return forwarded
    return "https" if request.secure else "http"


_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOST = re.compile(rf"(?:{_LABEL}(?:\.{_LABEL})*\.?|\[[0-9A-Fa-f:.]{{2,45}}\])(?::[0-9]{{1,5}})?")


def _host_text(value: str) -> str | None:
    """``value`` if it is a host name or address, with an optional port; None otherwise."""
    return value if len(value) <= 260 and _HOST.fullmatch(value) else None


def public_base(request: web.Request) -> str:
    """The instance's URL as the client reaches it (no trailing slash), for Link, Location
    and reference links: ``ApiSettings.public_url`` when set; else the scheme and host the
    request came with (X-Forwarded-Proto / X-Forwarded-Host when trust_forwarded); a host
    header that is not a host name or address is never echoed (the socket's own is used)."""
    settings = settings_of(request)
    if settings.public_url:
        return settings.public_url.rstrip("/")
    host = None
    if settings.trust_forwarded:
        host = _host_text(_last_entry(request.headers.get("X-Forwarded-Host")))
    if host is None:
        host = _host_text(request.headers.get("Host", ""))
    if host is None:
        sockname = request.transport.get_extra_info("sockname") if request.transport else None
        address, port = (sockname[0], sockname[1]) if sockname else ("localhost", 0)
        shown = f"[{address}]" if ":" in str(address) else str(address)
        host = f"{shown}:{port}" if port else shown
    return f"{request_scheme(request)}://{host}"


def client_address(request: web.Request) -> str:
    """The client's address (the last X-Forwarded-For entry when trusted)."""
    if settings_of(request).trust_forwarded:
        forwarded = _last_entry(request.headers.get("X-Forwarded-For"))
        if forwarded:
            return forwarded[:64]
    return request.remote or ""


async def authenticate(request: web.Request, authenticator: Authenticator) -> Principal:
    """Basic authentication of ``request``, throttled per user and client address; a
    Batch API sub-request runs as the batch's (already authenticated) user."""
    principal = request.get(BATCH_PRINCIPAL)
    if isinstance(principal, Principal):
        return principal
    return await authenticator.authenticate(
        request.headers.get("Authorization"), client_address(request)
    )


# --- request bodies -------------------------------------------------------------------------


def _too_large(limit: int) -> ApiError:
    return ApiError(413, "Request body too large", f"the limit is {limit} bytes")


async def read_body(request: web.Request, limit: int) -> bytes:
    """The request's body, at most ``limit`` bytes (413 beyond); a Batch API sub-request's
    own body when this is one."""
    sub_body = request.get(BATCH_BODY)
    if isinstance(sub_body, bytes):
        if len(sub_body) > limit:
            raise _too_large(limit)
        return sub_body
    if request.content_length is not None and request.content_length > limit:
        raise _too_large(limit)
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = await request.content.read(65_536)
        if not chunk:
            break
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


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
    raw = await read_body(request, limit)
    body = parse_json_body(raw or b"{}")
    if not isinstance(body, dict):
        raise ApiError(400, "The request body must be a JSON object", "")
    return body


__all__ = [
    "API_SETTINGS",
    "BATCH_BODY",
    "BATCH_PRINCIPAL",
    "ApiError",
    "ApiSettings",
    "authenticate",
    "client_address",
    "error_middleware",
    "error_response",
    "json_depth_exceeded",
    "json_object_body",
    "json_response",
    "origin_middleware",
    "parse_json_body",
    "public_base",
    "read_body",
    "request_scheme",
    "respond",
    "same_origin",
    "settings_of",
    "wants_xml",
]
