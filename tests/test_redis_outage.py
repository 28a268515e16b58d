"""Redis restarts and outages lose no accepted job: workers, the API and `latentd generate` ride
them out, and a job whose Redis replies were lost is counted once."""

from __future__ import annotations

import functools
import logging
import pathlib
import signal
import socket
import threading
import time

import httpx
import pytest
import redis

from latentd.contract import Keys
from latentd.embedded import free_port
from tests.conftest import (
    HTTP,
    LEASE,
    LONG_JOB,
    TINY_MODEL,
    Cluster,
    Proc,
    base_env,
    register_ghost,
    sitecustomize,
    spawn,
    start_api,
    start_worker,
    wait_until,
)

pytestmark = pytest.mark.integration


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
        outage = HTTP.post(f"{cluster.url}/v1/generations", json={"prompt": "during"})
        assert outage.status_code == 503 and outage.headers["retry-after"]
        read = HTTP.get(f"{cluster.url}/v1/generations/anyid")
        assert read.status_code == 503 and read.json()["error"]["code"] == "service_unavailable"
        time.sleep(3)
        cluster.redis.start()
        # Neither the API nor the worker was restarted.
        wait_until(
            lambda: HTTP.get(f"{cluster.url}/v1/models").json()["data"], 30, what="worker re-registered"
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


# Redis out of reach, once, as a batch records the start of a job it claimed (RQ's record).
A_CLAIMED_JOBS_START_FAILS_ONCE = """
import redis
from rq.worker.base import BaseWorker

_prepare_job_execution = BaseWorker.prepare_job_execution
failed = []


def prepare_job_execution(self, job, remove_from_intermediate_queue=False):
    if "claimed" in str(job.args) and not failed:
        failed.append(True)
        raise redis.ConnectionError("Error 111 connecting to Redis. Connection refused.")
    return _prepare_job_execution(self, job, remove_from_intermediate_queue)


BaseWorker.prepare_job_execution = prepare_job_execution
"""


def test_a_claimed_job_whose_start_finds_redis_away_runs_in_its_batch(cluster: Cluster) -> None:
    # Raised, the error ended the look for mates: the job, its execution written but not started,
    # was left out of the batch, and of the intermediate list's clean-up until its lease lapsed.
    r = cluster.redis.client()
    register_ghost(r, TINY_MODEL)  # both are queued before the worker looks
    first = cluster.submit({"prompt": "first", "steps": 2})
    mate = cluster.submit({"prompt": "claimed", "steps": 2})
    worker = cluster.worker("a", A_CLAIMED_JOBS_START_FAILS_ONCE)
    try:
        views = [cluster.wait_terminal(job_id, 30) for job_id in (first, mate)]
        assert [(v["status"], v["attempts"]) for v in views] == [("succeeded", 1)] * 2, views
        assert [r.hget(f"latentd:job:{job_id}", "batch_jobs") for job_id in (first, mate)] == [b"2"] * 2
        assert "redis_reachable_in_job at=rq_start" in worker.output()
        assert "batch_claim_failed" not in worker.output()
    finally:
        worker.stop()


def test_a_claim_whose_execution_could_not_be_written_leaves_none_among_the_workers(
    redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """RQ notes a job's execution among its worker's before it writes it: where the write failed,
    the batch's worker counted as its own, for good, the execution of a job it never started (what
    its stop and its lease renewal go by). The job waits on the intermediate list, not started."""
    from rq import Queue
    from rq.serializers import JSONSerializer

    from latentd.contract import JOB_FUNCTION, JobPayload
    from worker.jobs import Claimed
    from worker.main import LatentdWorker
    from worker.pipeline import batch_key

    queue = Queue(Keys.queue_name(TINY_MODEL), connection=redis_client, serializer=JSONSerializer)
    mate = JobPayload(
        job_id="mate", model=TINY_MODEL, prompt="x", width=64, height=64, steps=1, guidance_scale=0,
        seed=1, num_images=1,
    )  # fmt: skip
    queue.enqueue(JOB_FUNCTION, mate.model_dump(mode="json"), job_id="mate")
    worker = LatentdWorker(
        [queue], connection=redis_client, name="w", serializer=JSONSerializer, model=TINY_MODEL
    )
    execute = redis.client.Pipeline.execute

    def refused(self: redis.client.Pipeline, raise_on_error: bool = True) -> list[object]:
        if any(len(args) > 1 and str(args[1]).startswith("rq:execution:") for args, _ in self.command_stack):
            raise redis.ConnectionError("Error 111 connecting to Redis. Connection refused.")
        return execute(self, raise_on_error)

    claimed: list[Claimed] = []
    with monkeypatch.context() as m:
        m.setattr(redis.client.Pipeline, "execute", refused)
        with pytest.raises(redis.ConnectionError):
            worker._claim_into(queue, batch_key(mate), False, 4, time.monotonic() + 1, claimed)
    assert claimed == [] and worker.executions == {}
    assert redis_client.lrange(queue.intermediate_queue_key, 0, -1) == [b"mate"]
    assert redis_client.hget("rq:job:mate", "status") == b"queued"
    assert redis_client.zcard(queue.started_job_registry.key) == 0


# Redis out of reach, once each, at each call a worker makes outside RQ's wait for work and the
# job's own retries. Between the model's load and RQ's loop: as the worker takes its name, as RQ
# learns its address, as it records its lease, as RQ registers it and subscribes it. In RQ's loop:
# as it looks whether workers are suspended and runs its maintenance (as a worker starts, and
# between jobs every 10 minutes), as it notes the worker idle before the wait, as it starts the
# job the wait handed over, and in the heartbeat after a job. In a job's records: RQ's of its
# start, end and success, and latentd's of its start, whose reply is lost (the start was made);
# RQ's of a failure ("fail-here"), which RQ logs and does not raise.
REDIS_GONE_ONCE_AT_EACH_CALL = """
import sys

import redis
import latentd.reaping
import worker.main
from rq.worker.base import BaseWorker

names = ("run_maintenance_tasks", "check_for_suspension", "set_state", "prepare_execution", "perform_job",
         "heartbeat", "register_birth", "subscribe", "_set_ip_address", "prepare_job_execution",
         "handle_execution_ended", "handle_job_success")
real = {name: getattr(BaseWorker, name) for name in names}
failed = []
ran = []


def fail_once(what):
    if what not in failed:
        failed.append(what)
        print("injected:", what, file=sys.stderr, flush=True)
        raise redis.ConnectionError("Error 111 connecting to Redis. Connection refused.")


def once(name, when=lambda *args, **kwargs: True, call=None):
    call = call or (lambda self, *args, **kwargs: real[name](self, *args, **kwargs))

    def wrapped(*args, **kwargs):
        if when(*args[1:], **kwargs):
            fail_once(name)
        return call(*args, **kwargs)

    return wrapped


def performed(self, *args, **kwargs):
    result = real["perform_job"](self, *args, **kwargs)
    ran.append(True)
    return result


for name in ("run_maintenance_tasks", "check_for_suspension", "prepare_execution", "register_birth",
             "subscribe", "_set_ip_address", "prepare_job_execution", "handle_execution_ended",
             "handle_job_success"):
    setattr(BaseWorker, name, once(name))
BaseWorker.set_state = once("set_state", lambda state, pipeline=None: state == "idle" and pipeline is None)
BaseWorker.perform_job = performed
BaseWorker.heartbeat = once("heartbeat", lambda timeout=None, pipeline=None: bool(ran) and pipeline is None)
worker.main._take_name = once("_take_name", call=worker.main._take_name, when=lambda *a: True)
latentd.reaping.record_lease = once("record_lease", call=latentd.reaping.record_lease, when=lambda *a: True)

_eval = redis.Redis.eval


def eval_(self, script, *args):
    if "'attempts'" in script and "start" not in failed:
        _eval(self, script, *args)
        fail_once("start")
    return _eval(self, script, *args)


redis.Redis.eval = eval_

_generate = worker.main.jobs.Runner.generate


def generate(self, payloads, *args, **kwargs):
    if payloads[0].prompt == "fail-here":
        raise RuntimeError("injected failure")
    return _generate(self, payloads, *args, **kwargs)


worker.main.jobs.Runner.generate = generate
_cleanup = BaseWorker.cleanup_execution


def cleanup_execution(self, job, pipeline, execution=None):
    _cleanup(self, job, pipeline, execution)
    if job.get_status(refresh=False) == "failed" and "rq_failure" not in failed:
        execute = pipeline.execute

        def refused(*args, **kwargs):
            pipeline.execute = execute
            fail_once("rq_failure")

        pipeline.execute = refused


BaseWorker.cleanup_execution = cleanup_execution
"""


def test_redis_gone_once_at_each_call_outside_rqs_wait_leaves_the_worker_serving(cluster: Cluster) -> None:
    # RQ's loop ended on the error (found an unhandled exception, quitting): the worker exited 1
    # (seen in CI, Redis stopped as a worker started) and reloaded its model under its supervisor.
    # Before the loop, a traceback and exit 1. In a job's records, RQ failed the job (after its
    # images were stored, too), and a lost reply to the start counted a second attempt.
    worker = cluster.worker("a", REDIS_GONE_ONCE_AT_EACH_CALL)
    try:
        # The first job's start fails: it waits on the intermediate list for RQ's clean-up, which
        # puts it back on its queue a minute on (aged here, as if that minute had passed).
        first = cluster.submit({"prompt": "x", "steps": 1})
        wait_until(lambda: "job_start_failed" in worker.output(), 30, what="the failed start")
        r = cluster.redis.client()
        r.set(f"rq:queue:latentd:{TINY_MODEL}:intermediate:first_seen:{first}", time.time() - 120)
        view = cluster.wait_terminal(first, 60)
        assert view["status"] == "succeeded" and view["attempts"] == 1, view
        view = cluster.wait_terminal(cluster.submit({"prompt": "y", "steps": 1}), 30)
        assert view["status"] == "succeeded", view
        # Its failure unwritten, RQ left the job started, and its reaper ran it again.
        failing = cluster.submit({"prompt": "fail-here", "steps": 1})
        view = cluster.wait_terminal(failing, 30)
        assert view["status"] == "failed" and view["error"]["code"] == "generation_failed", view
        time.sleep(2 * float(LEASE))
        assert cluster.status(failing)["attempts"] == 1 and r.hget(f"rq:job:{failing}", "status") == b"failed"
        assert worker.proc.poll() is None and "quitting" not in worker.output()
    finally:
        assert worker.stop() == 0
    assert worker.output().count("Traceback") == 1  # the failing job's own (job_failed_traceback)
    injected = {line.split()[-1] for line in worker.output().splitlines() if line.startswith("injected:")}
    assert injected == {
        "rq_failure",
        "_take_name",
        "_set_ip_address",
        "record_lease",
        "register_birth",
        "subscribe",
        "run_maintenance_tasks",
        "check_for_suspension",
        "set_state",
        "prepare_execution",
        "heartbeat",
        "prepare_job_execution",
        "start",
        "handle_execution_ended",
        "handle_job_success",
    }


def test_a_redis_that_refuses_writes_for_a_while_is_waited_out(cluster: Cluster) -> None:
    # Full (`maxmemory`, OOM) or turned replica (READONLY; the wait for work gets UNBLOCKED): the
    # running job failed `generation_failed`, and RQ's loop, its own writes refused, ended: exit 1
    # (under `latentd up`, whose restarted worker then exits 4, the whole stack stopped).
    worker = cluster.worker("a", SLOW_STEPS)
    r = cluster.redis.client()

    def accepted() -> str | None:  # the worker's registration lapses while Redis refuses it
        response = HTTP.post(f"{cluster.url}/v1/generations", json={"prompt": "after", "steps": 1})
        return str(response.json()["id"]) if response.status_code == 202 else None

    try:
        job_id = cluster.submit({"prompt": "slow", "steps": 60})
        cluster.running_on(job_id)
        r.config_set("maxmemory", 1)
        wait_until(lambda: "OutOfMemoryError" in worker.output(), 30, what="the job's writes refused")
        time.sleep(1)
        r.config_set("maxmemory", 0)
        view = cluster.wait_terminal(job_id)
        assert view["status"] == "succeeded" and view["attempts"] == 1, view
        for refuse, allow in (
            (lambda: r.config_set("maxmemory", 1), lambda: r.config_set("maxmemory", 0)),
            (lambda: r.replicaof("127.0.0.1", free_port()), lambda: r.replicaof("NO", "ONE")),
        ):
            refuse()  # the worker idle, in its wait for work
            time.sleep(3)
            allow()
            view = cluster.wait_terminal(wait_until(accepted, 30, what="the worker back"), 30)
            assert view["status"] == "succeeded", view
        assert worker.proc.poll() is None and "quitting" not in worker.output()
    finally:
        r.config_set("maxmemory", 0)
        r.replicaof("NO", "ONE")
        assert worker.stop() == 0
    assert "Traceback" not in worker.output()
    assert "ReadOnlyError" in worker.output() or "UNBLOCKED" in worker.output()


class Blackhole:
    """A TCP relay to a local port whose connections can go dead without a word: each then takes
    what either end sends and delivers none of it, as a Redis behind a dead network path does (its
    host gone without a reset, a failover to a new primary). Connections made after work."""

    def __init__(self, port: int) -> None:
        self.target = port
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.links: list[tuple[socket.socket, socket.socket, threading.Event]] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            dead = threading.Event()
            self.links.append((client, upstream, dead))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._relay, args=(a, b, dead), daemon=True).start()

    @staticmethod
    def _relay(source: socket.socket, sink: socket.socket, dead: threading.Event) -> None:
        while data := Blackhole._read(source):
            if not dead.is_set():
                try:
                    sink.sendall(data)
                except OSError:
                    break
        for end in (source, sink):
            end.close()

    @staticmethod
    def _read(source: socket.socket) -> bytes:
        try:
            return source.recv(65536)
        except OSError:
            return b""

    def go_dead(self) -> None:
        """Every connection open now goes dead."""
        for *_, dead in list(self.links):
            dead.set()

    def close(self) -> None:
        self.server.close()
        for client, upstream, _ in list(self.links):
            client.close()
            upstream.close()


def test_a_worker_whose_redis_connections_go_dead_serves_again_within_seconds(cluster: Cluster) -> None:
    # Its wait for work held a dead connection for RQ's socket timeout, 415 s: jobs waited that long.
    hole = Blackhole(cluster.redis.port)
    worker = start_worker(
        f"redis://127.0.0.1:{hole.port}/0",
        cluster.model_dir,
        cluster.tmp,
        name="a",
        LATENTD_LEASE_SECONDS=LEASE,
    )
    try:
        cluster.wait_idle("a")
        hole.go_dead()
        wait_until(
            lambda: "Timeout reading from socket" in worker.output(), 40, what="the dead connection seen"
        )

        def accepted() -> str | None:
            response = HTTP.post(f"{cluster.url}/v1/generations", json={"prompt": "after", "steps": 1})
            return str(response.json()["id"]) if response.status_code == 202 else None

        job_id = wait_until(accepted, 30, what="the worker registered again")
        view = cluster.wait_terminal(job_id, 30)
        assert view["status"] == "succeeded", view
        assert worker.proc.poll() is None
    finally:
        worker.stop()
        hole.close()
    assert "Traceback" not in worker.output()


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


def test_a_redis_full_longer_than_a_lease_leaves_a_live_workers_job_to_it(cluster: Cluster) -> None:
    # Full, Redis refused the workers' registrations and lease renewals, and the API's reaper took
    # its own refused writes for one queue's failure, not for Redis's trouble: as Redis took writes
    # again it found no worker and the lease lapsed, and the job ran again on the other worker
    # (helper-50: 3 runs in 4).
    api, _ = start_api(cluster.redis.url, cluster.tmp, name="reaping-api", LATENTD_LEASE_SECONDS=LEASE)
    worker = cluster.worker("a", SLOW_STEPS)
    other = cluster.worker("b")
    r = cluster.redis.client()
    try:
        job_id = cluster.submit({"prompt": "slow", "steps": 100})
        cluster.running_on(job_id)
        r.config_set("maxmemory", 1)
        time.sleep(3 * float(LEASE))
        r.config_set("maxmemory", 0)
        view = cluster.wait_terminal(job_id)
        assert view["status"] == "succeeded" and view["attempts"] == 1, view
        assert "job_lease_lost" not in worker.output()
    finally:
        r.config_set("maxmemory", 0)
        worker.stop()
        other.stop()
        api.stop()
    assert "reaper_failed" not in api.output()


def test_a_redis_frozen_longer_than_a_lease_leaves_running_jobs_to_their_workers(cluster: Cluster) -> None:
    # Frozen (SIGSTOP: no error, shorter than the socket timeout), no one could renew a lease; the
    # first reaper to wake with Redis took the running job for lost and it ran again (helper-47:
    # two runs in three).
    worker = cluster.worker("a", SLOW_STEPS)
    other = cluster.worker("b")
    try:
        job_id = cluster.submit({"prompt": "slow", "steps": 100})
        cluster.running_on(job_id)
        assert cluster.redis.proc is not None
        cluster.redis.proc.send_signal(signal.SIGSTOP)
        time.sleep(2 * float(LEASE))
        cluster.redis.proc.send_signal(signal.SIGCONT)
        view = cluster.wait_terminal(job_id)
        assert view["status"] == "succeeded" and view["attempts"] == 1, view
        assert "job_lease_lost" not in worker.output()
    finally:
        cluster.redis.proc.send_signal(signal.SIGCONT)
        worker.stop()
        other.stop()
    assert "redis_stalled" in worker.output() + other.output()


# RQ's maintenance as the worker's loop begins, its `may_reap` looked at: Redis frozen before its
# first call (which then waits for Redis to wake), however long the worker took to get there.
FROZEN_IN_RQS_FIRST_MAINTENANCE = """
import os
import threading
import time

import redis
from latentd import reaping

_reaper_locks = reaping.reaper_locks
_first = [True]


def reaper_locks(*args):
    if _first and threading.current_thread() is threading.main_thread():
        _first.clear()
        probe = redis.Redis.from_url(os.environ["LATENTD_REDIS_URL"], socket_timeout=1.0)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                probe.ping()
            except redis.TimeoutError:
                break  # frozen
            time.sleep(0.1)
    return _reaper_locks(*args)


reaping.reaper_locks = reaper_locks
"""


def test_a_redis_frozen_as_rqs_maintenance_begins_leaves_a_live_workers_job_to_it(cluster: Cluster) -> None:
    # Under load, the second worker's maintenance as its loop began was still under way as Redis
    # froze: RQ read the time as Redis woke, found the running job's lease lapsed (its renewal
    # waiting in the freeze) and re-queued it (helper-61: test_a_redis_frozen_longer_than_a_lease_
    # leaves_running_jobs_to_their_workers, attempts 2, twice in a loaded CI).
    worker = cluster.worker("a", SLOW_STEPS)
    other = cluster.worker("b", FROZEN_IN_RQS_FIRST_MAINTENANCE)
    try:
        job_id = cluster.submit({"prompt": "slow", "steps": 100})
        assert cluster.running_on(job_id) == "a"
        assert cluster.redis.proc is not None
        cluster.redis.proc.send_signal(signal.SIGSTOP)
        time.sleep(2 * float(LEASE))
        cluster.redis.proc.send_signal(signal.SIGCONT)
        view = cluster.wait_terminal(job_id)
        assert view["status"] == "succeeded" and view["attempts"] == 1, view
        assert "job_requeued" not in other.output() and "job_lease_lost" not in worker.output()
    finally:
        cluster.redis.proc.send_signal(signal.SIGCONT)
        worker.stop()
        other.stop()


# As the worker takes its name (after its model's load), Redis away once, or frozen (the call
# answered late), until GO_AT (unix time) and for 2 s at least (a third of the test's lease and more);
# or frozen as the worker first looks at it, before the load.
AWAY_AS_IT_TAKES_ITS_NAME = """
import os
import time

import redis
import worker.main

_away = [True]


def troubled(call):
    def wrapped(*args):
        if _away:
            _away.clear()
            time.sleep(max(2.0, float(os.environ["GO_AT"]) - time.time()))
            if os.environ["REDIS_WAS"] == "away":
                raise redis.ConnectionError("Error 111 connecting to Redis. Connection refused.")
        return call(*args)

    return wrapped


if os.environ["REDIS_WAS"] == "frozen_before_load":
    worker.main.check_eviction_policy = troubled(worker.main.check_eviction_policy)
else:
    worker.main._take_name = troubled(worker.main._take_name)
"""


@pytest.mark.parametrize("was", ["away", "frozen", "frozen_before_load"])
def test_a_worker_that_found_redis_away_as_it_started_leaves_a_live_workers_job_to_it(
    cluster: Cluster, was: str
) -> None:
    # Redis gone (helper-55) or frozen (helper-58, helper-60) as a worker started: back, RQ's
    # maintenance as the new worker's loop began took a live worker's running job for lost, its lease
    # lapsed in the outage and not yet renewed, and the job ran again. Here the live worker's pause
    # is the outage.
    lease = 4
    running = cluster.worker("a", SLOW_STEPS, LATENTD_LEASE_SECONDS=str(lease))
    late: Proc | None = None
    try:
        job_id = cluster.submit({"prompt": "slow", "steps": 150})
        cluster.running_on(job_id)
        running.proc.send_signal(signal.SIGSTOP)
        go_at = time.time() + lease + 0.5  # its lease lapsed by then
        late = cluster.worker(
            "b", AWAY_AS_IT_TAKES_ITS_NAME, LATENTD_LEASE_SECONDS=str(lease), GO_AT=str(go_at), REDIS_WAS=was
        )  # ready soon after GO_AT, Redis "back"
        running.proc.send_signal(signal.SIGCONT)  # it renews its lease now, within a lease of the trouble
        view = cluster.wait_terminal(job_id)
        assert view["status"] == "succeeded" and view["attempts"] == 1, view
        assert ("redis_away" in late.output()) == (was == "away") and "job_requeued" not in late.output()
        assert "job_lease_lost" not in running.output()
    finally:
        running.proc.send_signal(signal.SIGCONT)
        running.stop()
        if late is not None:
            late.stop()


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
                return HTTP.get(f"{url}/healthz", timeout=1).status_code == 200
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


def test_a_worker_whose_redis_restarted_while_its_model_loaded_leaves_a_live_workers_job_to_it(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # helper-59: Redis restarted while a worker loaded its model (minutes on a GPU host), with no
    # call of the new worker's to fail: back before the load ended, every call after it answered,
    # and the worker took Redis for untroubled. RQ's maintenance as its loop began found a live
    # worker's lease lapsed in the outage, not yet renewed (every third of a lease), and re-queued
    # its running job. In-process: the load restarts a Redis of the test's own; RQ's loop is its
    # first maintenance only.
    from types import SimpleNamespace

    from rq import Queue, Retry
    from rq.serializers import JSONSerializer

    import worker.main as worker_main
    from latentd.contract import JOB_FUNCTION
    from tests.conftest import RedisServer
    from worker.config import WorkerSettings

    server = RedisServer(tmp_path / "redis")
    server.start()
    held = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        r = server.client()
        queue = Queue(Keys.queue_name("m"), connection=r, serializer=JSONSerializer)
        queue.enqueue(JOB_FUNCTION, {"prompt": "x"}, job_id="live", retry=Retry(max=1))
        r.lrem(queue.key, 1, "live")
        r.hset("rq:job:live", mapping={"status": "started", "worker_name": "other"})
        # The live worker's lease: renewed just now, lapsing in 2 s (the outage outlasts it).
        r.zadd(queue.started_job_registry.key, {"live:run": time.time() + 2})

        def load(settings: WorkerSettings) -> object:
            server.stop()  # Redis restarts during the load, and is back before it ends
            time.sleep(3)
            server.start()
            return SimpleNamespace(model="m", device="cpu", native_size=64, weights=None)

        first_pass: list[bool] = []

        def work(self: worker_main.LatentdWorker, **_: object) -> bool:
            first_pass.append(self.may_reap())
            self.clean_registries()  # RQ's maintenance as its loop begins
            return False

        monkeypatch.setattr(worker_main, "load_runner", load)
        monkeypatch.setattr(worker_main.LatentdWorker, "work", work)
        monkeypatch.setattr(worker_main.Heartbeat, "start", lambda self: None)
        monkeypatch.setattr(worker_main.gc, "freeze", lambda: None)
        settings = WorkerSettings(
            redis_url=server.url, model="m", lease_seconds=30, heartbeat_interval=1.0, worker_name="late"
        )
        assert worker_main.run(settings) == 0
        assert first_pass == [False], "reaping at once after a Redis restart it never saw"
        assert r.hget("rq:job:live", "status") == b"started"
    finally:
        for s, handler in held.items():
            signal.signal(s, handler)
        server.stop()


def _start_only(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """`worker.main.run` made its start alone, in-process: a stand-in model, no heartbeat thread, and
    for RQ's loop a look at whether the worker may reap (False after Redis trouble), returned."""
    from types import SimpleNamespace

    import worker.main as worker_main

    looks: list[bool] = []

    def work(self: worker_main.LatentdWorker, **_: object) -> bool:
        looks.append(self.may_reap())
        return False

    model = SimpleNamespace(model="m", device="cpu", native_size=64, weights=None)
    monkeypatch.setattr(worker_main, "load_runner", lambda settings: model)
    monkeypatch.setattr(worker_main.LatentdWorker, "work", work)
    monkeypatch.setattr(worker_main.Heartbeat, "start", lambda self: None)
    monkeypatch.setattr(worker_main.gc, "freeze", lambda: None)
    return looks


@pytest.mark.parametrize("redis_was", ["frozen", "full"])
def test_a_worker_that_starts_while_redis_is_frozen_or_full_waits_for_it(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, redis_was: str
) -> None:
    # Frozen (SIGSTOP: connections taken, no reply) as a worker began, it gave up as if no Redis were
    # there, exit 4; full (maxmemory), its mark of the load was refused, exit 4. Both pass, and
    # under `latentd up` a worker that ends before it is ready stops everything. Short timeouts
    # stand in for the worker's own (15 s a reply, 30 s to reach Redis).
    import worker.main as worker_main
    from tests.conftest import RedisServer
    from worker.config import WorkerSettings

    server = RedisServer(tmp_path / "redis")
    server.start()
    assert server.proc is not None
    r = server.client()
    looks = _start_only(monkeypatch)
    monkeypatch.setattr(worker_main.LatentdWorker, "connection_timeout", 1)
    monkeypatch.setattr(worker_main, "_connect", functools.partial(worker_main._connect, wait=1.0))
    held = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    if redis_was == "frozen":
        server.proc.send_signal(signal.SIGSTOP)
        back = threading.Timer(4, server.proc.send_signal, [signal.SIGCONT])
    else:
        r.config_set("maxmemory", 1)  # noeviction: writes refused
        back = threading.Timer(4, r.config_set, ["maxmemory", 0])
    back.start()
    try:
        settings = WorkerSettings(
            redis_url=server.url, model="m", lease_seconds=30, heartbeat_interval=1.0, worker_name="w"
        )
        with caplog.at_level(logging.INFO, logger="latentd.worker"):
            assert worker_main.run(settings) == 0
    finally:
        back.cancel()
        server.proc.send_signal(signal.SIGCONT)
        for s, handler in held.items():
            signal.signal(s, handler)
        server.stop()
    assert "redis_away" in caplog.text and "worker_ready" in caplog.text
    assert looks == [False], "reaping at once after a start that waited for Redis"


# The worker's timeouts for Redis made short (15 s a reply, 30 s to reach it).
SHORT_REDIS_TIMEOUTS = """
import functools

import worker.main

worker.main.LatentdWorker.connection_timeout = 1
worker.main._connect = functools.partial(worker.main._connect, wait=1.0)
"""


def test_a_worker_waiting_for_a_frozen_redis_as_it_starts_stops_at_once_when_asked(
    tmp_path: pathlib.Path, tiny_model_dir: pathlib.Path
) -> None:
    from tests.conftest import RedisServer

    server = RedisServer(tmp_path / "redis")
    server.start()
    assert server.proc is not None
    server.proc.send_signal(signal.SIGSTOP)
    env = base_env(
        server.url,
        LATENTD_MODEL=str(tiny_model_dir),
        LATENTD_TORCH_THREADS="1",
        PYTHONPATH=sitecustomize(tmp_path, SHORT_REDIS_TIMEOUTS),
    )
    worker = spawn(["worker"], env, tmp_path / "worker.log")
    try:
        wait_until(
            lambda: "redis_away" in worker.output() or worker.proc.poll() is not None, 60, what="the wait"
        )
        time.sleep(3)  # three times the time it had to reach Redis
        assert worker.proc.poll() is None, worker.output()
        asked = time.monotonic()
        worker.proc.terminate()
        assert worker.proc.wait(30) == 0
        assert time.monotonic() - asked < 5, worker.output()
    finally:
        worker.stop()
        server.proc.send_signal(signal.SIGCONT)
        server.stop()
    assert "Traceback" not in worker.output()


# Redis (its pid in REDIS_PID) frozen as RQ's loop begins, once the worker has said it is ready.
FROZEN_AS_RQS_LOOP_BEGINS = """
import os
import signal

import worker.main

_work = worker.main.LatentdWorker.work


def work(self, **kwargs):
    os.kill(int(os.environ["REDIS_PID"]), signal.SIGSTOP)
    return _work(self, **kwargs)


worker.main.LatentdWorker.work = work
"""


def test_a_worker_asked_to_stop_as_its_loop_begins_with_redis_frozen_stops_within_seconds(
    tmp_path: pathlib.Path, tiny_model_dir: pathlib.Path
) -> None:
    # The stop was kept for RQ's loop, whose start (registration, channel, state, maintenance) sent
    # its calls first, each waiting out the 15 s socket timeout, then two goodbyes of 5 s: 70 s,
    # past a container's stop grace (Docker's: 10 s), and the worker was killed.
    from tests.conftest import RedisServer

    server = RedisServer(tmp_path / "redis")
    server.start()
    assert server.proc is not None
    injected = sitecustomize(tmp_path, FROZEN_AS_RQS_LOOP_BEGINS)
    worker = start_worker(
        server.url, tiny_model_dir, tmp_path, PYTHONPATH=injected, REDIS_PID=str(server.proc.pid)
    )
    try:
        time.sleep(1)  # in RQ's registration, kept waiting
        asked = time.monotonic()
        worker.proc.terminate()
        assert worker.proc.wait(90) == 0, worker.output()
        assert time.monotonic() - asked < 8, worker.output()
    finally:
        worker.stop()
        server.proc.send_signal(signal.SIGCONT)
        server.stop()
    assert "Traceback" not in worker.output()


def test_a_worker_start_at_a_server_that_drops_the_connection_is_not_a_redis_away() -> None:
    # A redis:// URL at a TLS-only Redis (a managed one's usual port), or another server that takes
    # the connection and closes it: nothing there will ever answer, and the start says so (exit 4)
    # rather than wait on it as on a frozen Redis, unseen.
    import worker.main as worker_main

    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def drop() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                conn.recv(64)

    threading.Thread(target=drop, daemon=True).start()
    try:
        with pytest.raises(redis.ConnectionError):
            worker_main._connect(f"redis://127.0.0.1:{port}/0", wait=1.0)
    finally:
        listener.close()
