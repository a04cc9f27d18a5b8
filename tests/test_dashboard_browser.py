"""The dashboard in a real browser: Debian's headless Chromium through Selenium against
the instance, its broker connector and a real bridge on a private Mosquitto: sign in,
validate the agent, start a discovery, watch the CIs appear; every page at 1280 px and
390 px without sideways scrolling; screenshots saved and checked. The plain HTTP tests of
the dashboard are in tests/test_dashboard.py."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from aiohttp import web
from selenium import webdriver
from selenium.common.exceptions import WebDriverException
from selenium.webdriver.chrome.service import Service as ChromeService
from selenium.webdriver.chrome.webdriver import WebDriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support.wait import WebDriverWait
from yarl import URL

from bridge.agent.bridge import Bridge
from bridge.instance import discovery
from bridge.instance.connector import Connector, ConnectorSettings, install, keys_for
from bridge.instance.server import Instance, InstanceConfig
from bridge.wire.broker import BrokerConfig
from probes import REGISTRY
from tests.brokers import MosquittoServer
from tests.harness import REPO, make_config

pytestmark = pytest.mark.timeout(60)

ADMIN_PW = "admin-pass-123"
T = TypeVar("T")


@pytest.fixture
async def inst(tmp_path: Path) -> AsyncIterator[Instance]:
    config = InstanceConfig(db=tmp_path / "instance.db", admin_password=ADMIN_PW)
    async with Instance(config) as instance:
        yield instance


# --- the browser ------------------------------------------------------------------------------

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
DOCS_SCREENSHOT = REPO / "docs" / "img" / "dashboard.png"
WIDTHS = (1280, 390)  # a desktop and a phone


@pytest.fixture
def chrome(tmp_path: Path) -> Iterator[WebDriver]:
    """Debian's headless Chromium through its chromedriver (never a downloaded browser).
    Fails, never skips, when they are missing: ``scripts/test`` installs them."""
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if missing:
        pytest.fail(
            f"{', '.join(missing)} missing: apt-get install chromium chromium-driver",
            pytrace=False,
        )
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    profile = tmp_path / "chromium-profile"
    profile.mkdir()
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        "--window-size=1280,860",
        "--lang=en-US",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=ChromeService(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(20)
    try:
        yield driver
    finally:
        driver.quit()


class Chromium:
    """The browser, driven from the event loop: every WebDriver call runs in a thread so
    the instance (on this loop) keeps serving Chromium's requests."""

    def __init__(self, driver: WebDriver, base: str, shots: Path) -> None:
        self.driver = driver
        self.base = base
        self.shots = shots

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.to_thread(fn, *args)

    async def open(self, path: str) -> None:
        await self.call(self.driver.get, self.base + path)

    async def path(self) -> str:
        url = await self.call(lambda: self.driver.current_url)
        return URL(url).path_qs

    async def text(self, css: str) -> str:
        def read() -> str:
            found = self.driver.find_elements(By.CSS_SELECTOR, css)
            return found[0].text if found else ""

        return await self.call(read)

    async def submit(self, css: str) -> None:
        """Click a form's button and wait for the page it leads to."""

        def go() -> None:
            before = self.driver.find_element(By.TAG_NAME, "html")
            self.driver.find_element(By.CSS_SELECTOR, css).click()
            wait = WebDriverWait(self.driver, 20)

            def left(_driver: WebDriver) -> bool:
                # Chromium 156 sometimes answers "Node ... does not belong to the document"
                # (an unknown error) instead of a stale-element error: both mean it is gone.
                try:
                    before.is_enabled()
                except WebDriverException:
                    return True
                return False

            wait.until(left)
            wait.until(lambda d: d.execute_script("return document.readyState") == "complete")

        await self.call(go)

    async def type(self, css: str, text: str) -> None:
        def fill() -> None:
            element = self.driver.find_element(By.CSS_SELECTOR, css)
            element.clear()
            element.send_keys(text)

        await self.call(fill)

    async def sign_in(self, user: str, password: str) -> None:
        await self.open("/login")
        await self.type("#user_name", user)
        await self.type("#password", password)
        await self.submit("#sign-in")
        assert await self.text("#signed-in-as") == user

    async def screenshot(self, name: str) -> Path:
        path = self.shots / f"{name}.png"
        assert await self.call(self.driver.save_screenshot, str(path))
        return path

    async def at_widths(self, path: str, name: str) -> list[Path]:
        """Open ``path`` at 1280 px and at 390 px (a phone): the page never scrolls
        sideways (wide tables scroll in their own box); a screenshot of each, checked."""
        shots = []
        for width in WIDTHS:
            await self.call(self.driver.set_window_size, width, 860)
            await self.open(path)
            inner, scroll = await self.call(
                self.driver.execute_script,
                "return [window.innerWidth, document.scrollingElement.scrollWidth];",
            )
            assert inner == width, f"the window is {inner} px wide, not {width}"
            if scroll > inner:
                shot = await self.screenshot(f"failed-{name}-{width}")
                raise AssertionError(
                    f"{path} at {width} px scrolls sideways: {scroll} > {inner} (see {shot})"
                )
            shot = await self.screenshot(f"{name}-{width}")
            head = shot.read_bytes()[:24]
            assert head[:8] == b"\x89PNG\r\n\x1a\n", shot
            assert int.from_bytes(head[16:20], "big") == width, shot  # IHDR width
            shots.append(shot)
        await self.call(self.driver.set_window_size, 1280, 860)
        return shots

    async def until(
        self,
        what: str,
        check: Callable[[], Awaitable[bool]],
        *,
        timeout: float = 30.0,
        reload: bool = False,
    ) -> None:
        """Poll ``check`` (reloading the page first when ``reload``) for at most
        ``timeout`` seconds; a failure leaves a screenshot behind."""
        deadline = time.monotonic() + timeout
        while True:
            if await check():
                return
            if time.monotonic() > deadline:
                shot = await self.screenshot("failed-" + re.sub(r"\W+", "-", what)[:40])
                raise AssertionError(f"{what}: not within {timeout:g} s (see {shot})")
            await asyncio.sleep(0.3)
            if reload:
                await self.call(self.driver.refresh)


async def test_browser_discovery_progress_comes_live(
    inst: Instance, chrome: WebDriver, tmp_path: Path
) -> None:
    """The discovery page follows a run without reloading (its script polls
    ``/discovery/runs.json``), and reloads itself for a run it does not show yet."""
    assert inst.dashboard is not None
    inst.dashboard.set_start_run(None)
    run = await inst.store.insert(
        "discovery_status",
        {"name": "lab", "state": "Scanning", "progress": 10.0, "addresses": 256, "scanned": 25},
    )
    page = Chromium(chrome, inst.url, tmp_path)
    await page.sign_in("admin", ADMIN_PW)
    await page.open("/discovery")
    row = f'#runs tr[data-run="{run["sys_id"]}"]'
    assert await page.text(f"{row} [data-field=progress]") == "10"
    await page.call(chrome.execute_script, "window.__sameDocument = true;")

    async def same_document() -> bool:
        return bool(await page.call(chrome.execute_script, "return window.__sameDocument;"))

    await inst.store.update(
        "discovery_status", run["sys_id"], {"progress": 55.4, "scanned": 141, "alive": 3}
    )

    async def halfway() -> bool:
        return (
            await page.text(f"{row} [data-field=progress]") == "55"
            and await page.text(f"{row} [data-field=scanned]") == "141"
            and await page.text(f"{row} [data-field=alive]") == "3"
        )

    await page.until("progress 55 %", halfway, timeout=10)
    bar = await page.call(
        lambda: chrome.find_element(By.CSS_SELECTOR, f"{row} progress").get_property("value")
    )
    assert bar == 55
    await inst.store.update(
        "discovery_status",
        run["sys_id"],
        {"state": "Completed", "progress": 100.0, "completed": "2026-01-01 00:00:00"},
    )

    async def completed() -> bool:
        return await page.text(f"{row} [data-field=state]") == "Completed"

    await page.until("run Completed", completed, timeout=10)
    badge = await page.call(
        lambda: chrome.find_element(By.CSS_SELECTOR, f"{row} .badge").get_attribute("class")
    )
    assert badge == "badge ok"
    assert await same_document()

    newer = await inst.store.insert("discovery_status", {"name": "next", "state": "Scanning"})

    async def shown() -> bool:
        return bool(await page.text(f'#runs tr[data-run="{newer["sys_id"]}"]'))

    await page.until("the new run shown", shown, timeout=15)
    assert not await same_document()  # the page reloaded itself for it


async def lab_web_server() -> tuple[web.AppRunner, int]:
    """A web server on loopback for discovery to find and classify (RESTProbe GET /)."""

    async def home(request: web.Request) -> web.Response:
        return web.Response(
            text="<html><head><title>Lab web server</title></head><body>hi</body></html>",
            content_type="text/html",
            headers={"Server": "lab-httpd/1.0"},
        )

    app = web.Application()
    app.router.add_get("/", home)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = int(runner.addresses[0][1])
    return runner, port


@pytest.mark.slow
@pytest.mark.timeout(240)
async def test_browser_admin_validates_the_agent_runs_discovery_and_sees_cis(
    private_broker: MosquittoServer, unique_agent: str, tmp_path: Path, chrome: WebDriver
) -> None:
    """The acceptance test: sign in through the form, see the agent Up, validate it with
    the dashboard's button, start a discovery from the discovery page, watch its progress
    live, and see the CIs appear in the CMDB page. Real Chromium, instance, connector,
    broker, bridge and a web server to discover."""
    shots = tmp_path / "screenshots"
    shots.mkdir()
    host, port = private_broker.host, private_broker.port
    prefix = "t" + uuid.uuid4().hex[:12]
    db = tmp_path / "instance" / "instance.db"
    keys = keys_for(db)
    inst = Instance(InstanceConfig(db=db, admin_password=ADMIN_PW))
    install(inst, keys)  # agent actions, platform key, sealed credentials
    discovery.install(inst)  # the engine; the dashboard's Run button uses it
    connector = Connector(
        inst.store,
        BrokerConfig(host=host, port=port, reconnect_min=0.1, reconnect_max=1.0),
        settings=ConnectorSettings(
            prefix=prefix, client_id=f"inst-{prefix}", sweep_interval=0.5,
            lease_check_interval=0.2,
        ),
        keys=keys,
    )  # fmt: skip
    web_runner, web_port = await lab_web_server()
    config = make_config(
        host, port, unique_agent, tmp_path / "bridge",
        security={"require_signatures": True, "platform_key": keys.public_key_b64},
    )  # fmt: skip
    config.bridge.topic_prefix = prefix
    try:
        async with inst, connector, Bridge(config, REGISTRY) as bridge:
            assert inst.dashboard is not None
            assert inst.dashboard.start_run is not None  # found the discovery engine
            await inst.store.insert(
                "discovery_schedule",
                {"name": "lab", "ranges": "127.0.0.1", "agent": unique_agent,
                 "ports": str(web_port), "http_ports": str(web_port), "https_ports": "",
                 "ssh_ports": ""},
            )  # fmt: skip
            page = Chromium(chrome, inst.url, shots)
            row = f'tr[data-agent="{unique_agent}"]'

            # Sign in through the form; the page asked for comes next.
            await page.open("/agents")
            assert await page.path() == "/login?next=/agents"
            await page.type("#user_name", "admin")
            await page.type("#password", "not-the-password")
            await page.submit("#sign-in")
            assert await page.text("#login-error") == "Invalid user name or password."
            await page.type("#password", ADMIN_PW)
            await page.submit("#sign-in")
            assert await page.path() == "/agents"
            assert await page.text("#signed-in-as") == "admin"

            # The agent is Up, not yet validated; validate it with the button.
            async def agent_up() -> bool:
                return await page.text(f"{row} [data-field=status]") == "Up"

            await page.until("agent Up", agent_up, reload=True)
            assert (await page.text(f"{row} [data-field=validated]")).startswith("not validated")
            await page.submit(f'{row} button[data-action="validate"]')
            assert (await page.text("#flash")).startswith(f"validate sent to {unique_agent}")

            async def agent_validated() -> bool:
                cell = await page.text(f"{row} [data-field=validated]")
                return cell.startswith("validated")

            await page.until("agent validated", agent_validated, reload=True)
            assert await page.text(f"{row} [data-field=status]") == "Up"
            assert bridge.identity.validated
            buttons = await page.call(
                lambda: [
                    b.get_attribute("data-action")
                    for b in chrome.find_elements(By.CSS_SELECTOR, f"{row} button[data-action]")
                ]
            )
            assert buttons == ["invalidate", "pause", "drain"]  # what an Up, valid MID takes
            heartbeat = await page.text(f"{row} td:nth-child(6)")
            assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC", heartbeat), heartbeat
            await page.screenshot("agents")

            # Start the discovery from its page; progress comes live (no reload).
            await page.open("/discovery")
            await page.submit('button[data-run-schedule="lab"]')
            assert (await page.text("#flash")).startswith("Discovery lab started")
            await page.call(chrome.execute_script, "window.__sameDocument = true;")
            run = "#runs tr[data-run] [data-field=state]"

            async def run_completed() -> bool:
                return await page.text(run) == "Completed"

            await page.until("discovery run Completed", run_completed, timeout=90)
            same = await page.call(chrome.execute_script, "return window.__sameDocument;")
            assert same is True, "the page was reloaded: progress did not come live"
            assert await page.text("#runs tr[data-run] [data-field=progress]") == "100"
            assert await page.text("#runs tr[data-run] [data-field=alive]") == "1"
            await page.screenshot("discovery")

            # The CIs appear in the CMDB.
            await page.open("/cmdb")

            async def ci_shown() -> bool:
                return "127.0.0.1" in await page.text('table[data-class="cmdb_ci_web_server"]')

            await page.until("web server CI", ci_shown, reload=True)
            table = await page.text('table[data-class="cmdb_ci_web_server"]')
            assert "Lab web server" in table
            assert str(web_port) in table
            cmdb_shot = await page.screenshot("cmdb")
            [ci] = await inst.store.query("cmdb_ci", "sys_class_name=cmdb_ci_web_server")
            assert ci["ip_address"] == "127.0.0.1"

            # The overview sums it up; it is the screenshot the docs show (kept small).
            await page.open("/")
            assert await page.text("#card-agents .big") == "1 up of 1"
            assert await page.text("#card-cmdb .big") == "1 CI"
            overview = await page.screenshot("overview")

            # Every page at a desktop's and a phone's width: no sideways scroll, even with a
            # switch of many MACs in the CMDB (the column wraps, one MAC a line).
            macs = ",".join(f"00:1b:54:aa:bb:{i:02x}" for i in range(24))
            await inst.store.insert(
                "cmdb_ci",
                {"name": "core-switch-with-a-long-name-01.example.net", "ip_address": "10.9.9.9",
                 "sys_class_name": "cmdb_ci_netgear", "mac_address": macs,
                 "serial_number": "FOC" + "1234567890" * 3,
                 "sys_descr": "Cisco IOS Software, C3750E Software " * 4},
            )  # fmt: skip
            for route, name in (("/", "overview"), ("/agents", "agents"), ("/ecc", "ecc"),
                                ("/discovery", "discovery"), ("/cmdb", "cmdb")):  # fmt: skip
                await page.at_widths(route, f"{name}-width")
            await page.open("/cmdb")
            assert await page.text("#ci-count") == "2 CIs."
            inner = await page.call(
                chrome.execute_script,
                "return [...document.querySelectorAll('div.scroll')]"
                ".map(d => d.scrollWidth - d.clientWidth);",
            )
            assert inner, "the CMDB's tables are in their scroll boxes"
            assert max(inner) <= 0, f"a CMDB table is wider than the page at 1280 px: {inner}"
            assert "00:1b:54:aa:bb:17" in await page.text('table[data-class="cmdb_ci_netgear"]')
            for path in (shots / "agents.png", shots / "discovery.png", cmdb_shot, overview):
                assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
                assert path.stat().st_size < 300_000, path
            print(f"\nscreenshots: {shots}")
            if os.environ.get("MIDBRIDGE_UPDATE_DOC_IMAGES") == "1":  # refresh the docs' copy
                DOCS_SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(overview, DOCS_SCREENSHOT)
    finally:
        await web_runner.cleanup()
