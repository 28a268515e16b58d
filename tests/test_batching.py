"""Micro-batching: a worker runs compatible queued jobs as one pipeline call, each job keeping
its own seeds, progress, cancellation and RQ bookkeeping."""

from __future__ import annotations

import io
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from rq import Queue
from rq.serializers import JSONSerializer

from tests.conftest import HTTP, LONG_JOB, Cluster, Proc, cluster_with_worker, wait_until

pytestmark = pytest.mark.integration


@pytest.fixture
def batching(tmp_path: Path, tiny_model_dir: Path) -> Iterator[tuple[Cluster, Proc]]:
    yield from cluster_with_worker(
        tmp_path, tiny_model_dir, "batcher", LATENTD_MAX_BATCH_IMAGES="8", LATENTD_BATCH_WAIT_MS="50"
    )


def pixels(cluster: Cluster, view: dict[str, Any], index: int = 0) -> np.ndarray:
    data = HTTP.get(cluster.url + view["images"][index]["url"]).content
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(int)


def state(cluster: Cluster, job_id: str, field: str) -> str:
    raw = cluster.redis.client().hget(f"latentd:job:{job_id}", field)
    return raw.decode() if raw else ""


def test_compatible_jobs_share_a_call_and_others_keep_their_place(batching: tuple[Cluster, Proc]) -> None:
    cluster, _ = batching
    blocker = cluster.submit(LONG_JOB)
    cluster.running_on(blocker)
    bodies = {
        "b1": {"prompt": "a red circle", "seed": 1, "steps": 4},
        "x": {"prompt": "another size", "seed": 9, "steps": 4, "width": 72},
        "b2": {"prompt": "a blue square", "seed": 2, "steps": 4, "negative_prompt": "blurry"},
        "b3": {"prompt": "a green triangle", "seed": 3, "steps": 4, "num_images": 2},
    }
    ids = {name: cluster.submit(body) for name, body in bodies.items()}
    views = {name: cluster.wait_terminal(job_id) for name, job_id in ids.items()}
    assert all(v["status"] == "succeeded" for v in views.values()), views
    assert [state(cluster, ids[n], "batch_jobs") for n in ("b1", "b2", "b3", "x")] == ["3", "3", "3", "1"]
    # The incompatible job waited for the batch that overtook it, then ran next.
    assert views["x"]["timings"]["started_at"] >= views["b3"]["timings"]["started_at"]
    # The jobs claimed into b1's call started with it: RQ, settling each after the call, said then.
    started = {n: datetime.fromisoformat(views[n]["timings"]["started_at"]) for n in ("b1", "b2", "b3")}
    assert max(started.values()) - min(started.values()) < timedelta(seconds=0.5), started
    # RQ is still the system of record: each job finished, none is left started.
    queue = Queue("latentd:tiny", connection=cluster.redis.client(), serializer=JSONSerializer)
    assert set(ids.values()) <= set(queue.finished_job_registry.get_job_ids())
    assert queue.started_job_registry.get_job_ids() == []

    # Each image is the one its seed gives when its job runs alone (up to the rounding a
    # different batch size may change on the CPU).
    for name in ("b1", "b2", "b3"):
        alone = cluster.wait_terminal(cluster.submit(bodies[name]))
        assert state(cluster, alone["id"], "batch_jobs") == "1"
        for i in range(len(alone["images"])):
            assert np.abs(pixels(cluster, views[name], i) - pixels(cluster, alone, i)).max() <= 2

    # Operators see how full the calls were: 6 calls (blocker, batch, x, three alone), 10 images.
    text = HTTP.get(f"{cluster.url}/metrics").text
    assert 'latentd_batch_images_count{model="tiny"} 6.0' in text
    assert 'latentd_batch_images_sum{model="tiny"} 10.0' in text
    assert 'latentd_batch_images_bucket{le="2.0",model="tiny"} 5.0' in text  # all but the batch of 4


def test_canceling_one_job_of_a_batch_spares_the_others(batching: tuple[Cluster, Proc]) -> None:
    cluster, _ = batching
    blocker = cluster.submit(LONG_JOB)
    cluster.running_on(blocker)
    body = {"prompt": "a batch", "steps": 40, "width": 96, "height": 96}
    keep, drop = cluster.submit({**body, "seed": 1}), cluster.submit({**body, "seed": 2})
    cluster.running_on(keep)
    assert cluster.status(drop)["status"] == "running"  # batched with `keep`
    assert HTTP.post(f"{cluster.url}/v1/generations/{drop}/cancel").status_code == 202
    # Canceled at the worker's next look, while `keep` runs on (it read `running` until the call ended).
    dropped = HTTP.get(f"{cluster.url}/v1/generations/{drop}", params={"wait": 30}, timeout=40).json()
    assert dropped["status"] == "canceled" and dropped["timings"]["finished_at"], dropped
    assert cluster.status(keep)["status"] == "running"
    assert HTTP.post(f"{cluster.url}/v1/generations/{drop}/cancel").status_code == 409
    kept = cluster.wait_terminal(keep)
    assert kept["status"] == "succeeded" and len(kept["images"]) == 1
    assert state(cluster, keep, "batch_jobs") == "2"
    assert cluster.status(drop)["timings"] == dropped["timings"]  # RQ's record, now written, moves nothing


# The worker takes its time to claim company for a job that asks for it (the window between taking
# a job and starting it), and Redis is gone as the first cancel is counted.
SLOW_CLAIM = """
import time

import redis

import worker.jobs as jobs
import worker.main as main

_claim = main.LatentdWorker._claim_batch


def _claim_batch(self, first, queue):
    if "slow-claim" in str(first.args):
        time.sleep(3)
    return _claim(self, first, queue)


main.LatentdWorker._claim_batch = _claim_batch
_record = jobs._record_outcome
failed = []


def _record_outcome(r, model, status, *args, **kwargs):
    if status is jobs.JobStatus.CANCELED and not failed:
        failed.append(True)
        raise redis.ConnectionError("injected")
    return _record(r, model, status, *args, **kwargs)


jobs._record_outcome = _record_outcome
"""


def test_a_job_canceled_between_its_taking_and_its_start_reads_canceled_at_its_start(
    cluster: Cluster,
) -> None:
    # It read `running` (cancel requested) until the call of the jobs claimed with it ended; and
    # Redis gone as its cancel was counted failed it (generation_failed).
    worker = cluster.worker("w", SLOW_CLAIM, LATENTD_MAX_BATCH_IMAGES="4", LATENTD_BATCH_WAIT_MS="50")
    try:
        blocker = cluster.submit(LONG_JOB)
        cluster.running_on(blocker)
        body = {"prompt": "slow-claim", "steps": 40, "width": 96, "height": 96}
        drop, keep = cluster.submit({**body, "seed": 1}), cluster.submit({**body, "seed": 2})
        r = cluster.redis.client()
        wait_until(lambda: r.lrange("rq:queue:latentd:tiny:intermediate", 0, -1) == [drop.encode()], 30)
        assert HTTP.post(f"{cluster.url}/v1/generations/{drop}/cancel").status_code == 202  # taken
        dropped = HTTP.get(f"{cluster.url}/v1/generations/{drop}", params={"wait": 30}, timeout=40).json()
        assert dropped["status"] == "canceled", dropped
        assert cluster.status(keep)["status"] == "running"  # claimed with it, in its call
        assert cluster.wait_terminal(keep)["status"] == "succeeded"
        assert cluster.wait_terminal(drop)["status"] == "canceled"
        assert r.hget(f"rq:job:{drop}", "status") == b"stopped"
    finally:
        worker.stop()


@pytest.fixture
def long_wait(tmp_path: Path, tiny_model_dir: Path) -> Iterator[tuple[Cluster, Proc]]:
    # A wait longer than the jobs themselves: a worker that held a job for it would show it.
    yield from cluster_with_worker(tmp_path, tiny_model_dir, "w", LATENTD_BATCH_WAIT_MS="1000")


def test_a_lone_client_never_waits_for_company(long_wait: tuple[Cluster, Proc]) -> None:
    cluster, _ = long_wait
    for seed in range(3):  # one after another, as a lone client sends them
        view = cluster.wait_terminal(cluster.submit({"prompt": "alone", "steps": 2, "seed": seed}))
        assert view["status"] == "succeeded"
        t = view["timings"]
        queued = datetime.fromisoformat(t["started_at"]) - datetime.fromisoformat(t["created_at"])
        assert queued.total_seconds() < 1.0, f"job {seed} was held for company: {t}"


@pytest.fixture
def invariant(tmp_path: Path, tiny_model_dir: Path) -> Iterator[tuple[Cluster, Proc]]:
    yield from cluster_with_worker(
        tmp_path,
        tiny_model_dir,
        "invariant",
        LATENTD_BATCH_INVARIANT="true",
        LATENTD_MAX_BATCH_IMAGES="4",
        LATENTD_BATCH_WAIT_MS="50",
    )


def test_with_batch_invariance_a_batched_image_is_the_same_file_as_a_lone_one(
    invariant: tuple[Cluster, Proc],
) -> None:
    cluster, _ = invariant
    blocker = cluster.submit(LONG_JOB)
    cluster.running_on(blocker)
    bodies = [  # mixed seeds, prompts, negative prompts and image counts: 4 images in all
        {"prompt": "a red circle", "seed": 1, "steps": 4},
        {"prompt": "a blue square", "seed": 20, "steps": 4, "negative_prompt": "blurry"},
        {"prompt": "a green triangle", "seed": 300, "steps": 4, "num_images": 2},
    ]
    batched = [cluster.wait_terminal(job_id) for job_id in [cluster.submit(body) for body in bodies]]
    assert [state(cluster, v["id"], "batch_jobs") for v in batched] == ["3", "3", "3"], batched
    for body, together in zip(bodies, batched, strict=True):
        alone = cluster.wait_terminal(cluster.submit(body))
        assert state(cluster, alone["id"], "batch_jobs") == "1"
        for a, b in zip(together["images"], alone["images"], strict=True):
            assert HTTP.get(cluster.url + a["url"]).content == HTTP.get(cluster.url + b["url"]).content


def test_a_jobs_start_reads_the_same_while_it_runs_and_once_it_ended(batching: tuple[Cluster, Proc]) -> None:
    # RQ's perform_job said the job started again as it ran it, and saved that with its end: the
    # `started_at` a client read while it ran changed, by a millisecond, once it ended (helper-63).
    cluster, _ = batching
    first = cluster.submit(LONG_JOB)
    cluster.running_on(first)
    later = [cluster.submit({**LONG_JOB, "seed": seed}) for seed in (4, 5)]  # one call: one claimed into it
    seen: dict[str, str] = {}

    def each_seen_running() -> bool:
        for job_id in {first, *later} - seen.keys():
            view = cluster.status(job_id)
            assert view["status"] in ("queued", "running"), view  # seen running before it ends
            if view["status"] == "running":
                seen[job_id] = view["timings"]["started_at"]
        return len(seen) == 3

    wait_until(each_seen_running, 120, interval=0.01, what="each job running")
    for job_id, started in seen.items():
        assert cluster.wait_terminal(job_id)["timings"]["started_at"] == started, job_id
