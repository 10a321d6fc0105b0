"""The flusher: competing consumers that move the stream into Postgres, exactly once per key."""
