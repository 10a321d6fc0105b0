"""What can go wrong with a tick handed to the client, one type per way it fails for good."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence


class ClientError(Exception):
    """Base of the client's errors."""


class TickRejected(ClientError):
    """Ingest refused this tick (422 invalid field, 400 malformed JSON); it is never resent."""

    def __init__(self, status: int, code: str, detail: str, field: str | None) -> None:
        where = f" (field {field!r})" if field else ""
        super().__init__(f"{status} {code}{where}: {detail}")
        self.status = status
        self.code = code
        self.detail = detail
        self.field = field


class RequestRejected(ClientError):
    """Ingest refused the whole request (401, 403, 413, 415...): fix the cause, then resend."""

    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(f"{status} {code}: {detail}")
        self.status = status
        self.code = code
        self.detail = detail


class Unavailable(ClientError):
    """Ingest stayed unreachable or unavailable (503, connection errors) past the give-up time."""


@dataclasses.dataclass(frozen=True, slots=True)
class TickFailure:
    """A tick that failed for good: the tick as handed over, its tag, and why."""

    tick: object
    tag: object
    error: ClientError

    @property
    def reason(self) -> str:
        """A short reason to group failures by: the error code, and the field if one is named."""
        if isinstance(self.error, TickRejected) and self.error.field:
            return f"{self.error.code} ({self.error.field})"
        if isinstance(self.error, TickRejected | RequestRejected):
            return self.error.code
        return "unavailable"


class TicksFailed(ClientError):
    """Raised by ``flush()``/``close()`` when ticks failed for good since the last flush."""

    def __init__(self, failures: Sequence[TickFailure]) -> None:
        first = failures[0]
        more = f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""
        super().__init__(
            f"{len(failures)} ticks failed; first, tagged {first.tag!r}: {first.error}{more}"
        )
        self.failures = list(failures)
