"""The ingest service: authenticate, validate, append to the Redis Stream, answer."""

from ingest.app import create_app

__all__ = ["create_app"]
