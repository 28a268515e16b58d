"""A worker asked to stop finishes what it runs first (a whole batch), takes nothing new and exits
0; a stop is never lost, whether Redis is up, gone or frozen; past its grace a job goes to
another worker."""

from __future__ import annotations

import os
import signal
import time

import pytest

from latentd.contract import Keys
from tests.conftest import (
    HTTP,
    LEASE,
    LONG_JOB,
    TINY_MODEL,
    Cluster,
    base_env,
    sitecustomize,
    spawn,
    start_api,
    start_worker,
    wait_until,
)

pytestmark = pytest.mark.integration


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
        job_id = HTTP.post(f"{url}/v1/generations", json={"prompt": "after", "steps": 1}).json()["id"]
        assert cluster.wait_terminal(job_id)["status"] == "succeeded"
    finally:
        api.stop()
        worker.stop()


# RQ's loop meets an error it does not handle, and quits.
RQ_QUITS = """
import sys
import time

from rq.worker.base import BaseWorker

register_death = BaseWorker.register_death


def dequeue_job_and_maintain_ttl(self, *args, **kwargs):
    time.sleep(2)  # past the test's look at the ready worker
    raise RuntimeError("injected")


def slow_goodbye(self):
    print("saying goodbye", file=sys.stderr, flush=True)
    time.sleep(2)  # for the test's stop signal to land in it
    register_death(self)


BaseWorker.dequeue_job_and_maintain_ttl = dequeue_job_and_maintain_ttl
BaseWorker.register_death = slow_goodbye
"""


def test_a_worker_whose_rq_loop_quits_unasked_exits_1(cluster: Cluster) -> None:
    # It exited 0, as if asked to stop: a supervisor that restarts on failure left it down. A stop
    # signal in the goodbye that follows raised RQ's StopRequested there: a traceback, the goodbye
    # left half done.
    path = sitecustomize(cluster.tmp, RQ_QUITS)
    worker = start_worker(cluster.redis.url, cluster.model_dir, cluster.tmp, name="a", PYTHONPATH=path)
    wait_until(lambda: "saying goodbye" in worker.output(), 30, what="RQ's goodbye")
    worker.proc.send_signal(signal.SIGTERM)
    assert worker.proc.wait(30) == 1, worker.output()[-3000:]
    assert "found an unhandled exception, quitting" in worker.output()
    assert "Traceback" not in worker.output().split("saying goodbye")[1]
    assert cluster.redis.client().hexists("rq:worker:a", "death")  # the goodbye was said


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


def test_the_command_takes_a_stop_before_it_imports_its_settings() -> None:
    # Ctrl-C in the first 0.3 s of `latentd up` (or api, worker) printed a KeyboardInterrupt
    # traceback: importing latentd.cli imported pydantic before any handler was in place.
    import subprocess
    import sys

    script = "import sys, latentd.cli; print(sorted(m for m in ('pydantic', 'redis') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_the_command_takes_a_stop_before_anything_it_runs_imports(monkeypatch: pytest.MonkeyPatch) -> None:
    from latentd import cli

    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT)}
    seen: list[object] = []

    def run(args: object) -> int:  # what `main` hands the command to, imports and all
        seen.append(signal.getsignal(signal.SIGTERM))
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_run", run)
    try:
        assert cli.main(["api"]) == 130  # quietly, as for keys and generate
        assert seen and seen[0] not in (signal.SIG_DFL, handlers[signal.SIGTERM])
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
