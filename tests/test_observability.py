"""The operator's kit (tickpipe/observability): alert rules, dashboard, scrape config, compose.

The metric names the dashboard and the rules use are checked against the real
/metrics of an ingest and a flusher process, so a renamed metric fails here.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
import yaml
from redis.asyncio import Redis

from tests.client.conftest import Services, eventually, make_ticks
from tests.conftest import TEST_TOKEN
from tickpipe.client import TickClient, TicksFailed
from tickpipe.lab.stack import free_port

ROOT = Path(__file__).resolve().parent.parent
KIT = ROOT / "tickpipe" / "observability"
RULES = KIT / "tickpipe-alerts.yml"
DASHBOARD = KIT / "grafana" / "tickpipe.json"
METRIC = re.compile(r"\btickpipe_[a-z0-9_]+")
JOB = re.compile(r'job="([^"]+)"')


def rule_exprs() -> list[str]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule["expr"] for group in groups for rule in group["rules"]]


def dashboard_exprs() -> list[str]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [target["expr"] for panel in panels for target in panel["targets"]]


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    """Run promtool (a failure, not a skip, where it is missing)."""
    path = shutil.which("promtool")
    assert path is not None, (
        "promtool is not on PATH: `make promtool` installs it (Debian's prometheus package)"
    )
    return subprocess.run([path, *args], capture_output=True, text=True, check=False, cwd=KIT)


def test_alert_rules_pass_promtool() -> None:
    result = promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rule_exprs())} rules found" in result.stdout


def test_each_alert_fires_when_it_should_and_only_then() -> None:
    """tickpipe-alerts.test.yml: promtool's unit tests of the rules, on made-up series."""
    result = promtool("test", "rules", "tickpipe-alerts.test.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    tested = set(re.findall(r"alertname: (\w+)", (KIT / "tickpipe-alerts.test.yml").read_text()))
    assert tested == {
        rule["alert"] for g in yaml.safe_load(RULES.read_text())["groups"] for rule in g["rules"]
    }


def test_the_rules_cover_what_an_operator_must_hear_about() -> None:
    exprs = "\n".join(rule_exprs())
    for metric in (
        "tickpipe_flusher_lost_total",
        "tickpipe_flusher_dead_lettered_total",
        "tickpipe_flusher_oldest_pending_seconds",
        "tickpipe_flusher_lag",
        "tickpipe_ingest_requests_rejected_total",
    ):
        assert metric in exprs
    assert 'up{job="tickpipe-flusher"}' in exprs


def test_the_compose_profile_mounts_the_kit_where_its_files_point() -> None:
    compose: dict[str, Any] = yaml.safe_load((ROOT / "compose.yaml").read_text())
    services = compose["services"]
    mounts: dict[str, str] = {}
    for name in ("prometheus", "grafana"):
        assert services[name]["profiles"] == ["observability"]
        for volume in services[name]["volumes"]:
            source, target, *_ = volume.split(":")
            if source.startswith("./"):
                assert (ROOT / source).is_file(), source
                mounts[target] = source
    scrape = yaml.safe_load((KIT / "prometheus.yml").read_text())
    [rule_file] = scrape["rule_files"]
    assert mounts[rule_file] == "./tickpipe/observability/tickpipe-alerts.yml"
    jobs = {job["job_name"] for job in scrape["scrape_configs"]}
    used = {job for expr in rule_exprs() + dashboard_exprs() for job in JOB.findall(expr)}
    assert used <= jobs
    # Every flusher of the compose file is scraped on its FLUSHER_METRICS_PORT.
    port = compose["x-tickpipe-env"]["FLUSHER_METRICS_PORT"]
    [flushers] = [j for j in scrape["scrape_configs"] if j["job_name"] == "tickpipe-flusher"]
    assert flushers["static_configs"][0]["targets"] == [
        f"{name}:{port}" for name in services if name.startswith("flusher-")
    ]
    # Grafana: the dashboard's data source is the provisioned one; the provider reads its dir.
    [source] = yaml.safe_load((KIT / "grafana" / "datasource.yml").read_text())["datasources"]
    uids = {
        target["datasource"]["uid"]
        for panel in json.loads(DASHBOARD.read_text())["panels"]
        for target in panel["targets"]
    }
    assert uids == {source["uid"]}
    [provider] = yaml.safe_load((KIT / "grafana" / "dashboards.yml").read_text())["providers"]
    dashboard_mount = next(t for t, s in mounts.items() if s.endswith("tickpipe.json"))
    assert Path(dashboard_mount).parent == Path(provider["options"]["path"])


@pytest.fixture
def services(subprocess_env: dict[str, str], tmp_path: Path) -> Iterator[Services]:
    started = Services(subprocess_env, tmp_path)
    yield started
    started.stop_all()


@pytest.mark.services
async def test_every_metric_the_dashboard_and_rules_use_is_served(
    services: Services, redis: Redis, pg: asyncpg.Connection
) -> None:
    ingest_port, flusher_port = free_port(), free_port()
    await services.ingest(ingest_port)
    # The flusher holds its first batch 5 s before committing, so an entry stays pending.
    services.flusher(
        "observed",
        "--metrics-port",
        str(flusher_port),
        TICKPIPE_FAULT="before_commit:sleep=5",
        FLUSH_UPKEEP_INTERVAL_S="0.2",
    )
    url = f"http://127.0.0.1:{ingest_port}"
    async with TickClient(url, TEST_TOKEN) as client:
        await client.send_many(make_ticks(50))
    refused = TickClient(url, "wrong-token")  # so the refusals' counter has a sample
    await refused.send(make_ticks(1)[0])
    with pytest.raises(TicksFailed):
        await refused.close()

    async with aiohttp.ClientSession() as session:

        async def scrape(port: int) -> dict[str, float]:
            async with session.get(f"http://127.0.0.1:{port}/metrics") as response:
                assert response.status == 200
                return samples(await response.text())

        async def pending_is_aged() -> bool:
            try:
                flusher = await scrape(flusher_port)
            except aiohttp.ClientError:
                return False  # not listening yet
            return flusher["tickpipe_flusher_oldest_pending_seconds"] > 0

        await eventually(pending_is_aged)
        served = set(await scrape(ingest_port)) | set(await scrape(flusher_port))

    used = {name for expr in rule_exprs() + dashboard_exprs() for name in METRIC.findall(expr)}
    assert len(used) >= 10
    assert sorted(used - served) == []


def samples(text: str) -> dict[str, float]:
    """Prometheus text format: each sample's name (labels dropped) and its last value."""
    found = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name = re.split(r"[{ ]", line, maxsplit=1)[0]
            found[name] = float(line.rsplit(" ", 1)[1])
    return found
