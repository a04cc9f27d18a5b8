"""Helpers for end-to-end tests: a bridge in-process or as a real child process."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

from bridge.agent.bridge import Bridge
from bridge.agent.config import (
    BridgeSection,
    Config,
    LimitsConfig,
    ProbesConfig,
    SecurityConfig,
    config_env,
)
from bridge.agent.probe_contexts import validate_settings
from bridge.wire.broker import BrokerConfig
from bridge.wire.client import EccClient
from probes import REGISTRY
from probes.contract import CredentialResolver, ProbeContext, ProbeSpec
from probes.kit.ratelimit import RateLimiter

REPO = Path(__file__).resolve().parent.parent


def make_config(
    host: str,
    port: int,
    agent: str,
    state_dir: Path,
    *,
    limits: dict[str, Any] | None = None,
    shazzam: dict[str, Any] | None = None,
    broker: dict[str, Any] | None = None,
    security: dict[str, Any] | None = None,
) -> Config:
    return Config(
        broker=BrokerConfig(
            host=host, port=port, reconnect_min=0.1, reconnect_max=1.0, **(broker or {})
        ),
        bridge=BridgeSection(agent=agent, state_dir=state_dir),
        limits=LimitsConfig(**{"drain_timeout": 1.0, **(limits or {})}),
        probes=ProbesConfig.model_validate({"shazzam": shazzam or {}}),
        # Probe tests use local credentials without a platform to validate the MID;
        # the validation tests turn this back on.
        security=SecurityConfig.model_validate({"require_validation": False, **(security or {})}),
    )


def probe_settings(
    spec: ProbeSpec, table: dict[str, Any] | None = None, *, per_host: int = 8
) -> Any:
    """A probe's settings as the bridge validates them (``[probes.settings.<topic>]``)."""
    return validate_settings(spec.settings, table or {}, spec.topic, per_host_limit=per_host)


@asynccontextmanager
async def probe_context(
    spec: ProbeSpec,
    settings: dict[str, Any] | None = None,
    *,
    per_host: int = 8,
    state_dir: Path | None = None,
    credentials: CredentialResolver | None = None,
) -> AsyncIterator[ProbeContext]:
    """A probe's context as the bridge builds it: settings validated, resource opened."""
    validated = probe_settings(spec, settings, per_host=per_host)
    async with AsyncExitStack() as stack:
        resource = None
        if spec.resource is not None:
            resource = await stack.enter_async_context(spec.resource(validated, state_dir))
        yield ProbeContext(
            agent="mid.server.test",
            rate=RateLimiter(0),
            per_host_limit=per_host,
            settings=validated,
            credentials=credentials,
            resource=resource,
            state_dir=state_dir,
        )


@asynccontextmanager
async def bridge_and_client(config: Config) -> AsyncIterator[tuple[Bridge, EccClient]]:
    async with (
        Bridge(config, REGISTRY) as bridge,
        EccClient(
            config.broker, agent=config.bridge.agent, prefix=config.bridge.topic_prefix
        ) as client,
    ):
        yield bridge, client


class BridgeProcess:
    """``midbridge run`` as a child process with its log in a file."""

    def __init__(self, config: Config, log_path: Path) -> None:
        self.config = config
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self, *, ready_timeout: float = 20.0) -> None:
        self.starts += 1
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bridge", "--log-level", "info", "run"],
            env=config_env(self.config),
            stdout=log,
            stderr=log,
            cwd=REPO,
        )
        log.close()
        deadline = time.monotonic() + ready_timeout
        while time.monotonic() < deadline:
            text = self.log_path.read_bytes()[offset:].decode(errors="replace")
            if " up: " in text:
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"bridge exited {self.proc.returncode}:\n{text[-3000:]}")
            time.sleep(0.05)
        raise RuntimeError(f"bridge not up within {ready_timeout} s:\n{self.log_tail()}")

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self, timeout: float = 20.0) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        return self.proc.returncode

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid
