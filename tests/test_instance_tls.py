"""HTTPS for the built-in instance, its public URL, and the CLI's clients of it.

- ``midbridge instance --tls-self-signed`` (a real process): serves HTTPS with a certificate
  made beside the database, printed with its SHA-256 fingerprint and reused on restart; a
  client that trusts it connects, one that does not is refused; the CLI's own client
  (``instance agent list``) trusts it with ``--ca-file`` or ``SSL_CERT_FILE``.
- ``--tls-cert``/``--tls-key`` given; every bad TLS or URL flag is one line naming the flag,
  exit status 2.
- ``--public-url`` is the base of Location and Link.
- ``bridge.instance.tls``: the self-signed certificate (names, renewal, key file mode),
  accepted by a client that verifies strictly (``VERIFY_X509_STRICT``).
- ``midbridge demo --https`` (``run_demo(https=True)``): the demo's own client trusts the
  instance's self-signed certificate; the dashboard URL printed is https.

:class:`ServedInstance` (the instance in a thread of its own, over HTTPS or HTTP, recording
what it answered) and :func:`behaviour` / :func:`check` / :func:`same` (failures that name
the ServiceNow behaviour missing) serve ``tests/test_compat_clients.py`` too.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import re
import ssl
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
import requests
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from bridge.cli import main as midbridge_main
from bridge.console import make_console
from bridge.instance import tls
from bridge.instance.api import ApiSettings
from bridge.instance.server import Instance, InstanceConfig
from tests.harness import REPO

pytestmark = pytest.mark.timeout(120)

T = TypeVar("T")
ADMIN = "admin"
ADMIN_PW = "compat-admin-pass-123"
TABLE = "/api/now/table"


# --- the instance served from a thread (also tests/test_compat_clients.py's) ----------------


@dataclass(frozen=True, slots=True)
class Seen:
    method: str
    path: str
    status: int
    body: str  # the answer's start, for errors

    def __str__(self) -> str:
        tail = f" {self.body}" if self.body else ""
        return f"{self.method} {self.path} -> {self.status}{tail}"


@dataclass
class ServedInstance:
    """The built-in instance on a loopback port, served by an event loop in its own thread."""

    db: Path
    ssl_context: ssl.SSLContext | None = None
    cert: Path | None = None  # the certificate clients trust, when served over HTTPS
    api: ApiSettings = field(default_factory=ApiSettings)
    url: str = ""
    seen: list[Seen] = field(default_factory=list)
    instance: Instance | None = None
    _loop: asyncio.AbstractEventLoop | None = None
    _stop: asyncio.Event | None = None
    _thread: threading.Thread | None = None

    def start(self) -> ServedInstance:
        ready = threading.Event()
        failure: list[BaseException] = []

        async def serve() -> None:
            config = InstanceConfig(
                host="127.0.0.1",
                port=0,
                db=self.db,
                admin_password=ADMIN_PW,
                api=self.api,
                ssl_context=self.ssl_context,
            )
            instance = Instance(config)
            instance.app.middlewares.insert(0, self._recorder())
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            try:
                async with instance as inst:
                    self.instance = inst
                    self.url = inst.url
                    ready.set()
                    await self._stop.wait()
                await asyncio.sleep(0.2)  # TLS connections finish closing before the loop does
            except BaseException as exc:
                failure.append(exc)
                ready.set()
                raise

        def run() -> None:
            with contextlib.suppress(BaseException):
                asyncio.run(serve())

        self._thread = threading.Thread(target=run, name="compat-instance", daemon=True)
        self._thread.start()
        assert ready.wait(60), "the instance did not start within 60 s"
        if failure:
            raise failure[0]
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(30)

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the instance's loop (its store is not thread-safe)."""
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(30)

    def _recorder(self) -> Callable[..., Awaitable[web.StreamResponse]]:
        seen = self.seen

        @web.middleware
        async def record(
            request: web.Request,
            handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
        ) -> web.StreamResponse:
            try:
                response = await handler(request)
            except web.HTTPException as exc:
                seen.append(Seen(request.method, request.path_qs, exc.status, exc.text or ""))
                raise
            body = ""
            if response.status >= 400 and isinstance(response, web.Response) and response.body:
                raw = response.body
                body = raw[:400].decode(errors="replace") if isinstance(raw, bytes) else ""
            seen.append(Seen(request.method, request.path_qs, response.status, body))
            return response

        return record

    def last(self, n: int = 6) -> str:
        return "\n".join(f"    {s}" for s in self.seen[-n:]) or "    (no request reached it)"

    # --- records, straight through the store (not through the API under test) -------------

    def insert(self, table: str, fields: dict[str, Any]) -> dict[str, Any]:
        assert self.instance is not None
        return self.run(self.instance.store.insert(table, fields))

    def count(self, table: str, query: str) -> int:
        assert self.instance is not None
        return self.run(self.instance.store.count(table, query))

    def get(self, table: str, sys_id: str) -> dict[str, Any] | None:
        assert self.instance is not None
        return self.run(self.instance.store.get(table, sys_id))


@contextlib.contextmanager
def behaviour(served: ServedInstance, what: str) -> Iterator[None]:
    """Fail naming the ServiceNow behaviour ``what`` (and the last requests) on any error."""
    mark = len(served.seen)
    failure = ""
    try:
        yield
    except Exception as exc:
        failure = f"{type(exc).__name__}: {exc}"
    if failure:
        requests_seen = "\n".join(f"    {s}" for s in served.seen[mark:][-6:])
        message = (
            f"missing ServiceNow behaviour: {what}\n  {failure}\n"
            f"  requests:\n{requests_seen or '    (none reached the instance)'}"
        )
        raise pytest.fail.Exception(message, pytrace=False) from None


def check(served: ServedInstance, ok: bool, what: str, got: object) -> None:
    """Assert ``ok``; else fail naming the missing behaviour, what came back, the requests."""
    if not ok:
        pytest.fail(
            f"missing ServiceNow behaviour: {what}\n  got: {got!r}\n  requests:\n{served.last()}",
            pytrace=False,
        )


def same(served: ServedInstance, got: object, want: object, what: str) -> None:
    """Assert ``got == want``; else fail naming the missing behaviour and the requests."""
    check(served, got == want, f"{what} (want {want!r})", got)


def https_served(db: Path, api: ApiSettings | None = None) -> ServedInstance:
    """A ServedInstance (not started) over HTTPS with a self-signed certificate made by
    bridge.instance.tls beside ``db``."""
    made = tls.self_signed(db, tls.certificate_names("127.0.0.1"))
    context = tls.server_context(made.cert, made.key)
    return ServedInstance(db, ssl_context=context, cert=made.cert, api=api or ApiSettings())


# --- the CLI, as a real process -------------------------------------------------------------


@dataclass
class Started:
    proc: subprocess.Popen[str]
    url: str
    lines: list[str]

    def line(self, prefix: str) -> str:
        return next((ln for ln in self.lines if ln.startswith(prefix)), "")


@contextlib.contextmanager
def instance_process(db: Path, *flags: str) -> Iterator[Started]:
    """``midbridge instance --port 0 --db DB FLAGS...`` until it printed its signing key."""
    env = {**os.environ, "MIDBRIDGE_ADMIN_PASSWORD": ADMIN_PW}
    env.pop("SSL_CERT_FILE", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "bridge", "instance", "--port", "0", "--db", str(db), *flags],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env=env,
    )
    assert proc.stdout is not None
    lines: list[str] = []
    url = ""
    try:
        for _ in range(20):
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line.rstrip("\n"))
            if line.startswith("midbridge instance on "):
                url = line.split()[3]
            if line.startswith("platform signing key"):
                break
        assert url, (lines, proc.stderr.read() if proc.poll() is not None and proc.stderr else "")
        yield Started(proc, url, lines)
    finally:
        proc.terminate()
        _out, err = proc.communicate(timeout=20)
        assert "Traceback" not in err, err[-2000:]


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bridge", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
        env={**{k: v for k, v in os.environ.items() if k != "SSL_CERT_FILE"}, **(env or {})},
    )


def test_self_signed_https_from_the_command_line(tmp_path: Path) -> None:
    db = tmp_path / "state" / "instance.db"
    with instance_process(db, "--tls-self-signed") as first:
        assert first.url.startswith("https://127.0.0.1:"), first.lines
        cert = db.with_name("instance.db.tls-cert.pem")
        key = db.with_name("instance.db.tls-key.pem")
        assert f"TLS: self-signed certificate {cert} (made now)" in first.line("TLS: self-signed")
        assert oct(key.stat().st_mode & 0o777) == "0o600"
        printed = first.line("TLS: SHA-256 fingerprint ").split()[-1]
        pem = x509.load_pem_x509_certificate(cert.read_bytes())
        assert printed == pem.fingerprint(hashes.SHA256()).hex(":").upper()
        assert f"REQUESTS_CA_BUNDLE={cert}" in first.line("TLS: clients trust it")

        # A client that trusts the certificate connects; one that does not is refused.
        reply = requests.get(
            f"{first.url}{TABLE}/sys_user", auth=(ADMIN, ADMIN_PW), verify=str(cert), timeout=30
        )
        assert reply.status_code == 200, reply.text
        with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
            urllib.request.urlopen(f"{first.url}/", context=ssl.create_default_context())

        # The CLI's own client: refused (one line naming --ca-file), then trusting it.
        env = {"MIDBRIDGE_ADMIN_PASSWORD": ADMIN_PW}
        refused = cli("instance", "agent", "list", "--url", first.url, env=env)
        assert refused.returncode == 2, refused
        [error] = refused.stderr.splitlines()
        assert error.startswith("midbridge: error: the instance at https://"), error
        assert "--ca-file" in error, error
        trusted = cli(
            "instance", "agent", "list", "--url", first.url, "--ca-file", str(cert), env=env
        )
        assert trusted.returncode == 0, trusted.stderr
        by_env = cli(
            "instance", "agent", "list", "--url", first.url, env={**env, "SSL_CERT_FILE": str(cert)}
        )
        assert by_env.returncode == 0, by_env.stderr

    with instance_process(db, "--tls-self-signed") as again:  # reused across restarts
        assert "(reused)" in again.line("TLS: self-signed"), again.lines
        assert again.line("TLS: SHA-256 fingerprint ").split()[-1] == printed


def test_given_certificate_and_key(tmp_path: Path) -> None:
    made = tls.self_signed(tmp_path / "elsewhere" / "x.db", ("localhost", "127.0.0.1"))
    db = tmp_path / "instance.db"
    with instance_process(db, "--tls-cert", str(made.cert), "--tls-key", str(made.key)) as inst:
        assert inst.url.startswith("https://"), inst.lines
        assert inst.line("TLS: certificate ") == (
            f"TLS: certificate {made.cert} (SHA-256 fingerprint {made.fingerprint})"
        )
        reply = requests.get(
            f"{inst.url}{TABLE}/sys_user", auth=(ADMIN, ADMIN_PW), verify=str(made.cert), timeout=30
        )
        assert reply.status_code == 200, reply.text
    assert not db.with_name("instance.db.tls-cert.pem").exists()


def test_public_url_is_the_base_of_location_and_link(tmp_path: Path) -> None:
    public = "https://snow.example.com:8443/now"
    with instance_process(tmp_path / "i.db", "--public-url", public + "/") as inst:
        assert inst.line("public URL") == f"public URL (links, Location): {public}", inst.lines
        auth = (ADMIN, ADMIN_PW)
        for name in ("pub.a", "pub.b", "pub.c"):
            made = requests.post(
                f"{inst.url}{TABLE}/sys_user", json={"user_name": name}, auth=auth, timeout=30
            )
            assert made.status_code == 201, made.text
            sys_id = made.json()["result"]["sys_id"]
            assert made.headers["Location"] == f"{public}{TABLE}/sys_user/{sys_id}"
        listed = requests.get(
            f"{inst.url}{TABLE}/sys_user",
            params={"sysparm_query": "user_nameSTARTSWITHpub.", "sysparm_limit": "1"},
            auth=auth,
            timeout=30,
        )
        assert listed.status_code == 200, listed.text
        urls = [link["url"] for link in listed.links.values()]
        assert urls, listed.headers
        assert all(url.startswith(f"{public}{TABLE}/sys_user?") for url in urls), urls


# --- one-line errors, exit status 2 ---------------------------------------------------------


def other_key_pem() -> bytes:
    return ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


@pytest.mark.parametrize(
    ("flags", "error"),
    [
        (["--tls-cert", "{missing}", "--tls-key", "{key}"], "--tls-cert: no file {missing}"),
        (["--tls-cert", "{cert}", "--tls-key", "{missing}"], "--tls-key: no file {missing}"),
        (["--tls-cert", "{dir}", "--tls-key", "{key}"], "--tls-cert: {dir} is a directory"),
        (["--tls-cert", "{cert}"], "--tls-cert: needs --tls-key (the certificate's private key)"),
        (["--tls-key", "{key}"], "--tls-key: needs --tls-cert (the certificate it belongs to)"),
        (
            ["--tls-cert", "{junk}", "--tls-key", "{key}"],
            "--tls-cert: {junk} holds no PEM certificate",
        ),
        (
            ["--tls-cert", "{cert}", "--tls-key", "{junk}"],
            "--tls-key: {junk} holds no PEM private key",
        ),
        (
            ["--tls-cert", "{cert}", "--tls-key", "{other}"],
            "--tls-key: {other} is not the key of the certificate in {cert}",
        ),
        (
            ["--tls-self-signed", "--tls-cert", "{cert}"],
            "--tls-cert: not with --tls-self-signed (give one or the other)",
        ),
        (
            ["--public-url", "ftp://snow.example.com"],
            "--public-url: 'ftp://snow.example.com' must start with https:// or http://",
        ),
        (
            ["--public-url", "https://snow.example.com/?a=1"],
            "--public-url: 'https://snow.example.com/?a=1' must not have a query or fragment",
        ),
        (["--public-url", "https:///now"], "--public-url: 'https:///now' has no host"),
        (
            ["--public-url", "snow.example.com"],
            "--public-url: 'snow.example.com' must start with https:// or http://",
        ),
    ],
)
def test_bad_flags_are_one_line_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str], error: str
) -> None:
    made = tls.self_signed(tmp_path / "made" / "x.db", ("localhost",))
    other = tmp_path / "other.pem"
    other.write_bytes(other_key_pem())
    junk = tmp_path / "junk.pem"
    junk.write_text("not PEM at all\n")
    names = {
        "missing": str(tmp_path / "missing.pem"),
        "cert": str(made.cert),
        "key": str(made.key),
        "dir": str(tmp_path),
        "junk": str(junk),
        "other": str(other),
    }
    argv = ["instance", "--port", "0", "--db", str(tmp_path / "i.db")]
    argv += [flag.format(**names) for flag in flags]
    assert midbridge_main(argv) == 2
    err = capsys.readouterr().err
    assert err == f"midbridge: error: {error.format(**names)}\n"
    assert not (tmp_path / "i.db").exists(), "nothing started"


def test_bad_flags_from_a_real_process(tmp_path: Path) -> None:
    done = cli(
        "instance", "--port", "0", "--tls-cert", str(tmp_path / "nope.pem"), "--tls-key", "k"
    )
    assert done.returncode == 2
    assert done.stderr == f"midbridge: error: --tls-cert: no file {tmp_path / 'nope.pem'}\n"
    done = cli("instance", "agent", "list", "--ca-file", str(tmp_path / "ca.pem"))
    assert done.returncode == 2
    assert done.stderr == f"midbridge: error: --ca-file: no file {tmp_path / 'ca.pem'}\n"


# --- bridge.instance.tls --------------------------------------------------------------------


def test_self_signed_names_renewal_and_key_mode(tmp_path: Path) -> None:
    db = tmp_path / "instance.db"
    first = tls.self_signed(db, tls.certificate_names("127.0.0.1"))
    assert first.made == "new"
    assert set(first.names) == {"localhost", "127.0.0.1", "::1"}
    assert tls.self_signed(db, tls.certificate_names("localhost")).made == ""
    wider = tls.self_signed(db, tls.certificate_names("10.1.2.3", ["snow.example.com"]))
    assert wider.made == "renewed"  # a new name: a new certificate for the same key
    assert {"10.1.2.3", "snow.example.com", "localhost", "127.0.0.1", "::1"} <= set(wider.names)
    assert wider.fingerprint != first.fingerprint
    assert tls.self_signed(db, tls.certificate_names("127.0.0.1")).made == ""  # names kept
    anywhere = tls.certificate_names("0.0.0.0")
    assert "0.0.0.0" not in anywhere
    assert len(anywhere) == 4  # this machine's name instead
    first.key.chmod(0o644)
    with pytest.raises(tls.TlsError, match="is open to others"):
        tls.self_signed(db, ())


def test_a_strict_client_accepts_the_self_signed_certificate(tmp_path: Path) -> None:
    served = https_served(tmp_path / "instance.db").start()
    try:
        assert served.cert is not None
        context = ssl.create_default_context(cafile=str(served.cert))
        context.verify_flags |= ssl.VERIFY_X509_STRICT  # Python 3.13's default
        # The handshake passes; the API then asks for credentials.
        with pytest.raises(urllib.error.HTTPError, match="HTTP Error 401") as refused:
            urllib.request.urlopen(f"{served.url}/api/now/table/sys_user", context=context)
        refused.value.close()
    finally:
        served.stop()


def test_no_plain_http_warning_when_serving_https() -> None:
    from bridge.instance.cli import insecure_settings

    assert insecure_settings("0.0.0.0", None, https=True) == []
    [warning] = insecure_settings("0.0.0.0", None)
    assert "over plain HTTP" in warning


def test_client_context_and_public_url() -> None:
    assert (
        tls.check_public_url("HTTPS://Snow.Example.com:443/a/b/")
        == "https://snow.example.com:443/a/b"
    )
    assert tls.check_public_url("http://[::1]:8080") == "http://[::1]:8080"
    with pytest.raises(tls.TlsError, match=r"^--public-url: .* must not hold a user"):
        tls.check_public_url("https://me:pw@snow.example.com")
    with pytest.raises(tls.TlsError, match=r"^--public-url: .* is not a URL"):
        tls.check_public_url("https://snow.example.com:99999")
    with pytest.raises(tls.TlsError, match=r"^--ca-file: no file"):
        tls.client_context(Path("/nonexistent/ca.pem"))


# --- the demo over HTTPS ---------------------------------------------------------------------


async def test_demo_over_https() -> None:
    from bridge.demo import loop as demo

    out = io.StringIO()
    console = make_console(out, width=200, force_terminal=False)
    code = await demo.run_demo(embedded="amqtt", hosts=40, console=console, https=True)
    text = out.getvalue()
    assert code == 0, text[-3000:]
    assert re.search(r"instance: https://127\.0\.0\.1:\d+ ", text), text
    assert re.search(r"SHA-256 fingerprint ([0-9A-F]{2}:){31}[0-9A-F]{2}", text), text
    assert re.search(r"dashboard: https://127\.0\.0\.1:\d+/ ", text), text
    assert "discovery Completed" in text
