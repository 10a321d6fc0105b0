"""SyncTickClient: the TickClient for code without an event loop (it runs one in a thread)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Iterable
from types import TracebackType
from typing import Any, TypeVar

from tickpipe.client.client import ClientStats, TickClient, TickLike

T = TypeVar("T")


class SyncTickClient:
    """The same as :class:`TickClient`, blocking: ``send`` blocks while the buffer is full."""

    def __init__(self, url: str, token: str, **options: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="tickpipe-client", daemon=True
        )
        self._thread.start()
        self._client = self._call(self._make(url, token, options))

    @staticmethod
    async def _make(url: str, token: str, options: dict[str, Any]) -> TickClient:
        return TickClient(url, token, **options)

    @property
    def stats(self) -> ClientStats:
        return self._client.stats

    def send(self, tick: TickLike, *, tag: object = None) -> None:
        self._call(self._client.send(tick, tag=tag))

    def send_many(self, ticks: Iterable[TickLike], tags: Iterable[object] = ()) -> None:
        self._call(self._client.send_many(ticks, tags))

    def flush(self) -> None:
        self._call(self._client.flush())

    def close(self) -> None:
        """Flush, release the connection and stop the thread (raises like ``flush``)."""
        if self._loop.is_closed():
            return
        try:
            self._call(self._client.close())
        finally:
            self._stop()

    def abort(self) -> None:
        if not self._loop.is_closed():
            try:
                self._call(self._client.abort())
            finally:
                self._stop()

    def _stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def _call(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    def __enter__(self) -> SyncTickClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
