"""The shard of a symbol: a fixed, documented hash, and the keys of each shard."""

from __future__ import annotations

import pytest

from tickpipe.core.settings import Settings, SettingsError
from tickpipe.core.shards import ShardMap, fnv1a_64, jump_hash, shard_of


def test_fnv1a_64_matches_the_published_vectors() -> None:
    assert fnv1a_64(b"") == 0xCBF29CE484222325
    assert fnv1a_64(b"a") == 0xAF63DC4C8601EC8C
    assert fnv1a_64(b"foobar") == 0x85944171F73967E8


def test_jump_hash_matches_the_reference_implementation() -> None:
    # Values of the paper's C++ code (as ClickHouse's jumpConsistentHash tests list them).
    assert [
        jump_hash(1, 1),
        jump_hash(42, 57),
        jump_hash(256, 1024),
        jump_hash(3735883980, 1),
        jump_hash(3735883980, 666),
        jump_hash(16045690984833335023, 255),
    ] == [0, 43, 520, 0, 361, 237]


def test_shard_of_is_fixed() -> None:
    # Part of the contract between every writer and reader: these must never change.
    pinned = {"AAPL": 0, "MSFT": 4, "EURUSD": 1, "BTC-USD": 6, "ES:F": 3}
    assert {symbol: shard_of(symbol, 8) for symbol in pinned} == pinned
    assert all(shard_of(symbol, 1) == 0 for symbol in pinned)


def test_jump_hash_moves_only_to_the_new_bucket_and_spreads_evenly() -> None:
    symbols = [f"SYM{i}" for i in range(4000)]
    for buckets in range(1, 12):
        before = [jump_hash(fnv1a_64(s.encode()), buckets) for s in symbols]
        after = [jump_hash(fnv1a_64(s.encode()), buckets + 1) for s in symbols]
        assert all(a in (b, buckets) for b, a in zip(before, after, strict=True))
    counts = [0] * 8
    for symbol in symbols:
        counts[shard_of(symbol, 8)] += 1
    assert min(counts) > 4000 / 8 * 0.8
    assert max(counts) < 4000 / 8 * 1.2


def test_one_shard_keeps_todays_key_names() -> None:
    [shard] = ShardMap.build(1).shards
    assert (shard.stream, shard.latest, shard.dead_stream, shard.lost, shard.lost_ids) == (
        "ticks.received",
        "ticks:latest",
        "ticks.dead",
        "ticks:lost",
        "ticks:lost:ids",
    )


def test_several_shards_are_hash_tagged() -> None:
    shards = ShardMap.build(3).shards
    assert [s.stream for s in shards] == [
        "ticks.received:{0}",
        "ticks.received:{1}",
        "ticks.received:{2}",
    ]
    assert shards[2].latest == "ticks:latest:{2}"
    assert shards[2].dead_stream == "ticks.dead:{2}"
    assert shards[2].lost_ids == "ticks:lost:{2}:ids"


def test_settings_shards_and_flusher_subset() -> None:
    settings = Settings.from_env({"STREAM_SHARDS": "6", "FLUSHER_SHARDS": "0,3-4"})
    assert settings.stream_shards == 6
    assert [s.index for s in settings.flusher_shard_set] == [0, 3, 4]
    assert len(Settings.from_env({"STREAM_SHARDS": "6"}).flusher_shard_set) == 6
    # Built once, not per access (ingest asks for it on every request).
    assert settings.shard_map is settings.shard_map
    assert settings.shard_map is settings.replace(flusher_consumer="x").shard_map
    assert settings.shard_map is not settings.replace(redis_cluster=True).shard_map
    assert Settings.from_env({"REDIS_CLUSTER": "auto"}).redis_cluster is None
    assert Settings.from_env({"REDIS_CLUSTER": "1"}).redis_cluster is True
    assert Settings.from_env({"INGEST_DURABILITY": "replica"}).ingest_durability == "replica"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"STREAM_SHARDS": "0"}, "STREAM_SHARDS: must be 1 to 1024"),
        ({"STREAM_SHARDS": "2", "FLUSHER_SHARDS": "2"}, "FLUSHER_SHARDS: no shard 2"),
        ({"FLUSHER_SHARDS": "a"}, "FLUSHER_SHARDS: expected shard numbers"),
        # Not an empty set, which would mean "every shard".
        ({"STREAM_SHARDS": "8", "FLUSHER_SHARDS": "5-2"}, "'5-2' is an empty range: write it 2-5"),
        # Refused before four billion numbers are ever built.
        ({"FLUSHER_SHARDS": "0-4000000000"}, "shard 4000000000 is beyond the limit of 1024"),
        ({"STREAM_SHARDS": "2", "STREAM_NAME": "t{x}"}, "holds a brace"),
        # On a cluster even one shard's names are tagged.
        ({"REDIS_CLUSTER": "1", "STREAM_NAME": "t{x}"}, "holds a brace"),
        ({"REDIS_CLUSTER": "1", "LATEST_KEY": "latest}"}, "holds a brace"),
    ],
)
def test_bad_shard_settings_are_refused(env: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError, match=message.replace("{", r"\{")):
        Settings.from_env(env)
