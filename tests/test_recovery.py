"""Crashes lose nothing: a killed or frozen worker's job is re-queued under its lease and
completed exactly once; a stopped worker finishes its job first."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from latentd.contract import Keys, WorkerInfo
from latentd.embedded import free_port
from tests.conftest import (
    TINY_MODEL,
    Proc,
    RedisServer,
    base_env,
    register_ghost,
    sitecustomize,
    spawn,
    start_api,
    start_worker,
    wait_until,
)

pytestmark = pytest.mark.integration

LEASE = "3"
LONG_JOB = {"prompt": "a long job", "steps": 40, "width": 96, "height": 96, "seed": 3}


@dataclass
class Cluster:
    redis: RedisServer
    url: str
    model_dir: Path
    tmp: Path

    def worker(self, name: str, injected: str | None = None, **env: str) -> Proc:
        """A worker with a short lease; `injected`: code it runs as it starts (`sitecustomize`)."""
        if injected is not None:
            env["PYTHONPATH"] = str(sitecustomize(self.tmp, injected))
        return start_worker(
            self.redis.url, self.model_dir, self.tmp, name=name, **{"LATENTD_LEASE_SECONDS": LEASE, **env}
        )

    def wait_idle(self, name: str) -> None:
        """Until RQ's loop says worker `name` is idle: its signal handlers are in place then."""
        r = self.redis.client()
        wait_until(lambda: r.hget(f"rq:worker:{name}", "state") == b"idle", 30, what="RQ's loop")

    def submit(self, body: dict[str, Any]) -> str:
        response = httpx.post(f"{self.url}/v1/generations", json=body)
        assert response.status_code == 202, response.text
        job_id: str = response.json()["id"]
        return job_id

    def status(self, job_id: str) -> dict[str, Any]:
        view: dict[str, Any] = httpx.get(f"{self.url}/v1/generations/{job_id}").json()
        return view

    def wait_terminal(self, job_id: str, timeout: float = 90) -> dict[str, Any]:
        view: dict[str, Any] = wait_until(
            lambda: (v := self.status(job_id))["status"] in ("succeeded", "failed", "canceled") and v,
            timeout,
            interval=0.1,
            what=f"job {job_id} to end",
        )
        return view

    def ends_on_another_worker(self, job_id: str) -> dict[str, Any]:
        """The job's final view, once a fresh worker ("b") has found its lapsed lease."""
        second = self.worker("b")
        try:
            return self.wait_terminal(job_id)
        finally:
            second.stop()

    def running_on(self, job_id: str) -> str:
        def owner() -> str | None:
            view = self.status(job_id)
            if view["status"] == "running" and view["progress"]["step"] > 0:
                worker = self.redis.client().hget(f"latentd:job:{job_id}", "worker")
                return worker.decode() if worker else None
            return None

        name: str = wait_until(owner, 60, what="job running")
        return name


def make_cluster(tmp_path: Path, model_dir: Path, **api_env: str) -> Iterator[Cluster]:
    server = RedisServer(tmp_path / "redis")
    server.start()
    api, url = start_api(server.url, tmp_path, **api_env)
    try:
        yield Cluster(server, url, model_dir, tmp_path)
    finally:
        api.stop()
        server.stop()


def cluster_with_worker(
    tmp_path: Path, model_dir: Path, name: str, **worker_env: str
) -> Iterator[tuple[Cluster, Proc]]:
    """A cluster plus one worker started with these settings, for fixtures."""
    for cluster in make_cluster(tmp_path, model_dir):
        worker = start_worker(cluster.redis.url, model_dir, tmp_path, name=name, **worker_env)
        try:
            yield cluster, worker
        finally:
            worker.stop()


@pytest.fixture
def cluster(tmp_path: Path, tiny_model_dir: Path) -> Iterator[Cluster]:
    yield from make_cluster(tmp_path, tiny_model_dir)


@pytest.fixture
def one_attempt_cluster(tmp_path: Path, tiny_model_dir: Path) -> Iterator[Cluster]:
    yield from make_cluster(tmp_path, tiny_model_dir, LATENTD_MAX_ATTEMPTS="1")


def test_killed_worker_job_is_requeued_and_completed(cluster: Cluster) -> None:
    first = cluster.worker("a")
    job_id = cluster.submit(LONG_JOB)
    assert cluster.running_on(job_id) == "a"
    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait()
    assert cluster.status(job_id)["status"] == "running"  # until its lease runs out

    view = cluster.ends_on_another_worker(job_id)
    assert view["status"] == "succeeded"
    assert view["attempts"] == 2
    assert httpx.get(f"{cluster.url}{view['images'][0]['url']}").status_code == 200
    assert cluster.redis.client().hget(f"latentd:job:{job_id}", "completions") == b"1"


def test_a_job_whose_models_last_worker_died_is_requeued_by_another_models_worker(cluster: Cluster) -> None:
    other = start_worker(
        cluster.redis.url, cluster.model_dir, cluster.tmp, name="other",
        LATENTD_LEASE_SECONDS=LEASE, LATENTD_MODEL_NAME="other-model",
    )  # fmt: skip
    first = cluster.worker("a")
    try:
        job_id = cluster.submit(LONG_JOB)
        assert cluster.running_on(job_id) == "a"
        first.proc.send_signal(signal.SIGKILL)
        first.proc.wait()
        # No worker serves its model now; the other model's worker finds the lapsed lease.
        view = wait_until(
            lambda: (v := cluster.status(job_id))["status"] == "queued" and v, 30, what="the job re-queued"
        )
        assert view["queue_position"] == 0 and view["attempts"] == 1
        second = cluster.worker("b")  # the model is served again: the job runs
        try:
            assert cluster.wait_terminal(job_id)["status"] == "succeeded"
        finally:
            second.stop()
    finally:
        other.stop()


def test_a_killed_worker_restarted_under_its_name_serves_and_a_live_name_is_refused(cluster: Cluster) -> None:
    # RQ keeps a killed worker's record for minutes and refused a new worker of the same name
    # (a restarted container has it: the same host name, pid 1) with a traceback, for 8 minutes.
    first = cluster.worker("same")
    cluster.wait_idle("same")  # RQ's record is written once its loop starts, after the ready file
    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait()
    again = cluster.worker("same")
    try:
        assert cluster.wait_terminal(cluster.submit({"prompt": "x", "steps": 1}))["status"] == "succeeded"
        assert "stale_worker_record_cleared" in again.output()
        twin = spawn(
            ["worker"],
            base_env(
                cluster.redis.url, LATENTD_MODEL=str(cluster.model_dir), LATENTD_MODEL_NAME=TINY_MODEL,
                LATENTD_WORKER_NAME="same", LATENTD_HEARTBEAT_INTERVAL="0.5", LATENTD_TORCH_THREADS="1",
            ),
            cluster.tmp / "twin.log",
        )  # fmt: skip
        assert twin.proc.wait(120) == 5
        assert "a live worker is named 'same'" in twin.output() and "Traceback" not in twin.output()
        assert again.proc.poll() is None  # the live one serves on, still registered
        assert cluster.redis.client().exists("latentd:worker:same")
    finally:
        again.stop()


# The worker dies after RQ took the job off its queue (or a batch claimed it), before it starts it.
DIE_AFTER_TAKING = """
import os

from rq.worker.base import BaseWorker

_prepare_execution = BaseWorker.prepare_execution


def prepare_execution(self, job):
    if "die-here" in str(job.args):
        os._exit(9)
    return _prepare_execution(self, job)


BaseWorker.prepare_execution = prepare_execution
"""


def wait_for_rqs_maintenance_then_age(worker: Proc, r: redis.Redis, *job_ids: str) -> None:
    """RQ's maintenance runs as a worker starts, then every 10 minutes: past that first run, what
    finds a job left on the intermediate list is the worker's heartbeat. As if the jobs had sat
    there for two minutes (RQ waits one before it acts)."""
    wait_until(lambda: "cleaning registries for queue" in worker.output(), 30, what="RQ's maintenance")
    for job_id in job_ids:
        r.set(f"rq:queue:latentd:tiny:intermediate:first_seen:{job_id}", time.time() - 120)


def test_a_job_taken_by_a_worker_that_died_before_starting_it_runs(cluster: Cluster) -> None:
    path = sitecustomize(cluster.tmp, DIE_AFTER_TAKING)
    doomed = start_worker(cluster.redis.url, cluster.model_dir, cluster.tmp, name="doomed", PYTHONPATH=path)
    job_id = cluster.submit({"prompt": "die-here", "steps": 2})
    assert doomed.proc.wait(60) == 9
    r = cluster.redis.client()
    assert r.lrange("rq:queue:latentd:tiny:intermediate", 0, -1) == [job_id.encode()]
    worker = cluster.worker("b")
    try:
        wait_for_rqs_maintenance_then_age(worker, r, job_id)
        view = cluster.wait_terminal(job_id, timeout=60)
    finally:
        worker.stop()
    assert view["status"] == "succeeded", view  # RQ's maintenance failed it, as generation_failed
    assert worker.output().count("job_requeued") == 1


def test_a_job_claimed_into_a_batch_by_a_worker_that_died_runs(cluster: Cluster) -> None:
    # The claim took the job off its queue and onto no list: it stayed queued, for good.
    r = cluster.redis.client()
    register_ghost(r, TINY_MODEL)  # both are queued before the worker looks
    first = cluster.submit({"prompt": "first", "steps": 1})
    mate = cluster.submit({"prompt": "die-here", "steps": 1})
    doomed = cluster.worker("doomed", DIE_AFTER_TAKING)
    assert doomed.proc.wait(60) == 9
    assert r.lrange("rq:queue:latentd:tiny:intermediate", 0, -1) == [first.encode(), mate.encode()]
    worker = cluster.worker("b")
    try:
        wait_for_rqs_maintenance_then_age(worker, r, first, mate)
        views = [cluster.wait_terminal(job_id, timeout=60) for job_id in (first, mate)]
    finally:
        worker.stop()
    assert [v["status"] for v in views] == ["succeeded", "succeeded"], views


# The worker dies the moment it has stored a job's images, before RQ marks the job finished.
DIE_AFTER_COMMIT = """
import os

import worker.jobs as jobs

_commit = jobs._commit


def commit(rt, job_id, payload, images, finished):
    committed = _commit(rt, job_id, payload, images, finished)
    if "die-after-commit" in payload.prompt:
        os._exit(9)
    return committed


jobs._commit = commit
"""


@pytest.mark.parametrize("attempts", ["cluster", "one_attempt_cluster"])
def test_a_job_whose_images_were_stored_before_its_worker_died_is_not_run_again(
    request: pytest.FixtureRequest, attempts: str
) -> None:
    # With attempts left RQ re-ran it; on its last, RQ failed it as lost, its images stored.
    cluster: Cluster = request.getfixturevalue(attempts)
    path = sitecustomize(cluster.tmp, DIE_AFTER_COMMIT)
    doomed = start_worker(
        cluster.redis.url,
        cluster.model_dir,
        cluster.tmp,
        name="doomed",
        PYTHONPATH=path,
        LATENTD_LEASE_SECONDS=LEASE,
    )
    job_id = cluster.submit({"prompt": "die-after-commit", "steps": 2})
    assert doomed.proc.wait(60) == 9
    r = cluster.redis.client()
    stored = r.get(f"latentd:image:{job_id}:0")
    assert stored and cluster.status(job_id)["status"] == "running"
    worker = cluster.worker("b")  # its reaper re-queues the job once the lease lapses
    try:
        view = cluster.wait_terminal(job_id, timeout=60)
    finally:
        worker.stop()
    # It ran twice before: a second commit wrote the images again, with a new ETag where the
    # bytes differ (another GPU, say).
    assert view["status"] == "succeeded" and view["attempts"] == 1, view  # the settle runs nothing
    assert f"job_already_succeeded job_id={job_id}" in worker.output()
    reason = "images_stored" if attempts == "one_attempt_cluster" else "worker_lost"
    assert f"job_requeued job_id={job_id} reason={reason}" in worker.output()
    assert f"job_started job_id={job_id}" not in worker.output()
    assert r.hget(f"latentd:job:{job_id}", "completions") == b"1"
    assert r.hgetall("latentd:stats:outcomes") == {b"tiny|succeeded|": b"1"}  # counted as stored
    assert httpx.get(f"{cluster.url}{view['images'][0]['url']}").content == stored


def test_a_job_given_up_on_its_last_attempt_refuses_a_late_commit(redis_client: redis.Redis) -> None:
    """Between the reaper's look for stored images and RQ's write of `failed`, the job's worker,
    frozen rather than dead, could still commit: the job ended `failed` with its images stored and
    counted as a success. The look now fences the job off, and the commit is refused. The scripts
    run against Redis as the worker and the reaper run them; the window is too narrow to hit."""
    from worker import jobs

    r = redis_client
    r.hset("rq:job:late", mapping={"status": "started", "worker_name": "frozen"})
    r.hset(Keys.state("late"), "attempts", 1)

    def commit() -> int:
        keys = ["rq:job:late", Keys.state("late"), Keys.cancel("late"), Keys.OUTCOMES, Keys.image("late", 0)]
        args = ["frozen", 60, 60, '{"images": "[]"}', "tiny|succeeded|", jobs.GIVEN_UP_SECONDS, b"png"]
        return int(r.eval(jobs._COMMIT, len(keys), *keys, *args))

    assert not jobs.grant_settle_start(r, "late")  # no images: RQ fails it as lost
    assert commit() == jobs.NOT_OURS
    assert not r.exists(Keys.image("late", 0)) and not r.exists(Keys.OUTCOMES)
    # Should RQ's write never land, the job is still its worker's to finish once the fence lapses.
    r.hset(Keys.state("late"), "given_up_at", int(time.time()) - jobs.GIVEN_UP_SECONDS - 1)
    assert commit() == jobs.COMMITTED and r.get(Keys.image("late", 0)) == b"png"
    assert not jobs.grant_settle_start(r, "gone") and not r.exists(Keys.state("gone"))  # no key made
    # Stored images earn one start more, once.
    r.hset(Keys.state("stored"), "images", "[]")
    assert jobs.grant_settle_start(r, "stored") and not jobs.grant_settle_start(r, "stored")


def test_rqs_maintenance_waits_while_the_reaper_of_its_queue_works(redis_client: redis.Redis) -> None:
    # RQ's maintenance and the heartbeat's reaper both hand a queue's expired jobs to RQ, each
    # under a lock of its own: at the same moment, the two could re-queue one job twice.
    from rq import Queue
    from rq.serializers import JSONSerializer

    from worker.main import Heartbeat, LatentdWorker

    queue = Queue(Keys.queue_name("tiny"), connection=redis_client, serializer=JSONSerializer)
    worker = LatentdWorker(
        [queue], connection=redis_client, name="w", serializer=JSONSerializer, model="tiny"
    )
    lock = Keys.reaper_lock(queue.name)
    redis_client.set(lock, "another worker's reaper", px=60_000)
    worker.clean_registries()
    assert worker.last_cleaned_at is None  # it waits for its next turn
    assert redis_client.get(lock) == b"another worker's reaper"
    redis_client.delete(lock)
    worker.clean_registries()
    assert worker.last_cleaned_at is not None and not redis_client.exists(lock)
    # The reaper lets the lock go after its pass (it held it until the next, every few seconds,
    # which would have kept RQ's maintenance out for good).
    info = WorkerInfo(name="w", model="tiny", device="cpu", pid=os.getpid(), hostname="h", started_at=0.0)
    Heartbeat(worker, info, 5.0, queue).reap()
    assert not redis_client.exists(lock)


# The worker dies once RQ has started the job (off every list but the started registry), before
# the job's run begins: as a batch's mate can, while the batch waits for more.
DIE_AFTER_STARTING = """
import os

from rq.worker.base import BaseWorker

_prepare_job_execution = BaseWorker.prepare_job_execution


def prepare_job_execution(self, job, *args, **kwargs):
    _prepare_job_execution(self, job, *args, **kwargs)
    if "die-after-starting" in str(job.args):
        os._exit(9)


BaseWorker.prepare_job_execution = prepare_job_execution
"""


def test_a_job_lost_before_its_run_began_reads_as_failed(one_attempt_cluster: Cluster) -> None:
    # Its status read answered 500 (no inference start beside the finish the failure wrote), and
    # its state, which only the run's start gives a lifetime, was kept for good.
    cluster = one_attempt_cluster
    doomed = cluster.worker("doomed", DIE_AFTER_STARTING)
    job_id = cluster.submit({"prompt": "die-after-starting", "steps": 1})
    assert doomed.proc.wait(60) == 9
    view = cluster.ends_on_another_worker(job_id)
    assert view["status"] == "failed" and view["error"]["code"] == "worker_lost", view
    assert "before it began to run it" in view["error"]["message"]
    assert view["timings"]["inference_seconds"] is None
    assert 0 < cluster.redis.client().ttl(f"latentd:job:{job_id}") <= 86_400


def test_job_whose_attempts_run_out_fails_with_worker_lost(one_attempt_cluster: Cluster) -> None:
    cluster = one_attempt_cluster
    first = cluster.worker("a")
    job_id = cluster.submit(LONG_JOB)
    cluster.running_on(job_id)
    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait()
    second = cluster.worker("b")  # its reaper finds the lapsed lease
    try:
        view = cluster.wait_terminal(job_id)
        assert view["status"] == "failed"
        assert view["error"]["code"] == "worker_lost"
        assert view["timings"]["finished_at"] is not None  # RQ's failure of an abandoned job left it unset
        # The worker that reaped it serves new jobs.
        ok = cluster.wait_terminal(cluster.submit({"prompt": "next", "steps": 1}))
        assert ok["status"] == "succeeded"
    finally:
        second.stop()


@pytest.mark.parametrize("attempts", ["one_attempt_cluster", "cluster"])
def test_a_job_canceled_before_its_worker_died_ends_canceled(
    attempts: str, request: pytest.FixtureRequest
) -> None:
    # Its cancel answered 202, and it ended `failed`, `worker_lost` (or started again, to be
    # stopped by its flag, one attempt more on its count).
    cluster: Cluster = request.getfixturevalue(attempts)
    first = cluster.worker("a")
    job_id = cluster.submit(LONG_JOB)
    cluster.running_on(job_id)
    first.proc.send_signal(signal.SIGSTOP)  # it never reads the flag
    assert httpx.post(f"{cluster.url}/v1/generations/{job_id}/cancel").status_code == 202
    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait()
    second = cluster.worker("b")  # its reaper finds the lapsed lease
    try:
        view = cluster.wait_terminal(job_id)
        assert view["status"] == "canceled" and view["attempts"] == 1 and view["error"] is None, view
        assert view["timings"]["finished_at"] is not None
        assert cluster.redis.client().hget(f"rq:job:{job_id}", "status") == b"stopped"  # as RQ records a stop
    finally:
        second.stop()


def test_a_job_whose_worker_died_runs_again_before_those_queued_behind_it(cluster: Cluster) -> None:
    # It went to the back of its queue, behind every job submitted while it ran.
    first = cluster.worker("a", LATENTD_MAX_BATCH_IMAGES="1")
    lost = cluster.submit(LONG_JOB)
    cluster.running_on(lost)
    # Each long enough that the second worker's reaper (every 0.5 s) finds the lapsed lease first.
    behind = [cluster.submit({**LONG_JOB, "steps": 10, "seed": n}) for n in range(2)]
    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait()
    second = cluster.worker("b", LATENTD_MAX_BATCH_IMAGES="1")
    try:
        views = {job_id: cluster.wait_terminal(job_id) for job_id in (lost, *behind)}
        assert all(v["status"] == "succeeded" for v in views.values()), views
        # The second worker's first wait takes the head of the queue before its reaper finds the
        # lapsed lease; the job then goes before the rest.
        started = {job_id: v["timings"]["started_at"] for job_id, v in views.items()}
        assert started[lost] < started[behind[1]], started
    finally:
        second.stop()


def test_frozen_worker_late_result_is_discarded(cluster: Cluster) -> None:
    workers = {"a": cluster.worker("a"), "b": cluster.worker("b")}
    try:
        job_id = cluster.submit(LONG_JOB)
        owner = cluster.running_on(job_id)
        frozen = workers[owner]
        frozen.proc.send_signal(signal.SIGSTOP)
        view = cluster.wait_terminal(job_id)  # the other worker re-runs it after the lease lapses
        assert view["status"] == "succeeded" and view["attempts"] == 2
        image = httpx.get(f"{cluster.url}{view['images'][0]['url']}").content

        frozen.proc.send_signal(signal.SIGCONT)
        wait_until(lambda: "job_lease_lost" in frozen.output(), 30, what="the thawed worker to give up")
        after = cluster.status(job_id)
        assert after["status"] == "succeeded" and after["attempts"] == 2
        assert cluster.redis.client().hget(f"latentd:job:{job_id}", "completions") == b"1"
        assert httpx.get(f"{cluster.url}{view['images'][0]['url']}").content == image
        # The thawed worker carries on serving.
        for _ in range(3):
            assert (
                cluster.wait_terminal(cluster.submit({"prompt": "next", "steps": 1}))["status"] == "succeeded"
            )
    finally:
        for w in workers.values():
            w.proc.send_signal(signal.SIGCONT)
            w.stop()


def test_frozen_worker_gives_up_a_whole_batch_and_leaves_its_jobs_alone(cluster: Cluster) -> None:
    # A frozen worker's batch is re-run by another worker; thawed, the first worker must not take
    # the claimed jobs back (RQ's perform_job would mark them started again, for good).
    frozen = cluster.worker("a")
    other: Proc | None = None
    try:
        blocker = cluster.submit(LONG_JOB)
        cluster.running_on(blocker)
        batch = [cluster.submit({**LONG_JOB, "seed": seed}) for seed in (11, 12)]
        wait_until(
            lambda: (
                all(cluster.status(j)["status"] == "running" for j in batch)
                and cluster.status(batch[0])["progress"]["step"] > 0
            ),
            60,
            what="the two jobs running as one batch",
        )
        frozen.proc.send_signal(signal.SIGSTOP)
        other = cluster.worker("b")
        views = [cluster.wait_terminal(j) for j in batch]
        assert [v["status"] for v in views] == ["succeeded", "succeeded"]
        assert [v["attempts"] for v in views] == [2, 2]

        frozen.proc.send_signal(signal.SIGCONT)
        wait_until(
            lambda: frozen.output().count("job_lease_lost") >= 2, 30, what="the thawed worker to give up"
        )
        time.sleep(0.5)  # what it would wrongly write, it writes as it settles each job
        for job_id in batch:
            after = cluster.status(job_id)
            assert after["status"] == "succeeded" and after["attempts"] == 2, after
            assert cluster.redis.client().hget(f"latentd:job:{job_id}", "completions") == b"1"
        assert cluster.wait_terminal(blocker)["status"] == "succeeded"
    finally:
        frozen.proc.send_signal(signal.SIGCONT)
        frozen.stop()
        if other is not None:
            other.stop()


def test_a_queued_job_that_cannot_be_read_does_not_stop_the_worker(cluster: Cluster) -> None:
    # Something other than the API put a job RQ cannot deserialize in the queue. The worker reads
    # it looking for jobs to batch with the one before it, then takes it on its own (it quit, exit
    # code 0, leaving the queue to stand).
    worker = cluster.worker("w")
    try:
        blocker = cluster.submit({**LONG_JOB, "steps": 20})
        cluster.running_on(blocker)
        before = cluster.submit({"prompt": "before", "steps": 2})
        r = cluster.redis.client()
        r.hset(
            "rq:job:garbled",
            mapping={"status": "queued", "origin": "latentd:tiny", "data": b"\x00garbled", "created_at": ""},
        )
        r.rpush("rq:queue:latentd:tiny", "garbled")
        after = cluster.submit({"prompt": "after", "steps": 2})
        for job_id in (blocker, before, after):  # the first job's batch skipped it
            assert cluster.wait_terminal(job_id)["status"] == "succeeded"
        assert worker.proc.poll() is None, worker.output()[-2000:]
        assert r.hget("rq:job:garbled", "status") == b"failed"  # it ran, alone, and failed
    finally:
        worker.stop()


def test_sigterm_finishes_the_current_job_takes_no_new_one_and_exits_0(cluster: Cluster) -> None:
    worker = cluster.worker("a")
    running = cluster.submit(LONG_JOB)
    waiting = cluster.submit({"prompt": "waits", "steps": 1})
    cluster.running_on(running)
    worker.proc.send_signal(signal.SIGTERM)
    assert worker.proc.wait(90) == 0
    assert cluster.status(running)["status"] == "succeeded"
    assert cluster.status(waiting)["status"] == "queued"


def batch_behind_a_blocker(cluster: Cluster, second_prompt: str) -> tuple[str, str, str]:
    """A job running, and two compatible ones queued behind it: when the running one ends, the
    worker takes the first and claims the second into the same pipeline call."""
    blocker = cluster.submit({**LONG_JOB, "steps": 20})
    cluster.running_on(blocker)
    first = cluster.submit({"prompt": "a red circle", "steps": 2, "seed": 1})
    claimed = cluster.submit({"prompt": second_prompt, "steps": 2, "seed": 2})
    return blocker, first, claimed


# SIGTERM sent by the worker to itself at a chosen point of a batch, by a `sitecustomize` on its
# PYTHONPATH: while it claims queued jobs into the batch, or while RQ settles a claimed job.
SIGNAL_AT = {
    "claim": """
import os, signal
from rq.job import Job

_fetch_many = Job.fetch_many.__func__


def fetch_many(cls, job_ids, connection, serializer=None):
    found = _fetch_many(cls, job_ids, connection, serializer)
    if not os.environ.get("SIGNALLED") and any(j is not None and "stop-here" in str(j.args) for j in found):
        os.environ["SIGNALLED"] = "1"
        os.kill(os.getpid(), signal.SIGTERM)
    return found


Job.fetch_many = classmethod(fetch_many)
""",
    "settle": """
import os, signal
from rq.worker.base import BaseWorker

_perform_job = BaseWorker.perform_job


def perform_job(self, job, queue, execution):
    if not os.environ.get("SIGNALLED") and "stop-here" in str(job.args):
        os.environ["SIGNALLED"] = "1"
        os.kill(os.getpid(), signal.SIGTERM)
    return _perform_job(self, job, queue, execution)


BaseWorker.perform_job = perform_job
""",
}


@pytest.mark.parametrize("point", sorted(SIGNAL_AT))
def test_sigterm_inside_a_batch_finishes_the_whole_batch(cluster: Cluster, point: str) -> None:
    path = sitecustomize(cluster.tmp, SIGNAL_AT[point])
    worker = start_worker(cluster.redis.url, cluster.model_dir, cluster.tmp, name="w", PYTHONPATH=path)
    try:
        blocker, first, claimed = batch_behind_a_blocker(cluster, "stop-here")
        later = cluster.submit({"prompt": "another size", "steps": 2, "width": 72})
        assert worker.proc.wait(90) == 0, worker.output()[-3000:]
    finally:
        worker.stop()
    for job_id in (blocker, first, claimed):
        assert cluster.status(job_id)["status"] == "succeeded", cluster.status(job_id)
    assert cluster.redis.client().hget(f"latentd:job:{claimed}", "batch_jobs") == b"2"
    assert cluster.status(later)["status"] == "queued"  # no new job after the stop request


# RQ's time limit, as it would fire while a batch's results are recorded: the first job's
# images are committed, the claimed job's are not yet.
CUT_SHORT = """
import os

from rq.timeouts import JobTimeoutException

import worker.jobs as jobs

_record_outcome = jobs._record_outcome


def record_outcome(r, model, status, code="", seconds=None):
    if status == "succeeded":
        os.environ["SUCCEEDED"] = str(int(os.environ.get("SUCCEEDED", "0")) + 1)
        if os.environ["SUCCEEDED"] == "2":  # the blocker was the first
            raise JobTimeoutException("injected by a test")
    return _record_outcome(r, model, status, code, seconds)


jobs._record_outcome = record_outcome
"""


def test_a_batch_cut_short_as_it_commits_keeps_what_it_committed(cluster: Cluster) -> None:
    path = sitecustomize(cluster.tmp, CUT_SHORT)
    worker = start_worker(cluster.redis.url, cluster.model_dir, cluster.tmp, name="w", PYTHONPATH=path)
    try:
        blocker, first, claimed = batch_behind_a_blocker(cluster, "a blue square")
        views = {job_id: cluster.wait_terminal(job_id) for job_id in (blocker, first, claimed)}
    finally:
        worker.stop()
    assert cluster.redis.client().hget(f"latentd:job:{first}", "batch_jobs") == b"2"  # one call
    # The first job's images were committed before the cut: it succeeded, once. The claimed
    # job had committed nothing: it ran again on its own, and succeeded once.
    for job_id, view in views.items():
        assert view["status"] == "succeeded", view
        assert cluster.redis.client().hget(f"latentd:job:{job_id}", "completions") == b"1"
    assert views[claimed]["attempts"] == 2


# The pipeline call fails at the step where a member of its batch is found lost (as if another
# worker had taken it over).
CALL_FAILS = """
import worker.jobs as jobs
from worker.pipeline import Runner

_generate = Runner.generate


def generate(self, payloads, on_step):
    if payloads[0].job_id == "check":  # the worker's own call before it says ready
        return _generate(self, payloads, on_step)

    def step(done, total):
        stop = on_step(done, total)  # it asks Redis at every step (LATENTD_PROGRESS_INTERVAL_MS=0)
        r = jobs.current().connection
        if any(r.hget(f"rq:job:{p.job_id}", "worker_name") == b"elsewhere" for p in payloads):
            raise RuntimeError("injected by a test")
        return stop

    return _generate(self, payloads, step)


Runner.generate = generate
"""


@pytest.mark.parametrize("cut", ["as_it_commits", "in_the_call"])
def test_a_batch_cut_short_leaves_a_member_it_lost_to_its_new_owner(cluster: Cluster, cut: str) -> None:
    # A claimed job is taken over by another worker during the steps (the test writes what that
    # worker's RQ would: the job's record names it), then the batch is cut short. The first
    # worker must leave the job alone: not run it again as its own, not write a failure into it.
    source = CUT_SHORT if cut == "as_it_commits" else CALL_FAILS
    path = sitecustomize(cluster.tmp, source)
    worker = start_worker(
        cluster.redis.url, cluster.model_dir, cluster.tmp, name="w", PYTHONPATH=path,
        LATENTD_LEASE_SECONDS=LEASE, LATENTD_PROGRESS_INTERVAL_MS="0",
    )  # fmt: skip
    try:
        blocker = cluster.submit({**LONG_JOB, "steps": 20})
        cluster.running_on(blocker)
        first, claimed = (cluster.submit({**LONG_JOB, "seed": seed}) for seed in (11, 12))
        wait_until(
            lambda: (
                cluster.status(claimed)["status"] == "running"
                and cluster.status(first)["progress"]["step"] > 0
            ),
            60,
            what="the two jobs running as one batch",
        )
        r = cluster.redis.client()
        r.hset(f"rq:job:{claimed}", "worker_name", "elsewhere")
        view = cluster.wait_terminal(first)
        assert view["status"] == ("succeeded" if cut == "as_it_commits" else "failed"), view
        # The worker settles the claimed job before it takes the next one.
        assert cluster.wait_terminal(cluster.submit({"prompt": "next", "steps": 1}))["status"] == "succeeded"
        assert r.hget(f"rq:job:{claimed}", "worker_name") == b"elsewhere"
        assert r.hget(f"rq:job:{claimed}", "status") == b"started"
        state = r.hgetall(f"latentd:job:{claimed}")
        assert state[b"attempts"] == b"1" and b"error" not in state and b"completions" not in state, state
        assert cluster.status(claimed)["status"] == "running"
        assert "job_lease_lost" in worker.output()
    finally:
        worker.stop()


def test_sigterm_the_moment_the_worker_says_ready_still_exits_0(cluster: Cluster) -> None:
    # The ready file is a FIFO: the worker blocks while opening it, so SIGTERM lands exactly as
    # it announces readiness, before RQ has installed its own handlers (that used to be exit -15).
    ready = cluster.tmp / "early.ready"
    env = base_env(
        cluster.redis.url,
        LATENTD_MODEL=str(cluster.model_dir),
        LATENTD_MODEL_NAME=TINY_MODEL,
        LATENTD_READY_FILE=str(ready),
        LATENTD_WORKER_NAME="early",
        LATENTD_CACHE_DIR=str(cluster.tmp / "cache"),
    )
    worker = spawn(["worker"], env, cluster.tmp / "early.log")
    try:
        # Made once the worker has removed a ready file it found, as it does first.
        wait_until(lambda: "worker_starting" in worker.output(), 60, what="the worker's start")
        os.mkfifo(ready)
        # Registered (the step just before the ready file), so now blocked opening the FIFO.
        wait_until(
            lambda: cluster.redis.client().exists(Keys.worker("early")) or worker.proc.poll() is not None,
            120,
            what="the worker's registration",
        )
        worker.proc.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        assert worker.proc.poll() is None, (
            f"SIGTERM killed the worker as it said ready: {worker.proc.returncode}"
        )
        assert ready.read_text() == "early"  # lets the worker's open() complete
        assert worker.proc.wait(30) == 0, worker.output()[-3000:]
    finally:
        worker.stop()
    assert not ready.exists(), "the ready file goes when the worker exits"
    assert "worker_stopped" in worker.output()


def test_sigusr1_writes_every_threads_stack_and_the_processes_go_on(cluster: Cluster) -> None:
    worker = cluster.worker("a")
    api, url = start_api(cluster.redis.url, cluster.tmp, name="api-2")
    try:
        for proc in (worker, api):
            proc.proc.send_signal(signal.SIGUSR1)
        # The worker's main thread (in RQ's dequeue), its heartbeat and RQ's pubsub thread at least.
        wait_until(
            lambda: (
                (out := worker.output()).count("(most recent call first)") >= 3
                and "rq/queue.py" in out
                and "worker/main.py" in out
            ),
            10,
            what="the worker's stack dump",
        )
        wait_until(lambda: "(most recent call first)" in api.output(), 10, what="the API's stack dump")
        job_id = httpx.post(f"{url}/v1/generations", json={"prompt": "after", "steps": 1}).json()["id"]
        assert cluster.wait_terminal(job_id)["status"] == "succeeded"
    finally:
        api.stop()
        worker.stop()


def test_redis_restart_keeps_every_accepted_job(cluster: Cluster) -> None:
    # Register a worker so submits are accepted, then stop it: jobs wait in the queue.
    worker = cluster.worker("a")
    worker.stop()
    register_ghost(cluster.redis.client(), TINY_MODEL, name="holder", ttl=30)
    accepted = [cluster.submit({"prompt": f"job {i}", "steps": 1}) for i in range(5)]
    cluster.redis.stop()  # SIGTERM: Redis flushes its AOF
    cluster.redis.start()  # same port, same directory
    assert all(cluster.status(job_id)["status"] == "queued" for job_id in accepted)
    worker = cluster.worker("b")
    try:
        assert all(cluster.wait_terminal(job_id)["status"] == "succeeded" for job_id in accepted)
    finally:
        worker.stop()


def test_workers_ride_out_a_redis_outage(cluster: Cluster) -> None:
    worker = cluster.worker("a")
    try:
        assert (
            cluster.wait_terminal(cluster.submit({"prompt": "before", "steps": 1}))["status"] == "succeeded"
        )
        cluster.redis.stop()
        outage = httpx.post(f"{cluster.url}/v1/generations", json={"prompt": "during"})
        assert outage.status_code == 503 and outage.headers["retry-after"]
        read = httpx.get(f"{cluster.url}/v1/generations/anyid")
        assert read.status_code == 503 and read.json()["error"]["code"] == "service_unavailable"
        time.sleep(3)
        cluster.redis.start()
        # Neither the API nor the worker was restarted.
        wait_until(
            lambda: httpx.get(f"{cluster.url}/v1/models").json()["data"], 30, what="worker re-registered"
        )
        after = cluster.wait_terminal(cluster.submit({"prompt": "after", "steps": 1}))
        assert after["status"] == "succeeded"
        assert worker.proc.poll() is None
    finally:
        worker.stop()


# Each denoising step of a "slow" job takes 0.05 s more: a job that runs through an outage.
SLOW_STEPS = """
import time

import worker.pipeline

_generate = worker.pipeline.Runner.generate


def generate(self, payloads, on_step):
    def slow(done, total):
        if any("slow" in p.prompt for p in payloads):
            time.sleep(0.05)
        return on_step(done, total)

    return _generate(self, payloads, slow)


worker.pipeline.Runner.generate = generate
"""


def test_a_job_runs_through_a_redis_outage_and_its_worker_serves_on(cluster: Cluster) -> None:
    # The first progress write that found Redis gone failed the job, and RQ, failing it with
    # Redis still gone, stopped the worker (exit 1): the job stayed running until another came.
    path = sitecustomize(cluster.tmp, SLOW_STEPS)
    worker = start_worker(cluster.redis.url, cluster.model_dir, cluster.tmp, name="a", PYTHONPATH=path)
    try:
        job_id = cluster.submit({"prompt": "slow", "steps": 100})
        cluster.running_on(job_id)
        cluster.redis.stop()
        time.sleep(2)
        cluster.redis.start()
        view = cluster.wait_terminal(job_id)
        assert view["status"] == "succeeded", view
        assert "redis_unreachable_in_job" in worker.output() and worker.proc.poll() is None
        after = cluster.wait_terminal(cluster.submit({"prompt": "after", "steps": 1}))
        assert after["status"] == "succeeded"
    finally:
        worker.stop()


def test_a_worker_asked_to_stop_while_its_job_waits_for_redis_leaves_the_job(cluster: Cluster) -> None:
    # It waited for Redis, stop or not: `latentd up`, whose Redis had died, waited 10 min for it.
    worker = cluster.worker("a", SLOW_STEPS)
    job_id = cluster.submit({"prompt": "slow", "steps": 100})
    cluster.running_on(job_id)
    cluster.redis.stop()
    wait_until(lambda: "redis_unreachable_in_job" in worker.output(), 30, what="the job to wait")
    worker.proc.send_signal(signal.SIGTERM)
    assert worker.proc.wait(15) == 0, worker.output()[-3000:]
    assert "left_job_redis_unreachable" in worker.output()
    cluster.redis.start()
    view = cluster.ends_on_another_worker(job_id)
    assert view["status"] == "succeeded", view


def test_a_second_stop_request_leaves_the_job_to_its_lease(cluster: Cluster) -> None:
    # Ctrl-C twice: RQ's cold stop raised SystemExit inside the job, and RQ recorded it failed.
    first = cluster.worker("a", SLOW_STEPS)
    job_id = cluster.submit({"prompt": "slow", "steps": 100})
    cluster.running_on(job_id)
    first.proc.send_signal(signal.SIGINT)
    time.sleep(1.5)  # RQ ignores a second signal within a second, as a duplicate
    first.proc.send_signal(signal.SIGINT)
    assert first.proc.wait(30) == 0, first.output()
    assert "cold_shutdown" in first.output()
    assert cluster.status(job_id)["status"] == "running"  # until its lease runs out
    view = cluster.ends_on_another_worker(job_id)
    assert view["status"] == "succeeded", view


# The reply to a job's results commit is lost (the commit ran; the connection dropped after it).
LOSE_THE_COMMIT_REPLY = """
import redis
from redis.commands.core import Script

_call = Script.__call__
lost = []


def call(self, *args, **kwargs):
    answer = _call(self, *args, **kwargs)
    text = self.script if isinstance(self.script, str) else self.script.decode()
    if "completions" in text and not lost:
        lost.append(True)
        raise redis.ConnectionError("Connection closed by server.")
    return answer


Script.__call__ = call
"""


def test_a_job_whose_commit_reply_was_lost_succeeds_counted_once(cluster: Cluster) -> None:
    # It ended failed, generation_failed, its images stored, counted both succeeded and failed.
    path = sitecustomize(cluster.tmp, LOSE_THE_COMMIT_REPLY)
    worker = start_worker(cluster.redis.url, cluster.model_dir, cluster.tmp, name="a", PYTHONPATH=path)
    try:
        view = cluster.wait_terminal(cluster.submit({"prompt": "x", "steps": 1}))
    finally:
        worker.stop()
    assert view["status"] == "succeeded", view
    r = cluster.redis.client()
    assert r.hget(f"latentd:job:{view['id']}", "completions") == b"1"
    assert {k: v for k, v in r.hgetall("latentd:stats:outcomes").items() if b"tiny" in k} == {
        b"tiny|succeeded|": b"1"
    }


# The first look for batch mates finds Redis gone.
FIRST_BATCH_LOOK_FAILS = """
import redis
from rq.job import Job

_fetch_many = Job.fetch_many.__func__
failed = []


@classmethod
def fetch_many(cls, *args, **kwargs):
    if not failed:
        failed.append(True)
        raise redis.ConnectionError("Error 111 connecting to Redis. Connection refused.")
    return _fetch_many(cls, *args, **kwargs)


Job.fetch_many = fetch_many
"""


def test_a_batch_whose_look_for_mates_fails_runs_and_its_worker_serves_on(cluster: Cluster) -> None:
    # Raised outside the job, the error stopped the worker (exit 1), its job left to its lease.
    path = sitecustomize(cluster.tmp, FIRST_BATCH_LOOK_FAILS)
    worker = start_worker(cluster.redis.url, cluster.model_dir, cluster.tmp, name="a", PYTHONPATH=path)
    try:
        views = [cluster.wait_terminal(cluster.submit({"prompt": p, "steps": 1}), 30) for p in ("x", "y")]
        assert [v["status"] for v in views] == ["succeeded", "succeeded"]
        assert "batch_claim_failed" in worker.output() and worker.proc.poll() is None
    finally:
        worker.stop()


# RQ's loop meets an error it does not handle, and quits.
RQ_QUITS = """
import time

from rq.worker.base import BaseWorker


def dequeue_job_and_maintain_ttl(self, *args, **kwargs):
    time.sleep(2)  # past the test's look at the ready worker
    raise RuntimeError("injected")


BaseWorker.dequeue_job_and_maintain_ttl = dequeue_job_and_maintain_ttl
"""


def test_a_worker_whose_rq_loop_quits_unasked_exits_1(cluster: Cluster) -> None:
    # It exited 0, as if asked to stop: a supervisor that restarts on failure left it down.
    path = sitecustomize(cluster.tmp, RQ_QUITS)
    worker = start_worker(cluster.redis.url, cluster.model_dir, cluster.tmp, name="a", PYTHONPATH=path)
    assert worker.proc.wait(30) == 1, worker.output()[-3000:]
    assert "found an unhandled exception, quitting" in worker.output()


def test_a_worker_stopped_while_redis_is_gone_exits_0(cluster: Cluster) -> None:
    # Its stop handler asked Redis whether a job ran, and RQ's goodbye wrote to it: exit 1, traceback.
    worker = cluster.worker("a")
    cluster.redis.stop()
    time.sleep(1)
    worker.proc.send_signal(signal.SIGTERM)
    assert worker.proc.wait(30) == 0, worker.output()[-3000:]
    assert "Traceback" not in worker.output()
    cluster.redis.start()


# The StopRequested that RQ's signal handler raises, lost in code that catches exceptions where
# the signal lands (logging's handlers did, see the next test).
STOP_LOST = """
from rq.exceptions import StopRequested

from worker.main import LatentdWorker

request_stop = LatentdWorker.request_stop


def swallowed(self, signum, frame):
    try:
        request_stop(self, signum, frame)
    except StopRequested:
        pass


LatentdWorker.request_stop = swallowed
"""


@pytest.mark.parametrize("redis_up", [True, False], ids=["redis_up", "redis_gone"])
def test_an_idle_worker_whose_stop_signal_was_lost_in_flight_stops(cluster: Cluster, redis_up: bool) -> None:
    # It waited on its queue for good (seen with Redis gone: 25 minutes), its stop flag set.
    worker = cluster.worker("a", STOP_LOST)
    try:
        cluster.wait_idle("a")
        if not redis_up:
            cluster.redis.stop()
            time.sleep(1)
        worker.proc.send_signal(signal.SIGTERM)
        assert worker.proc.wait(30) == 0, worker.output()[-3000:]
        assert "Traceback" not in worker.output()
    finally:
        worker.proc.kill()
        if not redis_up:
            cluster.redis.start()


def test_a_job_handed_to_a_worker_as_its_lost_stop_is_seen_runs_before_it_stops(cluster: Cluster) -> None:
    # The stop was seen right after the wait handed it a job: the job was left on the queue's
    # intermediate list, back on its queue only a minute after some other worker started.
    worker = cluster.worker("a", STOP_LOST)
    r = cluster.redis.client()
    try:
        cluster.wait_idle("a")
        worker.proc.send_signal(signal.SIGTERM)
        job_id = cluster.submit({"prompt": "x", "steps": 1})  # within the wait under way
        assert worker.proc.wait(30) == 0, worker.output()[-3000:]
        assert r.llen(f"rq:queue:latentd:{TINY_MODEL}:intermediate") == 0
        status = cluster.status(job_id)["status"]
        # Ran; or, where the wait had just ended without it, still on its queue for the next worker.
        assert status == "succeeded" or r.lrange(f"rq:queue:latentd:{TINY_MODEL}", 0, -1) == [job_id.encode()]
    finally:
        worker.proc.kill()


# A stop signal that lands while logging writes RQ's "could not connect to Redis" line, sent at
# that moment: logging caught RQ's StopRequested and printed it as a 'Logging error'.
STOP_IN_A_LOG_LINE = """
import logging, os, signal

formatted = logging.Handler.format
sent = []


def format(self, record):
    text = formatted(self, record)
    if "could not connect to Redis" in text and not sent:
        sent.append(1)
        os.kill(os.getpid(), signal.SIGTERM)  # its handler runs here, inside the handler's emit
    return text


logging.Handler.format = format
"""


def test_a_stop_signal_that_lands_in_a_log_line_stops_the_worker(cluster: Cluster) -> None:
    worker = cluster.worker("a", STOP_IN_A_LOG_LINE)
    try:
        cluster.wait_idle("a")
        cluster.redis.stop()
        assert worker.proc.wait(30) == 0, worker.output()[-3000:]
        assert "could not connect to Redis" in worker.output()  # the line it landed in
        assert "Logging error" not in worker.output() and "Traceback" not in worker.output()
    finally:
        worker.proc.kill()
        cluster.redis.start()


def test_a_worker_stopped_while_redis_is_frozen_exits_in_seconds(cluster: Cluster) -> None:
    # Each of its goodbyes to Redis (RQ's death record, the registration's removal) waited out
    # the 415 s socket timeout: 14 minutes, past any stop grace, then killed.
    worker = cluster.worker("a")
    cluster.wait_idle("a")
    redis_proc = cluster.redis.proc
    assert redis_proc is not None
    redis_proc.send_signal(signal.SIGSTOP)
    try:
        worker.proc.send_signal(signal.SIGTERM)
        assert worker.proc.wait(30) == 0, worker.output()[-3000:]
        assert "Traceback" not in worker.output()
    finally:
        redis_proc.send_signal(signal.SIGCONT)
        worker.proc.kill()


def test_a_redis_outage_longer_than_a_lease_leaves_the_running_job_to_its_worker(cluster: Cluster) -> None:
    # Back from the outage, the worker's own reaper found its running job's lease lapsed before its
    # lease thread renewed it, and re-queued it: run again from step 0 (on its last attempt, failed
    # `worker_lost` while its worker was alive).
    worker = cluster.worker("a")
    try:
        job_id = cluster.submit(LONG_JOB)
        cluster.running_on(job_id)
        cluster.redis.stop()
        time.sleep(float(LEASE) + 2)
        cluster.redis.start()
        view = cluster.wait_terminal(job_id)
        assert view["status"] == "succeeded" and view["attempts"] == 1, view
        assert "job_lease_lost" not in worker.output()
    finally:
        worker.stop()


def test_latentd_generate_rides_out_a_redis_outage_and_saves_its_image(cluster: Cluster) -> None:
    # A worker's registration without the worker, so the job waits in its queue through the outage.
    r = cluster.redis.client()
    register_ghost(r, TINY_MODEL)
    out = cluster.tmp / "out"
    client = spawn(
        ["generate", "a red circle", "--url", cluster.url, "--out", str(out), "--steps", "2"],
        base_env(cluster.redis.url),
        cluster.tmp / "generate.log",
    )
    wait_until(lambda: "queued" in client.output(), 30, what="the job queued")
    cluster.redis.stop()  # every read answers 503 with Retry-After: the client waits, and asks again
    wait_until(lambda: "HTTP 503: waiting" in client.output(), 30, what="the client to wait")
    cluster.redis.start()
    worker = cluster.worker("a")
    try:
        assert client.proc.wait(120) == 0, client.output()
    finally:
        worker.stop()
    assert len(list(out.glob("*.png"))) == 1  # it gave up at the first 503, the job going on unseen


def test_latentd_generate_rides_out_an_api_restart(cluster: Cluster) -> None:
    # A dropped connection ended the client (ReadError, ConnectError), its job going on unseen.
    port = free_port()
    api_env = base_env(cluster.redis.url, LATENTD_PORT=str(port), LATENTD_DEFAULT_MODEL=TINY_MODEL)
    url = f"http://127.0.0.1:{port}"

    def api_up(api: Proc) -> None:
        def healthy() -> bool:
            try:
                return httpx.get(f"{url}/healthz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(healthy, 30, what="the API")

    register_ghost(cluster.redis.client(), TINY_MODEL)  # the job waits in its queue meanwhile
    api = spawn(["api"], api_env, cluster.tmp / "api-a.log")
    api_up(api)
    out = cluster.tmp / "out"
    client = spawn(
        ["generate", "a red circle", "--url", url, "--out", str(out), "--steps", "2"],
        base_env(cluster.redis.url),
        cluster.tmp / "generate.log",
    )
    try:
        wait_until(lambda: "queued" in client.output(), 30, what="the job queued")
        assert api.stop() == 0
        wait_until(lambda: "Error: waiting" in client.output(), 30, what="the client to wait")
        api = spawn(["api"], api_env, cluster.tmp / "api-b.log")
        api_up(api)
        worker = cluster.worker("a")
        try:
            assert client.proc.wait(120) == 0, client.output()
        finally:
            worker.stop()
    finally:
        api.stop()
        client.stop()
    assert len(list(out.glob("*.png"))) == 1


def test_sigterm_past_the_grace_period_hands_the_job_to_another_worker(cluster: Cluster) -> None:
    impatient = start_worker(
        cluster.redis.url,
        cluster.model_dir,
        cluster.tmp,
        name="a",
        LATENTD_LEASE_SECONDS=LEASE,
        LATENTD_SHUTDOWN_GRACE="0.5",
    )
    job_id = cluster.submit(LONG_JOB)
    cluster.running_on(job_id)
    impatient.proc.send_signal(signal.SIGTERM)
    assert impatient.proc.wait(30) == 0
    assert "shutdown_grace_expired" in impatient.output()
    other = cluster.worker("b")
    try:
        view = cluster.wait_terminal(job_id)
    finally:
        other.stop()
    assert view["status"] == "succeeded" and view["attempts"] == 2
