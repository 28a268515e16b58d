"""API keys, ownership and per-key limits, with a real API process, worker and redis-server."""

from __future__ import annotations

import hashlib
import hmac
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx
import pydantic
import pytest
import redis
from fastapi.testclient import TestClient

from app.auth import AUTH_STATE_TTL
from app.config import ApiSettings
from app.main import create_app
from tests.conftest import (
    HTTP,
    LONG_JOB,
    PRIVATE_DB,
    ROOT,
    Cluster,
    Proc,
    RedisServer,
    base_env,
    make_cluster,
    register_ghost,
    spawn,
    start_api,
    start_worker,
    wait_until,
)

pytestmark = pytest.mark.integration


def keys_command(redis_url: str, action: str, *args: str) -> subprocess.CompletedProcess[str]:
    # The option between the action and its NAME: `keys create --redis-url URL NAME` was refused.
    command = [sys.executable, "-m", "latentd.cli", "keys", action, "--redis-url", redis_url, *args]
    return subprocess.run(command, capture_output=True, text=True, env=base_env(redis_url), timeout=60)


def create_key(redis_url: str, name: str) -> str:
    out = keys_command(redis_url, "create", name)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


@dataclass
class Secured:
    redis: RedisServer
    url: str
    api: Proc
    alice: dict[str, str]
    bob: dict[str, str]


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Secured]:
    tmp = tmp_path_factory.mktemp("auth")
    server = RedisServer(tmp / "redis")
    server.start()
    alice = create_key(server.url, "alice")
    bob = create_key(server.url, "bob")
    worker = start_worker(server.url, tiny_model_dir, tmp)
    api, url = start_api(server.url, tmp, LATENTD_RATE_LIMIT_PER_MINUTE="0", LATENTD_MAX_JOBS_IN_FLIGHT="0")
    try:
        yield Secured(
            server, url, api, {"Authorization": f"Bearer {alice}"}, {"Authorization": f"Bearer {bob}"}
        )
    finally:
        api.stop()
        worker.stop()
        server.stop()


def test_keys_are_stored_hashed_and_shown_once(secured: Secured) -> None:
    r = secured.redis.client()
    stored = r.hgetall("latentd:apikeys")
    assert len(stored) == 2
    token = secured.alice["Authorization"].split()[1]
    assert all(token.encode() not in k and token.encode() not in v for k, v in stored.items())
    listed = keys_command(secured.redis.url, "list")
    assert listed.returncode == 0, listed.stderr
    rows = [line.split("\t") for line in listed.stdout.splitlines()]
    assert [name for name, _ in rows] == ["alice", "bob"]  # oldest first, each with when it was made
    assert all(made.endswith(" UTC") and made[:4].isdigit() for _, made in rows), listed.stdout
    assert token not in listed.stdout
    # Piped to a reader that stops early (`| head -0`): quiet, as other tools are, no traceback.
    reader = subprocess.Popen(["head", "-c", "0"], stdin=subprocess.PIPE)
    reader.wait()  # gone: the pipe has no reader left
    cut = subprocess.run(
        [sys.executable, "-m", "latentd.cli", "keys", "list", "--redis-url", secured.redis.url],
        stdout=reader.stdin, stderr=subprocess.PIPE, text=True, check=False,
    )  # fmt: skip
    reader.stdin.close()  # type: ignore[union-attr]
    assert "Traceback" not in cut.stderr and cut.stderr == "", cut.stderr


def test_every_api_route_requires_a_valid_key(secured: Secured) -> None:
    routes = [
        ("POST", "/v1/generations", {"prompt": "x"}),
        ("GET", "/v1/generations", None),
        ("GET", "/v1/generations/abc", None),
        ("POST", "/v1/generations/abc/cancel", None),
        ("GET", "/v1/generations/abc/images/0", None),
        ("POST", "/v1/images/generations", {"prompt": "x"}),
        ("GET", "/v1/models", None),
    ]
    for auth in ({}, {"Authorization": "Bearer ltd_wrong"}, {"Authorization": "Basic abc"}):
        for method, path, body in routes:
            response = HTTP.request(method, secured.url + path, json=body, headers=auth)
            assert response.status_code == 401, (method, path, auth, response.text)
            assert response.json()["error"]["code"] == "unauthorized"
            assert response.headers["www-authenticate"] == "Bearer"
        # A body that cannot be decoded (FastAPI decodes it before it asks for the key).
        for path in ("/v1/generations", "/v1/images/generations"):
            for raw in (b"{bad", b'{"prompt": "\xff"}'):
                response = HTTP.post(
                    secured.url + path, content=raw, headers={**auth, "Content-Type": "application/json"}
                )
                assert response.status_code == 401, (path, raw, auth, response.text)
    for raw in (b"{bad", b'{"prompt": "\xff"}'):  # with a key: the body's own error
        response = HTTP.post(
            secured.url + "/v1/generations",
            content=raw,
            headers={**secured.alice, "Content-Type": "application/json"},
        )
        assert response.status_code == 422 and response.json()["error"]["code"] == "invalid_request"
    for open_path in ("/healthz", "/readyz", "/metrics"):
        assert HTTP.get(secured.url + open_path).status_code == 200
    assert HTTP.get(secured.url + "/v1/models", headers=secured.alice).status_code == 200


def test_a_key_sees_and_cancels_only_its_own_jobs(secured: Secured) -> None:
    with httpx.Client(base_url=secured.url, timeout=30) as http:
        job = http.post("/v1/generations", json={"prompt": "mine", "steps": 2}, headers=secured.alice).json()
        job_id = job["id"]
        done = wait_until(
            lambda: (
                (v := http.get(f"/v1/generations/{job_id}", headers=secured.alice).json())["status"]
                == "succeeded"
                and v
            ),
            60,
        )
        image_url = done["images"][0]["url"]
        assert http.get(image_url, headers=secured.alice).status_code == 200
        unknown = http.get("/v1/generations/ffffffffffffffffffffffffffffffff", headers=secured.bob)
        for response in (
            http.get(f"/v1/generations/{job_id}", headers=secured.bob),
            http.get(image_url, headers=secured.bob),
            http.post(f"/v1/generations/{job_id}/cancel", headers=secured.bob),
        ):
            assert response.status_code == 404
            assert response.json()["error"]["code"] == unknown.json()["error"]["code"] == "not_found"
            assert "mine" not in response.text


def test_a_key_made_again_under_a_revoked_keys_name_does_not_see_its_jobs(secured: Secured) -> None:
    # Jobs belonged to the key's name: whoever got the name next saw the revoked key's jobs.
    first = {"Authorization": f"Bearer {create_key(secured.redis.url, 'carol')}"}
    job_id = HTTP.post(f"{secured.url}/v1/generations", json={"prompt": "old"}, headers=first).json()["id"]
    assert HTTP.get(f"{secured.url}/v1/generations/{job_id}", headers=first).status_code == 200
    assert keys_command(secured.redis.url, "revoke", "carol").returncode == 0
    again = {"Authorization": f"Bearer {create_key(secured.redis.url, 'carol')}"}
    hidden = HTTP.get(f"{secured.url}/v1/generations/{job_id}", headers=again)
    assert hidden.status_code == 404 and hidden.json()["error"]["code"] == "not_found", hidden.text
    assert keys_command(secured.redis.url, "revoke", "carol").returncode == 0


def test_the_openai_routes_image_urls_download_without_a_key_until_they_expire(secured: Secured) -> None:
    # OpenAI's image URLs need no key, and what takes one often hands it to a browser: with keys
    # on, ours answered 401 to any download without the bearer header.
    reply = HTTP.post(
        f"{secured.url}/v1/images/generations",
        json={"prompt": "a red circle", "n": 2, "size": "64x64"},
        headers=secured.alice,
        timeout=60,
    )
    assert reply.status_code == 200, reply.text
    urls = [image["url"] for image in reply.json()["data"]]
    first = HTTP.get(urls[0])
    assert first.status_code == 200 and first.headers["content-type"] == "image/png"
    path, _, query = urls[0].partition("?")
    assert first.content == HTTP.get(path, headers=secured.alice).content
    params = dict(pair.split("=") for pair in query.split("&"))
    expires, signature = int(params["expires"]), params["signature"]
    assert 3000 < expires - time.time() <= 3601  # as the image: LATENTD_RESULTS_TTL
    other = urls[1].partition("?")[0]
    changed = signature[:-1] + ("1" if signature.endswith("0") else "0")
    refused = {
        "no signature": HTTP.get(path),
        "another image": HTTP.get(f"{other}?{query}"),
        "a later expiry": HTTP.get(f"{path}?expires={expires + 1}&signature={signature}"),
        "a changed signature": HTTP.get(f"{path}?expires={expires}&signature={changed}"),
        "no expiry": HTTP.get(f"{path}?signature={signature}"),
        "not ASCII": HTTP.get(f"{path}?expires={expires}&signature=%C3%A9"),
    }
    for why, response in refused.items():
        assert response.status_code == 401, (why, response.text)
        assert response.json()["error"]["code"] == "unauthorized", why
    secret = secured.redis.client().get("latentd:url_secret")
    lapsed = int(time.time()) - 1
    signed = hmac.new(secret, f"{urlparse(path).path}\n{lapsed}".encode(), hashlib.sha256).hexdigest()
    expired = HTTP.get(f"{path}?expires={lapsed}&signature={signed}")
    assert expired.status_code == 404 and expired.json()["error"]["code"] == "expired", expired.text
    # A URL whose signature fails, fetched with a key (a client that sends its key with every
    # request): the key decides, as without the signature. It was refused 401 whatever the key.
    for query_that_fails in (
        f"expires={expires}&signature={changed}",
        f"expires={lapsed}&signature={signed}",
    ):
        owner = HTTP.get(f"{path}?{query_that_fails}", headers=secured.alice)
        assert owner.status_code == 200 and owner.content == first.content, owner.text
        stranger = HTTP.get(f"{path}?{query_that_fails}", headers=secured.bob)
        assert stranger.status_code == 404 and stranger.json()["error"]["code"] == "not_found", stranger.text
    # Not a key (a proxy's Basic login): the URL's own answer.
    basic = HTTP.get(f"{path}?expires={lapsed}&signature={signed}", headers={"authorization": "Basic eDp5"})
    assert basic.status_code == 404 and basic.json()["error"]["code"] == "expired", basic.text
    bad = HTTP.get(f"{path}?expires=soon&signature={signature}")
    assert bad.status_code == 422 and bad.json()["error"]["param"] == "expires", bad.text
    # Should Redis lose the secret (flushed, restarted without its file), every API process
    # takes up the one made next: this one kept the first for good, and its URLs failed elsewhere.
    r = secured.redis.client()
    for secret in (None, b"made by another API process"):
        r.delete("latentd:url_secret")
        if secret is None:  # a download checks against the secret there is, and makes none
            assert HTTP.get(urls[0]).status_code == 401 and not r.exists("latentd:url_secret")
            # An empty signature matched the empty one expected then: any image, without a key.
            forged = HTTP.get(f"{path}?expires={expires}&signature=")
            assert forged.status_code == 401 and not r.exists("latentd:url_secret"), forged.text
        else:
            r.set("latentd:url_secret", secret)
        reply = HTTP.post(
            f"{secured.url}/v1/images/generations", json={"prompt": "a red circle", "size": "64x64"},
            headers=secured.alice, timeout=60,
        )  # fmt: skip
        url = reply.json()["data"][0]["url"]
        path, _, query = url.partition("?")
        params = dict(pair.split("=") for pair in query.split("&"))
        made = r.get("latentd:url_secret")
        assert made is not None and made == (secret or made)
        signed = hmac.new(made, f"{urlparse(path).path}\n{params['expires']}".encode(), hashlib.sha256)
        assert params["signature"] == signed.hexdigest()
        assert HTTP.get(url).status_code == 200


def test_latentd_generate_takes_a_key_read_from_a_file_and_never_shows_one(
    secured: Secured, tmp_path: Path
) -> None:
    # A key from a secret file ends in a newline: generate failed, and its message quoted the key.
    key = secured.alice["Authorization"].split()[1]
    args = ["generate", "x", "--url", secured.url, "--out", str(tmp_path / "out"), "--steps", "2"]
    ok = spawn(args, base_env(secured.redis.url, LATENTD_API_KEY=key + "\n"), tmp_path / "ok.log")
    assert ok.proc.wait(60) == 0, ok.output()
    assert len(list((tmp_path / "out").glob("*.png"))) == 1 and key not in ok.output()
    for bad in ("ключ-0123456789abcdef", f"{key} {key}"):  # a traceback, or the key in the message
        refused = spawn(args, base_env(secured.redis.url, LATENTD_API_KEY=bad), tmp_path / "bad.log")
        assert refused.proc.wait(60) == 1, refused.output()
        said = refused.output()
        assert "LATENTD_API_KEY" in said and "Traceback" not in said and key not in said, said
    # Refused without a key, or with a wrong one: the message said nothing of where a key goes.
    for env, hint in (
        ({}, "set LATENTD_API_KEY"),
        ({"LATENTD_API_KEY": "ltd_" + "x" * 43}, "check LATENTD_API_KEY"),
    ):
        refused = spawn(args, base_env(secured.redis.url, **env), tmp_path / "refused.log")
        assert refused.proc.wait(60) == 1 and "HTTP 401 unauthorized" in refused.output(), refused.output()
        assert hint in refused.output(), refused.output()


def test_no_log_line_carries_a_key(secured: Secured) -> None:
    HTTP.get(secured.url + "/v1/models", headers={"Authorization": "Bearer ltd_guess"})
    log = secured.api.output()
    for headers in (secured.alice, secured.bob):
        assert headers["Authorization"].split()[1] not in log
    assert "ltd_guess" not in log and "Traceback" not in log


def test_forged_forwarded_for_changes_nothing(secured: Secured) -> None:
    headers = {"X-Forwarded-For": "127.0.0.1", "X-Real-IP": "127.0.0.1"}
    assert HTTP.get(secured.url + "/v1/models", headers=headers).status_code == 401


@pytest.fixture
def limited(tmp_path: Path) -> Iterator[tuple[RedisServer, str]]:
    server = RedisServer(tmp_path / "redis")
    server.start()
    r = server.client()
    register_ghost(r, "tiny")
    api, url = start_api(
        server.url, tmp_path, LATENTD_RATE_LIMIT_PER_MINUTE="5", LATENTD_MAX_JOBS_IN_FLIGHT="2"
    )
    try:
        yield server, url
    finally:
        api.stop()
        server.stop()


def test_jobs_in_flight_and_requests_per_minute_are_capped_per_key(limited: tuple[RedisServer, str]) -> None:
    server, url = limited
    carol = {"Authorization": f"Bearer {create_key(server.url, 'carol')}"}
    dave = {"Authorization": f"Bearer {create_key(server.url, 'dave')}"}
    wait_until(lambda: HTTP.get(f"{url}/v1/models").status_code == 401, 10, what="auth on")
    # The budget is per calendar minute: start well inside one so the count cannot reset midway.
    if time.time() % 60 > 45:
        time.sleep(61 - time.time() % 60)
    codes = [HTTP.post(f"{url}/v1/generations", json={"prompt": "x"}, headers=carol) for _ in range(3)]
    assert [c.status_code for c in codes] == [202, 202, 429]
    assert codes[2].json()["error"]["code"] == "too_many_jobs"
    # Canceling one frees its slot.
    assert HTTP.post(f"{url}/v1/generations/{codes[0].json()['id']}/cancel", headers=carol).status_code == 200
    assert HTTP.post(f"{url}/v1/generations", json={"prompt": "x"}, headers=carol).status_code == 202
    # Five requests this minute are spent: the sixth is refused, another key is not affected.
    limited_response = HTTP.get(f"{url}/v1/models", headers={**carol, "X-Forwarded-For": "10.9.8.7"})
    assert limited_response.status_code == 429
    assert limited_response.json()["error"]["code"] == "rate_limited"
    assert 1 <= int(limited_response.headers["retry-after"]) <= 60
    assert HTTP.get(f"{url}/v1/models", headers=dave).status_code == 200


CAROL_KEY = "carol-key-0123456789abcdef"


@pytest.fixture
def limited_cluster(tmp_path: Path, tiny_model_dir: Path) -> Iterator[Cluster]:
    yield from make_cluster(
        tmp_path, tiny_model_dir, LATENTD_API_KEYS=f"carol:{CAROL_KEY}", LATENTD_MAX_JOBS_IN_FLIGHT="2"
    )


def test_a_job_seen_canceled_in_a_running_batch_frees_its_slot_at_once(limited_cluster: Cluster) -> None:
    # RQ records a batch's canceled job once the batch's pipeline call ends: until then the key's
    # in-flight count held it, and the key at its limit got 429 for a job that reads `canceled`.
    cluster = limited_cluster
    carol = {"Authorization": f"Bearer {CAROL_KEY}"}
    api = f"{cluster.url}/v1/generations"

    def submit(body: dict[str, object]) -> httpx.Response:
        return HTTP.post(api, json=body, headers=carol)

    def status(job_id: str, **params: int) -> dict[str, Any]:
        view: dict[str, Any] = HTTP.get(f"{api}/{job_id}", params=params, headers=carol, timeout=70).json()
        return view

    register_ghost(cluster.redis.client(), "tiny")  # both are queued before the worker looks
    keep, drop = (submit({**LONG_JOB, "seed": seed}).json()["id"] for seed in (1, 2))
    worker = cluster.worker("a")  # it takes both into one pipeline call
    try:
        wait_until(lambda: status(drop)["progress"]["step"] > 0, 60, what="the batch running")
        assert status(keep)["status"] == "running"
        assert cluster.redis.client().hget(f"latentd:job:{drop}", "batch_jobs") == b"2"
        assert submit({"prompt": "x"}).status_code == 429  # two in flight
        assert HTTP.post(f"{api}/{drop}/cancel", headers=carol).status_code == 202
        assert status(drop, wait=30)["status"] == "canceled"
        again = submit({"prompt": "again", "steps": 1})
        assert again.status_code == 202, again.text
        assert cluster.redis.client().hget(f"rq:job:{drop}", "status") == b"started"  # RQ's record waits
        assert status(keep)["status"] == "running"  # the batch's call had not ended
        assert status(keep, wait=60)["status"] == "succeeded"
    finally:
        worker.stop()


def test_revoking_the_last_key_leaves_the_service_closed_until_it_is_opened(tmp_path: Path) -> None:
    """Revoking a leaked key, the only one, opened the service to anyone within 2 s, and an open
    service showed every key's jobs to callers without one."""
    server = RedisServer(tmp_path / "redis")
    server.start()
    register_ghost(server.client(), "tiny")
    api, url = start_api(server.url, tmp_path)
    try:
        made_open = HTTP.post(f"{url}/v1/generations", json={"prompt": "x"}).json()["id"]
        solo = {"Authorization": f"Bearer {create_key(server.url, 'solo')}"}
        wait_until(lambda: HTTP.get(f"{url}/v1/models").status_code == 401, 10, what="auth on")
        keyed = HTTP.post(f"{url}/v1/generations", json={"prompt": "x"}, headers=solo).json()["id"]
        create_key(server.url, "other")
        refused = keys_command(server.url, "open")
        assert refused.returncode == 1 and "revoke them first" in refused.stderr
        assert keys_command(server.url, "revoke", "other").returncode == 0
        last = keys_command(server.url, "revoke", "solo")
        assert last.returncode == 0 and "refuses every request" in last.stderr, last.stderr
        time.sleep(AUTH_STATE_TTL + 1)  # every API process has read the keys again
        assert HTTP.get(f"{url}/v1/models").status_code == 401
        assert HTTP.get(f"{url}/v1/models", headers=solo).status_code == 401
        assert HTTP.get(f"{url}/v1/generations/{keyed}").status_code == 401
        assert keys_command(server.url, "open").returncode == 0
        wait_until(lambda: HTTP.get(f"{url}/v1/models").status_code == 200, 10, what="auth off")
        assert "auth_open" in api.output()
        assert HTTP.get(f"{url}/v1/generations/{made_open}").status_code == 200
        hidden = HTTP.get(f"{url}/v1/generations/{keyed}")  # a key's job stays the key's
        assert hidden.status_code == 404 and hidden.json()["error"]["code"] == "not_found"
        assert HTTP.post(f"{url}/v1/generations/{keyed}/cancel").status_code == 404
    finally:
        api.stop()
        server.stop()


def test_a_redis_that_lost_its_keys_leaves_the_service_closed(tmp_path: Path) -> None:
    """A flushed Redis, or one restarted without its file, held no key and no flag, and the
    service opened to anyone within 2 s."""
    from latentd import keys

    server = RedisServer(tmp_path / "redis")
    server.start()
    register_ghost(server.client(), "tiny")
    api, url = start_api(server.url, tmp_path)
    try:
        assert HTTP.get(f"{url}/v1/models").status_code == 200  # open: no key was ever made
        time.sleep(AUTH_STATE_TTL + 0.5)  # read again, and still open: said once, at the start
        assert HTTP.get(f"{url}/v1/models").status_code == 200
        assert api.output().count("auth_open") == 1, api.output()[-2000:]
        # A key used at once, before the API reads that keys are on: its job was stored as
        # nobody's, and the key then got 404 for it.
        early = {"Authorization": f"Bearer {keys.create(server.client(), 'early')}"}
        job_id = HTTP.post(f"{url}/v1/generations", json={"prompt": "x"}, headers=early).json()["id"]
        wait_until(lambda: HTTP.get(f"{url}/v1/models").status_code == 401, 10, what="auth on")
        assert HTTP.get(f"{url}/v1/generations/{job_id}", headers=early).status_code == 200
        server.client().flushall()
        time.sleep(AUTH_STATE_TTL + 1)
        refused = HTTP.get(f"{url}/v1/models")
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "unauthorized"
        assert api.output().count("auth_state_lost") == 1, api.output()[-2000:]
        # It says so in Redis again, for the API processes that start from then on.
        later, later_url = start_api(server.url, tmp_path, "later")
        try:
            assert HTTP.get(f"{later_url}/v1/models").status_code == 401
        finally:
            later.stop()
        assert keys_command(server.url, "open").returncode == 0  # the way to open it
        wait_until(lambda: HTTP.get(f"{url}/v1/models").status_code == 200, 10, what="auth off")
        # A Redis that lost its data with no API running cannot be told from a new one, but for
        # LATENTD_REQUIRE_KEYS, which holds whatever Redis says.
        server.client().flushall()
        required, required_url = start_api(server.url, tmp_path, "required", LATENTD_REQUIRE_KEYS="true")
        try:
            assert HTTP.get(f"{required_url}/v1/models").status_code == 401
            assert HTTP.get(f"{url}/v1/models").status_code == 200
        finally:
            required.stop()
    finally:
        api.stop()
        server.stop()


def test_a_request_without_a_key_is_refused_while_redis_is_away(tmp_path: Path) -> None:
    """With keys on (stored in Redis), such a request got `503` and `Retry-After` while Redis was
    away, and its client sent it again and again; one with a key cannot be checked, and waits."""
    server = RedisServer(tmp_path / "redis")
    server.start()
    register_ghost(server.client(), "tiny")
    api, url = start_api(server.url, tmp_path)
    try:
        key = {"Authorization": f"Bearer {create_key(server.url, 'solo')}"}
        wait_until(lambda: HTTP.get(f"{url}/v1/models").status_code == 401, 10, what="auth on")
        server.stop()
        time.sleep(AUTH_STATE_TTL + 0.5)  # what Redis said has to be read again
        for headers in ({}, {"Authorization": "Basic eDp5"}):
            refused = HTTP.get(f"{url}/v1/models", headers=headers)
            assert refused.status_code == 401 and refused.json()["error"]["code"] == "unauthorized"
        twice = HTTP.get(
            f"{url}/v1/models", headers=[("Authorization", "Bearer a"), ("Authorization", "Bearer b")]
        )
        assert twice.status_code == 401 and twice.json()["error"]["param"] == "Authorization"
        waits = HTTP.get(f"{url}/v1/models", headers=key)
        assert waits.status_code == 503 and "retry-after" in waits.headers, waits.text
    finally:
        api.stop()
        server.stop()


def test_keys_of_one_name_made_at_once_are_one_and_a_revoke_ends_all(redis_client: redis.Redis) -> None:
    """Two creates of one name at once both passed the name's check and made two keys; the revoke
    then ended one of them."""
    from concurrent.futures import ThreadPoolExecutor

    from latentd import keys
    from latentd.contract import Keys

    def make(_: int) -> bool:
        try:
            keys.create(redis_client, "dup")
        except ValueError:
            return False
        return True

    with ThreadPoolExecutor(8) as pool:
        assert sum(pool.map(make, range(8))) == 1
    # Two made by an older latentd: a revoke takes both.
    redis_client.hset(Keys.API_KEYS, keys.digest("ltd_other"), json.dumps({"name": "dup", "created_at": 0}))
    assert keys.revoke(redis_client, "dup") and not keys.list_keys(redis_client)
    for name in ("evil\nname", "", " padded", "a" * 65, "tab\t"):  # each listed on a line of its own
        with pytest.raises(ValueError, match="control character"):
            keys.create(redis_client, name)
    for name in ("ops@example.com", "team/app one", "ключ"):
        keys.create(redis_client, name)
    # A key made before keys had ids owns its jobs by its name, as it did then: its jobs stay its.
    # A key made since owns them by its own id, which no other key, of its name or not, has.
    made = json.loads(redis_client.hget(Keys.API_KEYS, next(iter(redis_client.hkeys(Keys.API_KEYS)))))
    assert keys.owner_of(json.dumps(made)) == (made["name"], f"key:{made['id']}")
    assert keys.owner_of(json.dumps({"name": "old", "created_at": 0})) == ("old", "old")


@pytest.mark.parametrize(
    "entry",
    [
        "carol:ключключключключключ",
        "dave: davekey0123456789abc",
        "bad\tname:key0123456789abcdef",
        ":key0123456789abcdef",
    ],
)
def test_keys_from_the_environment_that_no_request_could_match_are_refused(entry: str) -> None:
    # A key with a space at an end or outside ASCII passed, and then never matched a request's.
    with pytest.raises(pydantic.ValidationError) as raised:
        ApiSettings(api_keys=entry)
    said = " ".join(str(e["msg"]) for e in raised.value.errors())
    assert "LATENTD_API_KEYS" in said and entry.partition(":")[2] not in said, said


def test_revoking_the_last_key_made_before_the_flag_leaves_keys_required(redis_client: redis.Redis) -> None:
    """A key stored by a latentd that set no flag: its revoke must not open the service either."""
    from latentd import keys
    from latentd.contract import Keys

    redis_client.hset(Keys.API_KEYS, keys.digest("ltd_old"), json.dumps({"name": "old", "created_at": 0}))
    assert keys.read_required(redis_client) and not redis_client.exists(Keys.KEYS_REQUIRED)
    assert keys.revoke(redis_client, "old")
    assert keys.read_required(redis_client) and not keys.list_keys(redis_client)
    assert keys.open_service(redis_client) and keys.read_required(redis_client) is False


def test_keys_from_the_environment(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis")
    server.start()
    key = "k8s-secret-key-0123456789abcdef"
    api, url = start_api(server.url, tmp_path, LATENTD_API_KEYS=f"ops:{key}")
    try:
        assert HTTP.get(f"{url}/v1/models").status_code == 401
        ops = {"Authorization": f"Bearer {key}"}
        assert HTTP.get(f"{url}/v1/models", headers=ops).status_code == 200
        assert key not in api.output()
        # A stored key of the same name is another key: it saw the other's jobs.
        stored = {"Authorization": f"Bearer {create_key(server.url, 'ops')}"}
        register_ghost(server.client(), "tiny")
        job_id = HTTP.post(f"{url}/v1/generations", json={"prompt": "x"}, headers=ops).json()["id"]
        assert HTTP.get(f"{url}/v1/generations/{job_id}", headers=ops).status_code == 200
        assert HTTP.get(f"{url}/v1/generations/{job_id}", headers=stored).status_code == 404
    finally:
        api.stop()
        server.stop()
    placeholder = spawn(["api"], base_env(server.url, LATENTD_API_KEYS="ops:changeme"), tmp_path / "bad.log")
    assert placeholder.proc.wait(60) == 2
    assert "LATENTD_API_KEYS" in placeholder.output() and "Traceback" not in placeholder.output()


def test_the_example_key_of_env_example_is_refused() -> None:
    # Uncommented as it stands, it served the API behind a key anyone could read.
    example = (ROOT / ".env.example").read_text().split("#LATENTD_API_KEYS=", 1)[1].splitlines()[0]
    with pytest.raises(ValueError, match="not a placeholder"):
        ApiSettings(api_keys=example).static_key_digests()


SECRET = "s3cret-Basic-credential"


@pytest.mark.parametrize(
    ("authorization", "says"),
    [
        (None, "missing API key: send `Authorization: Bearer <key>`"),
        ("Bearer ", "missing API key: send `Authorization: Bearer <key>`"),
        (f"Basic {SECRET}", "unsupported Authorization scheme 'Basic'; send `Authorization: Bearer <key>`"),
        (f"Token {SECRET}", "unsupported Authorization scheme 'Token'; send `Authorization: Bearer <key>`"),
        (SECRET, "the Authorization header is a single word; send `Authorization: Bearer <key>`"),
        ("short-key", "the Authorization header is a single word; send `Authorization: Bearer <key>`"),
        (f"{SECRET} {SECRET}", "unsupported Authorization scheme; send `Authorization: Bearer <key>`"),
    ],
)
def test_a_wrong_authorization_header_is_told_what_is_wrong_without_echoing_it(
    redis_server: RedisServer, authorization: str | None, says: str
) -> None:
    settings = ApiSettings(redis_url=redis_server.url_for(PRIVATE_DB), api_keys=f"alice:{'k7' * 16}")
    headers = {"Authorization": authorization} if authorization is not None else {}
    with TestClient(create_app(settings)) as client:
        response = client.get("/v1/models", headers=headers)
    assert response.status_code == 401
    assert response.json()["error"] == {"code": "unauthorized", "message": says, "param": None}
    assert SECRET not in response.text and "short-key" not in response.text


def test_two_authorization_headers_are_refused(redis_server: RedisServer) -> None:
    # The first won: a valid key, then anything.
    key = "k7" * 16
    settings = ApiSettings(redis_url=redis_server.url_for(PRIVATE_DB), api_keys=f"alice:{key}")
    with TestClient(create_app(settings)) as client:
        for second in (f"Bearer {key}", "Bearer nobody-s-key-at-all", "Basic eDp5"):
            sent = [("Authorization", f"Bearer {key}"), ("Authorization", second)]
            response = client.get("/v1/models", headers=sent)
            assert response.status_code == 401
            assert response.json()["error"] == {
                "code": "unauthorized",
                "message": "2 Authorization headers; send one",
                "param": "Authorization",
            }
            assert key not in response.text
        assert client.get("/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 200


def test_redis_passwords_are_not_shown() -> None:
    from latentd.settings import shown_url

    for url, shown in [
        ("redis://:hunter2@h:6379/0", "redis://:***@h:6379/0"),
        ("rediss://default:hun@ter2@h/0", "rediss://default:***@h/0"),
        ("unix:///run/redis.sock?db=0&password=hunter2", "unix:///run/redis.sock?db=0&password=***"),
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
    ]:
        assert shown_url(url) == shown
    # `latentd keys` told of a Redis it cannot reach quoting its password (the worker too).
    listed = keys_command("redis://:hunter2@127.0.0.1:1/0", "list")
    assert listed.returncode == 1 and "cannot reach Redis at redis://:***@127.0.0.1:1/0" in listed.stderr
    assert "hunter2" not in listed.stderr, listed.stderr
