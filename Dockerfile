FROM python:3.11-slim

WORKDIR /app
COPY pyproject.toml README.md schema.sql schema_rollups.sql schema_brin.sql ./
COPY tickpipe ./tickpipe
COPY ingest ./ingest
COPY flusher ./flusher
RUN pip install --no-cache-dir . \
    && useradd --system --no-create-home tickpipe

USER tickpipe
EXPOSE 8080
CMD ["tickpipe", "--help"]
