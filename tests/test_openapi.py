"""The OpenAPI document declares the response headers the API sends, route by route and status by
status, and no others: generated clients learn `Location`, `Retry-After`, `ETag` and the rest from
it. Checked against real responses, one of each kind the routes give, not against a list of names."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
import redis
from fastapi.testclient import TestClient

import app.serving
from app.config import ApiSettings
from app.main import create_app
from latentd.contract import ImageMeta, Keys, StateField
from latentd.embedded import free_port
from tests.conftest import PRIVATE_DB, RedisServer, register_ghost

# HTTP's own framing, which OpenAPI leaves out of a response's `headers` (Content-Type it ignores).
FRAMING = {"content-length", "content-type"}
KEY = "k" * 32
BODY = {"prompt": "a red circle"}
# Every route that authenticates its caller, as a request for an id that names nothing.
AUTHENTICATED = [
    ("POST", "/v1/generations", BODY),
    ("GET", "/v1/generations", None),
    ("HEAD", "/v1/generations", None),
    ("GET", "/v1/generations/0123abcd", None),
    ("HEAD", "/v1/generations/0123abcd", None),
    ("POST", "/v1/generations/0123abcd/cancel", None),
    ("GET", "/v1/generations/0123abcd/images/0", None),
    ("HEAD", "/v1/generations/0123abcd/images/0", None),
    ("POST", "/v1/images/generations", BODY),
    ("GET", "/v1/models", None),
]
UNAUTHENTICATED = [("GET", "/healthz", None), ("GET", "/readyz", None), ("GET", "/metrics", None)]


@contextmanager
def recorded(settings: ApiSettings, into: list[httpx.Response]) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as client:
        client.event_hooks["response"] = [into.append]
        yield client


def send_each(client: TestClient, requests: list[tuple[str, str, Any]], **headers: str) -> None:
    for method, path, body in requests:
        client.request(method, path, json=body, headers=headers)


def accepted_then_504(client: TestClient, key: str) -> str:
    """A job accepted by the OpenAI route and never run (its model's worker is a ghost): 504."""
    response = client.post("/v1/images/generations", json=BODY, headers={"Idempotency-Key": key})
    assert response.status_code == 504, response.text
    return str(response.json()["error"]["message"].split("'")[1])


def end(r: redis.Redis, job_id: str, rq_status: str, **state: str) -> None:
    """The job ended as a worker would have left it, as far as the API reads it."""
    r.hset(f"rq:job:{job_id}", "status", rq_status)
    if state:
        r.hset(Keys.state(job_id), mapping=state)


def image_meta(withheld: bool = False) -> str:
    meta = ImageMeta(
        index=0,
        seed=1,
        content_type="image/png",
        bytes=3,
        etag='"e0"',
        withheld=withheld,
        expires_at=time.time() + 600,
    )
    return json.dumps([meta.model_dump()])


def operation(spec: dict[str, Any], request: httpx.Request) -> tuple[str, dict[str, Any]]:
    """The operation the document gives for `request`; a HEAD is its GET's (hidden from it)."""
    method = "get" if request.method == "HEAD" else request.method.lower()
    for template, operations in spec["paths"].items():
        if method in operations and re.fullmatch(re.sub(r"\{[^}/]+\}", "[^/]+", template), request.url.path):
            return f"{method.upper()} {template}", operations[method]
    raise AssertionError(f"the document has no operation for {request.method} {request.url.path}")


def answers_of_an_open_service(client: TestClient, r: redis.Redis) -> None:
    send_each(client, AUTHENTICATED + UNAUTHENTICATED)
    job_id = client.post("/v1/generations", json=BODY).json()["id"]  # 202 with Location
    client.get(f"/v1/generations/{job_id}/images/0")  # 409: not ready
    client.post(f"/v1/generations/{client.post('/v1/generations', json=BODY).json()['id']}/cancel")
    end(r, job_id, "finished", **{StateField.IMAGES: image_meta()})
    r.set(Keys.image(job_id, 0), b"png", ex=600)
    client.get(f"/v1/generations/{job_id}")
    client.head(f"/v1/generations/{job_id}/images/0")
    etag = client.get(f"/v1/generations/{job_id}/images/0").headers["etag"]
    client.get(f"/v1/generations/{job_id}/images/0", headers={"If-None-Match": etag})  # 304
    # A model whose worker is restarting: 503. A queue that is full: 429.
    r.hset(Keys.MODELS_SEEN, "restarting", time.time())
    client.post("/v1/generations", json={**BODY, "model": "restarting"})
    client.post("/v1/images/generations", json={**BODY, "model": "restarting"})
    settings = client.app.state.settings  # type: ignore[attr-defined]
    settings.max_queue_depth = 1
    register_ghost(r, "busy", name="busy-worker")
    for _ in range(2):
        client.post("/v1/generations", json={**BODY, "model": "busy"})
    settings.max_queue_depth = 1000
    # An Idempotency-Key whose first request is still being accepted (its job not found yet):
    # 409 with Retry-After; sent with another body: 409, with x-should-retry on the OpenAI route.
    for path in ("/v1/generations", "/v1/images/generations"):
        client.post(path, json=BODY, headers={"Idempotency-Key": "pending"})
        r.delete(*r.keys("rq:job:*"))
        client.post(path, json=BODY, headers={"Idempotency-Key": "pending"})
        client.post(path, json={**BODY, "prompt": "another"}, headers={"Idempotency-Key": "pending"})
        r.flushdb()
        register_ghost(r, "tiny")
    # The OpenAI route's answers once the job is accepted: its job ends, and the request sent
    # again (the same Idempotency-Key) finds it ended.
    endings = {
        "507": ("failed", {StateField.ERROR: '{"code": "out_of_memory", "message": "m"}'}),
        "422": ("failed", {StateField.ERROR: '{"code": "invalid_parameters", "message": "m"}'}),
        "500": ("failed", {StateField.ERROR: '{"code": "generation_failed", "message": "m"}'}),
        "409": ("canceled", {}),
        "400": ("finished", {StateField.IMAGES: image_meta(withheld=True)}),
        "200": ("finished", {StateField.IMAGES: image_meta()}),
    }
    for key, (rq_status, state) in endings.items():
        end(r, accepted_then_504(client, key), rq_status, **state)
        again = client.post("/v1/images/generations", json=BODY, headers={"Idempotency-Key": key})
        assert again.status_code == int(key), again.text
    # The API is stopping: the OpenAI route answers 503 at once.
    client.app.state.service.ended.close()  # type: ignore[attr-defined]
    client.post("/v1/images/generations", json=BODY)


def answers_of_a_keyed_service(client: TestClient, r: redis.Redis) -> None:
    send_each(client, AUTHENTICATED)  # 401
    minute = int(time.time() // 60)
    for window in (minute, minute + 1):
        r.set(Keys.rate("alice", window), 1000, ex=120)
    send_each(client, AUTHENTICATED, authorization=f"Bearer {KEY}")  # 429


def mismatches(spec: dict[str, Any], responses: list[httpx.Response]) -> list[str]:
    """Each header a response carries and its operation does not declare for its status, each
    declared required that one lacks, and each declared that none carries."""
    problems, sent = [], set()
    for response in responses:
        name, documented = operation(spec, response.request)
        status = str(response.status_code)
        if status not in documented["responses"]:
            problems.append(f"{name} answered {status}, which it does not document")
            continue
        declared = {h.lower(): d for h, d in documented["responses"][status].get("headers", {}).items()}
        headers = {h.lower() for h in response.headers} - FRAMING
        problems += [f"{name} {status} sends {h}, undeclared" for h in sorted(headers - declared.keys())]
        problems += [
            f"{name} {status} lacks {h}, declared required"
            for h, d in declared.items()
            if d["required"] and h not in headers
        ]
        sent |= {(name, status, h) for h in headers}
    declared_anywhere = {
        (f"{method.upper()} {path}", status, h.lower())
        for path, operations in spec["paths"].items()
        for method, documented in operations.items()
        for status, answer in documented["responses"].items()
        for h in answer.get("headers", {})
    }
    problems += [
        f"{n} {s} declares {h}, which no response here carried"
        for n, s, h in sorted(declared_anywhere - sent)
    ]
    return list(dict.fromkeys(problems))


def test_the_document_declares_each_response_header_the_api_sends_and_no_other(
    redis_server: RedisServer, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(app.serving, "IDEMPOTENT_WAIT_S", 0.2)  # a pending Idempotency-Key's 409, sooner
    url = redis_server.url_for(PRIVATE_DB)
    register_ghost(redis_client, "tiny")  # jobs are accepted and never run
    responses: list[httpx.Response] = []
    with recorded(ApiSettings(redis_url=url, default_model="tiny", sync_timeout=0.2), responses) as client:
        answers_of_an_open_service(client, redis_client)
    keyed = ApiSettings(redis_url=url, default_model="tiny", api_keys=f"alice:{KEY}", rate_limit_per_minute=1)
    with recorded(keyed, responses) as client:
        answers_of_a_keyed_service(client, redis_client)
    with recorded(ApiSettings(redis_url=f"redis://127.0.0.1:{free_port()}/0"), responses) as client:
        send_each(client, AUTHENTICATED + UNAUTHENTICATED)  # Redis unreachable: 503
    problems = mismatches(create_app(ApiSettings()).openapi(), responses)
    assert not problems, "\n".join(problems)
