"""`GET /v1/generations`: a caller finds its jobs again (an id lost to a crash, an OpenAI-route
request that timed out at its side), with a real API process and redis-server, and a ghost
worker that takes jobs and never runs them, so each stays as the test left it."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis

from latentd import keys
from latentd.contract import Keys
from tests.conftest import HTTP, RedisServer, register_ghost, start_api, wait_until

pytestmark = pytest.mark.integration

JOB_TTL = 3600
PROMPT = {"prompt": "a red circle"}


@dataclass
class Listed:
    url: str
    redis: redis.Redis
    server: RedisServer

    def key(self, name: str) -> dict[str, str]:
        """The headers of a new key of its own, whose jobs no other test has touched."""
        return {"Authorization": f"Bearer {keys.create(self.redis, name)}"}

    def submit(self, headers: dict[str, str], **body: Any) -> str:
        response = HTTP.post(f"{self.url}/v1/generations", json={**PROMPT, **body}, headers=headers)
        assert response.status_code == 202, response.text
        job_id: str = response.json()["id"]
        return job_id

    def get(self, path: str, headers: dict[str, str]) -> dict[str, Any]:
        response = HTTP.get(f"{self.url}{path}", headers=headers)
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    def pages(self, headers: dict[str, str], query: str = "") -> list[dict[str, Any]]:
        """Every page of the caller's list, following `next` from the first."""
        pages = [self.get(f"/v1/generations{query}", headers)]
        while pages[-1]["has_more"]:
            assert len(pages) < 100, "the pages never end"
            pages.append(self.get(pages[-1]["next"], headers))
        assert pages[-1]["next"] is None
        return pages

    def listed(self, headers: dict[str, str], query: str = "") -> list[str]:
        return [item["id"] for page in self.pages(headers, query) for item in page["data"]]


def owner(r: redis.Redis, headers: dict[str, str]) -> str:
    found = keys.owner_of(r.hget(Keys.API_KEYS, keys.digest(headers["Authorization"].split()[1])))
    assert found is not None
    return found[1]


@pytest.fixture(scope="module")
def listed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Listed]:
    tmp = tmp_path_factory.mktemp("listing")
    server = RedisServer(tmp / "redis")
    server.start()
    r = server.client()
    keys.create(r, "first")  # keys on from the start
    register_ghost(r, "tiny", ttl=3600)
    api, url = start_api(
        server.url,
        tmp,
        LATENTD_RATE_LIMIT_PER_MINUTE="0",
        LATENTD_MAX_JOBS_IN_FLIGHT="0",
        LATENTD_SYNC_TIMEOUT="0.5",
        LATENTD_JOB_TTL=str(JOB_TTL),
    )
    try:
        yield Listed(url, r, server)
    finally:
        api.stop()
        server.stop()
    assert "Traceback" not in api.output()


def test_pages_list_the_callers_jobs_newest_first_with_no_job_twice_or_left_out(listed: Listed) -> None:
    alice, bob = listed.key("alice"), listed.key("bob")
    submitted = []
    for n in range(7):
        submitted.append(listed.submit(alice, seed=n))
        listed.submit(bob)  # interleaved: never in alice's list
    first = listed.get("/v1/generations?limit=3", alice)
    assert [item["id"] for item in first["data"]] == submitted[::-1][:3]
    assert first["has_more"] and first["next"] == f"/v1/generations?limit=3&after={submitted[4]}"
    newer = listed.submit(alice)  # arrives at the front as the client pages: no page shifts
    seen = [item["id"] for item in first["data"]]
    page = first
    while page["has_more"]:
        page = listed.get(page["next"], alice)
        assert len(page["data"]) <= 3
        seen += [item["id"] for item in page["data"]]
    assert seen == submitted[::-1]
    assert listed.listed(alice, "?limit=3") == [newer, *submitted[::-1]]
    assert listed.listed(alice) == [newer, *submitted[::-1]]  # one page of 20
    # Each item is the job's status read, as is.
    for item in listed.get("/v1/generations", alice)["data"]:
        assert item == listed.get(f"/v1/generations/{item['id']}", alice)
    head = HTTP.head(f"{listed.url}/v1/generations", headers=alice)
    assert head.status_code == 200 and head.content == b""
    assert head.headers["content-type"] == "application/json"


def test_a_key_never_sees_another_keys_jobs_listed(listed: Listed) -> None:
    carol, dave = listed.key("carol"), listed.key("dave")
    carols = [listed.submit(carol) for _ in range(3)]
    daves = [listed.submit(dave)]
    assert listed.listed(carol, "?limit=1") == carols[::-1]
    assert listed.listed(dave) == daves
    # Another key's job is no cursor: as unknown as one that never was.
    for after in (carols[0], "ffffffffffffffffffffffffffffffff"):
        refused = HTTP.get(f"{listed.url}/v1/generations?after={after}", headers=dave)
        assert refused.status_code == 422, refused.text
        assert refused.json()["error"]["code"] == "invalid_request"
        assert refused.json()["error"]["param"] == "after"
    nobody = HTTP.get(f"{listed.url}/v1/generations")
    assert nobody.status_code == 401 and nobody.json()["error"]["code"] == "unauthorized"
    new = listed.key("new")
    assert listed.get("/v1/generations", new) == {
        "object": "list",
        "data": [],
        "has_more": False,
        "next": None,
    }


def test_a_replayed_submit_is_listed_once(listed: Listed) -> None:
    erin = listed.key("erin")
    first = listed.submit({**erin, "Idempotency-Key": "order-1"})
    assert listed.submit({**erin, "Idempotency-Key": "order-1"}) == first
    assert listed.listed(erin) == [first]


def test_an_openai_route_caller_whose_wait_ran_out_finds_its_job_listed(listed: Listed) -> None:
    frank = listed.key("frank")
    timed_out = HTTP.post(f"{listed.url}/v1/images/generations", json=PROMPT, headers=frank)
    assert timed_out.status_code == 504, timed_out.text
    [item] = listed.get("/v1/generations", frank)["data"]
    assert item["status"] == "queued" and item["request"]["prompt"] == PROMPT["prompt"]


def test_expired_jobs_are_skipped_and_their_entries_trimmed(listed: Listed) -> None:
    grace = listed.key("grace")
    jobs = [listed.submit(grace) for _ in range(5)]
    r = listed.redis
    index = Keys.jobs(owner(r, grace))
    assert r.zcard(index) == 5 and 0 < r.ttl(index) <= JOB_TTL
    r.delete(f"rq:job:{jobs[1]}", f"rq:job:{jobs[2]}")  # lapsed, as a job's record does
    # An entry submitted before LATENTD_JOB_TTL, its record kept (by a long wait in its queue).
    r.zadd(index, {jobs[0]: time.time() - JOB_TTL - 1})
    assert listed.listed(grace, "?limit=1") == [jobs[4], jobs[3]]
    assert listed.listed(grace) == [jobs[4], jobs[3]]
    # The cursor is still the lapsed job's place: the pages go on after it.
    assert [item["id"] for item in listed.get(f"/v1/generations?after={jobs[2]}", grace)["data"]] == []
    assert [item["id"] for item in listed.get(f"/v1/generations?after={jobs[4]}", grace)["data"]] == [jobs[3]]
    # The next submit drops the entry older than a job's lifetime: the set holds one lifetime's jobs.
    newest = listed.submit(grace)
    assert jobs[0].encode() not in r.zrange(index, 0, -1)
    assert listed.listed(grace) == [newest, jobs[4], jobs[3]]


def test_the_status_filter_lists_the_jobs_of_that_status(listed: Listed) -> None:
    heidi = listed.key("heidi")
    jobs = [listed.submit(heidi) for _ in range(6)]
    for job_id in jobs[1::2]:
        canceled = HTTP.post(f"{listed.url}/v1/generations/{job_id}/cancel", headers=heidi)
        assert canceled.status_code == 200, canceled.text
    assert listed.listed(heidi, "?status=canceled&limit=2") == jobs[1::2][::-1]
    assert listed.listed(heidi, "?status=queued&limit=1") == jobs[0::2][::-1]
    assert listed.listed(heidi, "?status=succeeded") == []
    page = listed.get("/v1/generations?status=canceled&limit=2", heidi)
    assert page["next"] == f"/v1/generations?limit=2&after={jobs[3]}&status=canceled"


# Each bad query, and the parameter its 422 names.
BAD_QUERIES = [
    ("limit=0", "limit"),
    ("limit=101", "limit"),
    ("limit=ten", "limit"),
    ("limit=2.5", "limit"),
    ("limit=", "limit"),
    ("after=", "after"),
    ("after=no%20such", "after"),
    ("after=" + "a" * 65, "after"),
    ("after=0123abcd", "after"),  # well formed, and no job of the caller's
    ("status=done", "status"),
    ("status=QUEUED", "status"),
]


def test_a_bad_list_parameter_is_refused_naming_it(listed: Listed) -> None:
    ivan = listed.key("ivan")
    listed.submit(ivan)
    for query, param in BAD_QUERIES:
        for method in ("GET", "HEAD"):
            response = HTTP.request(method, f"{listed.url}/v1/generations?{query}", headers=ivan)
            assert response.status_code == 422, (query, method, response.text)
        error = HTTP.get(f"{listed.url}/v1/generations?{query}", headers=ivan).json()["error"]
        assert error["code"] == "invalid_request" and error["param"] == param, (query, error)


def test_the_list_outlives_a_redis_restart(listed: Listed) -> None:
    judy = listed.key("judy")
    jobs = [listed.submit(judy) for _ in range(3)]
    listed.server.stop()
    listed.server.start()
    listed.redis = listed.server.client()
    assert wait_until(lambda: HTTP.get(f"{listed.url}/v1/generations", headers=judy).status_code == 200, 10)
    assert listed.listed(judy, "?limit=2") == jobs[::-1]


def test_an_open_services_jobs_and_a_keys_jobs_are_listed_apart(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis")
    server.start()
    r = server.client()
    register_ghost(r, "tiny", ttl=3600)
    api, url = start_api(server.url, tmp_path)
    service = Listed(url, r, server)
    try:
        keyless = [service.submit({}) for _ in range(2)]
        assert service.listed({}) == keyless[::-1]
        solo = service.key("solo")
        wait_until(lambda: HTTP.get(f"{url}/v1/generations").status_code == 401, 10, what="auth on")
        keyed = service.submit(solo)
        assert service.listed(solo) == [keyed]  # not the jobs submitted without a key
        assert keys.revoke(r, "solo") and keys.open_service(r)
        wait_until(lambda: HTTP.get(f"{url}/v1/generations").status_code == 200, 10, what="auth off")
        assert service.listed({}) == keyless[::-1]  # not the key's
        refused = HTTP.get(f"{url}/v1/generations?after={keyed}")
        assert refused.status_code == 422 and refused.json()["error"]["param"] == "after"
    finally:
        api.stop()
        server.stop()
