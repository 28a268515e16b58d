"""End to end: real redis-server, a real worker process with the tiny model, the real API over HTTP."""

from __future__ import annotations

import base64
import io
import json
import re
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from latentd.client import generate
from latentd.contract import Keys, StateField
from tests.conftest import (
    HTTP,
    TINY_MODEL,
    RedisServer,
    Service,
    flag_everything_checker,
    start_worker,
    wait_until,
)

pytestmark = pytest.mark.integration


def download(service: Service, url: str) -> httpx.Response:
    response = service.http.get(url)
    assert response.status_code == 200, response.text
    return response


def test_submit_progress_succeed_download(service: Service) -> None:
    accepted_response = service.http.post(
        "/v1/generations",
        json={
            "prompt": "a red circle on a blue background",
            "seed": 7,
            "width": 96,
            "height": 64,
            "steps": 30,
        },
    )
    assert accepted_response.status_code == 202
    accepted = accepted_response.json()
    job_id = accepted["id"]
    assert accepted_response.headers["location"] == f"/v1/generations/{job_id}"
    assert accepted["status"] == "queued"
    assert accepted["links"]["cancel"] == f"/v1/generations/{job_id}/cancel"

    seen_steps = set()

    def finished() -> bool:
        view = service.status(job_id)
        if view["status"] == "running":
            seen_steps.add(view["progress"]["step"])
        return view["status"] == "succeeded"

    wait_until(finished, 60, interval=0.01, what="job to succeed")
    # Progress was reported while it ran, not only at the end.
    assert any(0 < step < 30 for step in seen_steps), seen_steps

    view = service.status(job_id)
    assert view["progress"] == {"step": 30, "total_steps": 30, "fraction": 1.0}
    assert view["request"]["seed"] == 7
    assert view["request"]["model"] == TINY_MODEL
    assert view["error"] is None
    timings = view["timings"]
    assert timings["started_at"] and timings["finished_at"]
    assert timings["queue_seconds"] >= 0 and timings["inference_seconds"] > 0
    [image] = view["images"]
    assert image.pop("expires_at")  # when, in test_images_expire_with_the_results_ttl
    assert image == {
        "index": 0,
        "seed": 7,
        "content_type": "image/png",
        "url": f"/v1/generations/{job_id}/images/0",
        "withheld": False,
    }

    response = download(service, image["url"])
    assert response.headers["content-type"] == "image/png"
    assert response.headers["etag"]
    assert "max-age" in response.headers["cache-control"]
    png = Image.open(io.BytesIO(response.content))
    assert png.format == "PNG" and png.size == (96, 64)
    params = png.text["parameters"]
    for fragment in (
        "a red circle on a blue background",
        "Seed: 7",
        "Steps: 30",
        "Size: 96x64",
        f"Model: {TINY_MODEL}",
        "Sampler: default (DDIMScheduler)",  # the model's own, named
    ):
        assert fragment in params
    meta = json.loads(png.text["latentd"])
    assert meta["seed"] == 7 and meta["guidance_scale"] == 5.0 and meta["negative_prompt"] == ""

    etag = response.headers["etag"]
    # A cache may send the tag weakened, or among others (RFC 9110's weak comparison).
    for sent in (etag, f"W/{etag}", f'"other", {etag}', "*"):
        again = service.http.get(image["url"], headers={"If-None-Match": sent})
        assert again.status_code == 304, sent
    changed = service.http.get(image["url"], headers={"If-None-Match": '"other", W/"another"'})
    assert changed.status_code == 200 and changed.content == response.content
    missing = service.http.get(f"/v1/generations/{job_id}/images/1")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    head = service.http.head(image["url"])  # the headers a GET has, without the bytes
    assert head.status_code == 200 and head.content == b""
    assert head.headers["content-length"] == str(len(response.content))
    assert head.headers["etag"] == etag and head.headers["content-type"] == "image/png"
    assert service.http.head(f"/v1/generations/{job_id}/images/1").status_code == 404


@pytest.mark.parametrize(
    ("fmt", "content_type", "pil"), [("jpeg", "image/jpeg", "JPEG"), ("webp", "image/webp", "WEBP")]
)
def test_output_formats(service: Service, fmt: str, content_type: str, pil: str) -> None:
    prompt = "café ☕ 日本"  # the parameters keep text that is not ASCII
    job = service.submit(output_format=fmt, steps=2, width=72, height=80, prompt=prompt)
    view = service.wait_terminal(job["id"])
    assert view["status"] == "succeeded"
    response = download(service, view["images"][0]["url"])
    assert response.headers["content-type"] == content_type
    img = Image.open(io.BytesIO(response.content))
    assert img.format == pil and img.size == (72, 80)
    if fmt == "jpeg":
        text = img.info["comment"].decode()
    else:
        comment = img.getexif().get_ifd(0x8769)[0x9286]
        assert comment.startswith(b"UNICODE\0")
        text = comment[8:].decode("utf-16-be")
    assert text.startswith(prompt + "\nSteps: 2,"), text


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(int)


def test_same_seed_same_bytes_and_one_generator_per_image(service: Service) -> None:
    body = {"prompt": "a green square", "seed": 1234, "steps": 4, "negative_prompt": "blurry"}
    first = [service.wait_terminal(service.submit(**body, num_images=2)["id"]) for _ in range(2)]
    single = service.wait_terminal(service.submit(**{**body, "seed": 1235})["id"])
    assert [i["seed"] for i in first[0]["images"]] == [1234, 1235]
    a0, a1 = (download(service, i["url"]).content for i in first[0]["images"])
    b0, b1 = (download(service, i["url"]).content for i in first[1]["images"])
    assert (a0, a1) == (b0, b1)  # the same request and seed: byte-identical files
    assert a0 != a1
    # Image 1 is drawn from its own generator seeded with seed + 1: it is the image a
    # one-image job with that seed gives, up to the rounding a batch of 2 may change.
    c0 = download(service, single["images"][0]["url"]).content
    assert np.abs(pixels(a1) - pixels(c0)).max() <= 1
    assert np.abs(pixels(a0) - pixels(c0)).max() > 10


def test_a_job_is_told_what_of_its_request_the_model_did_not_use(
    service: Service, tiny_model_dir: Path
) -> None:
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tiny_model_dir / "tokenizer")
    reads = tokenizer.model_max_length - 2  # 75, as Stable Diffusion's (the built-in model's: 30)

    def tokens(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False).input_ids)

    long = "a red circle on a blue background" * 20
    fits = "a red circle"
    assert tokens(long) > reads >= tokens(fits)
    cut = f"{tokens(long)} tokens, of which the model reads the first {reads}; the rest was ignored"
    body = {"prompt": long, "negative_prompt": "blue", "guidance_scale": 1.0, "steps": 1}
    told = service.wait_terminal(service.submit(**body)["id"])
    assert told["status"] == "succeeded", told
    assert told["warnings"] == [f"prompt: {cut}", "negative_prompt: ignored, as guidance_scale is at most 1"]
    negative = service.wait_terminal(service.submit(prompt=fits, negative_prompt=long, steps=1)["id"])
    assert negative["warnings"] == [f"negative_prompt: {cut}"]
    assert service.wait_terminal(service.submit(prompt=fits, steps=1)["id"])["warnings"] == []


def test_seed_is_chosen_and_recorded(service: Service) -> None:
    view = service.wait_terminal(service.submit(steps=1)["id"])
    assert isinstance(view["request"]["seed"], int)
    assert view["images"][0]["seed"] == view["request"]["seed"]


@pytest.mark.parametrize("scheduler", ["ddim", "euler", "euler_a", "dpmpp_2m", "lcm", "pndm"])
def test_every_documented_scheduler_runs(service: Service, scheduler: str) -> None:
    view = service.wait_terminal(service.submit(steps=4, scheduler=scheduler)["id"])
    assert view["status"] == "succeeded", view["error"]
    assert view["request"]["scheduler"] == scheduler


def test_cancel_queued_and_running(service: Service) -> None:
    # A long job occupies the worker so the next one stays queued.
    running = service.submit(steps=150, width=256, height=256)
    queued = service.submit(steps=2)
    wait_until(lambda: service.status(running["id"])["progress"]["step"] > 0, 60, what="first job running")
    assert service.status(queued["id"])["status"] == "queued"
    assert service.status(queued["id"])["queue_position"] == 0
    # Images of a job still queued or running: not yet (409), rather than never (404).
    for job in (queued, running):
        early = service.http.get(f"/v1/generations/{job['id']}/images/0")
        assert early.status_code == 409 and early.json()["error"]["code"] == "not_ready", early.text

    response = service.http.post(f"/v1/generations/{queued['id']}/cancel")
    assert response.status_code == 200
    assert response.json()["status"] == "canceled"

    response = service.http.post(f"/v1/generations/{running['id']}/cancel")
    assert response.status_code == 202
    assert response.json()["cancel_requested"] is True
    view = service.wait_terminal(running["id"], timeout=30)
    assert view["status"] == "canceled"
    assert view["progress"]["step"] < 150
    assert view["images"] == []

    # The canceled queued job never ran, and the worker serves the next job.
    never_ran = service.status(queued["id"])
    assert never_ran["status"] == "canceled" and never_ran["timings"]["started_at"] is None
    gone = service.http.get(f"/v1/generations/{queued['id']}/images/0")
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "not_found"
    after = service.wait_terminal(service.submit(steps=2)["id"])
    assert after["status"] == "succeeded"
    assert service.status(queued["id"])["status"] == "canceled"

    again = service.http.post(f"/v1/generations/{queued['id']}/cancel")
    assert again.status_code == 409 and again.json()["error"]["code"] == "not_cancelable"
    done = service.http.post(f"/v1/generations/{after['id']}/cancel")
    assert done.status_code == 409 and done.json()["error"]["code"] == "not_cancelable"
    assert service.status(after["id"])["status"] == "succeeded"


def test_failing_job_gets_its_code_and_the_worker_carries_on(service: Service) -> None:
    # The LCM scheduler refuses more steps than the model's original schedule (50): a real
    # failure inside the pipeline, not a test hook.
    failed = service.wait_terminal(service.submit(scheduler="lcm", steps=80)["id"])
    assert failed["status"] == "failed"
    assert failed["error"]["code"] == "invalid_parameters"
    assert failed["error"]["message"] == "steps: the lcm scheduler takes at most 50 steps with this model"
    assert failed["images"] == []
    image = service.http.get(f"/v1/generations/{failed['id']}/images/0")
    assert image.status_code == 404

    ok = service.wait_terminal(service.submit(steps=2)["id"])
    assert ok["status"] == "succeeded"


def test_jobs_a_worker_ran_are_listed_newest_first_as_their_status_reads_show_them(
    service: Service,
) -> None:
    failed = service.wait_terminal(service.submit(scheduler="lcm", steps=80)["id"])
    ok = service.wait_terminal(service.submit(steps=2)["id"])
    listed = service.http.get("/v1/generations?limit=2").json()
    assert listed["data"] == [ok, failed] and listed["has_more"] == (listed["next"] is not None)
    for status, view in (("succeeded", ok), ("failed", failed)):
        [item] = service.http.get(f"/v1/generations?limit=1&status={status}").json()["data"]
        assert item == view


def test_openai_endpoint_b64_and_url(service: Service) -> None:
    response = service.http.post(
        "/v1/images/generations",
        json={"prompt": "a yellow triangle", "n": 2, "size": "64x80", "response_format": "b64_json"},
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert isinstance(body["created"], int) and len(body["data"]) == 2
    img = Image.open(io.BytesIO(base64.b64decode(body["data"][0]["b64_json"])))
    assert img.size == (64, 80)
    # The job, which OpenAI's shape has no place for: a client whose wait ended could not find it.
    job = service.status(response.headers["x-generation-id"])
    assert job["status"] == "succeeded" and job["request"]["prompt"] == "a yellow triangle"

    response = service.http.post(
        "/v1/images/generations", json={"prompt": "a yellow triangle", "model": TINY_MODEL}
    )
    assert response.status_code == 200, response.text
    [item] = response.json()["data"]
    assert item["url"].startswith(service.url)
    fetched = HTTP.get(item["url"])
    assert fetched.status_code == 200 and fetched.headers["content-type"] == "image/png"

    # What newer OpenAI clients send: a size of "auto", n of null, an output format.
    response = service.http.post(
        "/v1/images/generations",
        json={"prompt": "a yellow triangle", "size": "auto", "n": None, "output_format": "webp"},
    )
    assert response.status_code == 200, response.text
    [item] = response.json()["data"]
    fetched = HTTP.get(item["url"])
    assert fetched.headers["content-type"] == "image/webp"
    assert Image.open(io.BytesIO(fetched.content)).size == (64, 64)  # LATENTD_DEFAULT_SIZE


def test_images_a_models_safety_checker_withholds(
    service: Service,
    redis_server: RedisServer,
    tiny_model_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # A model directory that ships a safety checker, as Stable Diffusion 1.5's does; this one
    # flags every image.
    from diffusers import StableDiffusionPipeline

    checker, feature_extractor = flag_everything_checker()
    tiny = StableDiffusionPipeline.from_pretrained(tiny_model_dir)
    StableDiffusionPipeline(
        **{**tiny.components, "safety_checker": checker, "feature_extractor": feature_extractor},
        requires_safety_checker=True,
    ).save_pretrained(tmp_path / "checked")
    worker = start_worker(
        redis_server.url, tmp_path / "checked", tmp_path, "checked", LATENTD_MODEL_NAME="checked"
    )
    try:
        view = service.wait_terminal(service.submit(model="checked", steps=2, num_images=2)["id"])
        assert view["status"] == "succeeded"
        assert [i["withheld"] for i in view["images"]] == [True, True]
        black = Image.open(io.BytesIO(download(service, view["images"][0]["url"]).content))
        assert np.asarray(black).max() == 0

        # OpenAI's route answers as OpenAI does, not with black pictures; the job is not sent again.
        response = service.http.post(
            "/v1/images/generations", json={"prompt": "x", "model": "checked", "size": "64x64"}
        )
        assert response.status_code == 400, response.text
        assert response.json()["error"]["code"] == "content_policy_violation"
        assert response.json()["error"]["param"] == "prompt"
        assert response.headers["x-should-retry"] == "false"
        assert "images_withheld" in worker.output()

        # The bundled client says so, beside the file it saved.
        capsys.readouterr()
        [saved] = generate(service.url, {"prompt": "x", "model": "checked", "steps": 2}, tmp_path / "out")
        assert f"{saved}: withheld by the model's safety checker" in capsys.readouterr().err
        assert [p.name for p in (tmp_path / "out").iterdir()] == [saved.name]  # no partial file left
    finally:
        worker.stop()


def test_the_worker_log_holds_no_prompt(service: Service) -> None:
    # Past the tokenizer's length, diffusers' truncation notice quoted the prompt's tail.
    prompt = "a red circle " * 40 + "with a private detail"
    assert service.wait_terminal(service.submit(prompt=prompt, steps=1)["id"])["status"] == "succeeded"
    assert "private detail" not in service.worker.output()
    # Nor advice to install torchvision, which transformers gave at each start (its PIL image
    # processors are what the worker uses).
    assert "torchvision" not in service.worker.output()


def test_a_workers_start_is_logged_in_its_own_lines_only(service: Service) -> None:
    # Loading wrote diffusers' and transformers' progress bars, and diffusers' advice to install
    # accelerate (a warning of seven lines), at each start.
    lines = service.worker.output().splitlines()
    start = lines[: next(n for n, each in enumerate(lines) if "worker_ready" in each)]
    line = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (INFO|WARNING) latentd\.worker [a-z_]+( |$)")
    assert start and all(line.match(each) for each in start), "\n".join(start)


def test_images_expire_with_the_results_ttl(service: Service) -> None:
    view = service.wait_terminal(service.submit(steps=1)["id"])
    key = f"latentd:image:{view['id']}:0"
    assert 0 < service.redis.ttl(key) <= 3600  # LATENTD_RESULTS_TTL's default
    # The view says when: never later than the bytes actually lapse, and not much earlier.
    stated = datetime.fromisoformat(view["images"][0]["expires_at"]).timestamp()
    lapses = time.time() + service.redis.pttl(key) / 1000
    assert lapses - 5 < stated <= lapses + 0.01
    assert service.redis.ttl(f"rq:job:{view['id']}") > 3600  # the record outlives the images
    # A worker's LATENTD_RESULTS_TTL decides, not the API's: a cache is told when the bytes lapse.
    state = Keys.state(view["id"])
    images = json.loads(service.redis.hget(state, StateField.IMAGES) or b"")
    images[0]["expires_at"] = time.time() + 100
    service.redis.hset(state, StateField.IMAGES, json.dumps(images))
    cache = service.http.get(view["images"][0]["url"]).headers["cache-control"]
    assert cache in ("private, max-age=99, immutable", "private, max-age=98, immutable"), cache
    service.redis.delete(key)  # what the TTL does when it runs out
    gone = service.http.get(view["images"][0]["url"])
    assert gone.status_code == 404
    assert gone.json()["error"]["code"] == "expired"
    assert "3600" not in gone.json()["error"]["message"]  # the API's TTL, not the worker's
    assert service.status(view["id"])["status"] == "succeeded"


def test_models_lists_live_workers(service: Service) -> None:
    models = service.http.get("/v1/models").json()
    assert models["object"] == "list"
    [tiny] = [m for m in models["data"] if m["id"] == TINY_MODEL]
    assert tiny["workers"] == 1 and tiny["devices"] == ["cpu"] and tiny["queue_depth"] >= 0
    assert tiny["native_size"] == 64  # what its worker reports: the size a request gets by default
    # OpenAI's model object's fields, which strictly typed clients require: they were missing.
    assert tiny["owned_by"] == "latentd" and time.time() - 3600 < tiny["created"] <= time.time()


def test_health_ready_and_metrics(service: Service) -> None:
    assert service.http.get("/healthz").json() == {"status": "ok"}
    assert service.http.get("/readyz").status_code == 200
    service.wait_terminal(service.submit(steps=1)["id"])
    text = service.http.get("/metrics").text
    assert f'latentd_queue_depth{{model="{TINY_MODEL}"}}' in text
    assert f'latentd_jobs_total{{code="",model="{TINY_MODEL}",status="succeeded"}}' in text
    assert f'latentd_job_duration_seconds_count{{model="{TINY_MODEL}"}}' in text
    assert f'latentd_batch_images_bucket{{le="1.0",model="{TINY_MODEL}"}}' in text
    assert f'latentd_out_of_memory_splits_total{{model="{TINY_MODEL}"}} 0.0' in text
    assert 'latentd_http_requests_total{method="POST",route="/v1/generations",status="202"}' in text
    assert "latentd_redis_up 1.0" in text


def test_status_reads_answer_alike_on_both_paths(service: Service) -> None:
    """A plain status read is answered by `StatusReads` before FastAPI's routing; one with a query
    string goes through the documented route. Both must give the same answer, byte for byte."""
    job_id = service.submit(steps=1)["id"]
    service.wait_terminal(job_id)

    def both(path: str) -> tuple[httpx.Response, httpx.Response]:
        return service.http.get(path), service.http.get(path, params={"wait": 0})

    for path in (f"/v1/generations/{job_id}", "/v1/generations/nosuchjob"):
        fast, routed = both(path)
        assert fast.status_code == routed.status_code
        assert fast.content == routed.content
        assert fast.headers["content-type"] == routed.headers["content-type"] == "application/json"
    assert fast.status_code == 404 and fast.json()["error"]["code"] == "not_found"

    def reads(status: int) -> float:
        labels = f'method="GET",route="/v1/generations/{{id}}",status="{status}"'
        series = f"latentd_http_requests_total{{{labels}}}"
        line = [ln for ln in service.http.get("/metrics").text.splitlines() if ln.startswith(series)]
        return float(line[0].split()[-1]) if line else 0.0

    before = reads(200), reads(404)
    both(f"/v1/generations/{job_id}")
    both("/v1/generations/nosuchjob")
    assert (reads(200), reads(404)) == (before[0] + 2, before[1] + 2)  # both paths counted, by route


def test_idempotency_key_returns_the_same_job(service: Service) -> None:
    body = {"prompt": "a retried submit", "steps": 1}
    headers = {"Idempotency-Key": "order-42-attempt"}
    first = service.http.post("/v1/generations", json=body, headers=headers)
    second = service.http.post("/v1/generations", json=body, headers=headers)
    assert first.status_code == second.status_code == 202
    assert first.json()["id"] == second.json()["id"]
    other = service.http.post("/v1/generations", json={**body, "steps": 2}, headers=headers)
    assert other.status_code == 409
    assert other.json()["error"]["code"] == "idempotency_conflict"
    assert service.wait_terminal(first.json()["id"])["status"] == "succeeded"
    fresh = service.http.post("/v1/generations", json=body, headers={"Idempotency-Key": "another"})
    assert fresh.json()["id"] != first.json()["id"]


def test_concurrent_replays_of_an_idempotency_key_all_get_the_one_job(service: Service) -> None:
    # Replays that arrive while the first request is still being enqueued wait for its job,
    # rather than answering 404 for it.
    body = {"prompt": "a double-clicked submit", "steps": 1}
    headers = {"Idempotency-Key": "double-click"}
    start = threading.Barrier(8)
    answers: list[httpx.Response] = []

    def submit() -> None:
        with httpx.Client(base_url=str(service.http.base_url), timeout=30) as client:
            start.wait()
            answers.append(client.post("/v1/generations", json=body, headers=headers))

    threads = [threading.Thread(target=submit) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [a.status_code for a in answers] == [202] * 8, [a.text for a in answers]
    assert len({a.json()["id"] for a in answers}) == 1


def test_oversized_bodies_are_refused_over_real_http(service: Service) -> None:
    def chunked() -> Iterator[bytes]:
        yield b'{"prompt": "'
        for _ in range(200):
            yield b"y" * 1000
        yield b'"}'

    headers = {"content-type": "application/json"}
    sized = service.http.post(
        "/v1/generations", content=b'{"prompt":"' + b"x" * 100_000 + b'"}', headers=headers
    )
    streamed = service.http.post("/v1/generations", content=chunked(), headers=headers)
    for response in (sized, streamed):
        assert response.status_code == 413
        assert response.json()["error"]["code"] == "payload_too_large"
    assert streamed.request.headers.get("transfer-encoding") == "chunked"  # no Content-Length sent
    assert service.http.get("/healthz").status_code == 200


def test_long_poll_answers_when_the_job_ends(service: Service) -> None:
    running = service.submit(steps=150, width=256, height=256)  # seconds of work
    queued = service.submit(steps=2)
    wait_until(lambda: service.status(running["id"])["progress"]["step"] > 0, 60, what="first job running")

    # A wait that passes before the job ends answers with the state it has then.
    started = time.monotonic()
    held = service.http.get(f"/v1/generations/{queued['id']}", params={"wait": 0.3})
    assert held.status_code == 200 and held.json()["status"] == "queued"
    assert time.monotonic() - started >= 0.3

    # One request, held open while the job runs, answers with its end.
    canceler = threading.Timer(0.5, lambda: service.http.post(f"/v1/generations/{running['id']}/cancel"))
    canceler.start()
    try:
        ended = service.http.get(f"/v1/generations/{running['id']}", params={"wait": 30}, timeout=60)
    finally:
        canceler.join()
    assert ended.status_code == 200 and ended.json()["status"] == "canceled"
    done = service.http.get(f"/v1/generations/{queued['id']}", params={"wait": 30}, timeout=60)
    assert done.json()["status"] == "succeeded" and done.json()["images"]


@pytest.mark.parametrize("wait", ["-1", "61", "soon"])
def test_long_poll_bounds(service: Service, wait: str) -> None:
    job = service.submit(steps=1)
    response = service.http.get(f"/v1/generations/{job['id']}", params={"wait": wait})
    assert response.status_code == 422
    assert response.json()["error"]["param"] == "wait"
