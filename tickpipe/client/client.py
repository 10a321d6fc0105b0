"""TickClient: ticks to ``POST /ingest/ticks`` in batches, resent until ingest has them.

Resending is safe because md_ticks is keyed by ``(symbol, ts)``: a tick stored
twice is one row. Batches in flight at the same time may land in any order, so
a feeder that sends two versions of one key close together should use
``max_in_flight=1`` (stream order decides which version stays).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import random
from collections.abc import Callable, Iterable, Mapping
from types import TracebackType
from typing import Any

import aiohttp
import msgspec

from tickpipe.client.errors import (
    ClientError,
    RequestRejected,
    TickFailure,
    TickRejected,
    TicksFailed,
    Unavailable,
)

log = logging.getLogger("tickpipe.client")

TickLike = Mapping[str, Any] | msgspec.Struct | bytes
"""A tick: a mapping (or msgspec Struct) with symbol, ts, price, volume, source, or the
JSON of one object as bytes. Decimals are sent as strings, so they stay exact."""

_encoder = msgspec.json.Encoder(decimal_format="string")

RETRIED_STATUSES = frozenset({502, 503, 504})
"""Answers after which a batch is resent with backoff (as after a connection error)."""
DEFAULT_RETRY_AFTER_S = 1.0


class _ErrorBody(msgspec.Struct):
    error: str
    detail: str = ""
    index: int | None = None
    field: str | None = None


_error_decoder = msgspec.json.Decoder(_ErrorBody)


@dataclasses.dataclass
class ClientStats:
    """Counts since the client was made."""

    sent: int = 0
    """Ticks handed to ``send``/``send_many``."""
    accepted: int = 0
    """Ticks ingest acknowledged (stored in the stream)."""
    failed: int = 0
    """Ticks that failed for good (see ``TicksFailed``)."""
    requests: int = 0
    """HTTP requests made, resends included."""
    retries: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    """Resends by reason: ``backpressure`` (429), an error code (503...), or ``connection``."""


@dataclasses.dataclass(slots=True)
class _Item:
    tick: object
    tag: object
    json: bytes


class TickClient:
    """Sends ticks to a tickpipe ingest, batching them and resending after outages.

    ``send`` returns once the tick is buffered; it waits while ``max_buffered``
    ticks are unacknowledged (backpressure). ``flush``/``close`` return once every
    tick is acknowledged or failed for good, and raise ``TicksFailed`` for the latter.
    """

    def __init__(
        self,
        url: str,
        token: str,
        *,
        max_batch: int = 1000,
        max_batch_bytes: int = 1024 * 1024,
        linger_ms: float = 5.0,
        max_in_flight: int = 4,
        max_buffered: int | None = None,
        backoff_base_s: float = 0.05,
        backoff_max_s: float = 5.0,
        give_up_after_s: float | None = 300.0,
        request_timeout_s: float = 30.0,
        session: aiohttp.ClientSession | None = None,
    ) -> None:
        if max_batch < 1 or max_in_flight < 1:
            raise ValueError("max_batch and max_in_flight must be at least 1")
        self.endpoint = url.rstrip("/") + "/ingest/ticks"
        self._headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        self.max_batch = max_batch
        self.max_batch_bytes = max_batch_bytes
        self.linger_s = linger_ms / 1000
        self.max_in_flight = max_in_flight
        self.max_buffered = max_buffered or max_batch * max_in_flight * 2
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self.give_up_after_s = give_up_after_s
        self._timeout = aiohttp.ClientTimeout(total=request_timeout_s)
        self._session = session
        self._own_session = session is None
        self.stats = ClientStats()

        self._buffer: collections.deque[_Item] = collections.deque()
        self._buffer_bytes = 0
        self._first_buffered_at = 0.0
        self._unsettled = 0
        """Ticks handed over and neither acknowledged nor failed: buffered or in flight."""
        self._failures: list[TickFailure] = []
        self._flushing = False
        self._closed = False
        # Made here, bound to the running loop on first use (Python >= 3.10).
        self._kick = asyncio.Event()
        self._progress = asyncio.Event()
        self._slots = asyncio.Semaphore(max_in_flight)
        self._dispatcher: asyncio.Task[None] | None = None
        self._senders: set[asyncio.Task[None]] = set()
        self._resume_at = 0.0
        """Loop time before which no request goes out (after a 429's Retry-After)."""

    # -- the caller's side -----------------------------------------------------------

    async def send(self, tick: TickLike, *, tag: object = None) -> None:
        """Buffer ``tick`` (``tag`` comes back with it if it fails); wait if the buffer is full."""
        await self._put(_Item(tick, tag, _encode(tick)))

    async def send_many(self, ticks: Iterable[TickLike], tags: Iterable[object] = ()) -> None:
        """``send`` each tick, with the tag at the same position (None past the end of ``tags``)."""
        tag_iter = iter(tags)
        for tick in ticks:
            await self._put(_Item(tick, next(tag_iter, None), _encode(tick)))

    async def flush(self) -> None:
        """Send what is buffered now; return once every tick handed over is settled.

        Raises ``TicksFailed`` with the ticks that failed for good since the last flush.
        """
        self._start()
        self._flushing = True
        self._kick.set()
        try:
            await self._wait_until(lambda: self._unsettled == 0)
        finally:
            self._flushing = False
        failures, self._failures = self._failures, []
        if failures:
            raise TicksFailed(failures)

    async def close(self) -> None:
        """``flush``, then release the connection (raises like ``flush``)."""
        try:
            if not self._closed:
                await self.flush()
        finally:
            await self.abort()

    async def abort(self) -> None:
        """Stop at once: ticks not yet acknowledged are dropped (they may or may not be stored)."""
        self._closed = True
        self._progress.set()  # a flush waiting elsewhere (another thread's) gives up
        tasks = [t for t in (self._dispatcher, *self._senders) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._dispatcher = None
        if self._own_session and self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> TickClient:
        self._start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            await self.close()
        else:
            await self.abort()

    # -- buffering -------------------------------------------------------------------

    def _start(self) -> None:
        if self._closed:
            raise ClientError("the client is closed")
        if self._dispatcher is None:
            self._dispatcher = asyncio.create_task(self._dispatch(), name="tickpipe-client")

    async def _put(self, item: _Item) -> None:
        self._start()
        if self._unsettled >= self.max_buffered:
            self._kick.set()
            await self._wait_until(lambda: self._unsettled < self.max_buffered)
        if not self._buffer:
            self._first_buffered_at = asyncio.get_running_loop().time()
            self._kick.set()
        self._buffer.append(item)
        self._buffer_bytes += len(item.json) + 1
        self._unsettled += 1
        self.stats.sent += 1
        if self._batch_ready():
            self._kick.set()

    def _batch_ready(self) -> bool:
        return len(self._buffer) >= self.max_batch or self._buffer_bytes >= self.max_batch_bytes

    async def _wait_until(self, done: Callable[[], bool]) -> None:
        while not done():
            if self._closed:
                raise ClientError("the client was aborted before every tick was settled")
            progress = self._progress
            if self._dispatcher is not None and self._dispatcher.done():
                self._dispatcher.result()  # a defect in the dispatcher: raise it here
            await progress.wait()

    def _settled(self, items: list[_Item], error: ClientError | None = None) -> None:
        self._unsettled -= len(items)
        if error is None:
            self.stats.accepted += len(items)
        else:
            self.stats.failed += len(items)
            self._failures.extend(TickFailure(i.tick, i.tag, error) for i in items)
        self._progress.set()
        self._progress = asyncio.Event()

    # -- sending ---------------------------------------------------------------------

    async def _dispatch(self) -> None:
        """Cut batches from the buffer (full, lingered long enough, or flushed) and send them."""
        loop = asyncio.get_running_loop()
        while True:
            await self._kick.wait()
            self._kick.clear()
            while self._buffer:
                wait_s = self._first_buffered_at + self.linger_s - loop.time()
                if wait_s > 0 and not self._batch_ready() and not self._flushing:
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(wait_s):
                            await self._kick.wait()
                    self._kick.clear()
                    continue
                await self._slots.acquire()
                batch = self._take()
                task = asyncio.create_task(self._deliver(batch))
                self._senders.add(task)
                task.add_done_callback(self._senders.discard)

    def _take(self) -> list[_Item]:
        batch: list[_Item] = []
        size = 0
        while self._buffer and len(batch) < self.max_batch:
            item = self._buffer[0]
            if batch and size + len(item.json) + 1 > self.max_batch_bytes:
                break
            batch.append(self._buffer.popleft())
            size += len(item.json) + 1
        self._buffer_bytes -= size
        return batch

    async def _deliver(self, batch: list[_Item]) -> None:
        try:
            await self._send_batch(batch)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a defect: fail the batch, keep the client going
            log.exception("tickpipe client: a batch of %d ticks failed", len(batch))
            self._settled(batch, ClientError(f"internal error: {exc!r}"))
        finally:
            self._slots.release()

    async def _send_batch(self, batch: list[_Item]) -> None:
        """Send ``batch`` until ingest acknowledges it; settle each tick once."""
        loop = asyncio.get_running_loop()
        attempt = 0
        unavailable_since: float | None = None
        while batch:
            if (delay := self._resume_at - loop.time()) > 0:
                await asyncio.sleep(delay)
            self.stats.requests += 1
            try:
                status, body, retry_after = await self._post(batch)
            except (aiohttp.ClientError, TimeoutError) as exc:
                status, body, retry_after = 0, f"{type(exc).__name__}: {exc}".encode(), None
            if status == 200:
                self._settled(batch)
                return
            error = _read_error(status, body)
            if status == 429:
                self.stats.retries["backpressure"] += 1
                wait_s = retry_after if retry_after is not None else DEFAULT_RETRY_AFTER_S
                self._resume_at = max(self._resume_at, loop.time() + wait_s)
                continue
            if status == 0 or status in RETRIED_STATUSES:
                reason = "connection" if status == 0 else error.error
                self.stats.retries[reason] += 1
                now = loop.time()
                unavailable_since = unavailable_since if unavailable_since is not None else now
                if self.give_up_after_s is not None and now - unavailable_since > (
                    self.give_up_after_s
                ):
                    self._settled(batch, Unavailable(_unavailable(self.endpoint, status, error)))
                    return
                ceiling = min(self.backoff_max_s, self.backoff_base_s * 2**attempt)
                attempt += 1
                await asyncio.sleep(max(retry_after or 0.0, random.uniform(ceiling / 2, ceiling)))
                continue
            unavailable_since, attempt = None, 0
            if status in (400, 422) and error.index is not None and 0 <= error.index < len(batch):
                # All or nothing: the bad tick fails, the others were not stored: resend them.
                bad = batch.pop(error.index)
                self._settled([bad], TickRejected(status, error.error, error.detail, error.field))
                continue
            if status == 413 and len(batch) > 1:
                half = len(batch) // 2
                await self._send_batch(batch[:half])
                await self._send_batch(batch[half:])
                return
            self._settled(batch, RequestRejected(status, error.error, error.detail))
            return

    async def _post(self, batch: list[_Item]) -> tuple[int, bytes, float | None]:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self.max_in_flight)
            )
        body = b"[" + b",".join(item.json for item in batch) + b"]"
        async with self._session.post(
            self.endpoint, data=body, headers=self._headers, timeout=self._timeout
        ) as response:
            answer = await response.read()
            return response.status, answer, _retry_after(response.headers.get("Retry-After"))


def _encode(tick: TickLike) -> bytes:
    if isinstance(tick, bytes):
        data = tick.strip()
        if not data.startswith(b"{") or b"\n" in data:
            raise ValueError("a tick given as bytes must be the JSON of one object, on one line")
        return data
    return _encoder.encode(tick)


def _read_error(status: int, body: bytes) -> _ErrorBody:
    if status == 0:
        return _ErrorBody("connection", body.decode(errors="replace"))
    try:
        return _error_decoder.decode(body)
    except msgspec.DecodeError:
        return _ErrorBody(f"http_{status}", body[:200].decode(errors="replace"))


def _retry_after(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None  # an HTTP date: not sent by tickpipe


def _unavailable(endpoint: str, status: int, error: _ErrorBody) -> str:
    last = error.detail if status == 0 else f"{status} {error.error}: {error.detail}"
    return f"{endpoint} stayed unavailable past the give-up time; last answer: {last}"
