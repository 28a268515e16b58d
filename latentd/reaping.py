"""Jobs whose worker stopped renewing their lease (killed, frozen): handed back to RQ, which
re-queues them while attempts are left and fails them after, with what the client is told
recorded beside. Live workers reap every model's queue; the API reaps when none is alive
(app/reaper.py). Needs Redis and RQ only: the API imports it."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import redis
from rq import Queue
from rq.exceptions import AbandonedJobError, NoSuchJobError
from rq.job import Job
from rq.job import JobStatus as RQStatus
from rq.serializers import JSONSerializer
from rq.utils import now

from latentd.contract import ErrorCode, JobError, JobStatus, Keys, StateField
from latentd.logs import event
from latentd.store import as_text, redis_away

log = logging.getLogger("latentd.reaper")

# The most a queue's reaper lock is held, should its holder die during a pass (a pass takes
# milliseconds): abandoned jobs then wait for it as long as for a lapsed lease.
REAPER_LOCK_MS = 30_000
_RELEASE = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"

# For a job on its last attempt whose worker stopped renewing its lease, as RQ is about to fail it:
# if its images are stored, it earns one start more (once), which settles it succeeded with them
# (worker/jobs.py `_START`); if not, a commit its worker makes after all (frozen, not dead) in the
# next `GIVEN_UP_SECONDS` is refused (`_COMMIT`), so the job does not end failed with its images
# stored. Past them, RQ has failed the job (the owner check refuses), or its write never landed and
# the job is still its worker's to finish.
# The grant is the abandoned run's (ARGV[1]): a pass cut short after it (a Redis error, a stop) and
# the pass after it grant it alike; a later run's abandonment (the settle start's own) does not.
_SETTLE_START = """
if redis.call('HEXISTS', KEYS[1], 'images') == 1 then
  redis.call('HSETNX', KEYS[1], 'settle_start', ARGV[1])
  return redis.call('HGET', KEYS[1], 'settle_start') == ARGV[1] and 1 or 0
end
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('HSET', KEYS[1], 'given_up_at', redis.call('TIME')[1])
end
return 0
"""
GIVEN_UP_SECONDS = 10


def outcome_field(model: str, status: JobStatus, code: str = "") -> str:
    """A job outcome's field in `Keys.OUTCOMES` (app/metrics.py reads it)."""
    return f"{model}|{status.value}|{code}"


@contextmanager
def reaper_locks(connection: redis.Redis, queues: list[str], holder: str) -> Iterator[list[str]]:
    """Takes the reaper lock of each queue that is free and gives the names of those taken; lets
    them go on leaving. A hold has its own value: the heartbeat and RQ's maintenance of one worker
    never let go the other's."""
    token = f"{holder}:{uuid.uuid4().hex}"
    taken = [q for q in queues if connection.set(Keys.reaper_lock(q), token, nx=True, px=REAPER_LOCK_MS)]
    try:
        yield taken
    finally:
        for q in taken:
            connection.eval(_RELEASE, 1, Keys.reaper_lock(q), token)


def model_queues(connection: redis.Redis, known: dict[str, Queue]) -> list[Queue]:
    """Every model's queue RQ knows of, in name order; `known` keeps them (a Queue reads the
    server's version once)."""
    prefix = Queue.redis_queue_namespace_prefix + Keys.queue_name("")
    queues = []
    for key in sorted(as_text(k) for k in connection.smembers(Queue.redis_queues_keys)):
        if key.startswith(prefix):
            if key not in known:
                name = key.removeprefix(Queue.redis_queue_namespace_prefix)
                known[key] = Queue(name, connection=connection, serializer=JSONSerializer)
            queues.append(known[key])
    return queues


def reap_each(
    connection: redis.Redis,
    queues: list[Queue],
    holder: str,
    failures: Failures,
    reap_one: Callable[[Queue], None],
    stopped: Callable[[], bool] = lambda: False,
) -> None:
    """`reap_one` for each queue whose reaper lock is free, under it. One queue's failure, logged once
    by `failures`, leaves the others reaped; Redis away (`redis_away`: out of reach, full, a
    replica) ends the pass, for the caller to wait a lease after it."""
    for queue in queues:
        if stopped():
            return
        try:
            with reaper_locks(connection, [queue.name], holder) as taken:
                if taken:
                    reap_one(queue)
            failures.ok(queue.name)
        except Exception as exc:  # one queue's trouble: the others reaped, the reaper's thread alive
            if redis_away(exc):
                raise
            failures.failed(queue.name, exc)


# An entry of the started registry dropped only if its lease is still lapsed (its worker, alive
# after all, may have renewed it since the look). KEYS: the registry; ARGV: the entry, the cutoff.
_DROP_IF_LAPSED = """
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if score and tonumber(score) <= tonumber(ARGV[2]) then return redis.call('ZREM', KEYS[1], ARGV[1]) end
return 0
"""


def reap(queue: Queue, job_ttl: int, on_abandoned: Callable[..., Any], as_of: float | None = None) -> None:
    """Under `queue`'s reaper lock: RQ re-queues or fails its executions expired by `as_of` (now, if
    not given), calling `on_abandoned` for each first; queued jobs canceled (app/serving.py) outlive
    their records in its canceled registry, which RQ trims never."""
    registry = queue.started_job_registry
    # RQ's pass stops at the first job it cannot read (a status or date it does not know), before
    # it saves any: the jobs before it were handled again at every pass, those after it never.
    lapsed = time.time() if as_of is None else as_of
    for entry in registry.connection.zrangebyscore(registry.key, 0, lapsed):
        job_id = registry.parse_job_id(entry)
        try:
            Job.fetch(job_id, connection=registry.connection, serializer=registry.serializer)
        except (NoSuchJobError, redis.ConnectionError, redis.TimeoutError):
            continue  # RQ drops the first; the others: Redis, not the job (RQ's pass meets it too)
        except Exception as exc:  # RQ's reading of the job: a status or a date it does not know
            if registry.connection.eval(_DROP_IF_LAPSED, 1, registry.key, entry, lapsed):
                event(log, "unreadable_job_dropped", logging.ERROR, job_id=job_id, error=type(exc).__name__)
    # As of the look above: Redis stalled since (frozen, swapping) left live workers' leases unrenewed.
    registry.cleanup(timestamp=lapsed, exception_handlers=[on_abandoned])
    canceled_before = time.time() - job_ttl
    queue.connection.zremrangebyscore(queue.canceled_job_registry.key, "-inf", canceled_before)


# KEYS: the longest lease; ARGV: this worker's.
_RECORD_LEASE = """
if tonumber(redis.call('GET', KEYS[1]) or '0') < tonumber(ARGV[1]) then
  redis.call('SET', KEYS[1], ARGV[1])
end
"""


def record_lease(connection: redis.Redis, lease_seconds: int) -> None:
    """A worker's lease, kept if it is the longest so far (`Keys.LONGEST_LEASE`)."""
    connection.eval(_RECORD_LEASE, 1, Keys.LONGEST_LEASE, lease_seconds)


def longest_lease(connection: redis.Redis, at_least: int) -> int:
    return max(at_least, int(connection.get(Keys.LONGEST_LEASE) or 0))


def grant_settle_start(r: redis.Redis, job_id: str, run: str) -> bool:
    """`run`: the abandoned run's mark (when RQ started it)."""
    return bool(r.eval(_SETTLE_START, 1, Keys.state(job_id), run))


def handle_abandoned(connection: redis.Redis, job: Any, default_model: str, job_ttl: int) -> None:
    """RQ's exception handler for a job whose lease lapsed, called before RQ re-queues or fails it
    (with the same `job`, which it then saves)."""
    # Canceled (`202`) before its worker died: it ended `failed`, `worker_lost`, or ran again. Seen
    # so by its worker (`canceled_at`), it reads canceled already, whose flag may have lapsed since.
    look = connection.pipeline(transaction=False)
    look.exists(Keys.cancel(job.id))
    look.hexists(Keys.state(job.id), StateField.CANCELED_AT)
    flag, seen = look.execute()
    canceled = bool(flag or seen)
    will_retry = not canceled and bool(job.retries_left and job.retries_left > 0)
    # Its images stored before its worker died, a job RQ would fail as lost gets one start
    # more: it settles the job succeeded with them, and runs nothing (worker/jobs.py `_START`).
    settle = not will_retry and grant_settle_start(connection, job.id, str(job.started_at))
    if settle:
        job.retries_left = 1
    if will_retry or settle:
        job.enqueue_at_front_on_retry = True  # it had its turn: before jobs queued behind it
    else:
        job.retries_left = 0
        job.ended_at = now()  # RQ's failure of an abandoned job left it unset
        if canceled:  # RQ records it as it records a job stopped on request (`_stopped_job_id`)
            as_failed = job.set_status
            job.set_status = lambda status, pipeline=None: as_failed(
                RQStatus.STOPPED if status == RQStatus.FAILED else status, pipeline=pipeline
            )
    # The job's own model: a reaper reaps every model's queue.
    model = (job.origin or "").removeprefix(Keys.queue_name("")) or default_model
    ttl = job.failure_ttl or job_ttl
    record_abandoned(connection, job.id, model, will_retry, settle, ttl, canceled=canceled and not settle)


def abandoned_handler(
    connection: redis.Redis, default_model: str, job_ttl: int
) -> Callable[[Any, Any, Any, Any, Any], None]:
    """`handle_abandoned` as an RQ exception handler: it acts on abandoned jobs only."""

    def handler(job: Any, exc_type: Any, *_: Any) -> None:
        if exc_type is AbandonedJobError:
            handle_abandoned(connection, job, default_model, job_ttl)

    return handler


# A canceled job's outcome, counted once (`StateField.CANCELED_COUNTED`). KEYS: state, outcome
# counts; ARGV: the outcome's field, the state's ttl should it have none (made here), the mark.
_COUNT_CANCELED = """
if redis.call('HSETNX', KEYS[1], ARGV[3], 1) == 0 then return 0 end
if redis.call('TTL', KEYS[1]) < 0 then redis.call('EXPIRE', KEYS[1], ARGV[2]) end
return redis.call('HINCRBY', KEYS[2], ARGV[1], 1)
"""


def count_canceled(r: Any, job_id: str, model: str, ttl: int) -> None:
    """On `r`, a connection or a pipeline: job `job_id` ended canceled, unless counted so already."""
    field = outcome_field(model, JobStatus.CANCELED)
    r.eval(_COUNT_CANCELED, 2, Keys.state(job_id), Keys.OUTCOMES, field, ttl, StateField.CANCELED_COUNTED)


def record_abandoned(
    r: redis.Redis,
    job_id: str,
    model: str,
    will_retry: bool,
    settle: bool,
    ttl: int,
    canceled: bool = False,
) -> None:
    """What the client is told of a job RQ re-queues or fails as abandoned (`canceled`: ends it
    canceled, its cancel requested before); `ttl` is the job record's (its worker may have died
    before it began the run, which sets one)."""
    state_key = Keys.state(job_id)
    if settle:
        event(log, "job_requeued", logging.WARNING, job_id=job_id, reason="images_stored")
        return
    if will_retry:
        r.hset(state_key, StateField.STEP, 0)
        event(log, "job_requeued", logging.WARNING, job_id=job_id, reason="worker_lost")
        return
    attempts = int(r.hget(state_key, StateField.ATTEMPTS) or 0)
    if canceled:
        p = r.pipeline(transaction=True)
        if attempts:
            p.hset(state_key, StateField.INFERENCE_FINISHED, time.time())
        p.expire(state_key, ttl)
        count_canceled(p, job_id, model, ttl)
        p.execute()
        event(log, "job_canceled", job_id=job_id, reason="worker_lost")
        return
    if attempts:
        lost = f"the worker running this job stopped responding, {attempts} time(s)"
    else:  # it died in the wait for batch mates, or between RQ's start and ours
        lost = "the worker that took this job stopped responding before it began to run it"
    error = JobError(code=ErrorCode.WORKER_LOST, message=f"{lost}; no attempts are left")
    p = r.pipeline(transaction=True)
    p.hset(state_key, StateField.ERROR, error.model_dump_json())
    if attempts:
        p.hset(state_key, StateField.INFERENCE_FINISHED, time.time())
    p.expire(state_key, ttl)
    p.hincrby(Keys.OUTCOMES, outcome_field(model, JobStatus.FAILED, ErrorCode.WORKER_LOST.value), 1)
    p.execute()
    event(log, "job_failed", logging.WARNING, job_id=job_id, code=ErrorCode.WORKER_LOST.value)


class Failures:
    """What failed at a reaper's last pass (a queue, Redis), each logged once as it fails and once
    as it recovers: a reaper that fails every pass would say so every few seconds."""

    def __init__(self, logger: logging.Logger) -> None:
        self.log = logger
        self.failing: set[str] = set()

    def ok(self, what: str) -> None:
        if what in self.failing:
            self.failing.discard(what)
            event(self.log, "reaper_recovered", what=what)

    def failed(self, what: str, exc: BaseException) -> None:
        if what not in self.failing:
            self.failing.add(what)
            error, message = type(exc).__name__, str(exc)[:200]
            event(self.log, "reaper_failed", logging.ERROR, what=what, error=error, message=message)
