"""RESTProbe's settings and parameters: what a job may ask, checked before it runs."""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from typing import Any, Literal

import orjson
from pydantic import Field, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError
from yarl import URL

from bridge.wire.errors import (
    BadParameter,
)
from bridge.wire.records import OutputRecord
from probes.contract import ProbeParams, ProbeSettings, parse_params
from probes.kit.limits import check_limit, with_defaults

TOPIC = "RESTProbe"
MAX_URL = 8192
MAX_REQUEST_BODY = 1_048_576
# Request headers a job may not set: credentials come from credential_id, never in clear.
FORBIDDEN_HEADERS = frozenset({"authorization", "proxy-authorization"})
_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]{1,256}$")  # an RFC 9110 header name
_BAD_URL_CHARS = re.compile(r"[\s\x00-\x1f\x7f]")


class RESTSettings(ProbeSettings):
    """``[probes.settings.RESTProbe]``: defaults for every job and the shared session."""

    timeout: float = Field(30.0, gt=0, le=3600)  # seconds for one request, redirects included
    max_body: int = Field(1_048_576, ge=0)  # response bytes kept when a job does not say
    max_body_limit: int = Field(16_777_216, ge=0)  # the most a job may ask for
    max_redirects: int = Field(5, ge=0, le=50)
    verify: bool = True
    ca_file: str | None = None  # PEM bundle used instead of the system's trust store
    limit: int = Field(100, ge=1, le=10_000)  # connections in the pool (ANCHORS: 100 fastest)
    limit_per_host: int = Field(0, ge=0, le=10_000)  # 0: the bridge's limits.per_host
    keepalive_timeout: float = Field(15.0, gt=0, le=3600)
    user_agent: str = Field("midbridge-RESTProbe/0.1", max_length=256)
    timings: bool = False  # DNS/connect timings through an aiohttp trace (costs ~20 µs/request)
    concurrency: int = Field(100, ge=1, le=10_000)  # default requests at once in a urls job
    max_urls: int = Field(10_000, ge=1, le=1_000_000)  # URLs one job may name
    max_in_flight: int = Field(0, ge=0, le=65_536)  # requests at once, all urls jobs; 0: limit

    @model_validator(mode="before")
    @classmethod
    def _bridge_per_host(cls, data: Any, info: ValidationInfo) -> Any:
        """``limit_per_host`` 0: the bridge's ``limits.per_host`` (the validation context)."""
        per_host = (info.context or {}).get("per_host_limit")
        if isinstance(data, dict) and per_host and not data.get("limit_per_host"):
            return {**data, "limit_per_host": per_host}
        return data


def _clean(message: str) -> PydanticCustomError:
    """A validation error without pydantic's ``Value error,`` prefix."""
    return PydanticCustomError("value_error", message)


def _maybe_json(value: Any) -> Any:
    """XML parameters are text: accept a JSON object or list given as text."""
    if isinstance(value, str) and value.lstrip()[:1] in ("{", "["):
        try:
            return orjson.loads(value)
        except orjson.JSONDecodeError:
            raise _clean("must be a JSON object (text does not parse)") from None
    return value


def _scalar(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    raise _clean("query values must be text or numbers")


def check_url(value: str) -> URL:
    """An absolute http(s) URL without credentials in it; ``ValueError`` says what is wrong."""
    if len(value) > MAX_URL:
        raise ValueError(f"is longer than {MAX_URL} characters")
    if _BAD_URL_CHARS.search(value):
        raise ValueError("may not contain white space or control characters")
    try:
        url = URL(value)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"does not parse as a URL: {str(exc)[:100]}") from None
    if url.scheme not in ("http", "https"):
        raise ValueError(f"scheme must be http or https, got {url.scheme[:20]!r}")
    if not url.host:
        raise ValueError("has no host")
    if url.raw_user or url.raw_password:
        raise ValueError("may not carry user:password@; name a credential in credential_id")
    return url


class RESTParams(ProbeParams):
    url: str | None = None
    urls: tuple[str, ...] | None = None  # many requests in one job (see ``run_many``)
    method: Literal["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"] = "GET"
    headers: dict[str, str] = Field(default_factory=dict)
    query: tuple[tuple[str, str], ...] = ()
    body: str | None = Field(None, max_length=MAX_REQUEST_BODY)
    json_body: Any = Field(None, alias="json")
    credential_id: str | None = Field(None, min_length=1, max_length=256)
    follow_redirects: bool = True
    max_redirects: int = Field(5, ge=0, le=50)
    timeout: float = Field(30.0, gt=0, le=3600)
    max_body: int = Field(1_048_576, ge=0)
    ca_file: str | None = Field(None, min_length=1, max_length=4096)
    verify: bool = True
    response_headers: bool = True  # false: the result leaves out the response's headers
    concurrency: int = Field(100, ge=1, le=10_000)  # requests of a ``urls`` job at once
    chunk_responses: int = Field(100, ge=1, le=100_000)  # responses in one result chunk

    @field_validator("urls", mode="before")
    @classmethod
    def _urls(cls, value: Any) -> Any:
        if value is None:
            return None
        if isinstance(value, str):  # XML parameters are text: URLs separated by white space
            value = value.split()
        if not isinstance(value, list | tuple):
            return value  # pydantic reports the type
        if not value:
            raise _clean("is empty: give at least one URL")
        for n, one in enumerate(value):
            if not isinstance(one, str):
                raise _clean(f"entry {n}: is not text")
        try:
            return _checked_urls(tuple(value))
        except ValueError as exc:
            raise _clean(str(exc)) from None

    @field_validator("url", mode="before")
    @classmethod
    def _url(cls, value: Any) -> Any:
        if not isinstance(value, str):
            return value  # pydantic reports the type
        value = value.strip()
        try:
            check_url(value)
            return value
        except ValueError as exc:
            raise _clean(str(exc)) from None

    @field_validator("method", mode="before")
    @classmethod
    def _method(cls, value: Any) -> Any:
        return value.strip().upper() if isinstance(value, str) else value

    @field_validator("headers", mode="before")
    @classmethod
    def _headers(cls, value: Any) -> Any:
        value = _maybe_json(value)
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            return value  # pydantic reports the type
        for name, text in value.items():
            if not isinstance(name, str) or not _TOKEN.match(name):
                raise _clean(f"invalid header name {str(name)[:40]!r}")
            if name.lower() in FORBIDDEN_HEADERS:
                raise _clean(f"{name} may not be given here; name a credential in credential_id")
            if isinstance(text, str) and any(ch in text for ch in "\r\n\x00"):
                raise _clean(f"the value of {name} contains a line break or NUL")
        return value

    @field_validator("query", mode="before")
    @classmethod
    def _query(cls, value: Any) -> Any:
        value = _maybe_json(value)
        if value is None:
            return ()
        pairs: list[tuple[str, str]] = []
        if isinstance(value, Mapping):
            for key, item in value.items():
                items = item if isinstance(item, list | tuple) else [item]
                pairs.extend((str(key), _scalar(one)) for one in items)
        elif isinstance(value, list | tuple):
            for pair in value:
                if not isinstance(pair, list | tuple) or len(pair) != 2:
                    raise _clean("must be an object, or a list of [name, value] pairs")
                pairs.append((str(pair[0]), _scalar(pair[1])))
        else:
            raise _clean("must be an object, or a list of [name, value] pairs")
        return tuple(pairs)

    @property
    def host(self) -> str | None:
        return URL(self.url).host if self.url is not None else None


@functools.lru_cache(maxsize=16)  # a poller's few lists; up to 10,000 URLs each
def _checked_urls(values: tuple[str, ...]) -> tuple[str, ...]:
    """Each URL checked (cached: a poller sends the same list again and again)."""
    checked: list[str] = []
    for n, value in enumerate(values):
        value = value.strip()
        try:
            check_url(value)
        except ValueError as exc:
            raise ValueError(f"entry {n}: {exc}") from None
        checked.append(value)
    return tuple(checked)


def build_params(record: OutputRecord, settings: RESTSettings) -> RESTParams:
    """Parameters from the payload; ``url`` defaults to the record's ``source`` if it is a URL."""
    data = {k: v for k, v in record.payload.items() if v is not None}
    if "urls" in data:
        if "url" in data:
            raise BadParameter("give either url or urls, not both", field="urls")
        data.setdefault("concurrency", settings.concurrency)
    elif "url" not in data:
        source = record.source.strip()
        if "://" not in source:
            raise BadParameter(
                "no URL: give payload 'url' or a URL in the record's source", field="url"
            )
        data["url"] = source
    with_defaults(data, settings, ("timeout", "max_body", "max_redirects", "verify"))
    if settings.ca_file is not None:
        data.setdefault("ca_file", settings.ca_file)
    params = parse_params(RESTParams, data)
    if params.body is not None and params.json_body is not None:
        raise BadParameter("give either body or json, not both", field="body")
    if params.urls is not None:
        count = len(params.urls)
        check_limit(
            count,
            settings.max_urls,
            topic=TOPIC,
            setting="max_urls",
            field="urls",
            what=f"{count} URLs",
        )
    if params.max_body > settings.max_body_limit:
        raise BadParameter(
            f"at most {settings.max_body_limit} bytes (probes.settings.{TOPIC}.max_body_limit)",
            field="max_body",
        )
    return params
