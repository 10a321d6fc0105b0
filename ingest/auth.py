"""Bearer-token authentication for feeders."""

from __future__ import annotations

import hmac
from collections.abc import Mapping


class TokenAuth:
    """Maps a presented token to its name, comparing in constant time."""

    def __init__(self, tokens: Mapping[str, str]) -> None:
        self._tokens = [(name, token.encode()) for name, token in tokens.items()]

    def __bool__(self) -> bool:
        return bool(self._tokens)

    def identify(self, authorization: str | None) -> str | None:
        """The name of the token in an ``Authorization: Bearer`` header, or None."""
        if not authorization:
            return None
        scheme, _, presented = authorization.partition(" ")
        if scheme.lower() != "bearer" or not presented.strip():
            return None
        candidate = presented.strip().encode()
        found = None
        # Compare against every token so the time taken does not tell which matched.
        for name, token in self._tokens:
            if hmac.compare_digest(candidate, token):
                found = name
        return found
