"""The HTTP API, black-box: real HTTP against a running ``multibot start``.

Every endpoint with and without tokens, with bad bodies and parameters. Two managers: one
for who may do what and what bad input gets, one for the happy paths with a bot, the
archive and the dead letters.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from collections.abc import AsyncIterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

import httpx
import pytest
from redis.asyncio import Redis

from bus.keys import Keys
from tests.daemon.conftest import ManagerFactory
from tests.daemon.manager_process import ManagerProcess, bot_toml
from tests.support import wait_until

pytestmark = [pytest.mark.redis, pytest.mark.postgres, pytest.mark.one_redis]

READER = "reader-token-0123456789abcdef"
PUBLISHER = "publisher-token-0123456789abcdef"
BURSTY = "bursty-token-0123456789abcdef"
STEADY = "tests.daemon.sample_bots:steady"
CRASH_LOOP = {"backoff_base": 0.05, "backoff_cap": 0.1, "crash_loop_restarts": 2,
              "crash_loop_window": 60.0}  # fmt: skip


def api_config(tmp_path: Path, **api: Any) -> str:
    token_file = tmp_path / "publisher.token"
    token_file.write_text(PUBLISHER + "\n")
    options = "".join(f"{k} = {v}\n" for k, v in api.items())
    return (
        f"[api]\n{options}"
        "[[api.tokens]]\n"
        f'name = "reader"\nscopes = ["read"]\ntoken = "{READER}"\n'
        "[[api.tokens]]\n"
        f'name = "crm"\nscopes = ["publish"]\ntoken_file = "{token_file}"\n'
        "[[api.tokens]]\n"
        f'name = "bursty"\nscopes = ["read"]\ntoken = "{BURSTY}"\n'
        "rate_limit = 5\nrate_burst = 10\n"
    )


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=10) as http:
        yield http


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def api(manager: ManagerProcess) -> tuple[str, str]:
    url, admin = await manager.api()
    assert url.startswith("http://127.0.0.1:")
    return url, admin


class TestAccessAndBadInput:
    async def test_tokens_scopes_limits_and_bad_bodies(
        self, manager_factory: ManagerFactory, client: httpx.AsyncClient, tmp_path: Path
    ) -> None:
        """No write without a token; each token only within its scopes; 401/403 say why;
        bad JSON, wrong types, unknown fields, oversize bodies and bad parameters get a
        4xx that names the problem, never a 500; a token past its rate gets 429."""
        config = api_config(tmp_path, max_body_bytes=4096)
        bots = bot_toml("broken", "tests.daemon.sample_bots:crasher", restart=CRASH_LOOP)
        manager = await manager_factory(bots, extra=config)
        url, admin = await api(manager)
        token_file = manager.data_dir / "api-admin.token"
        assert oct(token_file.stat().st_mode & 0o777) == "0o600"
        assert "api-admin.token" in manager.log()

        await check_scopes(client, url)
        await check_readiness_names_failed_bot(client, url)
        await check_bad_bodies(client, url, admin)
        await check_bad_queries(client, url, admin)
        await check_rate_limit(client, url)
        assert "Traceback" not in manager.log()


async def check_scopes(client: httpx.AsyncClient, url: str) -> None:
    anonymous = await client.post(f"{url}/v1/events", json={"type": "test.a.b"})
    assert anonymous.status_code == 401
    assert anonymous.headers["www-authenticate"].startswith("Bearer")
    assert "needs a token" in anonymous.json()["error"]
    forged = await client.get(f"{url}/v1/bots", headers=bearer("x" * 32))
    assert forged.status_code == 401
    assert "not one this manager knows" in forged.json()["error"]
    cases = [
        (READER, "POST", "/v1/events", "publish"),
        (PUBLISHER, "GET", "/v1/events", "read"),
        (PUBLISHER, "GET", "/v1/streams", "read"),
        (READER, "POST", "/v1/bots/broken/restart", "admin"),
        (READER, "DELETE", "/v1/dlq/1-0", "admin"),
        (READER, "POST", "/v1/dlq/1-0/retry", "admin"),
    ]
    for token, method, path, scope in cases:
        answer = await client.request(method, url + path, headers=bearer(token),
                                      json={"type": "test.a.b"})  # fmt: skip
        assert answer.status_code == 403, (method, path, answer.text)
        assert f"lacks the '{scope}' scope" in answer.json()["error"]
    published = await client.post(f"{url}/v1/events", headers=bearer(PUBLISHER),
                                  json={"type": "test.scope.checked"})  # fmt: skip
    assert published.status_code == 202, published.text
    for path in ("/v1/bots", "/v1/streams", "/v1/groups", "/v1/dlq"):
        assert (await client.get(url + path, headers=bearer(READER))).status_code == 200
    # Open without a token (api.open_status): health, metrics, the status page.
    for path in ("/healthz", "/metrics", "/v1/status", "/", "/openapi.json"):
        assert (await client.get(url + path)).status_code == 200, path


async def check_readiness_names_failed_bot(client: httpx.AsyncClient, url: str) -> None:
    async def unready() -> bool:
        answer = await client.get(f"{url}/readyz")
        return answer.status_code == 503 and "'broken'" in " ".join(answer.json()["problems"])

    await wait_until(unready, 30, "readyz to report the failed bot")
    checks = (await client.get(f"{url}/readyz")).json()["checks"]
    assert checks["redis"] == "ok" and checks["coordinator"] == "ok"
    assert checks["bots"] == "failed: broken"


async def check_bad_bodies(client: httpx.AsyncClient, url: str, admin: str) -> None:
    headers = {**bearer(admin), "Content-Type": "application/json"}
    bad_bodies: list[tuple[bytes, int, str]] = [
        (b'{"type": "test.a.b",', 400, "not valid JSON"),
        (b'"just a string"', 422, "JSON object or 1 to"),
        (b"[]", 422, "JSON object or 1 to"),
        (b'{"type": "test.a.b", "data": [1, 2]}', 422, "data"),
        (b'{"type": "test.a.b", "colour": "red"}', 422, "colour"),
        (b'{"type": "User Message"}', 422, "not a valid event type"),
        (b'{"type": "test.a.b", "version": "two"}', 422, "version"),
        (b'{"data": {}}', 422, "type"),
    ]
    for body, code, says in bad_bodies:
        answer = await client.post(f"{url}/v1/events", content=body, headers=headers)
        assert answer.status_code == code, (body, answer.text)
        assert says in answer.json()["error"], (body, answer.json())
    batch = [{"type": "test.batch.ok"}, {"type": "Bad Type"}, {"type": "test.batch.ok"}]
    answer = await client.post(f"{url}/v1/events", json=batch, headers=bearer(admin))
    assert answer.status_code == 422
    assert [p["index"] for p in answer.json()["detail"]] == [1]
    assert "[1] type" in answer.json()["error"]
    oversize = {"type": "test.a.b", "data": {"blob": "x" * 5000}}
    answer = await client.post(f"{url}/v1/events", json=oversize, headers=bearer(admin))
    assert answer.status_code == 413
    assert "api.max_body_bytes" in answer.json()["error"]

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: counted as it comes
        yield b'{"type": "test.a.b", "data": {"blob": "'
        for _ in range(10):
            yield b"y" * 1000
        yield b'"}}'

    answer = await client.post(f"{url}/v1/events", content=chunks(), headers=headers)
    assert answer.status_code == 413


async def check_bad_queries(client: httpx.AsyncClient, url: str, admin: str) -> None:
    bad_queries = [
        ("/v1/events?limit=0", 422, "limit"),
        ("/v1/events?where=notjson", 422, "is not JSON"),
        ("/v1/events?where=[1]", 422, "JSON object"),
        ("/v1/events?since=last-tuesday", 422, "neither a time"),
        ("/v1/events?since=99999999999d", 422, "at most 36500d"),
        ("/v1/events?cursor=garbage", 422, "not a cursor"),
        ("/v1/events/not-an-id", 404, "no archived event"),
        ("/v1/dlq?after=yesterday", 422, "after"),
        ("/v1/traces/nothing-like-it", 404, "no archived event"),
    ]
    for path, code, says in bad_queries:
        answer = await client.get(url + path, headers=bearer(admin))
        assert answer.status_code == code, (path, answer.text)
        assert says in answer.json()["error"], (path, answer.json())
    answer = await client.delete(f"{url}/v1/dlq/not-an-id", headers=bearer(admin))
    assert answer.status_code == 422
    answer = await client.post(f"{url}/v1/bots/nobody/restart", headers=bearer(admin))
    assert answer.status_code == 404
    assert "broken" in answer.json()["error"]


async def check_rate_limit(client: httpx.AsyncClient, url: str) -> None:
    """The bursty token: 10 at once, then 5/s (14 sent at once, so a loaded machine's slow
    answers cannot give the bucket time to refill)."""
    answers = await asyncio.gather(
        *(client.get(f"{url}/v1/bots", headers=bearer(BURSTY)) for _ in range(14))
    )
    codes = sorted(a.status_code for a in answers)
    assert codes.count(200) >= 10
    assert 429 in codes
    limited = await client.get(f"{url}/v1/bots", headers=bearer(BURSTY))
    if limited.status_code == 429:
        assert int(limited.headers["retry-after"]) >= 1
    # ... and other tokens are not affected
    assert (await client.get(f"{url}/v1/bots", headers=bearer(READER))).status_code == 200


@pytest.mark.slow
class TestHappyPaths:
    async def test_publish_query_trace_fleet_and_dead_letters(
        self,
        manager_factory: ManagerFactory,
        client: httpx.AsyncClient,
        redis: Redis,
        keys: Keys,
    ) -> None:
        """Publish one and a batch (source api:<token>), find them in the archive with
        paging, follow a three-hop trace, see streams, groups and bots, restart a bot, and
        retry and delete a dead letter."""
        manager = await manager_factory(bot_toml("steady", STEADY))
        url, admin = await api(manager)
        auth = bearer(admin)
        await check_publish_query_trace(client, url, auth)
        await check_fleet(client, url, auth, manager)
        await redis.xadd(keys.stream("bot"), {"garbage": "yes"})  # the bot dead-letters it
        await check_dead_letters(client, url, auth)
        await check_metrics(client, url)
        ready = await client.get(f"{url}/readyz")
        assert ready.status_code == 200, ready.text
        health = (await client.get(f"{url}/healthz")).json()
        assert health["alive"]
        assert health["archive"]["healthy"]
        assert "Traceback" not in manager.log()


async def publish(
    client: httpx.AsyncClient, url: str, auth: dict[str, str], body: Any
) -> list[str]:
    answer = await client.post(f"{url}/v1/events", headers=auth, json=body)
    assert answer.status_code == 202, answer.text
    ids: list[str] = answer.json()["ids"]
    return ids


async def check_publish_query_trace(
    client: httpx.AsyncClient, url: str, auth: dict[str, str]
) -> None:
    [root] = await publish(
        client, url, auth, {"type": "test.api.one", "data": {"n": 0}, "key": "k"}
    )
    child, other = await publish(client, url, auth, [
        {"type": "test.api.child", "data": {"n": 1}, "correlation_id": root, "causation_id": root},
        {"type": "test.api.other", "data": {"n": 2}},
    ])  # fmt: skip
    [grandchild] = await publish(client, url, auth, {
        "type": "test.api.grandchild", "correlation_id": root, "causation_id": child})  # fmt: skip

    async def query(**params: Any) -> dict[str, Any]:
        answer = await client.get(f"{url}/v1/events", headers=auth, params=params)
        assert answer.status_code == 200, answer.text
        page: dict[str, Any] = answer.json()
        return page

    async def archived() -> bool:
        return len((await query(type="test.api.#", limit=10))["events"]) == 4

    await wait_until(archived, 20, "the four events archived")
    found: list[str] = []
    cursor = None
    while True:
        page = await query(type="test.api.#", limit=3, **({"cursor": cursor} if cursor else {}))
        found += [e["id"] for e in page["events"]]
        if not (cursor := page["next_cursor"]):
            break
    assert sorted(found) == sorted([root, child, other, grandchild])
    event = (await client.get(f"{url}/v1/events/{root}", headers=auth)).json()
    assert (event["type"], event["source"], event["key"], event["data"], event["stream"]) == (
        "test.api.one", "api:admin", "k", {"n": 0}, "bot")  # fmt: skip
    filtered = await query(where='{"n": {"gte": 1}}', since="1h")
    assert sorted(e["id"] for e in filtered["events"]) == sorted([child, other])
    trace = (await client.get(f"{url}/v1/traces/{root}", headers=auth)).json()
    assert trace["events"] == 3
    assert [(n["id"], n["parent_id"], n["depth"]) for n in trace["nodes"]] == [
        (root, None, 0),
        (child, root, 1),
        (grandchild, child, 2),
    ]


async def check_fleet(
    client: httpx.AsyncClient, url: str, auth: dict[str, str], manager: ManagerProcess
) -> None:
    streams = {s["stream"]: s for s in (await client.get(f"{url}/v1/streams", headers=auth)).json()}
    assert streams["bot"]["length"] >= 4
    assert streams["bot"]["last_entry_id"]
    assert streams["bot"]["memory_bytes"]
    groups = (await client.get(f"{url}/v1/groups", headers=auth)).json()
    mine = [g for g in groups if g["stream"] == "bot" and "steady" in g["group"]]
    assert mine
    assert mine[0]["consumers"][0]["idle_seconds"] >= 0
    [steady] = (await client.get(f"{url}/v1/bots", headers=auth)).json()
    old_pid = steady["instances"][0]["pid"]
    assert steady["state"] == "running"
    assert old_pid
    answer = await client.post(f"{url}/v1/bots/steady/restart", headers=auth)
    assert answer.status_code == 202
    assert answer.json() == {"bot": "steady"}

    async def restarted() -> bool:
        new = (await manager.instances("steady"))[0]
        return bool(new["pid"] not in (None, old_pid) and new["state"] == "running")

    await wait_until(restarted, 20, "the bot restarted through the API")


async def check_dead_letters(client: httpx.AsyncClient, url: str, auth: dict[str, str]) -> None:
    async def dead_letters() -> list[dict[str, Any]]:
        answer = await client.get(f"{url}/v1/dlq", headers=auth)
        letters: list[dict[str, Any]] = answer.json()["dead_letters"]
        return [letter for letter in letters if letter["group"] != "archiver"]  # the bot's

    async def some() -> bool:
        return bool(await dead_letters())

    await wait_until(some, 20, "a dead letter")
    [letter] = await dead_letters()
    assert letter["reason"] == "malformed"
    assert letter["fields"] == {"garbage": "yes"}
    retried = await client.post(f"{url}/v1/dlq/{letter['id']}/retry", headers=auth)
    assert retried.status_code == 200, retried.text
    assert retried.json()["id"] == letter["id"]
    await wait_until(some, 20, "dead-lettered again")
    [again] = await dead_letters()
    assert again["id"] != letter["id"]
    deleted = await client.delete(f"{url}/v1/dlq/{again['id']}", headers=auth)
    assert deleted.json() == {"deleted": 1}
    gone = await client.delete(f"{url}/v1/dlq/{again['id']}", headers=auth)
    assert gone.status_code == 404
    assert await dead_letters() == []


async def check_metrics(client: httpx.AsyncClient, url: str) -> None:
    """/metrics in Prometheus format, with the fleet's numbers; promtool accepts it."""
    answer = await client.get(f"{url}/metrics")
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/plain; version=0.0.4")
    text = answer.text
    assert 'multibot_bot_up{bot="steady",replica="0"} 1.0' in text
    assert 'multibot_events_published_total{category="test"}' in text
    assert 'multibot_api_requests_total{code="202",method="POST",route="/v1/events"}' in text
    promtool = shutil.which("promtool")
    if promtool is None:
        return  # the test of the rendering checks the format without it
    checked = await asyncio.to_thread(
        subprocess.run,
        [promtool, "check", "metrics"],
        input=answer.content,
        capture_output=True,
        check=False,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


class TestDocs:
    async def test_docs_page_is_served_from_the_manager_alone(
        self, manager_factory: ManagerFactory, client: httpx.AsyncClient
    ) -> None:
        """/docs names only the manager's own files (no CDN, no favicon from another host),
        each of which it serves; the page, its files and /openapi.json need no token even
        with api.open_status off, as FastAPI's own page did; ReDoc is not offered."""
        manager = await manager_factory("", extra="[api]\nopen_status = false\n")
        url, _ = await api(manager)
        assert (await client.get(f"{url}/v1/status")).status_code == 401
        page = await client.get(f"{url}/docs")
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
        assert "http://" not in page.text and "https://" not in page.text
        links = LinkParser.links(page.text)
        assert {urlsplit(link).path.rsplit(".", 1)[-1] for link in links} == {"js", "css", "png"}
        for link in links:
            assert not urlsplit(link).scheme and not urlsplit(link).netloc, link
            asset = await client.get(urljoin(f"{url}/docs", link))
            assert asset.status_code == 200, (link, asset.text)
            kind = asset.headers["content-type"]
            assert any(t in kind for t in ("javascript", "text/css", "image/png")), (link, kind)
            assert len(asset.content) > 4096, link
        spec = await client.get(f"{url}/openapi.json")
        assert spec.status_code == 200
        assert "/v1/events" in spec.json()["paths"]
        assert "'/openapi.json'" in page.text  # the document Swagger UI loads
        assert (await client.get(f"{url}/redoc")).status_code == 404
        assert (await client.get(f"{url}/docs/assets/nothing.js")).status_code == 404
        assert "Traceback" not in manager.log()


class LinkParser(HTMLParser):
    """Every ``src`` and ``href`` of an HTML page."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.found += [v for k, v in attrs if k in ("src", "href") and v is not None]

    @classmethod
    def links(cls, html: str) -> list[str]:
        parser = cls()
        parser.feed(html)
        parser.close()
        return parser.found
