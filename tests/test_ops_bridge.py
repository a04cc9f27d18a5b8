"""Operating a running bridge (issue 17): a log line per job, /metrics, /livez and /readyz,
waiting for a broker that starts late. Every bridge here is a real ``midbridge run``
child process on a real mosquitto."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families

from bridge.agent.config import Config, config_env
from bridge.demo.broker import free_port
from bridge.wire.client import EccClient, output_record
from tests.brokers import BrokerAddress, MosquittoServer
from tests.harness import REPO, BridgeProcess, make_config


def _config(host: str, port: int, agent: str, tmp_path: Path, **top: Any) -> Config:
    config = make_config(host, port, agent, tmp_path / "state")
    return config.model_copy(update={"metrics_port": free_port("127.0.0.1"), **top})


def _read(path: Path) -> str:
    return path.read_text()


def _json_lines(path: Path) -> list[dict[str, Any]]:
    lines = []
    for line in path.read_text().splitlines():
        assert line.startswith("{"), f"not a JSON log line: {line!r}"
        lines.append(json.loads(line))
    return lines


async def _get(url: str) -> tuple[int, str, str]:
    async with aiohttp.ClientSession() as http, http.get(url) as resp:
        return resp.status, resp.headers.get("Content-Type", ""), await resp.text()


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def _run_logged(config: Config, log_path: Path, *args: str) -> subprocess.Popen[bytes]:
    with log_path.open("w") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "bridge", "run", *args],
            env=config_env(config),
            stdout=log,
            stderr=log,
            cwd=REPO,
        )


async def _wait_up(proc: subprocess.Popen[bytes], log_path: Path, seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while " up: " not in (text := _read(log_path)):
        assert proc.poll() is None, text
        assert time.monotonic() < deadline, text
        await asyncio.sleep(0.05)


async def test_job_log_lines_in_json_and_metrics(
    broker: BrokerAddress, unique_agent: str, tmp_path: Path
) -> None:
    config = _config(broker.host, broker.port, unique_agent, tmp_path, log_format="json")
    log_path = tmp_path / "bridge.log"
    # A success is logged at DEBUG (cheap when off), a failure at WARNING.
    proc = _run_logged(config, log_path, "--log-level", "debug")
    await _wait_up(proc, log_path)
    agent = f"mid.server.{unique_agent}"
    base = f"http://127.0.0.1:{config.metrics_port}"
    try:
        async with EccClient(config.broker, agent=unique_agent) as client:
            ok = output_record(
                "Echo", agent=agent, payload={"message": "x"}, agent_correlator="c-1"
            )
            unknown = output_record("NoSuchProbe", agent=agent, agent_correlator="c-2")
            slow = output_record("Echo", agent=agent, payload={"delay": 5}, timeout=0.2, priority=0)
            await client.send([ok, unknown, slow])
            await client.wait([ok["sys_id"], unknown["sys_id"], slow["sys_id"]], timeout=20)
        status, content_type, text = await _get(f"{base}/metrics")
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    assert proc.returncode == 0
    assert status == 200
    assert content_type == CONTENT_TYPE_LATEST

    # One log line per job, JSON, the job's fields as keys; WARNING for the failures.
    lines = _json_lines(log_path)
    assert {"ts", "level", "logger", "message"} <= set(lines[0])
    jobs = {line["sys_id"]: line for line in lines if line["logger"] == "midbridge.jobs"}
    assert set(jobs) == {ok["sys_id"], unknown["sys_id"], slow["sys_id"]}
    done = jobs[ok["sys_id"]]
    assert (done["level"], done["topic"], done["result"]) == ("debug", "Echo", "ok")
    assert (done["agent_correlator"], done["lane"]) == ("c-1", "standard")
    assert 0 <= done["duration_ms"] < 5000
    refused = jobs[unknown["sys_id"]]
    assert (refused["level"], refused["result"], refused["error_kind"]) == (
        "warning",
        "error",
        "unknown_topic",
    )
    assert refused["agent_correlator"] == "c-2"
    late = jobs[slow["sys_id"]]
    assert (late["level"], late["error_kind"], late["lane"]) == (
        "warning",
        "timeout",
        "interactive",
    )
    assert 150 <= late["duration_ms"] < 5000

    # /metrics as Prometheus parses it: histograms, named lanes, no placeholder series.
    samples = _samples(text)
    assert samples[("midbridge_jobs_total", (("result", "ok"), ("topic", "Echo")))] == 1
    assert samples[("midbridge_jobs_total", (("result", "timeout"), ("topic", "Echo")))] == 1
    key = ("midbridge_jobs_total", (("result", "unknown_topic"), ("topic", "NoSuchProbe")))
    assert samples[key] == 1
    assert samples[("midbridge_job_duration_seconds_count", (("topic", "Echo"),))] == 2
    buckets = {
        dict(labels)["le"]: value
        for (name, labels), value in samples.items()
        if name == "midbridge_job_duration_seconds_bucket" and ("topic", "Echo") in labels
    }
    assert len(buckets) > 10
    assert buckets["+Inf"] == 2
    assert buckets["0.1"] == 1  # the echo, not the 0.2 s timeout
    # Every enabled topic has its series from zero; SNMP ran nothing.
    assert samples[("midbridge_job_duration_seconds_count", (("topic", "SNMP"),))] == 0
    lanes = {
        dict(labels)["lane"]
        for (name, labels), _v in samples.items()
        if name == "midbridge_lane_workers"
    }
    assert lanes == {"interactive", "expedited", "standard", "control"}
    assert samples[("midbridge_lane_workers", (("lane", "standard"),))] == 100
    assert samples[("midbridge_broker_connected", (("session", "bulk"),))] == 1
    assert samples[("midbridge_outbox_records", ())] >= 0
    assert ("midbridge_outbox_oldest_age_seconds", ()) in samples
    assert samples[("midbridge_ready", ())] == 1
    from bridge import __version__

    assert samples[("midbridge_build_info", (("version", __version__),))] == 1
    assert samples[("process_cpu_seconds_total", ())] > 0
    assert samples[("process_resident_memory_bytes", ())] > 0
    placeholders = [
        key
        for key in samples
        if key[0].startswith("midbridge_") and any(v in ("none", "", "0") for _l, v in key[1])
    ]
    assert not placeholders


async def test_livez_and_readyz_through_a_broker_outage(
    private_broker: MosquittoServer, unique_agent: str, tmp_path: Path
) -> None:
    config = _config(private_broker.host, private_broker.port, unique_agent, tmp_path)
    bridge = BridgeProcess(config, tmp_path / "bridge.log")
    bridge.start()
    base = f"http://127.0.0.1:{config.metrics_port}"

    async def wait_ready(want: int, seconds: float = 20.0) -> dict[str, Any]:
        deadline = time.monotonic() + seconds
        while True:
            status, _ct, body = await _get(f"{base}/readyz")
            if status == want or time.monotonic() > deadline:
                assert status == want, body
                parsed: dict[str, Any] = json.loads(body)
                return parsed
            await asyncio.sleep(0.1)

    try:
        assert (await wait_ready(200))["status"] == "ok"
        private_broker.stop()
        down = await wait_ready(503)
        assert any("not connected" in p for p in down["problems"]), down
        status, _ct, body = await _get(f"{base}/livez")
        assert status == 200, body  # a broker outage never fails liveness
        status, _ct, body = await _get(f"{base}/healthz")  # as /readyz, with the counters
        assert status == 503
        assert "received" in json.loads(body)
        _s, _ct, text = await _get(f"{base}/metrics")
        assert _samples(text)[("midbridge_ready", ())] == 0
        private_broker.start()
        await wait_ready(200, 30)
    finally:
        assert bridge.stop() == 0


def _run(config: Config, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "bridge", "run", *args],
        env=config_env(config),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )


async def test_wait_for_broker_with_a_broker_that_starts_late(
    unique_agent: str, tmp_path: Path
) -> None:
    late = MosquittoServer(tmp_path / "late", port=free_port("127.0.0.1"))
    config = _config(late.host, late.port, unique_agent, tmp_path, log_format="json")
    log_path = tmp_path / "bridge.log"
    proc = _run_logged(config, log_path, "--wait-for-broker", "60")
    base = f"http://127.0.0.1:{config.metrics_port}"
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            failures = [
                line for line in _json_lines(log_path) if line.get("error_kind") == "refused"
            ]
            if len(failures) >= 2:
                break
            assert proc.poll() is None, log_path.read_text()
            await asyncio.sleep(0.1)
        assert len(failures) >= 2, log_path.read_text()
        assert "refused the TCP connection" in failures[0]["message"]
        assert failures[0]["level"] == "warning"
        # Waiting: alive, not ready.
        assert (await _get(f"{base}/livez"))[0] == 200
        status, _ct, body = await _get(f"{base}/readyz")
        assert status == 503
        assert "refused" in body
        late.start()
        deadline = time.monotonic() + 30
        while " up: " not in log_path.read_text() and time.monotonic() < deadline:
            assert proc.poll() is None, log_path.read_text()
            await asyncio.sleep(0.1)
        assert " up: " in log_path.read_text()
        deadline = time.monotonic() + 10
        while (await _get(f"{base}/readyz"))[0] != 200 and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert (await _get(f"{base}/readyz"))[0] == 200
        insecure = [line for line in _json_lines(log_path) if "insecure default" in line["message"]]
        assert len(insecure) == 2  # said once per start, not once per try
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        late.close()
    assert proc.returncode == 0
    assert "Traceback" not in log_path.read_text()


def test_wait_for_broker_gives_up_naming_the_cause(tmp_path: Path) -> None:
    config = make_config("127.0.0.1", free_port("127.0.0.1"), "t-giveup", tmp_path / "state")
    started = time.monotonic()
    proc = _run(config, "--wait-for-broker", "1.5")
    _out, err = proc.communicate(timeout=30)
    assert proc.returncode == 2
    assert time.monotonic() - started < 15
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("midbridge: error: refused: broker: the broker at 127.0.0.1:"), last
    assert err.count("broker refused (attempt") >= 2, err  # each failure logged with its cause


def test_unresolvable_broker_is_unreachable_and_a_bad_password_not_authorised(
    mosquitto_factory: Any, tmp_path: Path
) -> None:
    config = make_config("no-such-broker.invalid", 1883, "t-names", tmp_path / "state")
    proc = _run(config, "--wait-for-broker", "0")
    _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 2
    last = err.strip().splitlines()[-1]
    want = "midbridge: error: unreachable: broker: cannot reach the broker at no-such-broker."
    assert last.startswith(want), err
    server = mosquitto_factory(users={"mid": "right-password"})
    config = make_config(
        server.host,
        server.port,
        "t-names",
        tmp_path / "state2",
        broker={"username": "mid", "password": "wrong-password"},
    )
    started = time.monotonic()
    proc = _run(config)  # waiting for ever: but a refused login is not retried
    _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert time.monotonic() - started < 20
    last = err.strip().splitlines()[-1]
    assert last.startswith("midbridge: error: not_authorised: broker: the broker at"), err
    assert "bad user name or password" in last or "not authorised" in last
    assert "Traceback" not in err


def test_debug_shows_no_packet_dumps_trace_does(broker: BrokerAddress, tmp_path: Path) -> None:
    counts = {}
    for level in ("debug", "trace"):
        config = make_config(broker.host, broker.port, f"t-lvl-{level}", tmp_path / level)
        config = config.model_copy(update={"log_format": "json"})
        env = config_env(config)
        proc = subprocess.Popen(
            [sys.executable, "-m", "bridge", "run", "--log-level", level],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
        )
        assert proc.stderr is not None
        lines = []
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            lines.append(json.loads(line))
            if " up: " in lines[-1]["message"]:
                break
        proc.terminate()
        _out, rest = proc.communicate(timeout=20)
        assert proc.returncode == 0
        lines += [json.loads(line) for line in (rest or "").splitlines() if line]
        counts[level] = sum(1 for line in lines if "gmqtt" in line["logger"])
        assert any(" up: " in line["message"] for line in lines), level
    assert counts["debug"] == 0
    assert counts["trace"] > 0  # gmqtt's packet dumps, at its DEBUG, let through by trace
