"""The dashboard's signed-in users: its settings, sessions in memory, and what a user may read.

``bridge/instance/dashboard.py`` serves the pages; ``docs/dashboard.md`` is the reference.
"""

from __future__ import annotations

import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass

from bridge.instance import auth
from bridge.instance.api import restrict
from bridge.instance.auth import AuthError, Principal
from bridge.instance.store import Record


@dataclass(frozen=True, slots=True)
class DashboardSettings:
    session_idle: float = 1800.0  # seconds without a request before a session ends
    session_lifetime: float = 12 * 3600.0  # seconds after sign-in, whatever happens
    login_form_ttl: float = 1800.0  # seconds a sign-in form stays valid
    max_sessions: int = 10_000  # the oldest go first beyond this
    secure_cookie: bool | None = None  # None: Secure when the request came over HTTPS
    ecc_rows: int = 50  # ECC records shown by default (at most 500)
    cmdb_rows: int = 500  # CIs shown on one page
    runs_shown: int = 20  # discovery runs on the discovery page and in runs.json


@dataclass(slots=True)
class Session:
    id: str
    user_sys_id: str
    user_name: str
    password_tag: bytes  # HMAC of the stored hash at sign-in: a new password ends the session
    csrf: str
    created: float
    seen: float
    flash: tuple[str, str] | None = None  # (kind: ok|error, text), shown once


class Sessions:
    """Signed-in sessions, in memory (a restart signs everyone out), oldest first."""

    def __init__(self, settings: DashboardSettings) -> None:
        self.settings = settings
        self._by_id: OrderedDict[str, Session] = OrderedDict()

    def __len__(self) -> int:
        return len(self._by_id)

    def create(self, user: Record, password_tag: bytes) -> Session:
        self.purge()
        now = time.monotonic()
        session = Session(
            id=secrets.token_urlsafe(32),
            user_sys_id=str(user["sys_id"]),
            user_name=str(user["user_name"]),
            password_tag=password_tag,
            csrf=secrets.token_urlsafe(32),
            created=now,
            seen=now,
        )
        self._by_id[session.id] = session
        while len(self._by_id) > self.settings.max_sessions:
            self._by_id.popitem(last=False)
        return session

    def get(self, session_id: str | None) -> Session | None:
        if not session_id:
            return None
        session = self._by_id.get(session_id)
        if session is None:
            return None
        now = time.monotonic()
        if (
            now - session.seen > self.settings.session_idle
            or now - session.created > self.settings.session_lifetime
        ):
            self.drop(session_id)
            return None
        session.seen = now
        return session

    def drop(self, session_id: str) -> None:
        self._by_id.pop(session_id, None)

    def purge(self) -> None:
        now = time.monotonic()
        for sid in [
            s.id
            for s in self._by_id.values()
            if now - s.seen > self.settings.session_idle
            or now - s.created > self.settings.session_lifetime
        ]:
            self.drop(sid)


@dataclass(slots=True)
class View:
    """The signed-in user behind a request."""

    session: Session
    who: Principal

    def may_read(self, table: str) -> bool:
        return may_read(self.who, table)

    def scoped(self, table: str, query: str) -> str:
        """``query`` narrowed to the user's own agents, as the Table API narrows it."""
        scope = auth.agent_scope(self.who, table)
        return query if scope is None else restrict(query, scope)


def may_read(who: Principal, table: str) -> bool:
    """The Table API's rule: may ``who`` read ``table``?"""
    try:
        auth.authorize_table(who, table)
        auth.authorize(who, table, "read")
    except AuthError:
        return False
    return True
