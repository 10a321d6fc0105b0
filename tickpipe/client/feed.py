"""``tickpipe feed``: backfill ticks from files through the client, with progress and a summary."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import Mapping, Sequence

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from tickpipe.client.client import TickClient
from tickpipe.client.errors import TickFailure, TicksFailed
from tickpipe.client.sources import (
    Format,
    Line,
    data_lines,
    detect_format,
    open_binary,
    read_ticks,
)

SHOWN_LINES = 10
"""Line numbers listed per refusal reason in the summary."""


@dataclasses.dataclass(frozen=True)
class FeedOptions:
    url: str
    token: str
    files: Sequence[str]
    """Paths, ``-`` for stdin."""
    fmt: Format | None = None
    """None: by each file's name, else its first character."""
    columns: Mapping[str, str] = dataclasses.field(default_factory=dict)
    source: str | None = None
    max_batch: int = 1000
    max_in_flight: int = 4
    give_up_after_s: float = 300.0
    progress: bool = True


@dataclasses.dataclass
class Refusal:
    count: int = 0
    example: str = ""
    lines: list[Line] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class FeedSummary:
    files: int = 0
    read: int = 0
    """Ticks read (lines refused before sending included)."""
    sent: int = 0
    accepted: int = 0
    refused: dict[str, Refusal] = dataclasses.field(default_factory=dict)
    seconds: float = 0.0

    @property
    def refused_count(self) -> int:
        return sum(r.count for r in self.refused.values())

    @property
    def ok(self) -> bool:
        return self.accepted == self.read and not self.refused

    def refuse(self, reason: str, line: Line, detail: str) -> None:
        refusal = self.refused.setdefault(reason, Refusal(example=detail))
        refusal.count += 1
        if len(refusal.lines) < SHOWN_LINES:
            refusal.lines.append(line)


class _RateColumn(ProgressColumn):
    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:,.0f} ticks/s" if speed else "- ticks/s", style="progress.data.speed")


async def feed(options: FeedOptions, console: Console) -> FeedSummary:
    """Send every tick of ``options.files``; return what became of them."""
    summary = FeedSummary(files=len(options.files))
    started = time.perf_counter()
    formats = [options.fmt for _ in options.files]
    total: int | None = 0
    for index, path in enumerate(options.files):
        if path != "-":
            with open_binary(path) as stream:
                formats[index] = formats[index] or detect_format(path, _head(stream))
            lines = data_lines(path, formats[index] or "csv")
            total = None if total is None or lines is None else total + lines
        else:
            total = None
    progress = Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        _RateColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
        disable=not options.progress,
    )
    client = TickClient(
        options.url,
        options.token,
        max_batch=options.max_batch,
        max_in_flight=options.max_in_flight,
        give_up_after_s=options.give_up_after_s,
    )
    bad_lines = 0
    with progress:
        task = progress.add_task("feeding", total=total)

        def update() -> None:
            done = client.stats.accepted + client.stats.failed + bad_lines
            progress.update(task, completed=done)

        async def keep_updating() -> None:
            while True:
                update()
                await asyncio.sleep(0.25)

        updater = asyncio.create_task(keep_updating())
        try:
            async with client:
                for path, fmt in zip(options.files, formats, strict=True):
                    with open_binary(path) as stream:
                        chosen = fmt or detect_format(path, _head(stream))
                        name = "stdin" if path == "-" else path
                        for chunk in read_ticks(
                            stream, name, chosen, columns=options.columns, source=options.source
                        ):
                            summary.read += len(chunk)
                            for line, detail in chunk.bad:
                                summary.refuse("bad_line", line, detail)
                            bad_lines += len(chunk.bad)
                            await client.send_many(chunk.ticks, chunk.lines)
                try:
                    await client.flush()
                except TicksFailed as exc:
                    _record(summary, exc.failures)
        finally:
            updater.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await updater
            update()
            summary.sent = client.stats.sent
            summary.accepted = client.stats.accepted
            summary.seconds = time.perf_counter() - started
            progress.update(task, total=progress.tasks[0].completed)
    return summary


def _head(stream: object) -> bytes:
    peek = getattr(stream, "peek", None)
    return bytes(peek(64)[:64]) if peek is not None else b""


def _record(summary: FeedSummary, failures: Sequence[TickFailure]) -> None:
    for failure in failures:
        line = failure.tag if isinstance(failure.tag, Line) else Line("?", 0)
        detail = getattr(failure.error, "detail", None) or str(failure.error)
        summary.refuse(failure.reason, line, detail)


def render(summary: FeedSummary, console: Console) -> None:
    """The summary: ticks read, sent, accepted, and each refusal reason with its lines."""
    rate = summary.accepted / summary.seconds if summary.seconds else 0.0
    files = "1 file" if summary.files == 1 else f"{summary.files} files"
    console.print(
        f"tickpipe feed: {summary.read:,} ticks read from {files} in {summary.seconds:.1f} s"
        f" ({rate:,.0f} ticks/s accepted)"
    )
    console.print(f"  sent      {summary.sent:,}")
    console.print(f"  accepted  {summary.accepted:,}")
    console.print(f"  refused   {summary.refused_count:,}")
    for reason, refusal in sorted(summary.refused.items(), key=lambda r: -r[1].count):
        shown = ", ".join(str(line) for line in refusal.lines)
        unlisted = refusal.count - len(refusal.lines)
        more = f" and {unlisted:,} more" if unlisted else ""
        console.print(f"    {reason}: {refusal.count:,} (lines {shown}{more})", highlight=False)
        console.print(f"      e.g. {refusal.example}", highlight=False, markup=False)
    unsettled = summary.read - summary.accepted - summary.refused_count
    if unsettled > 0:
        console.print(f"  not sent  {unsettled:,} (the feed was interrupted)")
