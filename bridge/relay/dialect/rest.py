"""RESTProbe: a REST request through the MID (RESTMessageV2 with a MID Server).

In: the endpoint from ``rest_endpoint``, ``endpoint``, ``url`` or the record's ``source``;
the method from ``http_method`` or ``method``, else the record's ``name`` when it is an
HTTP method, else GET; headers from ``headers`` (a JSON object) and ``header.<Name>``
parameters; the body from ``content``, ``request_body`` or ``body``; ``http_timeout`` or
``timeout`` (ms) → ``timeout`` (s). An ``Authorization`` header is refused by the bridge:
it uses its own ``http_basic``/``http_bearer`` credentials. Accepted and dropped:
``skip_sensor``, ``use_mutual_auth``, ``mid_server``, ``credential_id``, the rest.

Out: ``<result status=".." reason=".." url=".." method=".."><headers><header name=".."
value=".."/></headers><body encoding="text|base64">..</body></result>``.
"""

from __future__ import annotations

from typing import Any

import orjson

from bridge.relay.dialect.base import Dialect, Mapped, ParamReader
from bridge.relay.envelope import Element, child, element
from bridge.wire.errors import BadParameter

METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class RESTProbe(Dialect):
    topic = "RESTProbe"

    def map(self, reader: ParamReader) -> Mapped:
        url = reader.text("rest_endpoint", "endpoint", "url") or reader.row.get("source", "")
        method = reader.text("http_method", "method")
        if method is None:
            name = reader.row.get("name", "").strip().upper()
            method = name if name in METHODS else "GET"
        params: dict[str, Any] = {"url": url.strip(), "method": method.strip().upper()}
        headers: dict[str, str] = {}
        given = reader.text("headers")
        if given is not None:
            try:
                decoded = orjson.loads(given)
            except orjson.JSONDecodeError:
                raise BadParameter("must be a JSON object of headers", field="headers") from None
            if not isinstance(decoded, dict):
                raise BadParameter("must be a JSON object of headers", field="headers")
            headers.update({str(k): str(v) for k, v in decoded.items()})
        for name in list(reader.values):
            if name.lower().startswith("header.") and len(name) > 7:
                value = reader.text(name)
                if value is not None:
                    headers[name[7:]] = value
        if headers:
            params["headers"] = headers
        body = reader.text("content", "request_body", "body")
        if body is not None:
            params["body"] = body
        timeout = reader.seconds_from_ms("http_timeout", "timeout")
        if timeout is not None:
            params["timeout"] = timeout
        return Mapped(params)

    def result(self, payload: dict[str, Any], extra: dict[str, Any]) -> Element:
        result = element("result", {
            "status": payload.get("status"), "reason": payload.get("reason"),
            "url": payload.get("final_url") or payload.get("url"),
            "method": payload.get("method"), "content_type": payload.get("content_type"),
        })  # fmt: skip
        headers = child(result, "headers")
        for pair in payload.get("headers") or []:
            if isinstance(pair, list | tuple) and len(pair) == 2:
                child(headers, "header", {"name": pair[0], "value": pair[1]})
        child(result, "body", {"encoding": payload.get("body_encoding") or "text",
                               "truncated": payload.get("truncated")},
              payload.get("body") or None)  # fmt: skip
        return result
