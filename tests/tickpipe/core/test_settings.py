import dataclasses
import re
from pathlib import Path

import pytest

from tickpipe.core.settings import (
    ENVIRONMENT,
    Settings,
    SettingsError,
    format_width,
    parse_tokens,
)


def test_defaults_point_at_the_local_stack() -> None:
    settings = Settings.from_env({})
    assert settings.redis_url == "redis://127.0.0.1:16379/0"
    assert settings.database_url == "postgresql://postgres@127.0.0.1:15432/tickpipe"
    assert settings.stream_name == "ticks.received"
    assert settings.group_name == "flushers"
    assert settings.flush_batch_size == 200
    assert settings.flush_interval_s == 1.0
    assert settings.flush_heartbeat_s == 0.5
    assert settings.flush_dead_after_s == 1.5
    assert settings.flush_claim_interval_s == 1.0
    assert settings.flush_claim_idle_s == 30.0
    assert settings.ingest_max_batch == 5000
    assert settings.ingest_durability == "everysec"
    assert settings.state_dir == Path(".tickpipe")


def test_environment_overrides() -> None:
    settings = Settings.from_env(
        {
            "REDIS_URL": "redis://r:6379/1",
            "DATABASE_URL": "postgresql://u@h/db",
            "TICKPIPE_PG_PORT": "25432",
            "FLUSH_BATCH_SIZE": "500",
            "FLUSH_INTERVAL_S": "0.25",
            "INGEST_DURABILITY": "fsync",
            "STREAM_NAME": "ticks.test",
            "FLUSHER_CONSUMER": "flusher-1",
            "INGEST_TOKENS": "a:tok1, b:tok2",
        }
    )
    assert settings.redis_url == "redis://r:6379/1"
    assert settings.pg_port == 25432
    assert settings.flush_batch_size == 500
    assert settings.flush_interval_s == 0.25
    assert settings.ingest_durability == "fsync"
    assert settings.stream_name == "ticks.test"
    assert settings.flusher_consumer == "flusher-1"
    assert dict(settings.ingest_tokens) == {"a": "tok1", "b": "tok2"}


def test_heartbeat_settings() -> None:
    settings = Settings.from_env({"FLUSH_HEARTBEAT_S": "0.2", "FLUSH_DEAD_AFTER_S": "0.8"})
    assert settings.flush_heartbeat_s == 0.2
    assert settings.flush_dead_after_s == 0.8
    with pytest.raises(SettingsError, match="FLUSH_DEAD_AFTER_S: must be a positive number"):
        Settings.from_env({"FLUSH_DEAD_AFTER_S": "0"})
    # A refresh as slow as the expiry would let a live flusher pass for dead.
    with pytest.raises(SettingsError, match="FLUSH_HEARTBEAT_S=2 must be below FLUSH_DEAD_AFTER_S"):
        Settings.from_env({"FLUSH_HEARTBEAT_S": "2"})


def test_heartbeat_keys_share_their_shard_slot() -> None:
    single = Settings.from_env({})
    [shard] = single.shard_map.shards
    assert shard.heartbeat("flushers", "f1") == "ticks.received:heartbeat:alive:flushers:f1"
    assert shard.heartbeats_seen("flushers") == "ticks.received:heartbeat:seen:flushers"
    sharded = Settings.from_env({"STREAM_SHARDS": "4"})
    third = sharded.shard_map.shards[3]
    assert third.stream == "ticks.received:{3}"
    # The shard's tag comes first: a brace in a consumer's name cannot move the key.
    assert third.heartbeat("flushers", "a{b}") == "ticks.received:heartbeat:{3}:alive:flushers:a{b}"
    assert third.heartbeats_seen("flushers") == "ticks.received:heartbeat:{3}:seen:flushers"


def test_local_urls_follow_the_stack_ports() -> None:
    settings = Settings.from_env({"TICKPIPE_REDIS_PORT": "26379", "TICKPIPE_PG_PORT": "25432"})
    assert settings.redis_url.endswith(":26379/0")
    assert ":25432/" in settings.database_url


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("FLUSH_BATCH_SIZE", "0", "FLUSH_BATCH_SIZE: must be a positive integer"),
        ("FLUSH_BATCH_SIZE", "many", "FLUSH_BATCH_SIZE='many' is not a valid value"),
        ("FLUSH_INTERVAL_S", "-1", "FLUSH_INTERVAL_S: must be a positive number"),
        ("FLUSH_INTERVAL_S", "nan", "FLUSH_INTERVAL_S: must be a positive number"),
        ("INGEST_PORT", "70000", "INGEST_PORT: must be a TCP port"),
        (
            "INGEST_DURABILITY",
            "always",
            "INGEST_DURABILITY: must be 'everysec', 'fsync' or 'replica'",
        ),
        ("STREAM_NAME", "has space", "STREAM_NAME: must not contain whitespace"),
    ],
)
def test_bad_values_name_the_variable(name: str, value: str, message: str) -> None:
    with pytest.raises(SettingsError) as info:
        Settings.from_env({name: value})
    assert message in str(info.value)


def test_token_errors_never_echo_the_secret() -> None:
    with pytest.raises(SettingsError) as info:
        Settings.from_env({"INGEST_TOKENS": "supersecretvalue"})
    assert "supersecretvalue" not in str(info.value)
    assert "INGEST_TOKENS" in str(info.value)


def test_tokens_file(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text("# feeders\nalpha:t-alpha\nbeta:t-beta\n")
    settings = Settings.from_env({"INGEST_TOKENS_FILE": str(path), "INGEST_TOKENS": "gamma:t-g"})
    assert dict(settings.ingest_tokens) == {"gamma": "t-g", "alpha": "t-alpha", "beta": "t-beta"}


def test_missing_tokens_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="cannot read"):
        Settings.from_env({"INGEST_TOKENS_FILE": str(tmp_path / "absent")})


def test_duplicate_token_names_are_rejected() -> None:
    with pytest.raises(SettingsError, match="appears twice"):
        parse_tokens("a:x,a:y")


def test_read_tokens_are_separate_from_ingest_tokens(tmp_path: Path) -> None:
    path = tmp_path / "readers"
    path.write_text("wall:t-wall\n")
    settings = Settings.from_env(
        {
            "INGEST_TOKENS": "feed:t-feed",
            "READ_TOKENS": "dash:t-dash",
            "READ_TOKENS_FILE": str(path),
        }
    )
    assert dict(settings.read_tokens) == {"dash": "t-dash", "wall": "t-wall"}
    with pytest.raises(SettingsError, match="READ_TOKENS: token name 'feed'"):
        Settings.from_env({"INGEST_TOKENS": "feed:t-feed", "READ_TOKENS": "feed:t-other"})
    with pytest.raises(SettingsError, match="READ_TOKENS_FILE: cannot read"):
        Settings.from_env({"READ_TOKENS_FILE": str(tmp_path / "absent")})


def test_settings_are_frozen() -> None:
    settings = Settings.from_env({})
    with pytest.raises(AttributeError):
        settings.flush_batch_size = 1  # type: ignore[misc]
    assert settings.replace(flush_batch_size=7).flush_batch_size == 7


def test_rollup_max_symbols_per_pass() -> None:
    assert Settings.from_env({}).rollup_max_symbols_per_pass == 64
    settings = Settings.from_env({"ROLLUP_MAX_SYMBOLS_PER_PASS": "256"})
    assert settings.rollup_max_symbols_per_pass == 256
    with pytest.raises(SettingsError, match="ROLLUP_MAX_SYMBOLS_PER_PASS"):
        Settings.from_env({"ROLLUP_MAX_SYMBOLS_PER_PASS": "0"})


def test_rollup_widths() -> None:
    assert Settings.from_env({}).rollup_widths_s == (1, 60)
    assert Settings.from_env({"ROLLUP_WIDTHS": " 1h, 5s ,1m,1d"}).rollup_widths_s == (
        5,
        60,
        3600,
        86400,
    )
    assert [format_width(w) for w in (1, 90, 300, 3600, 7200, 86400)] == [
        "1s",
        "90s",
        "5m",
        "1h",
        "2h",
        "1d",
    ]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("1x", "'1x' is not a window width: use a whole number and s, m, h or d"),
        ("1s,,1m", "'' is not a window width"),
        ("0s", "'0s' is not a window width"),
        ("1.5s", "'1.5s' is not a window width"),
        ("-1m", "'-1m' is not a window width"),
        ("60s,1m", "'1m' is the same width as '60s'"),
        ("2d", "'2d' is wider than the maximum, 1d"),
    ],
)
def test_bad_rollup_widths_say_what_is_wrong(value: str, message: str) -> None:
    with pytest.raises(SettingsError) as info:
        Settings.from_env({"ROLLUP_WIDTHS": value})
    assert str(info.value).startswith("ROLLUP_WIDTHS: ")
    assert message in str(info.value)


README = Path(__file__).resolve().parents[3] / "README.md"
NOT_FOR_USERS = {"TICKPIPE_FAULT", "PROMETHEUS_MULTIPROC_DIR"}
"""Test hooks and variables set by tickpipe itself for its own processes."""
ALSO_LISTED = {"TICKPIPE_LOG_LEVEL"}
"""Read by the CLI (click), not by Settings."""


def _configuration_rows() -> list[tuple[list[str], list[str]]]:
    text = README.read_text().split("## Configuration", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in text.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) >= 2 and cells[0].startswith("`"):
            names = re.findall(r"`([A-Z0-9_]+)`", cells[0])
            defaults = [d.strip() for d in cells[1].split(" / ")] if cells[1] else []
            rows.append((names, defaults))
    return rows


def test_the_readme_lists_every_variable_settings_reads_and_no_other() -> None:
    listed = {name for names, _ in _configuration_rows() for name in names}
    assert listed - ALSO_LISTED == set(ENVIRONMENT) - NOT_FOR_USERS


def test_the_readme_shows_the_defaults_of_settings() -> None:
    defaults = {
        str(f.metadata["env"]): f.default
        for f in dataclasses.fields(Settings)
        if "parse" in f.metadata and f.default is not dataclasses.MISSING
    }
    compared = 0
    for names, shown in _configuration_rows():
        if len(names) != len(shown):
            continue
        for name, cell in zip(names, shown, strict=True):
            literal = re.fullmatch(r"`([^`]*)`", cell)
            default = defaults.get(name)
            if literal is None or isinstance(default, bool) or default is None:
                continue
            if isinstance(default, int | float):
                assert float(literal[1]) == default, name
            elif isinstance(default, str | Path):
                assert literal[1] == str(default), name
            else:
                continue
            compared += 1
    assert compared > 40
