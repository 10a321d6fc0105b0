"""The fields of a dead letter (an entry moved to ``ticks.dead``), written by the flusher
and read by `tickpipe dlq` and `tickpipe audit`."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

ORIGINAL_ID = "original_id"
"""The id the entry had in its stream."""
STREAM = "stream"
"""The stream it came from."""
REASON = "reason"
DELIVERIES = "deliveries"
"""How many times it was delivered before it was moved."""
FIELD_PREFIX = "field:"
"""Prefixes each of the entry's own fields, kept as the original bytes."""


def encode(
    original_id: str,
    stream: str,
    reason: str,
    deliveries: int,
    fields: Mapping[bytes, bytes],
) -> list[bytes | str]:
    """The XADD field list of one dead letter."""
    out: list[bytes | str] = [
        ORIGINAL_ID, original_id,
        STREAM, stream,
        REASON, reason,
        DELIVERIES, str(deliveries),
    ]  # fmt: skip
    for key, value in fields.items():
        out.extend((FIELD_PREFIX.encode() + key, value))
    return out


@dataclasses.dataclass(frozen=True, slots=True)
class DeadLetterFields:
    """A dead letter as read back; None where the letter lacks the field."""

    original_id: str | None
    stream: str | None
    reason: str | None
    deliveries: int
    fields: dict[str, str]
    """The entry's own fields, without their prefix."""


def decode(raw: Mapping[str, str]) -> DeadLetterFields:
    """A dead letter from its fields as text."""
    rest = dict(raw)
    return DeadLetterFields(
        original_id=rest.pop(ORIGINAL_ID, None),
        stream=rest.pop(STREAM, None),
        reason=rest.pop(REASON, None),
        deliveries=int(rest.pop(DELIVERIES, 0)),
        fields={k.removeprefix(FIELD_PREFIX): v for k, v in rest.items()},
    )
