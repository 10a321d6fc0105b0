"""Bad input at scale: schemathesis against a real ingest, with real Redis and Postgres.

ingest, a flusher and a rollup worker run as processes (`python -m ingest`, ...)
on the session's servers, in a database of their own. schemathesis reads the
served /openapi.json and sends thousands of generated requests to every
operation: schema-valid ones (positive) and ones that break the schema on
purpose (negative), first one request at a time, then in stateful sequences
that follow the document's links (POST a tick, then read it back).

Every answer must be documented: no 5xx (not even the documented 503s: the
servers are healthy), a documented status, content type, headers and body
(each event of the event stream too), a negative request refused with a 4xx,
a positive one accepted (but for the rules listed in UNSTATED), and no read
route served without a token.

GET /ticks/stream never ends by itself: each request reads the events that
come within STREAM_READ_S (at most 20, schemathesis' max-stream-events), then
hangs up. TICKPIPE_SCHEMATHESIS_EXAMPLES raises the examples per operation for
a longer run (docs/reliability.md).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from asyncio.subprocess import Process
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import hypothesis
import pytest
import requests
import schemathesis
from schemathesis import Case, CheckContext, Response
from schemathesis.openapi.checks import RejectedPositiveData
from schemathesis.specs.openapi.checks import positive_data_acceptance
from schemathesis.specs.openapi.schemas import OpenApiSchema

from ingest.openapi import openapi_document
from tests.conftest import TEST_TOKEN, fresh_database, service_env
from tests.ingest.conftest import READ_TOKENS
from tickpipe.core import redis_conn
from tickpipe.core.settings import Settings
from tickpipe.lab.stack import LocalStack, free_port

pytestmark = pytest.mark.services

EXAMPLES = int(os.environ.get("TICKPIPE_SCHEMATHESIS_EXAMPLES", "200"))
"""Examples per operation, per generation mode and phase."""
STATEFUL_EXAMPLES = max(10, EXAMPLES // 3)
"""Stateful scenarios (each up to STATEFUL_STEPS requests)."""
STATEFUL_STEPS = 10
STREAM_READ_S = 0.1
"""How long one GET /ticks/stream is read before the client hangs up."""
REQUEST_TIMEOUT_S = 30.0
GENERATION_SPEED = [
    hypothesis.HealthCheck.too_slow,
    hypothesis.HealthCheck.filter_too_much,
    hypothesis.HealthCheck.data_too_large,
]
"""Health checks of how fast examples are generated (it varies with the machine's load),
not of the API: not failures here."""

[(READ_TOKEN_NAME, READ_TOKEN)] = READ_TOKENS.items()
AnyCase = Case[Any]

UNSTATED: dict[str, dict[str, tuple[str, ...]]] = {
    # A price or volume's digit limits count the digits after an exponent is expanded
    # (1e99 is 100 integer digits), and "> 0" binds a decimal string: no JSON Schema
    # keyword says either.
    "POST /ingest/tick": {"price": ("",), "volume": ("",)},
    "POST /ingest/ticks": {"price": ("",), "volume": ("",)},
    # `to` later than `from` compares two parameters; a cursor is opaque: only one this
    # API returned is one (the stateful run follows the `next` link with real ones).
    "GET /ticks/{symbol}": {
        "to": ("to must be later than from",),
        "cursor": ("cursor is not one this API returned", "cursor only pages a from/to range"),
    },
    # The number of shards is the deployment's (STREAM_SHARDS), not the document's.
    "GET /ticks/stream": {"shard": ("shard must be 0 to",)},
}
"""Per operation: the rules a schema-valid request can still break, as the 422 names them
(field -> the start of its detail)."""


# -- the servers ------------------------------------------------------------------------


async def wait_ready(url: str, processes: list[Process], logs: Path) -> None:
    async with aiohttp.ClientSession() as session:
        for _ in range(300):
            if any(process.returncode is not None for process in processes):
                pytest.fail(f"a server exited: {_tails(logs)}")
            try:
                async with session.get(f"{url}/readyz") as answer:
                    if answer.status == 200:
                        return
            except aiohttp.ClientConnectionError:
                pass
            await asyncio.sleep(0.1)
    pytest.fail(f"ingest is not ready after 30 s: {_tails(logs)}")


def _tails(logs: Path) -> str:
    return "\n".join(f"{log.name}: {log.read_text()[-2000:]}" for log in sorted(logs.iterdir()))


@pytest.fixture(scope="module")
async def ingest_url(
    stack: LocalStack, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[str]:
    """ingest, a flusher and a rollup worker on the session's Redis (emptied) and a database
    of their own; the base URL of ingest."""
    database_url = await fresh_database(stack, "tickpipe_schemathesis")
    redis = redis_conn.connect(stack.redis_url, client_name="tickpipe-tests")
    await redis.flushall()
    await redis.aclose()
    port = free_port()
    env = {
        **os.environ,
        **service_env(
            stack,
            DATABASE_URL=database_url,
            READ_TOKENS=f"{READ_TOKEN_NAME}:{READ_TOKEN}",
            INGEST_PORT=str(port),
            SSE_HEARTBEAT_S="1",
        ),
    }
    logs = tmp_path_factory.mktemp("schemathesis-logs")
    processes = []
    for command in (["ingest"], ["flusher"], ["tickpipe", "rollup"]):
        with (logs / f"{command[-1]}.log").open("wb") as log:
            processes.append(
                await asyncio.create_subprocess_exec(
                    sys.executable, "-m", *command, env=env, stdout=log, stderr=log
                )
            )
    url = f"http://127.0.0.1:{port}"
    try:
        await wait_ready(url, processes, logs)
        await trim_a_first_tick(url, Settings.from_env(env))
        yield url
    finally:
        for process in processes:
            if process.returncode is None:
                process.terminate()
        for process in processes:
            try:
                await asyncio.wait_for(process.wait(), 15)
            except TimeoutError:
                process.kill()
                await process.wait()
    statuses: Counter[int] = Counter()
    for (_, status), count in SENT.items():
        statuses[status] += count
    print(f"\nschemathesis: {SENT.total()} requests, by status {dict(sorted(statuses.items()))}")
    # An exception after an event stream's 200 reaches no client: only the log tells.
    ingest_log = (logs / "ingest.log").read_text()
    assert "Traceback" not in ingest_log, ingest_log[-5000:]


async def trim_a_first_tick(url: str, settings: Settings) -> None:
    """A tick written, then trimmed from the stream: an event stream resumed from before
    it (Last-Event-ID 0-0, say) starts with a `gap` event, which gets checked too."""
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {TEST_TOKEN}"}) as http:
        tick = {"symbol": "GAP", "ts": 0, "price": "1", "volume": "1", "source": "setup"}
        async with http.post(f"{url}/ingest/tick", json=tick) as answer:
            assert answer.status == 200, await answer.text()
    redis = redis_conn.connect(settings.redis_url, client_name="tickpipe-tests")
    try:
        for _ in range(300):  # acknowledged by the flusher first: trimming takes only that
            [group] = await redis.xinfo_groups(settings.stream_name)
            if group["pending"] == 0 and group["lag"] == 0:
                break
            await asyncio.sleep(0.1)
        await redis.xtrim(settings.stream_name, maxlen=0)
    finally:
        await redis.aclose()


class RoleTokens:
    """The ingest token on the ingest routes, the read-only token on every other one."""

    def get(self, case: AnyCase, ctx: schemathesis.AuthContext) -> str:
        return TEST_TOKEN if case.method.upper() == "POST" else READ_TOKEN

    def set(self, case: AnyCase, data: str, ctx: schemathesis.AuthContext) -> None:
        case.headers["Authorization"] = f"Bearer {data}"


def config() -> schemathesis.Config:
    """Every check schemathesis has, but positive_data_accepted for positive_data_acceptance
    (and no schemathesis.toml from around the checkout)."""
    return schemathesis.Config.from_dict(
        {"checks": {"positive_data_acceptance": {"enabled": False}}}
    )


def configured(schema: OpenApiSchema) -> OpenApiSchema:
    """``schema`` with the test settings: both generation modes, the tokens, the timeout."""
    schema.config.update(request_timeout=REQUEST_TIMEOUT_S)
    schema.config.generation.update(
        modes=[schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE],
        max_examples=EXAMPLES,
    )
    schema.auth(refresh_interval=None)(RoleTokens)
    return schema


# The document ingest serves (GET /openapi.json answers exactly this, which
# test_served_document_is_the_one_tested checks), loaded at import so that each
# operation is a test of its own; requests go to the running ingest (base_url).
schema = configured(schemathesis.openapi.from_dict(openapi_document(), config=config()))


@pytest.fixture(scope="module")
def api(ingest_url: str) -> OpenApiSchema:
    """The document as ingest serves it at /openapi.json, for the stateful run."""
    return configured(schemathesis.openapi.from_url(f"{ingest_url}/openapi.json", config=config()))


SENT: Counter[tuple[str, int]] = Counter()
"""Requests sent, by operation and status (printed at the end: `pytest -s`)."""


@schemathesis.hook
def after_call(context: schemathesis.HookContext, case: AnyCase, response: Response) -> None:
    SENT[case.operation.label, response.status_code] += 1


@schemathesis.serializer("application/x-ndjson")
def ndjson(ctx: schemathesis.SerializationContext, value: Any) -> bytes:
    """A batch as NDJSON: the array's items one per line (anything else on one line)."""
    items = value if isinstance(value, list) else [value]
    return b"".join(json.dumps(item).encode() + b"\n" for item in items)


# -- the checks -------------------------------------------------------------------------


def positive_data_accepted(ctx: CheckContext, response: Response, case: AnyCase) -> bool | None:
    """schemathesis' positive_data_acceptance, but for the refusals UNSTATED lists."""
    try:
        return positive_data_acceptance(ctx, response, case)
    except RejectedPositiveData:
        if response.status_code == 422 and _unstated(case, response.json()):
            return None
        raise


def _unstated(case: AnyCase, body: Any) -> bool:
    rules = UNSTATED.get(f"{case.method.upper()} {case.operation.path}", {})
    field, detail = body.get("field"), body.get("detail", "")
    return field in rules and any(detail.startswith(start) for start in rules[field])


def call_kwargs(case: AnyCase) -> dict[str, Any]:
    if case.operation.path == "/ticks/stream":
        return {"timeout": STREAM_READ_S}
    return {}


# -- the runs ---------------------------------------------------------------------------


def test_served_document_is_the_one_tested(ingest_url: str) -> None:
    assert requests.get(f"{ingest_url}/openapi.json", timeout=10).json() == openapi_document()


@schema.parametrize()
# The same examples every run: a query array mutated into one string (``symbols=NULL``)
# is, on the wire, a valid one-element array, which schemathesis counts as accepted
# negative data; a fixed draw keeps such chance findings out of the suite.
@hypothesis.settings(deadline=None, suppress_health_check=GENERATION_SPEED, derandomize=True)
def test_every_generated_request_gets_a_documented_answer(case: AnyCase, ingest_url: str) -> None:
    case.call_and_validate(
        base_url=ingest_url, additional_checks=[positive_data_accepted], **call_kwargs(case)
    )


def test_stateful_sequences_follow_the_links(api: OpenApiSchema) -> None:
    """POST ticks, then follow the links: latest, history and its pages, ranges, events."""

    class Sequences(api.as_state_machine()):  # type: ignore[misc]
        def get_call_kwargs(self, case: AnyCase) -> dict[str, Any]:
            return call_kwargs(case)

        def validate_response(
            self,
            response: Response,
            case: AnyCase,
            additional_checks: list[Any] | None = None,
            **kwargs: Any,
        ) -> None:
            super().validate_response(
                response, case, additional_checks=[positive_data_accepted], **kwargs
            )

    Sequences.run(
        settings=hypothesis.settings(
            max_examples=STATEFUL_EXAMPLES,
            stateful_step_count=STATEFUL_STEPS,
            deadline=None,
            suppress_health_check=GENERATION_SPEED,
            derandomize=True,
        )
    )
