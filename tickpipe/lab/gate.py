"""A TCP gate in front of a Redis, for fault tests: not there yet, then there; replies lost.

The tests use it for the faults a real network makes and a real server cannot
be asked to make: a Redis that does not answer yet (nothing listens until
:meth:`Gate.open`), or one that runs a command and whose reply never arrives
(after a command holding ``lose_replies_after`` passes, the replies are
dropped: the client times out, the server has done the work).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from tickpipe.lab.stack import free_port


class Gate:
    """A port that refuses connections until :meth:`open`, then forwards them to ``target``."""

    def __init__(self, target: int, *, lose_replies_after: bytes | None = None) -> None:
        self.port = free_port()
        self.target = target
        self.lose_replies_after = lose_replies_after
        self._losing = False
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def open(self) -> None:
        self._server = await asyncio.start_server(self._pipe, "127.0.0.1", self.port)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", self.target)
        self._writers += [writer, upstream_writer]

        async def copy(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            try:
                while data := await source.read(65536):
                    if self.lose_replies_after and self.lose_replies_after in data:
                        self._losing = True
                    if sink is writer and self._losing:
                        continue
                    sink.write(data)
                    await sink.drain()
            finally:
                sink.close()

        await asyncio.gather(
            copy(reader, upstream_writer), copy(upstream_reader, writer), return_exceptions=True
        )

    async def close(self) -> None:
        for writer in self._writers:
            writer.close()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


MakeGate = Callable[..., Gate]
"""``make_gate(target_port, lose_replies_after=None)``: the tests' fixture, closed after."""
