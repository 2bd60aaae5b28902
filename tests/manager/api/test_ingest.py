"""The lean route of ``POST /v1/events`` (:mod:`manager.api.ingest`) in process, on a real
bus client of the test's Redis: what it accepts and refuses, what it publishes and records,
and that it answers exactly as the FastAPI route it stands in front of."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import orjson
import pytest
from redis.asyncio import Redis

from bus import BusClient
from bus.archive import ArchiveStore
from bus.archive.audit_log import AuditRecord
from manager.api.app import create_app
from manager.api.auth import SCOPES, Caller, Tokens
from manager.api.ingest import CLIENT_GONE, PublishRoute
from manager.api.models import ApiStatus, Health
from manager.audit import AuditBuffer, audit_key, decode
from manager.config import ApiSettings
from manager.observe.history import History
from manager.status import BotStatus
from tests.conftest import BusFactory

pytestmark = [pytest.mark.redis, pytest.mark.one_redis]

ADMIN = "admin-token-0123456789abcdef"
READER = "reader-token-0123456789abcdef"
CRM = "crm-token-0123456789abcdef"
SLOW = "slow-token-0123456789abcdef"
LIMIT = 4096  # api.max_body_bytes of the tests' application
EVENT_BYTES = 512  # the bus's max_event_bytes


class PublishView:
    """The manager as the publish route sees it: its bus client and audit buffer; it
    records the requests counted."""

    def __init__(self, bus: BusClient) -> None:
        self._bus = bus
        self._audit = AuditBuffer(bus.redis, bus.keys)
        self.counted: list[tuple[str, str, int]] = []

    @property
    def bus(self) -> BusClient:
        return self._bus

    @property
    def audit_buffer(self) -> AuditBuffer:
        return self._audit

    def count_request(self, method: str, route: str, code: int) -> None:
        self.counted.append((method, route, code))

    async def archive(self) -> ArchiveStore | None:
        return None

    async def status(self) -> ApiStatus:
        raise AssertionError("not used by the publish route")

    @property
    def history(self) -> History:
        raise AssertionError("not used by the publish route")

    def bots(self) -> list[BotStatus]:
        raise AssertionError("not used by the publish route")

    async def restart_bot(self, bot_id: str) -> None:
        raise AssertionError("not used by the publish route")

    async def readiness(self) -> tuple[list[str], dict[str, str]]:
        raise AssertionError("not used by the publish route")

    def health(self) -> Health:
        raise AssertionError("not used by the publish route")

    async def metrics(self) -> bytes:
        raise AssertionError("not used by the publish route")


TOKENS = Tokens({
    ADMIN: Caller("admin", frozenset(SCOPES)),
    READER: Caller("reader", frozenset({"read"})),
    CRM: Caller("crm", frozenset({"publish"})),
    SLOW: Caller("slow", frozenset({"publish"}), rate=0.001, burst=2),
})  # fmt: skip


@pytest.fixture
async def view(bus_factory: BusFactory) -> PublishView:
    return PublishView(await bus_factory("api", max_event_bytes=EVENT_BYTES))


@pytest.fixture
def app(view: PublishView) -> PublishRoute:
    return create_app(view, ApiSettings(max_body_bytes=LIMIT), TOKENS)


Client = Callable[..., Awaitable[httpx.Response]]


@pytest.fixture
async def post(app: PublishRoute) -> AsyncIterator[Client]:
    """``post(body, token=CRM, **httpx options)``: POST /v1/events on the lean route."""
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://api.test", timeout=30
    ) as http:

        async def send(body: Any = None, token: str | None = CRM, **options: Any) -> httpx.Response:
            headers = dict(options.pop("headers", {}))
            if token is not None:
                headers["Authorization"] = f"Bearer {token}"
            if body is not None:
                options["json"] = body
            return await http.post("/v1/events", headers=headers, **options)

        yield send


async def stream_entries(redis: Redis, bus: BusClient) -> list[dict[str, Any]]:
    """Every entry of the stream the tests' events go to, oldest first (``redis`` decodes)."""
    entries: Any = await redis.xrange(bus.keys.stream(bus.router.target("test.ingest.sent", None)))
    return [dict(fields) for _, fields in entries]


async def audit_records(view: PublishView, redis: Redis) -> list[AuditRecord]:
    """The audit records of the publishes, once the buffer is written."""
    await view.audit_buffer.flush()
    entries: Any = await redis.xrange(audit_key(view.bus.keys))
    return [decode(item) for _, fields in entries for item in orjson.loads(fields["batch"])]


class TestPublishing:
    async def test_an_event_and_a_batch_are_published_in_order_as_the_token(
        self, post: Client, view: PublishView, redis: Redis
    ) -> None:
        """202 with the ids, one for an object, one per item in order for an array; the
        events carry source api:<token name>; each request counted as the route template."""
        one = await post({"type": "test.ingest.sent", "data": {"n": 0}, "key": "k"})
        assert one.status_code == 202, one.text
        assert one.headers["content-type"] == "application/json"
        batch = await post([{"type": "test.ingest.sent", "data": {"n": n}} for n in (1, 2, 3)])
        assert batch.status_code == 202, batch.text
        ids = one.json()["ids"] + batch.json()["ids"]
        assert len(ids) == 4
        entries = await stream_entries(redis, view.bus)
        assert [e["id"] for e in entries] == ids
        assert [orjson.loads(e["data"])["n"] for e in entries] == [0, 1, 2, 3]
        assert {e["source"] for e in entries} == {"api:crm"}
        assert view.counted == [("POST", "/v1/events", 202)] * 2

    async def test_the_publish_is_recorded_in_the_audit_log(
        self, post: Client, view: PublishView, redis: Redis
    ) -> None:
        """One record per request: the token, ok with the count and ids, or refused with
        the 422's text."""
        ok = await post([{"type": "test.ingest.sent"}, {"type": "test.ingest.sent"}])
        bad = await post({"type": "Not A Type"})
        assert (ok.status_code, bad.status_code) == (202, 422)
        published, refused = await audit_records(view, redis)
        assert (published.actor, published.channel, published.action, published.outcome) == (
            "token:crm", "api", "events.publish", "ok")  # fmt: skip
        assert published.detail == {"count": 2, "ids": ok.json()["ids"]}
        assert refused.outcome == "refused"
        assert refused.error == bad.json()["error"]

    async def test_concurrent_requests_each_get_their_own_ids(
        self, post: Client, view: PublishView, redis: Redis
    ) -> None:
        """Requests answered together (published in one pipeline) get exactly their own
        events' ids, in their order."""
        bodies = [
            [{"type": "test.ingest.sent", "data": {"r": r, "n": n}} for n in range(r % 3 + 1)]
            for r in range(20)
        ]
        answers = await asyncio.gather(*(post(body) for body in bodies))
        assert [a.status_code for a in answers] == [202] * 20
        by_id = {e["id"]: orjson.loads(e["data"]) for e in await stream_entries(redis, view.bus)}
        for r, answer in enumerate(answers):
            ids = answer.json()["ids"]
            assert [by_id[i] for i in ids] == [{"r": r, "n": n} for n in range(r % 3 + 1)]


class TestRefusals:
    async def test_tokens_scopes_and_rates(self, post: Client) -> None:
        """No token, another scheme or an unknown one: 401 with a challenge; a token
        without the publish scope: 403 naming it; past the token's rate: 429."""
        for token, headers in ((None, {}), (None, {"Authorization": "Basic " + CRM})):
            answer = await post({"type": "test.ingest.sent"}, token=token, headers=headers)
            assert answer.status_code == 401
            assert answer.headers["www-authenticate"] == 'Bearer realm="multibot"'
            assert "POST /v1/events needs a token" in answer.json()["error"]
        forged = await post({"type": "test.ingest.sent"}, token="x" * 32)
        assert forged.status_code == 401
        assert 'error="invalid_token"' in forged.headers["www-authenticate"]
        reader = await post({"type": "test.ingest.sent"}, token=READER)
        assert reader.status_code == 403
        assert "lacks the 'publish' scope that POST /v1/events needs" in reader.json()["error"]
        codes = [(await post({"type": "test.ingest.sent"}, token=SLOW)) for _ in range(3)]
        assert [c.status_code for c in codes] == [202, 202, 429]
        assert int(codes[2].headers["retry-after"]) >= 1
        assert "over its rate limit" in codes[2].json()["error"]

    async def test_bodies_over_the_limit_are_413_declared_or_streamed(
        self, post: Client, view: PublishView, redis: Redis
    ) -> None:
        """Over api.max_body_bytes by Content-Length, or counted as a chunked body
        arrives: 413 saying the limit, before anything is published."""
        big = {"type": "test.ingest.sent", "data": {"blob": "x" * LIMIT}}
        declared = await post(big)
        assert declared.status_code == 413
        assert f"over {LIMIT} bytes (api.max_body_bytes)" in declared.json()["error"]

        async def chunks() -> AsyncIterator[bytes]:  # no Content-Length
            yield b'{"type": "test.ingest.sent", "data": {"blob": "'
            for _ in range(LIMIT // 1000 + 1):
                yield b"y" * 1000
            yield b'"}}'

        streamed = await post(content=chunks(), headers={"Content-Type": "application/json"})
        assert streamed.status_code == 413
        assert streamed.json() == declared.json()
        assert await stream_entries(redis, view.bus) == []

    async def test_bad_json_and_bad_items(
        self, post: Client, view: PublishView, redis: Redis
    ) -> None:
        """Not JSON: 400; not an object or 1 to 1000 of them: 422; a batch with bad items
        (by the API's model, the library's rules, or the size limit): 422 naming each by
        its index, and none of the batch is published."""
        malformed = await post(content=b'{"type": ', headers={"Content-Type": "application/json"})
        assert malformed.status_code == 400
        assert "the body is not valid JSON" in malformed.json()["error"]
        shapes: list[Any] = ["a string", [], [{}] * 1001]
        for shape in shapes:
            answer = await post(shape)
            assert answer.status_code == 422, shape
            assert "JSON object or 1 to 1000" in answer.json()["error"]
        batch = [
            {"type": "test.ingest.sent"},
            {"type": "Bad Type"},
            {"type": "test.ingest.sent", "colour": "red"},
            {"type": "test.ingest.sent", "data": {"blob": "z" * EVENT_BYTES}},
            {"type": "test.ingest.sent"},
        ]
        answer = await post(batch)
        assert answer.status_code == 422
        body = answer.json()
        assert [(p["index"], p["loc"]) for p in body["detail"]] == [
            (1, ["type"]), (2, ["colour"]), (3, ["data"])]  # fmt: skip
        assert body["error"].startswith("not published, the events are not valid: [1] type")
        assert await stream_entries(redis, view.bus) == []

    async def test_an_item_over_the_size_limit_alone_refuses_the_batch(
        self, post: Client, view: PublishView, redis: Redis
    ) -> None:
        """The check publish_many makes (the size limit): 422 naming the item; nothing of
        the batch is published, and a single event says 'the event is'."""
        blob = {"type": "test.ingest.sent", "data": {"blob": "z" * EVENT_BYTES}}
        answer = await post([{"type": "test.ingest.sent"}, blob])
        assert answer.status_code == 422
        assert [p["index"] for p in answer.json()["detail"]] == [1]
        alone = await post(blob)
        assert alone.status_code == 422
        assert alone.json()["error"].startswith("not published, the event is not valid: data")
        assert await stream_entries(redis, view.bus) == []


class TestSameAsFastApi:
    async def test_every_refusal_is_answered_as_the_fastapi_route_answers_it(
        self, app: PublishRoute
    ) -> None:
        """Status, body and the headers that matter, for each kind of refusal and a
        success, on the lean route and on the FastAPI route behind it."""
        json_type = {"Content-Type": "application/json"}
        cases: list[tuple[dict[str, str], bytes]] = [
            ({}, b'{"type": "test.ingest.sent"}'),
            ({"Authorization": "Bearer " + "x" * 32}, b"{}"),
            ({"Authorization": "Bearer " + READER}, b"{}"),
            ({"Authorization": "Bearer " + ADMIN, **json_type}, b'{"type": '),
            ({"Authorization": "Bearer " + ADMIN, **json_type}, b'"just a string"'),
            ({"Authorization": "Bearer " + ADMIN, **json_type}, b'[{"type": "x y"}, {"a": 1}]'),
            ({"Authorization": "Bearer " + ADMIN, **json_type}, b'{"type": "a.b", "data": 1}'),
            ({"Authorization": "Bearer " + ADMIN}, b'{"type": "a.b", "x": "' + b"y" * LIMIT),
        ]
        answers = []
        for target in (app, app.app):
            async with httpx.AsyncClient(
                transport=httpx.ASGITransport(app=target), base_url="http://api.test"
            ) as http:
                answers.append([
                    await http.post("/v1/events", headers=headers, content=body)
                    for headers, body in cases
                ])  # fmt: skip
        for lean, framework in zip(*answers, strict=True):
            assert lean.status_code == framework.status_code, lean.text
            assert lean.json() == framework.json()
            for header in ("content-type", "www-authenticate", "retry-after"):
                assert lean.headers.get(header) == framework.headers.get(header), header
        assert [a.status_code for a in answers[0]] == [401, 401, 403, 400, 422, 422, 422, 413]

    async def test_other_requests_go_to_fastapi(self, app: PublishRoute, view: PublishView) -> None:
        """Another method on the path, or another path: FastAPI answers (its 401 naming
        the route, the request counted by its template)."""
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://api.test"
        ) as http:
            answer = await http.get("/v1/events")
            assert answer.status_code == 401
            assert "GET /v1/events needs a token" in answer.json()["error"]
            assert (await http.get("/openapi.json")).json()["paths"]["/v1/events"]["post"]
        assert view.counted[0] == ("GET", "/v1/events", 401)


class TestDisconnect:
    async def test_a_client_gone_before_its_body_gets_no_answer(
        self, app: PublishRoute, view: PublishView, redis: Redis
    ) -> None:
        """Nothing is sent or published; the request is counted as 499 and audited as
        failed."""
        scope = {
            "type": "http", "method": "POST", "path": "/v1/events", "root_path": "",
            "query_string": b"", "headers": [(b"authorization", f"Bearer {CRM}".encode())],
        }  # fmt: skip
        messages = iter([
            {"type": "http.request", "body": b'{"type": ', "more_body": True},
            {"type": "http.disconnect"},
        ])  # fmt: skip
        sent: list[Any] = []

        async def receive() -> Any:
            return next(messages)

        async def send(message: Any) -> None:
            sent.append(message)

        await app(scope, receive, send)
        assert sent == []
        assert view.counted == [("POST", "/v1/events", CLIENT_GONE)]
        [record] = await audit_records(view, redis)
        assert (record.outcome, record.error) == ("failed", "ClientGoneError: ")
        assert await stream_entries(redis, view.bus) == []
