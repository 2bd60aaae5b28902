"""The API's archive routes (``/v1/events``, ``/v1/traces``) in process, on a real archive.

The application runs in this process over ASGI, on a real bus client (the test's Redis) and
a real archive store (the test's PostgreSQL); the view of the manager around them is the
only stand-in. The black-box tests of the whole manager are in tests/daemon/test_api.py.
"""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import httpx
import pytest

from bus import BusClient
from bus.archive import ArchiveStore
from bus.archive.deliveries import DeliveryRow
from manager.api.app import create_app
from manager.api.auth import SCOPES, Caller, Tokens
from manager.api.models import ApiStatus, Health
from manager.audit import AuditBuffer
from manager.config import ApiSettings
from manager.observe.history import History
from manager.status import BotStatus
from tests.conftest import BusFactory
from tests.manager.cli.test_cli_archive import _chain, deep_chain

pytestmark = [pytest.mark.redis, pytest.mark.postgres, pytest.mark.one_redis]

TOKEN = "test-admin-token-0123456789abcdef"


class ArchiveView:
    """The manager as the archive routes see it: its bus client and archive store."""

    def __init__(self, bus: BusClient, store: ArchiveStore) -> None:
        self._bus = bus
        self._store = store
        self._audit = AuditBuffer(bus.redis, bus.keys)

    @property
    def bus(self) -> BusClient:
        return self._bus

    async def archive(self) -> ArchiveStore | None:
        return self._store

    async def status(self) -> ApiStatus:
        raise AssertionError("not used by the archive routes")

    @property
    def history(self) -> History:
        raise AssertionError("not used by the archive routes")

    @property
    def audit_buffer(self) -> AuditBuffer:
        return self._audit

    def bots(self) -> list[BotStatus]:
        raise AssertionError("not used by the archive routes")

    async def restart_bot(self, bot_id: str) -> None:
        raise AssertionError("not used by the archive routes")

    async def readiness(self) -> tuple[list[str], dict[str, str]]:
        raise AssertionError("not used by the archive routes")

    def health(self) -> Health:
        raise AssertionError("not used by the archive routes")

    async def metrics(self) -> bytes:
        raise AssertionError("not used by the archive routes")

    def count_request(self, method: str, route: str, code: int) -> None:
        pass


@pytest.fixture
async def client(store: ArchiveStore, bus_factory: BusFactory) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client of the API application, authenticated as admin."""
    view = ArchiveView(await bus_factory("api"), store)
    tokens = Tokens({TOKEN: Caller("admin", frozenset(SCOPES))})
    app = create_app(view, ApiSettings(), tokens)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app),
        base_url="http://api.test",
        headers={"Authorization": f"Bearer {TOKEN}"},
        timeout=30,
    ) as http:
        yield http


class TestTrace:
    async def test_three_hop_chain_is_given_depth_first_with_parents(
        self, store: ArchiveStore, client: httpx.AsyncClient
    ) -> None:
        """Each event once, depth-first, with the id of its cause in the tree and its depth."""
        root, child, grandchild = await _chain(store)
        answer = await client.get(f"/v1/traces/{root.id}")
        assert answer.status_code == 200, answer.text
        trace = answer.json()
        assert (trace["correlation_id"], trace["events"]) == (root.id, 3)
        assert [(n["id"], n["parent_id"], n["depth"]) for n in trace["nodes"]] == [
            (root.id, None, 0),
            (child.id, root.id, 1),
            (grandchild.id, child.id, 2),
        ]
        assert trace["nodes"][1]["type"] == "user.message.sent"

    async def test_a_chain_600_hops_deep_is_answered(
        self, store: ArchiveStore, client: httpx.AsyncClient
    ) -> None:
        """A chain deeper than Python's recursion and JSON's nesting limits: 200, every hop."""
        chain = await deep_chain(store, 600)
        answer = await client.get(f"/v1/traces/{chain[0].id}")
        assert answer.status_code == 200, answer.text
        trace = answer.json()
        assert trace["events"] == 600
        assert [(n["id"], n["parent_id"], n["depth"]) for n in trace["nodes"]] == [
            (e.id, chain[n - 1].id if n else None, n) for n, e in enumerate(chain)
        ]


class TestDeliveries:
    async def test_each_group_s_outcomes_and_an_unknown_event(
        self, store: ArchiveStore, client: httpx.AsyncClient
    ) -> None:
        """An archived event greeter's group handled after taking it over: the group, its
        status and the outcome with its consumer, delivery count and the consumer it came
        from; an id no event has is a 404 saying archiving takes a moment."""
        root, _, _ = await _chain(store)
        done = datetime.now(UTC)
        await store.deliveries.copy([
            DeliveryRow(
                event_id=root.id, created_at=root.timestamp, group_name="bot-group-greeter",
                consumer="greeter-1", outcome="handled", attempts=2, entry_id="5-0",
                read_at=done - timedelta(milliseconds=30), done_at=done, handler_ms=12.5,
                previous="greeter-0",
            )
        ])  # fmt: skip
        answer = await client.get(f"/v1/events/{root.id}/deliveries")
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["event"]["id"] == root.id
        (group,) = body["groups"]
        assert (group["group"], group["expected"], group["status"]) == (
            "bot-group-greeter",
            False,
            "handled",
        )
        (outcome,) = group["outcomes"]
        assert (outcome["consumer"], outcome["attempts"], outcome["previous_consumer"]) == (
            "greeter-1",
            2,
            "greeter-0",
        )
        missing = await client.get("/v1/events/0190d5b6-6a8b-7c3d-8e4f-0a1b2c3d4e5f/deliveries")
        assert missing.status_code == 404
        assert "archiving takes a moment" in missing.json()["error"]


def _cursor(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


#: Query parameters past what their type holds, and what the 422 says.
OUT_OF_RANGE = {
    "since=99999999999d": "at most 36500d",
    "since=36501d": "at most 36500d",
    "until=99999999999999999999999999s": "at most 36500d",
    f"since={'9' * 5000}m": "at most 36500d",
    "since=0001-01-01T00:00:00%2B05:00": "between 0001-01-01 and 9999-12-31",
    "until=9999-12-31T23:59:59-05:00": "between 0001-01-01 and 9999-12-31",
    "limit=-1": "limit",
    "limit=99999999999999999999999": "limit",
    f"cursor={_cursor('9' * 30 + '/x')}": "not a cursor",
    f"cursor={_cursor('-' + '9' * 30 + '/x')}": "not a cursor",
}


class TestQueryParameters:
    @pytest.mark.parametrize("query", OUT_OF_RANGE, ids=[q[:40] for q in OUT_OF_RANGE])
    async def test_values_out_of_range_are_a_422_saying_the_range(
        self, client: httpx.AsyncClient, query: str
    ) -> None:
        """A duration, time, limit or cursor too large (or negative) for its type: a 422
        naming the range, never a 500."""
        answer = await client.get(f"/v1/events?{query}")
        assert answer.status_code == 422, answer.text
        assert OUT_OF_RANGE[query] in answer.json()["error"]

    @pytest.mark.parametrize(
        "path", ["/v1/events/a%00b", "/v1/traces/a%00b", "/v1/events/a%00b/deliveries"]
    )
    async def test_an_id_with_a_nul_character_is_a_422(
        self, client: httpx.AsyncClient, path: str
    ) -> None:
        """An id PostgreSQL cannot hold as text: a 422 saying so, not a 500."""
        answer = await client.get(path)
        assert answer.status_code == 422, answer.text
        assert "NUL character" in answer.json()["error"]

    async def test_durations_in_range_still_work(
        self, store: ArchiveStore, client: httpx.AsyncClient
    ) -> None:
        """The longest duration allowed and an old time with an offset are answered."""
        await _chain(store)
        for query in ("since=36500d", "since=1900-01-01T00:00:00%2B05:00", "until=36500d"):
            answer = await client.get(f"/v1/events?{query}")
            assert answer.status_code == 200, (query, answer.text)
        answer = await client.get("/v1/events?since=36500d")
        assert len(answer.json()["events"]) == 4


class TestUnrouted:
    async def test_an_unknown_path_and_a_wrong_method_answer_in_the_api_s_shape(
        self, client: httpx.AsyncClient
    ) -> None:
        """Not FastAPI's bare ``{"detail": "Not Found"}``: the API's error shape, saying
        what was asked and where the API is listed."""
        missing = await client.get("/v1/no-such-thing")
        assert missing.status_code == 404
        assert missing.json() == {
            "error": "no such endpoint: GET /v1/no-such-thing; the API is listed at /docs"
        }
        wrong = await client.delete("/v1/traces/abc")
        assert wrong.status_code == 405
        assert wrong.json()["error"].startswith("DELETE /v1/traces/abc is not allowed")
        assert "GET" in wrong.json()["error"] and wrong.headers["allow"] == "GET"
