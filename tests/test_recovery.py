"""Crashes lose nothing: a killed or frozen worker's job is re-queued under its lease and
completed exactly once."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from latentd.contract import Keys, WorkerInfo
from tests.conftest import (
    HTTP,
    LEASE,
    LONG_JOB,
    TINY_MODEL,
    Cluster,
    Proc,
    base_env,
    make_cluster,
    register_ghost,
    sitecustomize,
    spawn,
    start_worker,
    wait_until,
)

pytestmark = pytest.mark.integration


def test_killed_worker_job_is_requeued_and_completed(cluster: Cluster) -> None:
    job_id = cluster.killed_mid_job()
    assert cluster.status(job_id)["status"] == "running"  # until its lease runs out

    view = cluster.ends_on_another_worker(job_id)
    assert view["status"] == "succeeded"
    assert view["attempts"] == 2
    assert HTTP.get(f"{cluster.url}{view['images'][0]['url']}").status_code == 200
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
    # Worker b's reaper, or the API's should b have been slow to start.
    reaped_by = worker.output() + (cluster.tmp / "api.log").read_text()
    assert f"job_requeued job_id={job_id} reason={reason}" in reaped_by
    assert f"job_started job_id={job_id}" not in worker.output()
    assert r.hget(f"latentd:job:{job_id}", "completions") == b"1"
    assert r.hgetall("latentd:stats:outcomes") == {b"tiny|succeeded|": b"1"}  # counted as stored
    assert HTTP.get(f"{cluster.url}{view['images'][0]['url']}").content == stored


def test_a_job_given_up_on_its_last_attempt_refuses_a_late_commit(redis_client: redis.Redis) -> None:
    """Between the reaper's look for stored images and RQ's write of `failed`, the job's worker,
    frozen rather than dead, could still commit: the job ended `failed` with its images stored and
    counted as a success. The look now fences the job off, and the commit is refused. The scripts
    run against Redis as the worker and the reaper run them; the window is too narrow to hit."""
    from latentd import reaping
    from worker import jobs

    r = redis_client
    r.hset("rq:job:late", mapping={"status": "started", "worker_name": "frozen"})
    r.hset(Keys.state("late"), "attempts", 1)

    def commit() -> int:
        keys = ["rq:job:late", Keys.state("late"), Keys.cancel("late"), Keys.OUTCOMES, Keys.image("late", 0)]
        args = ["frozen", 60, 60, '{"images": "[]"}', "tiny|succeeded|", reaping.GIVEN_UP_SECONDS, b"png"]
        return int(r.eval(jobs._COMMIT, len(keys), *keys, *args))

    assert not reaping.grant_settle_start(r, "late", "run-1")  # no images: RQ fails it as lost
    assert commit() == jobs.NOT_OURS
    assert not r.exists(Keys.image("late", 0)) and not r.exists(Keys.OUTCOMES)
    # Should RQ's write never land, the job is still its worker's to finish once the fence lapses.
    r.hset(Keys.state("late"), "given_up_at", int(time.time()) - reaping.GIVEN_UP_SECONDS - 1)
    assert commit() == jobs.COMMITTED and r.get(Keys.image("late", 0)) == b"png"
    assert not reaping.grant_settle_start(r, "gone", "run-1") and not r.exists(
        Keys.state("gone")
    )  # no key made
    # Stored images earn one start more, once.
    r.hset(Keys.state("stored"), "images", "[]")
    # Granted once, to the abandoned run: again to a pass that follows one cut short after the
    # grant (it failed the job with its images stored), never to a later run's abandonment.
    assert reaping.grant_settle_start(r, "stored", "run-1") and reaping.grant_settle_start(
        r, "stored", "run-1"
    )
    assert not reaping.grant_settle_start(r, "stored", "run-2")


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
    job_id = cluster.killed_mid_job()
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
    assert HTTP.post(f"{cluster.url}/v1/generations/{job_id}/cancel").status_code == 202
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


# The worker freezes itself (SIGSTOP) the moment a step's look has seen its job's cancel: the job's
# state notes it canceled (`canceled_at`), and RQ has not recorded it so yet.
FREEZE_AS_IT_SEES_THE_CANCEL = """
import os
import signal

from rq import get_current_job

import worker.jobs as jobs

_resent_while_away = jobs.resent_while_away


def resent_while_away(send, what, *args):
    answer = _resent_while_away(send, what, *args)
    job = get_current_job()
    if what == "progress" and job is not None:
        if jobs.current().connection.hexists(f"latentd:job:{job.id}", "canceled_at"):
            os.kill(os.getpid(), signal.SIGSTOP)
    return answer


jobs.resent_while_away = resent_while_away
"""


def is_stopped(pid: int) -> bool:
    """Whether process `pid` is stopped (SIGSTOP): its state in /proc/PID/stat."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T"


@pytest.fixture
def short_flag_cluster(tmp_path: Path, tiny_model_dir: Path) -> Iterator[Cluster]:
    """An API whose records and cancel flags last 10 s (its LATENTD_JOB_TTL, the least allowed), and
    that reaps with the workers' short lease while none is alive."""
    yield from make_cluster(
        tmp_path, tiny_model_dir, LATENTD_LEASE_SECONDS=LEASE, LATENTD_JOB_TTL="10", LATENTD_RESULTS_TTL="10"
    )


def test_a_job_seen_canceled_and_reaped_after_its_flag_lapsed_stays_canceled(
    short_flag_cluster: Cluster,
) -> None:
    # Its worker saw the cancel and froze before RQ recorded it; its cancel flag lapsed before its
    # lease did, and the reaper re-queued it as lost. It read `queued`; a worker then ran it again,
    # and it ended `succeeded`, its cancel long answered. Now the reaper ends it canceled.
    cluster = short_flag_cluster
    frozen = cluster.worker("a", FREEZE_AS_IT_SEES_THE_CANCEL, LATENTD_LEASE_SECONDS="14")
    other: Proc | None = None
    try:
        job_id = cluster.submit(LONG_JOB)
        cluster.running_on(job_id)
        assert HTTP.post(f"{cluster.url}/v1/generations/{job_id}/cancel").status_code == 202
        wait_until(lambda: is_stopped(frozen.proc.pid), 30, what="the worker to freeze")
        seen = cluster.status(job_id)
        assert seen["status"] == "canceled" and seen["timings"]["finished_at"], seen
        r = cluster.redis.client()
        wait_until(lambda: not r.exists(Keys.cancel(job_id)), 15, what="the cancel flag to lapse")
        api_log = cluster.tmp / "api.log"
        ended = f"job_canceled job_id={job_id} reason=worker_lost"
        wait_until(lambda: ended in api_log.read_text(), 45, what="the API's reaper")
        assert r.hget(f"rq:job:{job_id}", "status") == b"stopped"
        assert "job_requeued" not in api_log.read_text()
        # Read before a worker starts: the record lasts LATENTD_JOB_TTL (10 s) from the reaper's end,
        # less than a worker's start takes on a loaded machine.
        view = cluster.status(job_id)
        assert view["status"] == "canceled" and view["images"] == [], view
        assert [view["timings"][t] for t in ("started_at", "finished_at")] == [
            seen["timings"][t] for t in ("started_at", "finished_at")
        ]
        conflict = HTTP.post(f"{cluster.url}/v1/generations/{job_id}/cancel")
        assert conflict.status_code == 409, conflict.text
        other = cluster.worker("b")  # nothing for it to run
        assert r.llen(f"rq:queue:latentd:{TINY_MODEL}") == 0
        assert cluster.status(job_id).get("status", "lapsed") in ("canceled", "lapsed")
        assert f"job_started job_id={job_id}" not in other.output()
    finally:
        frozen.proc.send_signal(signal.SIGKILL)
        frozen.proc.wait()
        if other is not None:
            other.stop()


@pytest.fixture
def api_reaping_cluster(tmp_path: Path, tiny_model_dir: Path) -> Iterator[Cluster]:
    """A cluster whose API has its workers' short lease: it reaps within seconds of their deaths."""
    yield from make_cluster(tmp_path, tiny_model_dir, LATENTD_LEASE_SECONDS=LEASE)


@pytest.fixture
def api_reaping_one_attempt_cluster(tmp_path: Path, tiny_model_dir: Path) -> Iterator[Cluster]:
    yield from make_cluster(tmp_path, tiny_model_dir, LATENTD_LEASE_SECONDS=LEASE, LATENTD_MAX_ATTEMPTS="1")


def test_with_no_worker_alive_the_api_requeues_a_dead_workers_job(api_reaping_cluster: Cluster) -> None:
    # Only a live worker's reaper re-queued it: with none left, it read `running` for good.
    cluster = api_reaping_cluster
    job_id = cluster.killed_mid_job()
    wait_until(lambda: cluster.status(job_id)["status"] == "queued", 30, what="the API's reaper")
    api_log = (cluster.tmp / "api.log").read_text()
    assert f"job_requeued job_id={job_id} reason=worker_lost" in api_log, api_log[-3000:]
    assert cluster.status(job_id)["attempts"] == 1  # a worker that comes runs it again
    cancel = HTTP.post(f"{cluster.url}/v1/generations/{job_id}/cancel")
    assert cancel.status_code == 200 and cancel.json()["status"] == "canceled"  # queued: at once


def test_with_no_worker_alive_the_api_ends_a_dead_workers_last_attempts(
    api_reaping_one_attempt_cluster: Cluster,
) -> None:
    # A batch of two on their last attempt; one canceled (202) after its worker died: that cancel
    # changed nothing until some worker started.
    cluster = api_reaping_one_attempt_cluster
    worker = cluster.worker("a")
    cluster.wait_idle("a")
    worker.proc.send_signal(signal.SIGSTOP)
    lost, canceled = (cluster.submit({**LONG_JOB, "seed": seed}) for seed in (1, 2))
    worker.proc.send_signal(signal.SIGCONT)  # it takes both into one pipeline call
    cluster.running_on(lost)
    assert cluster.status(canceled)["status"] == "running"
    worker.proc.send_signal(signal.SIGKILL)
    worker.proc.wait()
    assert HTTP.post(f"{cluster.url}/v1/generations/{canceled}/cancel").status_code == 202
    failed = cluster.wait_terminal(lost, timeout=30)
    assert failed["status"] == "failed" and failed["error"]["code"] == "worker_lost", failed
    view = cluster.wait_terminal(canceled, timeout=30)
    assert view["status"] == "canceled" and view["error"] is None, view
    assert cluster.redis.client().hget(f"rq:job:{canceled}", "status") == b"stopped"


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
        image = HTTP.get(f"{cluster.url}{view['images'][0]['url']}").content

        frozen.proc.send_signal(signal.SIGCONT)
        wait_until(lambda: "job_lease_lost" in frozen.output(), 30, what="the thawed worker to give up")
        after = cluster.status(job_id)
        assert after["status"] == "succeeded" and after["attempts"] == 2
        assert cluster.redis.client().hget(f"latentd:job:{job_id}", "completions") == b"1"
        assert HTTP.get(f"{cluster.url}{view['images'][0]['url']}").content == image
        # The thawed worker carries on serving.
        for _ in range(3):
            assert (
                cluster.wait_terminal(cluster.submit({"prompt": "next", "steps": 1}))["status"] == "succeeded"
            )
    finally:
        for w in workers.values():
            w.proc.send_signal(signal.SIGCONT)
            w.stop()


# Redis out of reach, once for each job, as a worker drops its own record of a job that another
# worker owns now.
DROPPING_A_LOST_JOB_FAILS_ONCE = """
import redis

import worker.main as main

_cleanup_execution = main.LatentdWorker.cleanup_execution
failed = set()


def cleanup_execution(self, job, pipeline, execution=None):
    if job.id not in failed and self.connection.hget(job.key, "worker_name") != self.name.encode():
        failed.add(job.id)
        raise redis.ConnectionError("Error 111 connecting to Redis. Connection refused.")
    return _cleanup_execution(self, job, pipeline, execution)


main.LatentdWorker.cleanup_execution = cleanup_execution
"""


def test_a_thawed_worker_that_drops_its_lost_jobs_as_redis_is_away_serves_on(cluster: Cluster) -> None:
    # The error ended RQ's loop: the worker exited 1 (its model loaded again under a supervisor).
    # Two jobs in one call: the one RQ performs, and one claimed into its batch, each dropped apart.
    r = cluster.redis.client()
    register_ghost(r, TINY_MODEL)  # both are queued before the worker looks
    batch = [cluster.submit({**LONG_JOB, "seed": seed}) for seed in (1, 2)]
    frozen = cluster.worker("a", DROPPING_A_LOST_JOB_FAILS_ONCE)
    other: Proc | None = None
    try:
        cluster.running_on(batch[0])
        assert [r.hget(f"latentd:job:{job_id}", "batch_jobs") for job_id in batch] == [b"2", b"2"]
        frozen.proc.send_signal(signal.SIGSTOP)
        other = cluster.worker("b")  # it re-runs the jobs once their lease lapses
        views = [cluster.wait_terminal(job_id) for job_id in batch]
        assert [(v["status"], v["attempts"]) for v in views] == [("succeeded", 2)] * 2, views
        other.stop()
        frozen.proc.send_signal(signal.SIGCONT)
        dropped = "redis_reachable_in_job at=rq_drop"
        wait_until(
            lambda: frozen.output().count(dropped) == 2 or frozen.proc.poll() is not None,
            30,
            what="the drops",
        )
        assert frozen.proc.poll() is None, frozen.output()[-3000:]
        assert all(f"job_lease_lost job_id={job_id}" in frozen.output() for job_id in batch)
        cluster.wait_idle("a")
        assert [r.hget(f"rq:job:{job_id}", "status") for job_id in batch] == [b"finished"] * 2
        assert r.zcard("rq:wip:latentd:tiny") == 0 and not r.exists("rq:worker:a:executions")
        # The worker serves on.
        assert cluster.wait_terminal(cluster.submit({"prompt": "next", "steps": 1}))["status"] == "succeeded"
        assert frozen.proc.poll() is None
    finally:
        frozen.proc.send_signal(signal.SIGCONT)
        frozen.stop()
        if other is not None:
            other.stop()


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
        # It ran after that batch, alone, and failed.
        wait_until(
            lambda: r.hget("rq:job:garbled", "status") == b"failed", 30, what="the garbled job to fail"
        )
        assert worker.proc.poll() is None, worker.output()[-2000:]
    finally:
        worker.stop()
