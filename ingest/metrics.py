"""Prometheus metrics of the ingest service.

With ``--workers N`` every worker process writes its samples to
PROMETHEUS_MULTIPROC_DIR and any worker's ``/metrics`` answers for all of them.
"""

from __future__ import annotations

import bisect
from collections import Counter as Tally
from collections.abc import Iterable
from pathlib import Path

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

ACCEPTED_TICKS = Counter(
    "tickpipe_ingest_ticks_accepted",
    "Ticks appended to the stream and acknowledged with 200, by token name.",
    ["token"],
)
REJECTED_REQUESTS = Counter(
    "tickpipe_ingest_requests_rejected",
    "Requests refused, by error code and token name (anonymous when unauthenticated).",
    ["reason", "token"],
)
REQUEST_SECONDS = Histogram(
    "tickpipe_ingest_request_seconds",
    "Time from request to answer on the ingest endpoints.",
    ["endpoint"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)
BATCH_TICKS = Histogram(
    "tickpipe_ingest_batch_ticks",
    "Ticks per accepted request.",
    buckets=(1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000),
)
GROUP_REQUESTS = Histogram(
    "tickpipe_ingest_group_requests",
    "Requests written together in one group commit (one Redis round trip).",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)
BACKLOG_ENTRIES = Gauge(
    "tickpipe_ingest_backlog_entries",
    "The consumer group's backlog (lag + pending) as last seen by ingest.",
    multiprocess_mode="livemostrecent",
)

SSE_CLIENTS = Gauge(
    "tickpipe_sse_clients",
    "Clients connected to GET /ticks/stream.",
    multiprocess_mode="livesum",
)
SSE_DROPPED = Counter(
    "tickpipe_sse_clients_dropped",
    "SSE clients disconnected because they fell SSE_CLIENT_BUFFER events behind.",
)


def observe_many(histogram: Histogram, values: Iterable[float]) -> None:
    """``histogram.observe`` of each value, written as one update per bucket.

    With ``--workers N`` every observation is a write to a memory-mapped file
    under a lock: per request, a visible share of ingest's CPU. Folding a
    group's or a second's observations makes it one write per bucket touched.
    """
    bounds = histogram._upper_bounds
    counts = [0] * len(bounds)
    total = 0.0
    for value in values:
        total += value
        counts[bisect.bisect_left(bounds, value)] += 1
    histogram._sum.inc(total)
    for index, count in enumerate(counts):
        if count:
            histogram._buckets[index].inc(count)


class RequestTimes:
    """Request durations by endpoint, kept in lists and folded into the histogram
    every second and before ``/metrics`` answers (:func:`observe_many`)."""

    def __init__(self) -> None:
        self._seconds: dict[str, list[float]] = {}

    def add(self, endpoint: str, seconds: float) -> None:
        self._seconds.setdefault(endpoint, []).append(seconds)

    def flush(self) -> None:
        seconds, self._seconds = self._seconds, {}
        for endpoint, values in seconds.items():
            observe_many(REQUEST_SECONDS.labels(endpoint=endpoint), values)


def count_accepted(tokens: Iterable[tuple[str, int]]) -> None:
    """Accepted ticks of a group's requests, ``(token name, ticks)`` each: one write per token."""
    tally: Tally[str] = Tally()
    sizes = []
    for token, ticks in tokens:
        tally[token] += ticks
        sizes.append(ticks)
    for token, ticks in tally.items():
        ACCEPTED_TICKS.labels(token=token).inc(ticks)
    observe_many(BATCH_TICKS, sizes)


def render(multiproc_dir: Path | None) -> tuple[bytes, str]:
    """The Prometheus text exposition and its content type."""
    if multiproc_dir is None:
        return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=str(multiproc_dir))  # type: ignore[no-untyped-call]
    return generate_latest(registry), CONTENT_TYPE_LATEST
