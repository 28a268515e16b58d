"""Every bound of the request is enforced with a 422 naming the field, and nothing is enqueued."""

from __future__ import annotations

import gzip
import time
import zlib
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import redis
from fastapi.testclient import TestClient

from app.config import ApiSettings
from app.main import create_app
from app.protocol import GenerationRequest, OpenAIImageRequest
from tests.conftest import PRIVATE_DB, RedisServer, register_ghost

VALID = {"prompt": "a red circle"}


@pytest.fixture
def client(redis_server: RedisServer, redis_client: redis.Redis) -> Iterator[TestClient]:
    settings = ApiSettings(
        redis_url=redis_server.url_for(PRIVATE_DB), default_model="tiny", max_pixels=512 * 512, max_images=4
    )
    with TestClient(create_app(settings)) as c:
        yield c


def nothing_enqueued(r: redis.Redis) -> bool:
    return not r.keys("rq:*") and not r.keys("latentd:job:*")


CASES: list[tuple[str, Any]] = [
    ("prompt", ""),
    ("prompt", "   \n\t"),
    ("prompt", "x" * 2001),
    ("prompt", 5),
    ("prompt", None),
    ("prompt", "nul\x00byte"),
    ("negative_prompt", "x" * 2001),
    ("negative_prompt", ["a"]),
    ("model", ""),
    ("width", 56),
    ("width", 2056),
    ("width", 100),
    ("width", "64"),
    ("width", 64.5),
    ("width", True),
    ("height", 0),
    ("height", 2**70),
    ("steps", 0),
    ("steps", 151),
    ("steps", 1.5),
    ("guidance_scale", -0.1),
    ("guidance_scale", 30.5),
    ("guidance_scale", "high"),
    ("seed", -1),
    ("seed", 2**32),
    ("seed", 10**40),
    ("num_images", 0),
    ("num_images", 5),
    ("scheduler", "karras_magic"),
    ("output_format", "gif"),
    ("bogus_field", 1),
]


@pytest.mark.parametrize(("field", "value"), CASES, ids=[f"{f}={str(v)[:12]!r}" for f, v in CASES])
def test_each_bound_is_rejected(
    client: TestClient, redis_client: redis.Redis, field: str, value: Any
) -> None:
    response = client.post("/v1/generations", json={**VALID, field: value})
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_request"
    assert error["param"] == field
    assert field in error["message"]
    assert "Traceback" not in response.text
    assert nothing_enqueued(redis_client)


def test_missing_prompt_names_prompt(client: TestClient, redis_client: redis.Redis) -> None:
    response = client.post("/v1/generations", json={"width": 64})
    assert response.status_code == 422
    assert response.json()["error"]["param"] == "prompt"
    assert nothing_enqueued(redis_client)


def test_pixel_budget(client: TestClient, redis_client: redis.Redis) -> None:
    response = client.post("/v1/generations", json={**VALID, "width": 1024, "height": 512})
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["param"] == "width"
    assert "262144" in error["message"]
    assert nothing_enqueued(redis_client)


@pytest.mark.parametrize("body", ["{not json", "[]", '"text"', ""])
def test_malformed_bodies(client: TestClient, redis_client: redis.Redis, body: str) -> None:
    response = client.post("/v1/generations", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "invalid_request"
    assert nothing_enqueued(redis_client)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("size", "100x100"),
        ("size", "big"),
        ("size", "64x4096"),
        ("size", "1792x1024"),  # each side allowed, the pixels over LATENTD_MAX_PIXELS
        ("n", 0),
        ("n", 5),
        ("n", True),  # strict, as the native route is
        ("response_format", "xml"),
        ("output_format", "gif"),
        ("size", "automatic"),
    ],
)
def test_openai_endpoint_bounds(
    client: TestClient, redis_client: redis.Redis, field: str, value: Any
) -> None:
    response = client.post("/v1/images/generations", json={"prompt": "a red circle", field: value})
    assert response.status_code == 422, response.text
    assert response.json()["error"]["param"] == field
    assert nothing_enqueued(redis_client)


def test_the_openai_route_refuses_a_field_given_twice(client: TestClient, redis_client: redis.Redis) -> None:
    response = client.post(
        "/v1/images/generations",
        content=b'{"prompt": "a red circle", "n": 1, "n": 4}',
        headers={"content-type": "application/json"},
    )
    assert response.status_code == 422, response.text
    assert response.json()["error"]["param"] == "n"
    assert nothing_enqueued(redis_client)


@pytest.mark.parametrize(
    "size",
    [
        "\u0668\u0660x64",
        "\uff16\uff14x\uff16\uff14",
        "\uff11\uff10\uff12\uff14x1024",
        "64X64",
        "64x64\n",
        " 64x64",
    ],
)
def test_openai_size_takes_ascii_digits_only_and_says_so_plainly(
    client: TestClient, redis_client: redis.Redis, size: str
) -> None:
    # Arabic-Indic and fullwidth digits were read as numbers (a fullwidth 1024 made a 1024-pixel
    # job), and a wrong size was told the raw regex.
    response = client.post("/v1/images/generations", json={"prompt": "a red circle", "size": size})
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error == {
        "code": "invalid_request",
        "message": "size: must be WIDTHxHEIGHT (e.g. 512x512) or auto",
        "param": "size",
    }
    assert nothing_enqueued(redis_client)


@pytest.mark.parametrize("size", ["8x8", "64x9", "12345x64"])
def test_an_openai_size_out_of_bounds_is_told_the_bounds(
    client: TestClient, redis_client: redis.Redis, size: str
) -> None:
    # Sides of one digit, or five, were told their format was wrong.
    response = client.post("/v1/images/generations", json={"prompt": "a red circle", "size": size})
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["param"] == "size" and "multiple of 8 in 64–2048" in error["message"], error
    assert nothing_enqueued(redis_client)


@pytest.mark.parametrize(
    ("route", "body", "param"),
    [
        ("/v1/generations", {"steps": 21}, "steps"),
        ("/v1/generations", {"num_images": 2}, "num_images"),
        ("/v1/generations", {"width": 512}, "width"),
        ("/v1/images/generations", {"n": 2}, "n"),  # the OpenAI route has no steps to blame
        ("/v1/images/generations", {"size": "512x512"}, "size"),
    ],
)
def test_work_over_the_limit_names_a_field_the_request_sent(
    redis_server: RedisServer, redis_client: redis.Redis, route: str, body: dict[str, Any], param: str
) -> None:
    # One 64x64 image at the default 20 steps fits, and nothing more.
    settings = ApiSettings(
        redis_url=redis_server.url_for(PRIVATE_DB), default_model="tiny", max_work=64 * 64 * 20
    )
    with TestClient(create_app(settings)) as client:
        response = client.post(route, json={**VALID, **body})
    assert response.status_code == 422, response.text
    assert response.json()["error"]["param"] == param
    if route == "/v1/images/generations":  # in the caller's terms
        assert "num_images" not in response.json()["error"]["message"]
    assert nothing_enqueued(redis_client)


def test_an_enqueue_sent_again_pushes_the_job_once(
    redis_server: RedisServer, redis_client: redis.Redis
) -> None:
    # What redis-py's retry does when a reply is lost (a timeout, a dropped connection) after
    # Redis ran the enqueue: it sends it again. The job must not be queued, and run, twice.
    settings = ApiSettings(redis_url=redis_server.url_for(PRIVATE_DB), default_model="tiny")
    with TestClient(create_app(settings)) as client:
        service = client.app.state.service  # type: ignore[attr-defined]
        payload = service.resolve(GenerationRequest(prompt="x"), "resent-job")
        queue = service.queue("tiny")
        lengths = [
            client.portal.call(service._rq_enqueue, queue, payload, None)[1]  # type: ignore[union-attr]
            for _ in range(2)
        ]
    assert redis_client.lrange(queue.key, 0, -1) == [b"resent-job"]
    assert lengths == [1, 1]  # and the job's place is told right


def test_the_openai_route_honours_an_idempotency_key(client: TestClient, redis_client: redis.Redis) -> None:
    register_ghost(redis_client, "tiny")  # jobs are accepted and never run: each answer is a 504
    client.app.state.settings.sync_timeout = 0.2  # type: ignore[attr-defined]
    body = {"prompt": "a red circle", "size": "64x64"}

    def job_of(response: httpx.Response) -> str:
        assert response.status_code == 504, response.text
        return str(response.json()["error"]["message"].split("'")[1])

    first = job_of(client.post("/v1/images/generations", json=body, headers={"Idempotency-Key": "k1"}))
    again = job_of(client.post("/v1/images/generations", json=body, headers={"Idempotency-Key": "k1"}))
    assert again == first
    assert redis_client.llen("rq:queue:latentd:tiny") == 1  # queued once
    # The same key with another request is refused; a bad key is named as the native route names it.
    conflict = client.post("/v1/images/generations", json={**body, "n": 2}, headers={"Idempotency-Key": "k1"})
    assert conflict.status_code == 409
    assert conflict.json()["error"]["code"] == "idempotency_conflict"
    assert conflict.headers["x-should-retry"] == "false"  # OpenAI's SDKs send a 409 again otherwise
    too_long = client.post("/v1/images/generations", json=body, headers={"Idempotency-Key": "k" * 256})
    assert too_long.status_code == 422 and too_long.json()["error"]["param"] == "Idempotency-Key"
    assert redis_client.llen("rq:queue:latentd:tiny") == 1


def test_an_optional_field_sent_as_null_takes_its_default(
    client: TestClient, redis_client: redis.Redis
) -> None:
    """null took the default for most fields and was refused for num_images, output_format,
    negative_prompt and the OpenAI route's response_format."""
    register_ghost(redis_client, "tiny")
    optional = [name for name, field in GenerationRequest.model_fields.items() if not field.is_required()]
    nulls = {**VALID, "seed": 7, **{name: None for name in optional if name != "seed"}}
    sent = client.post("/v1/generations", json=nulls)
    assert sent.status_code == 202, sent.text
    left_out = client.post("/v1/generations", json={**VALID, "seed": 7})
    assert left_out.status_code == 202, left_out.text
    resolved = [client.get(f"/v1/generations/{r.json()['id']}").json()["request"] for r in (sent, left_out)]
    assert resolved[0] == resolved[1]
    openai = {"prompt": "a red circle", "response_format": None, "n": None, "output_format": None}
    assert OpenAIImageRequest.model_validate(openai).response_format == "url"


def test_unknown_model_is_refused_at_submit(client: TestClient, redis_client: redis.Redis) -> None:
    response = client.post("/v1/generations", json={**VALID, "model": "nobody-serves-this"})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "model_unavailable"
    assert error["param"] == "model"
    assert "nobody-serves-this" in error["message"]
    assert nothing_enqueued(redis_client)


def test_unknown_ids_and_routes(client: TestClient) -> None:
    assert client.get("/v1/generations/0123abcd").json()["error"]["code"] == "not_found"
    assert client.get("/v1/generations/0123abcd").status_code == 404
    assert client.post("/v1/generations/0123abcd/cancel").status_code == 404
    assert client.get("/v1/generations/0123abcd/images/0").status_code == 404
    assert client.get("/v1/nothing-here").json()["error"]["code"] == "not_found"
    assert client.get("/v1/generations/bad%20id").status_code == 404


@pytest.mark.parametrize("path", ["", "?wait=0.1", "/cancel", "/images/0"])
def test_the_job_id_is_named_id_whatever_is_wrong_with_it(client: TestClient, path: str) -> None:
    # A malformed id (the path's own check) and an unknown one (the service's) name it alike.
    method = "POST" if path == "/cancel" else "GET"
    for job_id in ("bad%20id", "a" * 65, "0123abcd"):
        response = client.request(method, f"/v1/generations/{job_id}{path}")
        assert response.status_code == 404, response.text
        assert response.json()["error"]["param"] == "id", response.text


ID_RULE = "ids are 1–64 characters of A–Z, a–z, 0–9, _ and -"
# Each id no generation can have, as the path gives it, and how the answer names it.
NO_SUCH_IDS = [
    ("a.b", "id 'a.b'"),
    ("bad%20id", "id 'bad id'"),
    ("a" * 65, "this id"),  # too long to echo
    ("nul%00", "this id"),  # not printable
    ("zero%E2%80%8Bwidth", "this id"),
    ("é", "id 'é'"),
]
# Each index no image can have, and how the answer names it.
NO_SUCH_INDEXES = [
    ("64", "image 64"),
    ("-1", "image -1"),
    ("abc", "image abc"),
    ("1.5", "image 1.5"),
    ("9" * 80, "an image at this index"),
]
ID_ROUTES = [
    ("GET", ""),
    ("GET", "?wait=0"),
    ("HEAD", ""),
    ("HEAD", "?wait=0"),
    ("POST", "/cancel"),
    ("GET", "/images/0"),
    ("HEAD", "/images/0"),
]


@pytest.mark.parametrize(("method", "path"), ID_ROUTES)
@pytest.mark.parametrize(("job_id", "named"), NO_SUCH_IDS)
def test_an_id_no_generation_can_have_is_not_found(
    client: TestClient, method: str, path: str, job_id: str, named: str
) -> None:
    """As an unknown id is, on every route that takes one: it was 422, the pattern's own message."""
    response = client.request(method, f"/v1/generations/{job_id}{path}")
    assert response.status_code == 404, response.text
    if method == "HEAD":
        return
    assert response.json()["error"] == {
        "code": "not_found",
        "message": f"no generation with {named}: {ID_RULE}",
        "param": "id",
    }


@pytest.mark.parametrize("method", ["GET", "HEAD"])
@pytest.mark.parametrize(("index", "named"), NO_SUCH_INDEXES)
def test_an_index_no_image_can_have_is_not_found(
    client: TestClient, method: str, index: str, named: str
) -> None:
    response = client.request(method, f"/v1/generations/0123abcd/images/{index}")
    assert response.status_code == 404, response.text
    if method == "HEAD":
        return
    assert response.json()["error"] == {
        "code": "not_found",
        "message": f"no generation has {named}: images are numbered 0–63",
        "param": "index",
    }
    # A bad id is named first, whichever the framework checks first.
    response = client.get(f"/v1/generations/a.b/images/{index}")
    assert response.status_code == 404 and response.json()["error"]["param"] == "id", response.text


def test_a_bad_id_is_not_found_before_a_bad_query_is_invalid(client: TestClient) -> None:
    response = client.get("/v1/generations/a.b?wait=nan")
    assert response.status_code == 404 and response.json()["error"]["param"] == "id", response.text
    response = client.get("/v1/generations/0123abcd/images/64?expires=soon&signature=x")
    assert response.status_code == 404 and response.json()["error"]["param"] == "index", response.text


def test_status_reads_of_an_id_no_generation_can_have_answer_alike_on_both_paths(client: TestClient) -> None:
    """`StatusReads` answers a plain status read before FastAPI's routing and checks; one with a
    query string goes through the route. Both answer 404, byte for byte alike."""
    for job_id in ("a" * 64, "a" * 65, "a.b", "nul%00"):
        fast = client.get(f"/v1/generations/{job_id}")
        routed = client.get(f"/v1/generations/{job_id}", params={"wait": 0})
        assert fast.status_code == routed.status_code == 404, fast.text
        assert fast.content == routed.content
        assert fast.json()["error"]["code"] == "not_found" and fast.json()["error"]["param"] == "id"
    assert ("a" * 65) not in fast.text + routed.text


def test_a_path_that_names_nothing_is_not_found_to_a_caller_with_a_key_only(
    redis_server: RedisServer, redis_client: redis.Redis
) -> None:
    """Authentication comes first, as for an unknown id: a caller without a key learns nothing."""
    settings = ApiSettings(redis_url=redis_server.url_for(PRIVATE_DB), api_keys="alice:" + "k" * 32)
    with TestClient(create_app(settings)) as keyed:
        for method, path in ID_ROUTES:
            response = keyed.request(method, f"/v1/generations/a.b{path}")
            assert response.status_code == 401, (method, path, response.text)
        response = keyed.get("/v1/generations/a.b", headers={"Authorization": "Bearer " + "k" * 32})
        assert response.status_code == 404, response.text


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/v1/models", "/metrics"])
def test_head_is_answered_where_get_is(client: TestClient, path: str) -> None:
    """Load balancers and uptime checks probe with HEAD; these answered 405."""
    got, head = client.get(path), client.head(path)
    assert head.status_code == got.status_code == 200, head.text
    assert head.content == b"" and head.headers["content-type"] == got.headers["content-type"]


@pytest.mark.parametrize("query", ["", "?wait=0"])  # answered before routing, and by the route
def test_head_of_a_generation_is_its_status_reads_head(
    client: TestClient, redis_client: redis.Redis, query: str
) -> None:
    """`curl -I` and monitors read with HEAD; it answered 405."""
    register_ghost(redis_client, "tiny")  # accepted, never run: it stays queued
    job_id = client.post("/v1/generations", json=VALID).json()["id"]
    for url, status in ((f"/v1/generations/{job_id}{query}", 200), (f"/v1/generations/0123abcd{query}", 404)):
        got, head = client.get(url), client.head(url)
        assert head.status_code == got.status_code == status and head.content == b"", head.text
        for name in ("content-type", "content-length"):
            assert head.headers[name] == got.headers[name], (url, name)


def test_a_head_with_wait_answers_at_once_and_checks_it(
    client: TestClient, redis_client: redis.Redis
) -> None:
    """Held open, a HEAD would end in the same 200, its body (never sent) aside: it is not held."""
    register_ghost(redis_client, "tiny")
    job_id = client.post("/v1/generations", json=VALID).json()["id"]
    start = time.monotonic()
    assert client.head(f"/v1/generations/{job_id}?wait=30").status_code == 200
    assert time.monotonic() - start < 5
    assert client.head(f"/v1/generations/{job_id}?wait=nan").status_code == 422  # as the GET's


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("DELETE", "/v1/generations", "GET, HEAD, POST"),
        ("POST", "/v1/generations/0123abcd", "GET, HEAD"),
        ("GET", "/v1/generations/0123abcd/cancel", "POST"),
        ("POST", "/v1/generations/0123abcd/images/0", "GET, HEAD"),  # two routes, one path
        ("PUT", "/healthz", "GET, HEAD"),
    ],
)
def test_a_wrong_method_is_told_the_allowed_ones(
    client: TestClient, method: str, path: str, allow: str
) -> None:
    response = client.request(method, path)
    assert response.status_code == 405
    assert response.headers["allow"] == allow  # RFC 9110 requires it on a 405
    error = response.json()["error"]
    assert error["code"] == "method_not_allowed"
    assert error["message"] == f"method {method} is not allowed here; this route takes {allow}"


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/v1/generations/"),
        ("GET", "/v1/generations/0123abcd/"),
        ("POST", "/v1/images/generations/"),
        ("GET", "/v1/models/"),
        ("GET", "/healthz/"),
    ],
)
def test_a_trailing_slash_is_not_found_never_redirected(client: TestClient, method: str, path: str) -> None:
    # Starlette redirected to the other form, before authentication, to the client's own Host header.
    response = client.request(method, path, headers={"Host": "elsewhere.example"}, follow_redirects=False)
    assert response.status_code == 404 and "location" not in response.headers
    assert response.json()["error"] == {
        "code": "not_found",
        "message": f"no route at {path}; routes take no trailing slash",
        "param": None,
    }


def test_a_trailing_slash_is_blamed_only_where_the_path_without_it_is_a_route(client: TestClient) -> None:
    response = client.get("/v1/generations/0123abcd/images/")  # no index: no route either way
    assert response.json()["error"]["message"] == "no route at /v1/generations/0123abcd/images/"


def test_an_unhandled_exception_is_a_bare_internal_error_and_is_counted(redis_server: RedisServer) -> None:
    app = create_app(ApiSettings(redis_url=redis_server.url_for(PRIVATE_DB)))

    @app.get("/boom")
    def boom() -> None:
        raise RuntimeError("a secret detail")

    with TestClient(app, raise_server_exceptions=False) as client:
        response = client.get("/boom")
        assert response.status_code == 500
        assert response.json()["error"]["code"] == "internal_error"
        assert "secret" not in response.text
        assert "latentd_internal_errors_total 1.0" in client.get("/metrics").text


def test_openapi_documents_every_route_and_error(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    paths = spec["paths"]
    for path in (
        "/v1/generations",
        "/v1/generations/{id}",
        "/v1/generations/{id}/cancel",
        "/v1/generations/{id}/images/{index}",
        "/v1/images/generations",
        "/v1/models",
        "/healthz",
        "/readyz",
        "/metrics",
    ):
        assert path in paths, path
    submit = paths["/v1/generations"]["post"]["responses"]
    assert {"202", "400", "422", "429", "503"} <= set(submit)
    cancel = paths["/v1/generations/{id}/cancel"]["post"]["responses"]
    assert {"404", "409"} <= set(cancel) and "images are stored" in cancel["409"]["description"]
    # Its id failing its check is 404; FastAPI's own 422, not the error envelope, is not listed.
    assert "422" not in cancel and "HTTPValidationError" not in spec["components"]["schemas"]
    assert "stopping" in paths["/v1/images/generations"]["post"]["responses"]["503"]["description"]
    native_size = spec["components"]["schemas"]["ModelInfo"]["properties"]["native_size"]
    assert "LATENTD_DEFAULT_SIZE" in native_size["description"]
    assert client.get("/docs").status_code == 200


def test_oversized_bodies_get_413_with_or_without_content_length(
    client: TestClient, redis_client: redis.Redis
) -> None:
    big = b'{"prompt": "' + b"x" * 70_000 + b'"}'
    response = client.post("/v1/generations", content=big, headers={"content-type": "application/json"})
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "payload_too_large"
    # Refused before routing, and still counted under its route.
    counted = 'latentd_http_requests_total{method="POST",route="/v1/generations",status="413"} 1.0'
    assert counted in client.get("/metrics").text

    def chunks() -> Iterator[bytes]:
        yield b'{"prompt": "'
        for _ in range(100):
            yield b"x" * 1000
        yield b'"}'

    response = client.post("/v1/generations", content=chunks(), headers={"content-type": "application/json"})
    assert response.status_code == 413
    assert nothing_enqueued(redis_client)


def test_total_work_is_capped(client: TestClient, redis_client: redis.Redis) -> None:
    # 512 x 512 x 4 images x 150 steps = 157M: within the pixel budget, over a 100M work cap.
    settings = client.app.state.settings  # type: ignore[attr-defined]
    settings.max_work = 100_000_000
    body = {**VALID, "width": 512, "height": 512, "num_images": 4, "steps": 150}
    response = client.post("/v1/generations", json=body)
    assert response.status_code == 422
    assert response.json()["error"]["param"] == "steps"
    assert "100000000" in response.json()["error"]["message"]
    assert nothing_enqueued(redis_client)


@pytest.mark.parametrize(
    ("raw", "param"),
    [
        (b'{"prompt": "\\ud800 lone surrogate"}', "prompt"),
        (b'{"prompt": "\xff\xfe not utf-8"}', None),
        (b'{"prompt": "ok", "seed": 1e400}', "seed"),
        (b'{"prompt": "ok", "steps": 99999999999999999999999999}', "steps"),
        (b'{"prompt": "\\u200b\\u200b\\ufeff "}', "prompt"),
    ],
)
def test_unicode_and_number_edge_cases(
    client: TestClient, redis_client: redis.Redis, raw: bytes, param: str | None
) -> None:
    response = client.post("/v1/generations", content=raw, headers={"content-type": "application/json"})
    assert response.status_code == 422, response.text
    assert response.json()["error"]["code"] == "invalid_request"
    assert response.json()["error"]["param"] == param
    assert nothing_enqueued(redis_client)


@pytest.mark.parametrize("route", ["/v1/generations", "/v1/images/generations"])
@pytest.mark.parametrize(
    ("raw", "message", "param"),
    [
        (b'{"prompt": "a", "": 1}', "unknown field ''", ""),  # named as sent: it said 'None'
        (b'{"prompt": "a", "\\ud800": 1}', "a field name is not valid Unicode", None),
        (b'{"prompt": "a", "x\\udfffy": 1}', "a field name is not valid Unicode", None),
        (b'{"prompt": "\\ud800"}', "prompt: not valid Unicode", "prompt"),
    ],
)
def test_odd_field_names_are_named_or_said_to_be_unreadable(
    client: TestClient, redis_client: redis.Redis, route: str, raw: bytes, message: str, param: str | None
) -> None:
    response = client.post(route, content=raw, headers={"content-type": "application/json"})
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_request"
    assert error["message"].startswith(message) and error["param"] == param, error
    assert nothing_enqueued(redis_client)


BLANK_PROMPTS = [
    "\u00ad",  # soft hyphen (Cf)
    "\u200e\u200f",  # direction marks (Cf)
    "\u202e",  # right-to-left override (Cf)
    "\u2800",  # Braille blank
    "\u3164",  # Hangul filler
    "\u115f\u1160\uffa0",  # Hangul choseong, jungseong and halfwidth fillers
    "\u0001",  # a control (Cc)
    "\uffff\ufdd0\U0010fffe",  # noncharacters
    "\u2028\u3000 \u00a0",  # line separator (Zl), ideographic and no-break spaces (Zs)
    "\ufe0f\U000e0100",  # variation selectors (Mn)
    "\u034f\u17b4\u17b5\u180b",  # combining grapheme joiner, Khmer inherent vowels, Mongolian FVS (Mn)
]


@pytest.mark.parametrize("route", ["/v1/generations", "/v1/images/generations"])
@pytest.mark.parametrize("prompt", BLANK_PROMPTS, ids=[ascii(p) for p in BLANK_PROMPTS])
def test_a_prompt_of_invisible_characters_is_blank(
    client: TestClient, redis_client: redis.Redis, route: str, prompt: str
) -> None:
    response = client.post(route, json={"prompt": prompt})
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["param"] == "prompt" and "visible character" in error["message"], error
    assert nothing_enqueued(redis_client)


@pytest.mark.parametrize(
    "prompt",
    [
        "\u200e\u00ad a red circle\u2800",
        "\u0600",  # the Arabic number sign: a format character that draws
        "\u06dd",  # the Arabic end of ayah, drawn alone
        "\U000110bd",  # the Kaithi number sign
        "\u1680",  # the Ogham space mark: a space (Zs) drawn as a stroke
        "\U0001fae8",  # an emoji newer than some Pythons' Unicode tables (Cn there)
    ],
)
def test_a_prompt_with_something_to_draw_is_kept_as_sent(prompt: str) -> None:
    assert GenerationRequest(prompt=prompt).prompt == prompt


JSON = {"content-type": "application/json"}
FORM = {"content-type": "application/x-www-form-urlencoded"}
SEND_JSON = "Content-Type: application/json"
ENCODED = "send the JSON without Content-Encoding"
CODING = "Content-Encoding"


@pytest.mark.parametrize(
    ("content", "headers", "message", "param"),
    [
        # curl -d sends a form's Content-Type; some clients send none.
        (b'{"prompt": "a"}', FORM, "Content-Type: application/json", "Content-Type"),
        (b'{"prompt": "a"}', {}, "Content-Type: application/json", "Content-Type"),
        # "json" in the name is not JSON: FastAPI decodes only application/json and application/*+json.
        (b'{"prompt": "a"}', {"content-type": "text/json"}, SEND_JSON, "Content-Type"),
        (b'{"prompt": "a"}', {"content-type": "application/x-ndjson"}, SEND_JSON, "Content-Type"),
        (b'{"prompt": "a"}', {"content-type": "application/jsonp"}, SEND_JSON, "Content-Type"),
        (b'{"width": 64}', {"content-type": "Application/JSON; charset=utf-8"}, "prompt: Field", "prompt"),
        (b'{"width": 64}', {"content-type": "application/merge-patch+json"}, "prompt: Field", "prompt"),
        (b"", JSON, "request body (a JSON object) is missing", None),
        (b"[]", JSON, "the request body must be a JSON object", None),
        (b"null", JSON, "the request body must be a JSON object", None),
        (b'"a red circle"', JSON, "the request body must be a JSON object", None),
        (b'{"prompt": "a red circle", "seed": 7', JSON, "not valid JSON (at character", None),
        # Python's decoder would keep the last of the two without a word.
        (b'{"prompt": "a cat", "prompt": "a dog"}', JSON, "gives 'prompt' more than once", "prompt"),
        (b'{"prompt": "a", "\\ud800": 1, "\\ud800": 2}', JSON, "gives a field name more than once", None),
        (b'{"prompt": "x", "steps": ' + b"1" * 4301 + b"}", JSON, "cannot be read as JSON", None),
        (b'{"prompt": ' + b"[" * 3000 + b"]" * 3000 + b"}", JSON, "cannot be read as JSON", None),
        # Compressed: bodies are read as sent. The answer blamed the bytes, naming nothing.
        (gzip.compress(b'{"prompt": "a"}', mtime=0), {**JSON, "content-encoding": "gzip"}, ENCODED, CODING),
        (zlib.compress(b'{"prompt": "a"}'), {**JSON, "content-encoding": "deflate"}, ENCODED, CODING),
    ],
)  # fmt: skip
def test_bodies_that_are_not_a_json_object_say_why(
    client: TestClient,
    redis_client: redis.Redis,
    content: bytes,
    headers: dict[str, str],
    message: str,
    param: str | None,
) -> None:
    response = client.post("/v1/generations", content=content, headers=headers)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_request"
    assert message in error["message"] and error["param"] == param, error
    assert nothing_enqueued(redis_client)


def test_a_bad_header_is_named_as_it_is_written(client: TestClient, redis_client: redis.Redis) -> None:
    response = client.post("/v1/generations", json=VALID, headers={"Idempotency-Key": "k" * 256})
    assert response.status_code == 422
    assert response.json()["error"]["param"] == "Idempotency-Key"  # as the 409 for a reused key names it
    assert nothing_enqueued(redis_client)


@pytest.mark.parametrize(("wait", "says"), [("nan", "finite number"), ("-1", "greater than or equal to 0")])
def test_a_bad_wait_says_what_is_wrong_with_it(client: TestClient, wait: str, says: str) -> None:
    response = client.get(f"/v1/generations/0123abcd?wait={wait}")
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["param"] == "wait" and says in error["message"], error


def test_a_size_left_out_is_the_models_own(redis_server: RedisServer, redis_client: redis.Redis) -> None:
    # Stable Diffusion 1.5 makes noise at 64x64, what LATENTD_DEFAULT_SIZE gave every model.
    register_ghost(redis_client, "sd15", "sd15-worker", native_size=512)
    register_ghost(redis_client, "old", "old-worker", native_size=None)  # a worker that does not say
    settings = ApiSettings(redis_url=redis_server.url_for(PRIVATE_DB), default_model="sd15", sync_timeout=0.2)
    try:
        with TestClient(create_app(settings)) as client:
            client.post("/v1/generations", json={**VALID, "steps": 1})
            client.post("/v1/generations", json={**VALID, "width": 64, "steps": 1})
            client.post("/v1/images/generations", json={**VALID, "size": "auto"})  # 504: nobody runs it
            client.post("/v1/generations", json={**VALID, "model": "old", "steps": 1})
            jobs = [
                j.decode()
                for q in ("sd15", "old")
                for j in redis_client.lrange(f"rq:queue:latentd:{q}", 0, -1)
            ]
            views = [client.get(f"/v1/generations/{j}").json()["request"] for j in jobs]
        assert [(v["width"], v["height"]) for v in views] == [(512, 512), (64, 512), (512, 512), (512, 512)]
        with TestClient(create_app(settings.model_copy(update={"default_size": 256}))) as client:
            job = client.post("/v1/generations", json={**VALID, "steps": 1}).json()
            assert client.get(f"/v1/generations/{job['id']}").json()["request"]["width"] == 256
    finally:
        redis_client.flushdb()


OPENAI, NATIVE = "/v1/images/generations", "/v1/generations"


@pytest.mark.parametrize(
    ("default_size", "route", "body", "says"),
    [
        (None, OPENAI, {}, "size auto: width × height = 1048576 pixels (1024 where left out: the model's"),
        (None, OPENAI, {"size": "auto"}, "size auto: width × height = 1048576 pixels"),
        (None, NATIVE, {"width": 512}, "width × height = 524288 pixels (1024 where left out: the model's"),
        (512, NATIVE, {"width": 1024}, "width × height = 524288 pixels (512 where left out: LATENTD_DEFAULT"),
        (None, NATIVE, {"model": "old", "width": 1024}, "524288 pixels (512 where left out: the default)"),
    ],
)  # fmt: skip
def test_a_size_over_the_pixel_limit_names_where_it_came_from(
    redis_server: RedisServer,
    redis_client: redis.Redis,
    default_size: int | None,
    route: str,
    body: dict[str, Any],
    says: str,
) -> None:
    # The OpenAI route said "size None" for a size left out, and a size LATENTD_DEFAULT_SIZE
    # supplied was called the model's.
    register_ghost(redis_client, "sdxl", "sdxl-worker", native_size=1024)
    register_ghost(redis_client, "old", "old-worker", native_size=None)  # a worker that does not say
    settings = ApiSettings(
        redis_url=redis_server.url_for(PRIVATE_DB),
        default_model="sdxl",
        max_pixels=512 * 512,
        default_size=default_size,
    )
    try:
        with TestClient(create_app(settings)) as client:
            response = client.post(route, json={**VALID, **body})
        assert response.status_code == 422, response.text
        error = response.json()["error"]
        assert says in error["message"], error
        assert error["param"] == ("size" if route == OPENAI else "width"), error
        assert not redis_client.llen("rq:queue:latentd:sdxl") and not redis_client.llen(
            "rq:queue:latentd:old"
        )
    finally:
        redis_client.flushdb()


@pytest.mark.parametrize("route", ["/v1/generations", "/v1/images/generations"])
def test_two_idempotency_keys_are_refused(client: TestClient, redis_client: redis.Redis, route: str) -> None:
    # The first was taken silently, where a proxy in front may join them into one other key
    # ("k1, k2"): a retry through it would not find the job, and the job would run twice.
    register_ghost(redis_client, "tiny")
    headers = [("Idempotency-Key", "k1"), ("Idempotency-Key", "k2")]
    response = client.post(route, json={"prompt": "a red circle"}, headers=headers)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_request" and error["param"] == "Idempotency-Key"
    assert "2 Idempotency-Key headers" in error["message"]
    assert nothing_enqueued(redis_client)


APP_ORIGIN = "https://app.example.com"


@pytest.fixture
def browser_client(redis_server: RedisServer, redis_client: redis.Redis) -> Iterator[TestClient]:
    settings = ApiSettings(
        redis_url=redis_server.url_for(PRIVATE_DB),
        default_model="tiny",
        cors_origins=f"{APP_ORIGIN}, http://localhost:5173",
    )
    with TestClient(create_app(settings)) as c:
        yield c


def test_a_browser_app_of_an_allowed_origin_submits_and_reads_the_answer(
    browser_client: TestClient, redis_client: redis.Redis
) -> None:
    # A page could not call the API at all: its preflight got 405, and no answer carried CORS headers.
    register_ghost(redis_client, "tiny")
    preflight = browser_client.options(
        "/v1/generations",
        headers={
            "Origin": APP_ORIGIN,
            "Access-Control-Request-Method": "POST",
            # OpenAI's SDKs send headers of their own: refused, a page using one could not call.
            "Access-Control-Request-Headers": "authorization, content-type, idempotency-key, x-stainless-os",
        },
    )
    assert preflight.status_code == 200, preflight.text
    assert preflight.headers["access-control-allow-origin"] == APP_ORIGIN
    assert "idempotency-key" in preflight.headers["access-control-allow-headers"].lower()
    accepted = browser_client.post(
        "/v1/generations", json={"prompt": "a red circle"}, headers={"Origin": APP_ORIGIN}
    )
    assert accepted.status_code == 202
    assert accepted.headers["access-control-allow-origin"] == APP_ORIGIN
    assert "location" in accepted.headers["access-control-expose-headers"].lower()  # readable by the page
    refused = browser_client.post("/v1/generations", json={"prompt": ""}, headers={"Origin": APP_ORIGIN})
    assert refused.status_code == 422 and refused.headers["access-control-allow-origin"] == APP_ORIGIN
    other = browser_client.get("/v1/models", headers={"Origin": "https://evil.example.com"})
    assert other.status_code == 200 and "access-control-allow-origin" not in other.headers


def test_a_browser_page_may_read_the_openai_routes_generation_id(browser_client: TestClient) -> None:
    # `x-generation-id` names the job on every accepted OpenAI-route answer; a page could not read it.
    answer = browser_client.get("/v1/models", headers={"Origin": APP_ORIGIN})
    exposed = {h.strip().lower() for h in answer.headers["access-control-expose-headers"].split(",")}
    assert "x-generation-id" in exposed


@pytest.mark.parametrize(
    ("header", "value", "param"),
    [
        ("Origin", "https://evil.example.com", "Origin"),
        ("Access-Control-Request-Method", "DELETE", "Access-Control-Request-Method"),
    ],
)
def test_a_refused_preflight_says_why_in_the_error_envelope(
    browser_client: TestClient, header: str, value: str, param: str
) -> None:
    # Starlette's answer was `Disallowed CORS origin` in plain text.
    headers = {"Origin": APP_ORIGIN, "Access-Control-Request-Method": "POST", header: value}
    refused = browser_client.options("/v1/generations", headers=headers)
    assert refused.status_code == 400
    assert int(refused.headers["content-length"]) == len(refused.content)
    error = refused.json()["error"]
    assert error["code"] == "invalid_request" and error["param"] == param, error


def test_without_cors_origins_no_answer_lets_a_browser_page_read_it(client: TestClient) -> None:
    preflight = client.options(
        "/v1/generations", headers={"Origin": APP_ORIGIN, "Access-Control-Request-Method": "POST"}
    )
    assert preflight.status_code == 405 and "access-control-allow-origin" not in preflight.headers
    assert (
        "access-control-allow-origin" not in client.get("/v1/models", headers={"Origin": APP_ORIGIN}).headers
    )


@pytest.mark.parametrize(
    "origins", ["app.example.com", "https://app.example.com/", "https://a.com/x", "ftp://a.com"]
)
def test_cors_origins_that_no_browser_sends_are_refused_at_start(origins: str) -> None:
    with pytest.raises(ValueError, match="cors_origins"):
        ApiSettings(cors_origins=origins)


def test_cors_origins_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LATENTD_CORS_ORIGINS", "*")
    assert ApiSettings().allowed_origins() == ["*"]


def test_cors_origins_are_matched_as_a_browser_writes_them() -> None:
    # Written so, none matched: a browser sends its Origin in lower case, without a default port.
    origins = "https://App.Example.com:443, HTTP://localhost:80, http://localhost:5173, https://a.com:8443"
    assert ApiSettings(cors_origins=origins).allowed_origins() == [
        "https://app.example.com",
        "http://localhost",
        "http://localhost:5173",
        "https://a.com:8443",
    ]
