"""The local stack: `tickpipe up` / `down` / `status` against real servers."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tickpipe.stack import LocalStack, StackError, free_port

pytestmark = pytest.mark.services


def tickpipe(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tickpipe", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def stack_env(stack: LocalStack) -> dict[str, str]:
    return {
        "TICKPIPE_STATE_DIR": str(stack.state_dir),
        "TICKPIPE_REDIS_PORT": str(stack.redis_port),
        "TICKPIPE_PG_PORT": str(stack.pg_port),
    }


def test_both_servers_run(stack: LocalStack) -> None:
    services = {s.name: s for s in stack.status()}
    assert services["redis"].running
    assert services["postgres"].running
    assert services["redis"].pid
    assert services["postgres"].pid


def test_redis_runs_with_aof_everysec(stack: LocalStack) -> None:
    import redis

    client = redis.Redis(port=stack.redis_port)
    try:
        assert client.config_get("appendonly") == {"appendonly": "yes"}
        assert client.config_get("appendfsync") == {"appendfsync": "everysec"}
    finally:
        client.close()


def test_up_twice_is_harmless(stack: LocalStack) -> None:
    before = [s.pid for s in stack.status()]
    stack.up()
    assert [s.pid for s in stack.status()] == before


def test_cli_up_prints_only_exports(stack: LocalStack) -> None:
    result = tickpipe("up", env=stack_env(stack))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        f"export REDIS_URL={stack.redis_url}",
        f"export DATABASE_URL={stack.database_url}",
    ]
    assert "already running" in result.stderr


def test_cli_status(stack: LocalStack) -> None:
    result = tickpipe("status", env=stack_env(stack))
    assert result.returncode == 0, result.stderr
    assert "redis" in result.stdout
    assert "postgres" in result.stdout
    assert result.stdout.count("running (pid") == 2


def test_status_of_a_stopped_stack_exits_1(tmp_path: Path) -> None:
    env = {
        "TICKPIPE_STATE_DIR": str(tmp_path),
        "TICKPIPE_REDIS_PORT": str(free_port()),
        "TICKPIPE_PG_PORT": str(free_port()),
    }
    result = tickpipe("status", env=env)
    assert result.returncode == 1
    states = [line.split()[1] for line in result.stdout.splitlines()]
    assert states == ["stopped", "stopped"]


@pytest.mark.parametrize("service", ["redis", "postgres"])
def test_port_in_use_is_a_clear_error(tmp_path: Path, service: str) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        busy = squatter.getsockname()[1]
        ports = {"redis": free_port(), "postgres": free_port(), service: busy}
        env = {
            "TICKPIPE_STATE_DIR": str(tmp_path),
            "TICKPIPE_REDIS_PORT": str(ports["redis"]),
            "TICKPIPE_PG_PORT": str(ports["postgres"]),
        }
        if service == "postgres":
            # Redis comes up first; make sure it does not stay behind.
            try:
                result = tickpipe("up", env=env)
            finally:
                tickpipe("down", env=env)
        else:
            result = tickpipe("up", env=env)
    assert result.returncode == 1
    assert f"port {busy} is already in use" in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


def test_stale_pid_file_is_replaced(tmp_path: Path) -> None:
    messages: list[str] = []
    local = LocalStack(tmp_path, free_port(), free_port(), log=messages.append)
    local.redis_dir.mkdir(parents=True)
    gone = subprocess.Popen(["true"])
    gone.wait()
    local.redis_pidfile.write_text(f"{gone.pid}\n")
    try:
        local.start_redis()
        assert any("stale pid file" in m for m in messages)
        assert local.status()[0].running
    finally:
        local.stop_redis()
    assert not local.status()[0].running


def test_running_on_another_port_is_reported(stack: LocalStack) -> None:
    other = LocalStack(stack.state_dir, stack.redis_port, free_port(), log=lambda m: None)
    with pytest.raises(StackError, match="already running on port"):
        other.start_postgres()
