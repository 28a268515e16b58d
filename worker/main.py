"""The worker process: load the pipeline once, announce it, then serve its model's queue."""

from __future__ import annotations

import contextlib
import functools
import gc
import logging
import math
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import diffusers.utils.logging
import redis
import transformers.utils.logging
from rq import Queue, SimpleWorker, worker_registration
from rq.exceptions import AbandonedJobError, DeserializationError, StopRequested
from rq.job import Job
from rq.rate_limit import RateLimitRegistry
from rq.registry import DeferredJobRegistry, FailedJobRegistry, FinishedJobRegistry, ReadyJobRegistry
from rq.serializers import JSONSerializer
from rq.timeouts import JobTimeoutException, UnixSignalDeathPenalty
from rq.utils import now, utcformat
from rq.worker import WorkerStatus

from latentd import reaping
from latentd.contract import JobPayload, Keys, WorkerInfo
from latentd.logs import event
from latentd.settings import shown_url
from latentd.store import (
    UnsafeRedis,
    as_text,
    check_eviction_policy,
    live_workers,
    redis_away,
    warn_if_keeps_nothing,
)
from worker import jobs
from worker.config import WorkerSettings
from worker.pipeline import DeviceBroken, ModelLoadError, batch_key, first_line, load_runner

log = logging.getLogger("latentd.worker")

T = TypeVar("T")
EXIT_MODEL_LOAD_FAILED = 3
EXIT_REDIS_UNREACHABLE = 4  # no connection made at start; or unsafe (it may evict jobs), or a replica
EXIT_DEVICE_BROKEN = 70
EXIT_NAME_TAKEN = 5
EXIT_RQ_QUIT = 1  # RQ's loop met an error it does not handle ("found an unhandled exception, quitting")
# What RQ's maintenance says of a job left in a queue's intermediate list for over a minute.
STUCK_IN_INTERMEDIATE_QUEUE = "Job was stuck in intermediate queue."

# A batch's claim of a queued job: off its queue and onto the queue's intermediate list in one
# step, as RQ's own dequeue moves a job, so that a worker that dies before it starts the job
# leaves it where the reaper finds it (`LatentdWorker.handle_job_failure`). KEYS: the queue, its
# intermediate list; ARGV: the job id. Returns 1, or 0 where another worker took it first.
_CLAIM = """
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 0 then return 0 end
redis.call('RPUSH', KEYS[2], ARGV[1])
return 1
"""


def payload_of(job: Any) -> JobPayload:
    """The job's payload; ValueError (pydantic's ValidationError is one) when unreadable."""
    try:
        return JobPayload.model_validate(job.args[0])
    except (IndexError, TypeError, DeserializationError) as exc:
        raise ValueError(f"job {job.id} carries no payload") from exc


class BatchTimeLimit(UnixSignalDeathPenalty):
    """RQ's time limit on the job it performs. A batch runs inside its first job, so it gets the
    time its `jobs` would have had, run one after another: that many times the job time limit."""

    jobs = 1
    # When the limit set is due, and the limit, until it is lifted: the limit's signal is handled
    # only once the main thread runs Python again (`LatentdWorker._exit_if_stuck` watches for a job
    # that runs on past it, in a call that never returns or having swallowed it).
    due: float | None = None
    limit = 0

    def __init__(self, timeout: int, exception: Any = JobTimeoutException, **kwargs: Any) -> None:
        super().__init__(timeout * self.jobs if timeout > 0 else timeout, exception, **kwargs)

    def setup_death_penalty(self) -> None:
        BatchTimeLimit.due = time.monotonic() + self._timeout if self._timeout > 0 else None
        BatchTimeLimit.limit = self._timeout
        super().setup_death_penalty()

    def cancel_death_penalty(self) -> None:
        BatchTimeLimit.due = None
        super().cancel_death_penalty()


class LatentdWorker(SimpleWorker):
    """RQ's in-process worker, plus what it lacks for GPU jobs.

    - a lease: while a job runs, a thread renews the job's execution heartbeat in RQ's
      StartedJobRegistry every third of `lease_seconds`; a killed or frozen worker stops
      renewing it and another worker's `Heartbeat.reap` re-queues the job (RQ's retry) or fails it;
    - cancellation recorded the way RQ records a stopped job;
    - real job errors are not retried: retries are for lost workers only;
    - a batch: jobs claimed into the call of the job it performs (`execute_job`).
    """

    death_penalty_class = BatchTimeLimit
    lease_seconds = 30
    longest_lease = 0  # of any worker's, as Redis last said (`reaping.longest_lease`)
    shutdown_grace = 600.0
    max_batch_images = 1
    batch_wait = 0.005
    job_ttl = 86_400
    ready_file: Path | None = None
    _had_company = False  # whether other jobs were queued at the last pickup that looked

    def __init__(self, *args: Any, model: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.model = model
        # RQ's own registry maintenance passes these handlers for abandoned jobs too.
        self.push_exc_handler(self.on_abandoned)

    def on_abandoned(self, job: Any, exc_type: Any, *_: Any) -> None:
        """RQ calls this for a job whose lease lapsed, before it re-queues or fails it."""
        if exc_type is AbandonedJobError:
            reaping.handle_abandoned(self.connection, job, self.model, self.job_ttl)

    def run_maintenance_tasks(self) -> None:
        """RQ's, left for its next turn while Redis is out of reach. RQ's loop runs it as the
        worker starts, and between jobs every 10 minutes, where an error ends the loop: a worker
        whose Redis went away then quit (exit 1), as one starting beside a Redis restart did."""
        if self._stop_requested:  # as the loop began: left to the workers that stay (`bootstrap`)
            return
        with self._riding_out():  # the wait for work that comes next waits for Redis
            super().run_maintenance_tasks()

    def check_for_suspension(self, burst: bool) -> None:
        """RQ's (`rq suspend`), passed while Redis is out of reach, for the same reason."""
        with self._riding_out():
            super().check_for_suspension(burst)

    def dequeue_job_and_maintain_ttl(self, timeout: int | None, max_idle_time: int | None = None) -> Any:
        """RQ's wait for work, which waits out only Redis out of reach: one that refuses the wait's
        move (full, turned replica) ended RQ's loop, and the worker exited 1. Waited out here too;
        a stop request ends the wait (`heartbeat`, at the start of RQ's)."""
        wait = functools.partial(super().dequeue_job_and_maintain_ttl, timeout, max_idle_time)
        return _once_redis_answers(wait, self.redis_trouble)

    @contextlib.contextmanager
    def _riding_out(self, quietly: bool = True) -> Iterator[None]:
        """Redis away inside (`redis_away`: out of reach, full, a replica...) is noted
        (`redis_trouble`) and passed over; logged unless `quietly`, where the next wait says so."""
        try:
            yield
        except redis.RedisError as exc:
            if not redis_away(exc):
                raise
            self.redis_trouble()
            if not quietly:
                _say_redis_away(exc)

    def _until_redis_answers(self, what: str, call: Callable[[], Any]) -> Any:
        """`call()`, sent again while Redis is away, for RQ's records of a job: raised, RQ took an
        error in its start or its end for the job's failure (a job whose images were stored ended
        `failed`), or ended its loop (exit 1). A stop request leaves the job to its lease."""
        return jobs.resent_while_away(call, what, lambda: self._stop_requested, self._leave_the_job)

    def clean_registries(self) -> None:
        """RQ's maintenance (as its loop begins, then every 10 minutes) hands each queue's expired
        jobs to RQ, as the heartbeat's reaper does: under the reaper's lock, so that the two never
        re-queue one job twice. While the lock is held it waits: RQ tries again at its next turn.

        RQ's own (`Worker.clean_registries`), but with leases lapsed as of before its first call to
        Redis, as `may_reap` found it: RQ read the time after its first calls, and a Redis frozen in
        them (from just after `may_reap` looked) had let live workers' leases lapse unrenewed as it
        woke; their running jobs ran again (helper-61)."""
        if not self.may_reap():
            return  # RQ asks again at its next turn
        as_of = time.time()
        names = [queue.name for queue in self.queues]
        with reaping.reaper_locks(self.connection, names, self.name) as taken:
            if len(taken) < len(names):
                return
            for queue in self.queues:
                if not queue.acquire_maintenance_lock():
                    continue
                self.log.info("Worker %s: cleaning registries for queue: %s", self.name, queue.name)
                reaping.reap(queue, self.job_ttl, self.on_abandoned, as_of)
                for registry in (
                    FinishedJobRegistry,
                    FailedJobRegistry,
                    DeferredJobRegistry,
                    ReadyJobRegistry,
                ):
                    registry(
                        name=queue.name,
                        connection=queue.connection,
                        job_class=queue.job_class,
                        serializer=queue.serializer,
                    ).cleanup()
                for limits in RateLimitRegistry.all(queue.connection):
                    limits.cleanup()
                worker_registration.clean_worker_registry(queue)
                queue.intermediate_queue.cleanup(self, queue)
                queue.release_maintenance_lock()
        self.last_cleaned_at = now()  # type: ignore[assignment]  # RQ leaves it unannotated (None)

    def handle_exception(self, job: Any, *exc_info: Any) -> None:
        # The job function already logged one structured line (and a traceback where it
        # helps); RQ's default would add a traceback for every canceled or failed job.
        self.on_abandoned(job, *exc_info)

    def stop_on_signals(self) -> None:
        """Take SIGTERM and SIGINT as a stop request from now on. RQ installs its own handlers
        only once `work()` has registered the worker; a signal before that would kill the
        process outright (exit -15, its ready file left behind). Set here, the request is kept
        and RQ's loop ends before its first dequeue."""

        def early_stop(signum: int, frame: Any) -> None:
            self._stop_requested = True
            if self._starting:
                raise StopRequested()  # `bootstrap`

        signal.signal(signal.SIGTERM, early_stop)
        signal.signal(signal.SIGINT, early_stop)

    _starting = False  # in RQ's bootstrap, which a stop request ends

    def bootstrap(self, *args: Any, **kwargs: Any) -> None:
        """RQ's start of its loop (its registration, its channel for commands, its state), ended by a
        stop request, before or during it: with Redis frozen each of its calls waited out the socket
        timeout, and a worker asked to stop as its loop began took 70 s to. The loop then ends
        before its first dequeue, as RQ's own handler makes it do once installed."""
        self._starting = True
        try:
            if not self._stop_requested:
                super().bootstrap(*args, **kwargs)
        except StopRequested:
            pass
        finally:
            self._starting = False

    # An idle worker waits on its queue this many seconds at a time (RQ: 405), so that it looks at
    # its stop flag that often (`heartbeat`); and gives up on a Redis reply after this many, as RQ
    # derives it. RQ's own, 415 s, held a connection that had gone dead without a reset (a host
    # gone, a failover) that long, in the wait or in a job. Every call outside the wait's retries
    # rides out the timeout as it does Redis gone (`heartbeat`, `set_state`, `execute_job`...).
    dequeue_timeout = 5
    connection_timeout = dequeue_timeout + 10
    # With Redis gone, the longest pause between attempts to reach it (RQ: 60): a worker serves
    # again within seconds of Redis's return, and sees a stop request as soon (`heartbeat`).
    max_connection_wait_time = 5.0
    _handed_a_job = False  # by the wait that just ended; it runs before a stop
    # No lease counts as lapsed before this (`time.monotonic()`): while Redis was out of reach no
    # worker could renew one, and each gets a lease's time after to do so (`redis_trouble`).
    reap_from = 0.0
    # When the heartbeat last beat (`time.monotonic()`), and how long after it the next is late.
    beaten = 0.0
    beat_late = math.inf
    _held: dict[str, Any] = {}

    def heartbeat(self, timeout: int | None = None, pipeline: Any = None) -> None:
        """RQ's, where an idle worker asked to stop stops. RQ's loop waits for work until a job
        comes, and reaches a stop request only as the StopRequested its signal handler raises,
        wherever the main thread is; one raised inside code that catches every exception was lost
        (logging's, see `_let_stops_through_logging`), and an idle worker went on waiting for
        good (seen with Redis down, the flag set). RQ's loop calls this before each wait, after a
        wait that took a job (which runs first), and after each job."""
        if (
            self._stop_requested
            and pipeline is None
            and not self._handed_a_job
            and self.get_state() == WorkerStatus.IDLE
        ):
            raise StopRequested()
        # Not raised: outside RQ's wait for work (after the wait, after each job) it ended RQ's
        # loop and the worker exited 1; inside it, the wait's own call finds the trouble too.
        with self._riding_out():
            super().heartbeat(timeout, pipeline)

    def set_state(self, state: str, pipeline: Any = None) -> None:
        """RQ's note of the worker's state (idle, busy) for `rq info`, left for the next one while
        Redis is out of reach: RQ's loop sets it before its wait for work, outside the wait's
        retries, and an error there ended the loop (exit 1)."""
        with self._riding_out():
            super().set_state(state, pipeline)

    def redis_trouble(self) -> None:
        """Redis was out of reach just now (this worker's wait, lease thread or reaper found it):
        no reaping for the longest lease any worker holds jobs under (a live worker renews its own
        every third of its lease once Redis is back)."""
        self.reap_from = time.monotonic() + max(self.lease_seconds, self.longest_lease)

    def may_reap(self) -> bool:
        """Whether lapsed leases may count as their workers' deaths: not within a lease of an
        outage (a live worker's reaper, or RQ's maintenance, took live workers' jobs for lost), nor
        while this worker's heartbeat is late: kept waiting by a frozen Redis, which RQ's maintenance
        in the main thread met as it woke, before the heartbeat could say so (`Heartbeat._stalled`)."""
        now = time.monotonic()
        return now >= self.reap_from and now - self.beaten < self.beat_late

    def reorder_queues(self, reference_queue: Any) -> None:
        self._handed_a_job = True  # RQ's wait calls this as it hands the worker a job
        super().reorder_queues(reference_queue)

    ended_unasked = False  # RQ's loop ended on an error, no stop asked (`run`: exit 1)

    def teardown(self) -> None:
        # RQ's goodbye on a client that gives up in seconds: a stalled Redis (frozen, swapping)
        # held a stopping worker 415 s a call, past any stop grace; its records lapse on their own.
        self.connection = _quick(self.connection)
        self.ended_unasked = not self._stop_requested
        # A stop asked from here on is kept, not raised: RQ's handler raised StopRequested inside
        # the goodbye, which it left half said, and out of `work` (a traceback).
        self.stop_on_signals()
        super().teardown()

    def request_stop(self, signum: Any, frame: Any) -> None:
        # RQ's warm shutdown: finish the current job, take no new one. Bound the wait.
        self._stop_requested = True  # kept even where RQ's StopRequested is raised and caught
        # `executions`, not RQ's `execution`: this worker's own, with no round trip to a Redis that
        # may be gone (asked with Redis down, RQ's property raised inside this handler).
        if self.executions and not getattr(self, "_grace_timer", None):
            self._grace_timer = threading.Timer(self.shutdown_grace, self._grace_expired)
            self._grace_timer.daemon = True
            self._grace_timer.start()
        super().request_stop(signum, frame)

    def request_force_stop(self, signum: int, frame: Any) -> None:
        """A second stop request (Ctrl-C twice). RQ's cold stop raises SystemExit inside the job,
        and RQ then records the job failed; the job is left to its lease instead, as when the
        grace runs out."""
        asked = self._shutdown_requested_date
        if not self.executions or asked is None or (now() - asked).total_seconds() < 1:
            super().request_force_stop(signum, frame)  # no job; or a duplicate signal, ignored
            return
        self._leave_the_job("cold_shutdown")

    def set_shutdown_requested_date(self) -> None:
        with contextlib.suppress(redis.RedisError):  # a note for `rq info`; raised, it reached the job
            super().set_shutdown_requested_date()

    def register_birth(self) -> None:
        """RQ's, as its loop begins (outside its retries), waiting while Redis is away: raised, it
        was a traceback and exit 1. A stop request ends the wait, and RQ's loop then ends."""
        tried = False
        while not self._stop_requested:
            try:
                super().register_birth()
                return
            except ValueError:  # "an active worker named ...": after a lost reply, this one
                if not tried:
                    raise
                return
            except redis.RedisError as exc:
                if not redis_away(exc):
                    raise
                tried = True
                self.redis_trouble()
                time.sleep(1)

    def subscribe(self) -> None:
        """RQ's channel for `rq` commands to this worker (latentd sends none): left out if Redis
        is away as the loop begins, where raised it ended the worker (exit 1)."""
        with self._riding_out(quietly=False):
            super().subscribe()

    def register_death(self) -> None:
        """RQ's goodbye. With Redis gone it raised, and a worker stopped then exited 1 with a
        traceback; its records lapse on their own (the heartbeat's in seconds, RQ's in minutes)."""
        try:
            super().register_death()
        except redis.RedisError as exc:
            self.goodbye_unheard = isinstance(exc, redis.TimeoutError)
            event(log, "worker_death_unrecorded", logging.WARNING, error=type(exc).__name__)

    goodbye_unheard = False  # `register_death` waited for Redis in vain: frozen, or its host gone

    def unsubscribe(self) -> None:
        """RQ's, but the pubsub's socket is not closed under its thread: with Redis frozen, the
        thread outlived RQ's 1 s join, and the close raised in it (a traceback at every such stop).
        The thread closes it as it ends; it is a daemon, gone with the process."""
        thread = self.pubsub_thread
        if thread is None:
            return
        with contextlib.suppress(redis.RedisError):  # gone with Redis
            self.pubsub.unsubscribe()
        thread.stop()
        thread.join(timeout=1)
        if not thread.is_alive():
            self.pubsub.close()

    def _grace_expired(self) -> None:
        if self.executions:
            self._leave_the_job("shutdown_grace_expired", grace=self.shutdown_grace)

    def _leave_the_job(self, why: str, **fields: Any) -> None:
        # Exit without a word to Redis: the job's lease lapses, and another worker re-runs it.
        jobs_left = ",".join(e.job_id for e in list(self.executions.values()))
        event(log, why, logging.WARNING, job_ids=jobs_left, **fields)
        if self.ready_file:
            self.ready_file.unlink(missing_ok=True)
        logging.shutdown()
        os._exit(0)

    def get_heartbeat_ttl(self, job: Any, working_time: float = 0.0) -> int:
        return self.lease_seconds

    def handle_job_failure(
        self,
        job: Any,
        queue: Any,
        started_job_registry: Any = None,
        exc_string: str = "",
        execution: Any = None,
    ) -> None:
        if exc_string == STUCK_IN_INTERMEDIATE_QUEUE:
            # Its worker died between taking it off the queue and starting it: it never ran. RQ
            # would fail it (and we allow no retries); it goes back to the head of its queue. Taken
            # off the intermediate list first: RQ's maintenance and a heartbeat may both find it.
            # In one step: between RQ's LREM and its enqueue, a cancel found the job queued on no
            # list, and canceled it; the enqueue then saved it queued again.
            keys = (queue.intermediate_queue_key, queue.intermediate_queue.get_first_seen_key(job.id))
            if self.connection.eval(_REQUEUE_TAKEN, 4, *keys, job.key, queue.key, job.id):
                event(log, "job_requeued", logging.WARNING, job_id=job.id, reason="taken_but_never_started")
            return
        rt = jobs.current()
        if rt.lost_job_id == job.id:
            # Another worker owns the job now: drop only our own execution record.
            rt.lost_job_id = None
            self._drop_execution(job, execution)
            return
        stopped = self._stopped_job_id
        if rt.stopped_job_id == job.id:
            stopped = job.id  # RQ then marks it STOPPED, never retried
            rt.stopped_job_id = None
        fail = functools.partial(
            super().handle_job_failure,
            job, queue, started_job_registry=started_job_registry, exc_string=exc_string, execution=execution,
        )  # fmt: skip

        def record() -> None:
            self._stopped_job_id = stopped  # RQ clears it as it writes
            job.retries_left = 0
            fail()
            # RQ logs a failure it could not write, and goes on: the job stayed started, its lease
            # unrenewed, and its reaper ran it again or failed it `worker_lost`. Read back.
            status, owner = self.connection.hmget(job.key, "status", "worker_name")
            if status == b"started" and owner == self.name.encode():
                raise redis.ConnectionError("RQ could not record the job's failure")

        self._until_redis_answers("rq_failure", record)

    # RQ's records of a job's start and end, each sent again while Redis is away (`_until_redis_answers`).
    def prepare_job_execution(self, job: Any, remove_from_intermediate_queue: bool = False) -> None:
        start = functools.partial(super().prepare_job_execution, job, remove_from_intermediate_queue)
        self._until_redis_answers("rq_start", start)
        # RQ's perform_job then says it started again, a moment later, and saves that with its end:
        # `started_at` read while it ran changed once it ended. A claimed job's start is its claim.
        if (rt := jobs.installed()) is not None:  # None: RQ's records driven without a pipeline (tests)
            rt.claimed_at.setdefault(job.id, job.started_at)

    def handle_execution_ended(self, job: Any, queue: Any, heartbeat_ttl: int) -> None:
        ended = functools.partial(super().handle_execution_ended, job, queue, heartbeat_ttl)
        self._until_redis_answers("rq_end", ended)

    def handle_job_success(self, job: Any, queue: Any, started_job_registry: Any, execution: Any) -> None:
        record = functools.partial(super().handle_job_success, job, queue, started_job_registry, execution)
        self._until_redis_answers("rq_success", record)

    def execute_job(self, job: Any, queue: Any) -> None:
        """SimpleWorker's execute_job, for a batch: the job, then each job claimed into its call.
        The worker is BUSY from before the claim until every job is settled, so a stop request
        (SIGTERM) anywhere in between waits for the batch; RQ would raise it in an IDLE worker,
        inside whatever runs, and fail a job it interrupts."""
        self._handed_a_job = False
        rt = jobs.current()
        try:
            execution = self.prepare_execution(job)  # the worker is BUSY from here
        except redis.RedisError as exc:
            if not redis_away(exc):
                raise
            # Redis went away since the wait handed the job over: it is left on its queue's
            # intermediate list, from where a reaper puts it back at the head of its queue a minute
            # on (`Heartbeat.reap`, `handle_job_failure`). Raised, it ended RQ's loop: exit 1.
            self.executions.clear()
            self.redis_trouble()
            event(log, "job_start_failed", logging.WARNING, job_id=job.id, error=type(exc).__name__)
            return
        claimed = self._claim_batch(job, queue) if self.max_batch_images > 1 else []
        rt.batch = claimed
        done = threading.Event()
        self._held = {j.id: j for j in (job, *(c.job for c in claimed))}
        lease = threading.Thread(target=self._renew_lease, args=(done,), name="latentd-lease", daemon=True)
        lease.start()
        try:
            BatchTimeLimit.jobs = 1 + len(claimed)
            self.perform_job(job, queue, execution)  # runs the batch; each claimed job's outcome is recorded
            BatchTimeLimit.jobs = 1
            rt.batch = []
            for c in claimed:  # RQ settles each as if it had run alone
                if isinstance(rt.settled.get(c.job.id), jobs.Lost):
                    # Another worker owns it now: RQ's perform_job would mark it started again,
                    # ours, for good. Drop only our own execution record.
                    del rt.settled[c.job.id]
                    self._drop_execution(c.job, c.execution)
                    continue
                rt.claimed_at[c.job.id] = c.job.started_at
                self.perform_job(c.job, queue, c.execution)
        finally:
            BatchTimeLimit.jobs = 1
            rt.batch = []
            rt.settled.clear()
            rt.claimed_at.clear()
            done.set()
            lease.join()
            self._held = {}
            self.set_state(WorkerStatus.IDLE)
        if rt.fatal:
            event(log, "device_broken_exiting", logging.ERROR, job_id=job.id)
            self.register_death()
            raise SystemExit(EXIT_DEVICE_BROKEN)

    def _drop_execution(self, job: Any, execution: Any) -> None:
        def drop() -> None:
            with self.connection.pipeline() as pipeline:
                self.cleanup_execution(job, pipeline=pipeline, execution=execution)
                pipeline.execute()

        self._until_redis_answers("rq_drop", drop)

    def cleanup_execution(self, job: Any, pipeline: Any, execution: Any = None) -> None:
        """RQ calls this in the transaction that ends a job (success, failure, retry, stop): wake the
        API's long-polls in it, so they answer as the job's status changes. A hint only: they
        re-read the job's record, so a job handed to another worker is not mistaken for ended."""
        super().cleanup_execution(job, pipeline=pipeline, execution=execution)
        pipeline.publish(Keys.ENDED, job.id)

    def _claim_batch(self, first: Any, queue: Queue) -> list[jobs.Claimed]:
        """Take queued jobs that can share `first`'s pipeline call, up to `max_batch_images`
        images, waiting at most `batch_wait` seconds for more. Others keep their place.

        The wait is only for company that is likely to come: when other jobs are queued at this
        pickup or were at the one before. A lone client's jobs, which find the queue empty each
        time, start at once."""
        try:
            payload = payload_of(first)
        except ValueError:
            return []
        zeros = jobs.current().runner.zeros_empty_negatives
        key = batch_key(payload, zeros)
        budget = self.max_batch_images - payload.num_images
        if budget <= 0:
            return []
        deadline = time.monotonic() + self.batch_wait
        claimed: list[jobs.Claimed] = []
        try:
            self._claim_into(queue, key, zeros, budget, deadline, claimed)
        except redis.RedisError as exc:
            if not redis_away(exc):
                raise
            # The batch runs with what it has; raised here, outside the job, it stopped the worker.
            event(log, "batch_claim_failed", logging.WARNING, job_id=first.id, error=type(exc).__name__)
        return claimed

    def _claim_into(
        self,
        queue: Queue,
        key: tuple[object, ...],
        zeros: bool,
        budget: int,
        deadline: float,
        claimed: list[jobs.Claimed],
    ) -> None:
        """`_claim_batch`'s loop: each job it claims goes into `claimed` at once."""
        company = False
        while budget > 0:
            ids = [as_text(i) for i in self.connection.lrange(queue.key, 0, 4 * self.max_batch_images)]
            company = company or bool(ids)
            for candidate in Job.fetch_many(ids, connection=self.connection, serializer=self.serializer):
                if candidate is None or budget <= 0:
                    continue
                try:
                    other = payload_of(candidate)
                except ValueError:  # not ours to batch; it runs (and fails) on its own
                    continue
                if batch_key(other, zeros) != key or other.num_images > budget:
                    continue
                if not self.connection.eval(_CLAIM, 2, queue.key, queue.intermediate_queue_key, candidate.id):
                    continue  # another worker took it first
                try:
                    execution = self.prepare_execution(candidate)
                except redis.RedisError:
                    # Not started: back to its queue from the intermediate list, a minute on. RQ
                    # keeps the execution it could not write among the worker's (busy for good).
                    for execution_id, each in list(self.executions.items()):
                        if each.job_id == candidate.id:
                            del self.executions[execution_id]
                    raise
                # Its execution written, it is this batch's: a job whose execution is in the started
                # registry is left out of the intermediate list's clean-up, to its lease (an attempt).
                self.prepare_job_execution(candidate, remove_from_intermediate_queue=True)
                claimed.append(jobs.Claimed(job=candidate, payload=other, execution=execution))
                budget -= other.num_images
            if budget <= 0 or time.monotonic() >= deadline or not (company or self._had_company):
                break
            time.sleep(0.002)
        self._had_company = company

    def _renew_lease(self, done: threading.Event) -> None:
        while not done.wait(self.lease_seconds / 3):
            self._exit_if_stuck()
            try:
                self.renew_leases()
            except redis.RedisError as exc:
                self.redis_trouble()
                event(
                    log,
                    "lease_renewal_failed",
                    logging.WARNING,
                    job_ids=",".join(self._held),
                    error=type(exc).__name__,
                )

    def _exit_if_stuck(self) -> None:
        """A batch still running well past its time limit (two leases, or a tenth of the limit if
        longer: a single torch operation under way finishes first): the main thread is inside one
        call that never returns to Python (a hung accelerator, a native deadlock), where no signal
        reaches it. The lease renewed on, the job read `running` for good and its worker held its
        device. Exit 70, as for a broken device: a supervisor starts the worker again, and the jobs'
        leases lapse, for another worker to run them again (an attempt each)."""
        due = BatchTimeLimit.due
        if due is None or time.monotonic() < due + max(2 * self.lease_seconds, BatchTimeLimit.limit / 10):
            return
        event(
            log,
            "job_stuck",
            logging.CRITICAL,
            job_ids=",".join(self._held),
            seconds_past_limit=round(time.monotonic() - due),
            note="its time limit cannot interrupt the call it is in; exiting for a restart",
        )
        if self.ready_file:
            self.ready_file.unlink(missing_ok=True)
        os._exit(EXIT_DEVICE_BROKEN)

    def renew_leases(self) -> None:
        """Renew the lease of each job this worker runs: its lease thread does every third of a
        lease, and its reaper before it looks for lapsed ones (after a Redis outage longer than a
        lease, the reaper found the worker's own running jobs lapsed and re-queued them)."""
        for execution in list(self.executions.values()):
            job = self._held.get(execution.job_id)
            if job is not None:
                self.maintain_heartbeats(job, execution)


class Heartbeat(threading.Thread):
    """Keeps this worker's registration alive (the API routes and lists models from it) and
    re-queues abandoned jobs, those whose worker stopped renewing their lease: of every model's
    queue, so the job of a model whose last worker died is not left `running` for good."""

    def __init__(self, worker: LatentdWorker, info: WorkerInfo, interval: float, queue: Queue) -> None:
        super().__init__(name="latentd-heartbeat", daemon=True)
        self.worker = worker
        self.connection = worker.connection
        self.info = info
        self.interval = interval
        self.queue = queue
        self._queues: dict[str, Queue] = {}
        self.failures = reaping.Failures(log)
        self.stopped = threading.Event()
        self._stalled_since = 0.0

    def beat(self) -> None:
        p = self.connection.pipeline(transaction=False)
        p.set(Keys.worker(self.info.name), self.info.model_dump_json(), ex=max(2, int(self.interval * 3)))
        p.sadd(Keys.WORKERS, self.info.name)
        p.hset(Keys.MODELS_SEEN, self.info.model, time.time())
        p.incr(Keys.BEATS)
        p.execute()

    def reap(self) -> None:
        """For each queue, one worker at a time hands RQ its expired executions: RQ retries them
        while retries are left, else fails them; we record why for the client. The lock is let go
        after the pass, for RQ's maintenance (`LatentdWorker.clean_registries`)."""
        renewed = time.monotonic()
        self.worker.renew_leases()  # its own running jobs are not abandoned, whatever their lease says
        self.worker.longest_lease = reaping.longest_lease(self.connection, self.worker.lease_seconds)
        others = reaping.model_queues(self.connection, self._queues)
        queues = [self.queue, *(q for q in others if q.key != self.queue.key)]

        stalled = functools.partial(self._stalled, renewed)

        def reap_one(queue: Queue) -> None:
            if stalled():  # looked at under the queue's lock, which Redis may have held up too
                return
            reaping.reap(queue, self.worker.job_ttl, self.worker.on_abandoned)
            # Jobs a dead worker had taken off the queue but not started (RQ does this only in its
            # maintenance, every 10 minutes): back to their queue after a minute.
            queue.intermediate_queue.cleanup(self.worker, queue)

        reaping.reap_each(self.connection, queues, self.info.name, self.failures, reap_one, stalled)

    def _stalled(self, since: float) -> bool:
        """Whether Redis kept this thread waiting a third of a lease or more since `since`: frozen
        or swapping, with no error to show for it (a freeze shorter than the socket timeout). No
        one could renew a lease meanwhile, and live workers' running jobs looked lapsed to the
        reaper that woke with Redis: they ran again, an attempt spent. As after an outage, there is
        no reaping for a lease (`redis_trouble`)."""
        if time.monotonic() - since < self.worker.lease_seconds / 3:
            return False
        if since != self._stalled_since:  # said once a pass
            self._stalled_since = since
            self.worker.redis_trouble()
            event(log, "redis_stalled", logging.WARNING, seconds=round(time.monotonic() - since, 1))
        return True

    def run(self) -> None:
        failing = False
        while not self.stopped.wait(self.interval):
            try:
                began = time.monotonic()
                self.beat()
                self._stalled(began)
                self.worker.beaten = time.monotonic()
                if failing:
                    event(log, "heartbeat_recovered")
                failing = False
                if self.worker.may_reap():
                    self.reap()
            except redis.RedisError as exc:
                if redis_away(exc):
                    self.worker.redis_trouble()
                if not failing:
                    event(log, "heartbeat_failed", logging.WARNING, error=type(exc).__name__)
                failing = True

    def stop(self, goodbye: bool = True) -> None:
        """The thread's end, and unless not `goodbye`, the registration's (a Redis that kept the
        worker's own goodbye waiting would keep this one as long, past a container's stop grace)."""
        self.stopped.set()
        if not goodbye:
            return
        try:
            p = _quick(self.connection).pipeline(transaction=False)
            p.delete(Keys.worker(self.info.name))
            p.srem(Keys.WORKERS, self.info.name)
            p.execute()
        except redis.RedisError:
            pass  # the registration expires on its own


def _connect(url: str, wait: float = 30.0) -> redis.Redis:
    """A client of the Redis at `url`, once it answers, or once a connection to it is made and it
    says it cannot serve for now (`redis_away`: frozen, loading its data, ...), which the start then
    waits out (`run`). The error where no connection is made within `wait` seconds: nothing
    listens at `url` (a wrong LATENTD_REDIS_URL, a Redis not started), which a supervisor's
    restart or a corrected setting mends, not a wait."""
    made = threading.Event()

    def handshake(conn: Any) -> None:  # redis-py's, once the socket is connected
        made.set()
        conn.on_connect()

    # The socket timeout RQ would set (it sets it only for connections made after it looked: this
    # first one kept redis-py's, shorter than the wait on the queue).
    connection = redis.Redis.from_url(
        url,
        socket_connect_timeout=2,
        socket_timeout=LatentdWorker.connection_timeout,
        health_check_interval=30,
        redis_connect_func=handshake,
    )
    deadline = time.monotonic() + wait
    while True:
        made.clear()
        try:
            connection.ping()
            return connection
        except redis.RedisError as exc:
            # A frozen Redis took the connection and did not answer: after 30 s the worker exited 4,
            # and under `latentd up` everything stopped. Credentials refused are no passing state.
            refused = isinstance(exc, redis.AuthenticationError | redis.exceptions.AuthorizationError)
            # A connection the server dropped unanswered is no Redis that will answer: a redis:// URL
            # at a TLS-only port, or another service's. Loading its data, it answered (BusyLoading).
            dropped = type(exc) is redis.ConnectionError
            if made.is_set() and redis_away(exc) and not refused and not dropped:
                return connection
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.5)


def _quick(connection: redis.Redis) -> redis.Redis:
    """A client of `connection`'s Redis whose calls give up within seconds."""
    pool = connection.connection_pool
    kwargs = {**pool.connection_kwargs, "socket_timeout": 5, "socket_connect_timeout": 2}
    return redis.Redis(connection_pool=redis.ConnectionPool(connection_class=pool.connection_class, **kwargs))


def _rq_says_its_failed_write_in_a_line(record: logging.LogRecord) -> bool:
    """RQ logs a job's failure it could not write to Redis with two tracebacks (the job's, then
    Redis's); the worker writes it again (`handle_job_failure`), and the job's own line has said
    why it failed."""
    if str(record.msg).startswith("Worker %s: failed to persist failure"):
        record.exc_info, record.exc_text = None, None
    return True


def _let_stops_through_logging() -> None:
    """logging's handlers catch every exception a line's write raises and print it as a 'Logging
    error': RQ's StopRequested, raised by its signal handler where the signal lands, was lost there
    when it landed in the line RQ logs at each attempt to reach a Redis that is gone."""
    for handler in logging.getLogger().handlers:
        report = handler.handleError

        def handle_error(
            record: logging.LogRecord, report: Callable[[logging.LogRecord], None] = report
        ) -> None:
            if isinstance(sys.exc_info()[1], StopRequested):
                raise
            report(record)

        handler.handleError = handle_error  # type: ignore[method-assign]


def _take_name(connection: redis.Redis, name: str, interval: float) -> bool:
    """Whether this process may register as worker `name`. A worker killed without a goodbye
    (SIGKILL, the OOM killer) leaves RQ's record of it alive for minutes, and RQ refuses a new
    worker of the same name, which a restarted container (the same host name, pid 1) has. That
    record is stale once the worker's own heartbeat has lapsed, or if the heartbeat names this
    very host and pid. False if a live worker holds the name."""
    rq_key = LatentdWorker.redis_worker_namespace_prefix + name
    deadline = time.monotonic() + max(2, interval * 3)  # the heartbeat's lifetime
    while connection.exists(rq_key) and not connection.hexists(rq_key, "death"):
        raw = connection.get(Keys.worker(name))
        mine = raw is not None and (info := WorkerInfo.model_validate_json(raw)).pid == os.getpid()
        if raw is None or (mine and info.hostname == socket.gethostname()):
            connection.hset(rq_key, "death", utcformat(now()))  # as RQ marks a death
            event(log, "stale_worker_record_cleared", logging.WARNING, worker=name)
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.5)
    return True


# A load's mark in MODELS_SEEN, and what it replaced (a worker that served the model lately).
_MARK_LOAD = """
local before = redis.call('HGET', KEYS[1], ARGV[1])
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return before
"""
# A job a dead worker had taken off its queue but not started, back at the head of its queue unless
# it was canceled meanwhile. KEYS: the intermediate list, its first-seen key, the job, the queue.
_REQUEUE_TAKEN = """
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 0 then return 0 end
redis.call('DEL', KEYS[2])
if redis.call('HGET', KEYS[3], 'status') ~= 'queued' then return 0 end
redis.call('LPUSH', KEYS[4], ARGV[1])
return 1
"""

# A failed load's mark taken back, unless another worker began to load the model since.
_FORGET_LOAD = """
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then return end
if ARGV[3] == '' then return redis.call('HDEL', KEYS[1], ARGV[1]) end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
"""


def _say_redis_away(exc: BaseException) -> None:
    event(log, "redis_away", logging.WARNING, error=f"{type(exc).__name__}: {first_line(exc)[:200]}")


def _redis_run(connection: redis.Redis) -> object:
    """The Redis server's run id, another after each restart; None where INFO is refused (an ACL,
    renamed away): restarts then go unseen."""
    try:
        return connection.info("server").get("run_id")
    except redis.ResponseError:
        return None


def _once_redis_answers(call: Callable[[], T], trouble: Callable[[], object] = lambda: None) -> T:
    """`call()`, tried again while Redis is away (`redis_away`), saying so once; `trouble()` at
    each time it is."""
    said = False
    while True:
        try:
            return call()
        except redis.RedisError as exc:
            if not redis_away(exc):
                raise
            trouble()
            if not said:
                _say_redis_away(exc)
                said = True
            time.sleep(1)


def _say_if_weights_differ(connection: redis.Redis, info: WorkerInfo) -> None:
    """Warn where live workers serve this model's name with other weights: an image then depends on
    the worker that ran its job, and its seed does not reproduce it. Advice: nothing stops."""
    if info.weights is None:
        return
    with contextlib.suppress(redis.RedisError, ValueError):
        others = sorted(
            f"{w.name}={w.weights}"
            for w in live_workers(connection)
            if w.model == info.model and w.name != info.name and w.weights not in (None, info.weights)
        )
        if others:
            event(
                log,
                "model_weights_differ",
                logging.WARNING,
                model=info.model,
                weights=info.weights,
                workers=",".join(others),
            )


def run(settings: WorkerSettings) -> int:
    """The worker's life after `latentd worker` has read its settings and configured logging."""
    _let_stops_through_logging()
    logging.getLogger("rq.worker").addFilter(_rq_says_its_failed_write_in_a_line)
    name = settings.effective_worker_name()
    began = time.monotonic()
    try:
        connection = _connect(settings.effective_redis_url)
    except redis.RedisError as exc:
        print(
            f"latentd worker: cannot reach Redis at {shown_url(settings.effective_redis_url)}: {exc}",
            file=sys.stderr,
        )
        return EXIT_REDIS_UNREACHABLE
    # Redis away from here until RQ's loop (frozen, loading its data, full, restarted...) is waited
    # for: before the load a frozen or full Redis ended the worker (exit 4, or a traceback); after it
    # (restarted, or loading its data, as the model loaded) a traceback (exit 1), and its model was
    # loaded again; under `latentd up` either stopped everything. A stop signal meanwhile ends it at
    # once (`latentd.cli`), as during the load. Away at any call of the start, frozen (a call kept
    # waiting a third of a lease, as `Heartbeat._stalled` counts it) or restarted since the load
    # began (no call of this worker's to fail), it is trouble as in RQ's loop (`redis_trouble`):
    # live workers' leases lapsed and not yet renewed, RQ's maintenance as the loop began re-queued
    # their running jobs.
    away = threading.Event()

    def answered(call: Callable[[], T]) -> T:
        began = time.monotonic()
        try:
            return _once_redis_answers(call, away.set)
        finally:
            if time.monotonic() - began >= settings.lease_seconds / 3:
                away.set()

    def mark_load() -> tuple[str, bytes]:
        loading = str(time.time())  # submits wait for the load (503, "loading?")
        try:
            before = connection.eval(_MARK_LOAD, 1, Keys.MODELS_SEEN, settings.served_name(), loading)
        except redis.ReadOnlyError as exc:
            # A replica, which a start meets where its URL names one, not in a failover's passing:
            # said and left to the person who set the URL (exit 4), not waited on unseen.
            raise UnsafeRedis(
                f"Redis at {shown_url(settings.effective_redis_url)} refuses writes: {exc}"
            ) from exc
        return loading, before or b""

    try:
        answered(functools.partial(check_eviction_policy, connection))
        answered(functools.partial(warn_if_keeps_nothing, connection, log))
        loading, before = answered(mark_load)
        redis_run = answered(functools.partial(_redis_run, connection))
    except UnsafeRedis as exc:
        print(f"latentd worker: {exc}", file=sys.stderr)
        return EXIT_REDIS_UNREACHABLE
    # Kept waiting a third of a lease in all before the load (out of reach at first): trouble too.
    waited = time.monotonic() - began >= settings.lease_seconds / 3
    try:
        runner = load_runner(settings)
    except ModelLoadError as exc:
        print(f"latentd worker: {exc}", file=sys.stderr)
        # Submits were told to wait for this load for an hour: now as before it began (400 for a
        # model no worker served lately).
        with contextlib.suppress(redis.RedisError):
            connection.eval(_FORGET_LOAD, 1, Keys.MODELS_SEEN, settings.served_name(), loading, before)
        return EXIT_DEVICE_BROKEN if isinstance(exc, DeviceBroken) else EXIT_MODEL_LOAD_FAILED
    # From here on diffusers' and transformers' warnings are about jobs, and quote their prompts
    # (the tokenizer's truncation notice: one batch of long prompts wrote a 700 kB line). Clients'
    # text stays out of the log; what loading had to say is said by now.
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()
    # torch, diffusers and the model are ~450,000 objects that live as long as the process. Kept out
    # of the collector: a full collection walked them for ~250 ms, inside some job's time.
    gc.collect()
    gc.freeze()
    if waited or answered(functools.partial(_redis_run, connection)) != redis_run:
        away.set()
    if not answered(functools.partial(_take_name, connection, name, settings.heartbeat_interval)):
        print(
            f"latentd worker: a live worker is named {name!r}; give this one another LATENTD_WORKER_NAME",
            file=sys.stderr,
        )
        return EXIT_NAME_TAKEN
    runtime = jobs.Runtime(runner=runner, connection=connection, settings=settings, worker_name=name)
    jobs.install(runtime)
    info = WorkerInfo(
        name=name,
        model=runner.model,
        device=str(runner.device),
        pid=os.getpid(),
        hostname=socket.gethostname(),
        started_at=time.time(),
        native_size=runner.native_size,
        weights=runner.weights or None,
    )
    _say_if_weights_differ(connection, info)
    queue = Queue(Keys.queue_name(runner.model), connection=connection, serializer=JSONSerializer)
    worker = answered(
        functools.partial(
            LatentdWorker,
            [queue],
            connection=connection,
            name=name,
            serializer=JSONSerializer,
            model=runner.model,
        )
    )
    worker.lease_seconds = settings.lease_seconds
    worker.shutdown_grace = settings.shutdown_grace
    worker.max_batch_images = settings.max_batch_images
    worker.batch_wait = settings.batch_wait_ms / 1000
    worker.job_ttl = settings.job_ttl
    worker.ready_file = settings.ready_file
    runtime.stop_requested = lambda: bool(worker._stop_requested)
    runtime.leave = worker._leave_the_job
    # Other reapers wait this worker's lease after an outage.
    answered(functools.partial(reaping.record_lease, connection, settings.lease_seconds))
    worker.longest_lease = answered(
        functools.partial(reaping.longest_lease, connection, settings.lease_seconds)
    )
    heartbeat = Heartbeat(worker, info, settings.heartbeat_interval, queue)
    answered(heartbeat.beat)
    worker.beaten = time.monotonic()
    worker.beat_late = settings.heartbeat_interval + settings.lease_seconds / 3
    if away.is_set():
        worker.redis_trouble()
    worker.stop_on_signals()  # before anyone is told the worker is ready
    heartbeat.start()
    # Said in the log before the file says it: a reader of both, woken by the file, finds the line.
    event(log, "worker_ready", worker=name, model=runner.model, queue=queue.name)
    if settings.ready_file:
        settings.ready_file.parent.mkdir(parents=True, exist_ok=True)
        settings.ready_file.write_text(name)
    code = 0
    try:
        worker.work(logging_level=settings.log_level.upper(), with_scheduler=False)
        if worker.ended_unasked:  # RQ logged the error it quit on
            code = EXIT_RQ_QUIT
    except SystemExit as exc:
        code = int(exc.code or 0)
    finally:
        heartbeat.stop(goodbye=not worker.goodbye_unheard)
        if settings.ready_file:
            settings.ready_file.unlink(missing_ok=True)
        event(log, "worker_stopped", worker=name, exit_code=code)
    return code
