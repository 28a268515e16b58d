"""The job function RQ runs (`latentd.contract.JOB_FUNCTION`) and the state it writes.

It runs inside the worker process that loaded the pipeline (RQ's SimpleWorker:
no fork), so it reaches that pipeline through the process's `Runtime`.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import logging
import math
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import redis
from pydantic import ValidationError
from rq import get_current_job
from rq.timeouts import JobTimeoutException

from latentd.contract import (
    BATCH_BUCKETS,
    DURATION_BUCKETS,
    ErrorCode,
    JobError,
    JobPayload,
    JobStatus,
    Keys,
    StateField,
)
from latentd.logs import event
from latentd.reaping import GIVEN_UP_SECONDS, count_canceled, outcome_field
from latentd.store import redis_away
from worker.config import WorkerSettings
from worker.encode import encode
from worker.pipeline import Runner, first_line, free_accelerator_memory, is_device_broken, is_out_of_memory

log = logging.getLogger("latentd.worker")
T = TypeVar("T")


class JobCanceled(Exception):
    """Raised out of a job whose cancel flag was seen; RQ records it as stopped."""


class JobFailure(Exception):
    """A job that cannot succeed, with the code its client will see."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class Claimed:
    """A queued job taken into the current job's batch, already started in RQ's registry."""

    job: Any
    payload: JobPayload
    execution: Any


@dataclass
class Succeeded:
    images: int


class Canceled:
    pass


class Lost:
    pass


Outcome = Succeeded | Canceled | Lost | JobFailure


@dataclass
class Runtime:
    runner: Runner
    connection: redis.Redis
    settings: WorkerSettings
    worker_name: str
    # Set when the device is in a state no later job can trust: the worker exits.
    fatal: bool = False
    # The job this process is running, for the worker to mark stopped on cancel.
    stopped_job_id: str | None = field(default=None)
    # A job this process lost to another worker: RQ's bookkeeping for it must not be touched.
    lost_job_id: str | None = field(default=None)
    # Jobs the worker claimed to run in the same pipeline call as the job it took (micro-batch),
    # and the outcomes of those it ran that way, settled when RQ performs each of them.
    batch: list[Claimed] = field(default_factory=list)
    settled: dict[str, Outcome] = field(default_factory=dict)
    # When each job started, as RQ first recorded it (a claimed job's: its claim): RQ's perform_job
    # says it starts again as it runs, or settles, the job.
    claimed_at: dict[str, Any] = field(default_factory=dict)
    # For a job that waits for Redis: whether the worker was asked to stop, and its way out that
    # leaves its jobs to their leases (`LatentdWorker._leave_the_job`; it does not return).
    stop_requested: Callable[[], bool] = field(default=lambda: False)
    leave: Callable[[str], None] | None = None


_runtime: Runtime | None = None


def install(runtime: Runtime) -> None:
    global _runtime
    _runtime = runtime


def installed() -> Runtime | None:
    return _runtime


def current() -> Runtime:
    if _runtime is None:
        raise RuntimeError("no pipeline is loaded in this process; jobs run only inside `latentd worker`")
    return _runtime


def _record_outcome(
    r: redis.Redis,
    model: str,
    status: JobStatus,
    code: str = "",
    seconds: float | None = None,
    counted: bool = False,  # a success is counted as it is committed (`_COMMIT`)
) -> None:
    pipe = r.pipeline(transaction=False)
    if not counted:
        pipe.hincrby(Keys.OUTCOMES, outcome_field(model, status, code), 1)
    if seconds is not None:
        _observe(pipe, Keys.durations(model), DURATION_BUCKETS, seconds)
    pipe.execute()


def _observe(pipe: Any, key: str, bounds: tuple[float, ...], value: float) -> None:
    """Queue on `pipe` one observation of a histogram kept as a Redis hash: a field per bucket
    bound, plus count and sum (app/metrics.py reads it)."""
    for bound in bounds:
        if value <= bound:
            pipe.hincrby(key, str(bound), 1)
    pipe.hincrby(key, "count", 1)
    pipe.hincrbyfloat(key, "sum", value)


def _classify(exc: BaseException, payload: JobPayload, pad_to: int | None = None) -> JobFailure:
    if isinstance(exc, JobFailure):
        return exc
    if isinstance(exc, JobTimeoutException):
        return JobFailure(ErrorCode.TIMEOUT, "the job ran past its time limit")
    if is_out_of_memory(exc):
        size = f"{payload.width}x{payload.height}"
        what = (
            f"{size} images: this worker pads every call to {pad_to + 1} images (LATENTD_BATCH_INVARIANT)"
            if pad_to
            else f"even one {size} image (the request asked for {payload.num_images})"
        )
        return JobFailure(ErrorCode.OUT_OF_MEMORY, f"out of memory for {what}; try a smaller size")
    if isinstance(exc, ValueError):
        # diffusers raises ValueError for parameters a model cannot take; its message is for users.
        return JobFailure(ErrorCode.INVALID_PARAMETERS, first_line(exc, "invalid parameters")[:500])
    return JobFailure(ErrorCode.GENERATION_FAILED, f"generation failed ({type(exc).__name__})")


# Run for each job as its worker starts it. A job whose images are stored already (its worker died
# after the commit, before RQ marked it finished, and it was re-queued) is not run again: returns
# the images' metadata. Else, unless another worker owns the job now (-1: its start was sent
# again through an outage, after its lease lapsed), records the start and returns whether the
# cancel flag is up: a job so started ends canceled, which is noted and told to waiting readers at
# once (as `_STEP` does), not when the batch it was taken with ends. Sent again after its reply was
# lost, it counts no further attempt. KEYS: state, cancel flag, RQ's job; ARGV: job_ttl, this run's
# token, worker, the channel of ended jobs, the job's id, the time, then field, value...
_START = """
local images = redis.call('HGET', KEYS[1], 'images')
if images then return images end
local owner = redis.call('HMGET', KEYS[3], 'status', 'worker_name')
if owner[1] ~= 'started' or owner[2] ~= ARGV[3] then return -1 end
if redis.call('HGET', KEYS[1], 'run') ~= ARGV[2] then redis.call('HINCRBY', KEYS[1], 'attempts', 1) end
redis.call('HSET', KEYS[1], 'run', ARGV[2], unpack(ARGV, 7))
redis.call('EXPIRE', KEYS[1], ARGV[1])
if redis.call('EXISTS', KEYS[2]) == 0 then return 0 end
if redis.call('HSETNX', KEYS[1], 'canceled_at', ARGV[6]) == 1 then redis.call('PUBLISH', ARGV[4], ARGV[5]) end
return 1
"""

# Run for each job of a batch after a denoising step (one round trip for the batch): refuse if
# another worker now owns the job (our lease lapsed and it was re-queued), else record progress
# and report the cancel flag. A flag seen settles the job `canceled` (it commits nothing), which is
# noted and told to waiting readers at once: its record, RQ's, waits for the pipeline call, which
# other jobs of its batch may keep running for a while. KEYS: job, state, cancel flag; ARGV:
# worker, step, the channel of ended jobs, the job's id, the time.
_STEP = """
local owner = redis.call('HMGET', KEYS[1], 'status', 'worker_name')
if owner[1] ~= 'started' or owner[2] ~= ARGV[1] then return -1 end
redis.call('HSET', KEYS[2], 'step', ARGV[2])
if redis.call('EXISTS', KEYS[3]) == 0 then return 0 end
if redis.call('HSETNX', KEYS[2], 'canceled_at', ARGV[5]) == 1 then
  redis.call('PUBLISH', ARGV[3], ARGV[4])
end
return 1
"""

# Results are written once, atomically, only by the worker that still owns the job, and only if
# its cancel flag is down (the API raises it only while no images are stored: one order or the
# other, never both), and counted with them. KEYS: job, state, cancel flag, outcome counts, image
# keys...; ARGV: worker, results_ttl, job_ttl, state json, outcome field, GIVEN_UP_SECONDS, image
# bytes... Returns COMMITTED, NOT_OURS or CANCELED. Sent again after its reply was lost, it finds
# its own images and writes and counts nothing more.
_COMMIT = """
local owner = redis.call('HMGET', KEYS[1], 'status', 'worker_name')
if owner[1] ~= 'started' or owner[2] ~= ARGV[1] then return 0 end
if redis.call('HEXISTS', KEYS[2], 'images') == 1 then return 1 end
local given_up = redis.call('HGET', KEYS[2], 'given_up_at')
if given_up and tonumber(redis.call('TIME')[1]) - tonumber(given_up) < tonumber(ARGV[6]) then return 0 end
if redis.call('EXISTS', KEYS[3]) == 1 then return 2 end
local fields = cjson.decode(ARGV[4])
for k, v in pairs(fields) do redis.call('HSET', KEYS[2], k, v) end
redis.call('HINCRBY', KEYS[2], 'completions', 1)
redis.call('EXPIRE', KEYS[2], ARGV[3])
redis.call('HINCRBY', KEYS[4], ARGV[5], 1)
for i = 5, #KEYS do redis.call('SET', KEYS[i], ARGV[i + 2], 'EX', ARGV[2]) end
return 1
"""
NOT_OURS, COMMITTED, CANCELED = 0, 1, 2


class LeaseLost(Exception):
    """This worker no longer owns the job (it was re-queued while we were frozen): write nothing."""


def generate(raw_payload: dict[str, Any]) -> dict[str, Any]:
    """Run a job, together with the jobs the worker claimed for its batch; each of those is
    settled from its recorded outcome when RQ performs it right after."""
    rt = current()
    job = get_current_job()
    job_id = job.id if job is not None else str(raw_payload.get("job_id", "?"))
    if job is not None and job_id in rt.claimed_at:  # RQ saves it with the job's outcome
        job.started_at = rt.claimed_at.pop(job_id)
    if job_id in rt.settled:
        return _settle(rt, job_id, rt.settled.pop(job_id))
    batch, rt.batch = rt.batch, []
    try:
        payload = JobPayload.model_validate(raw_payload)
    except ValidationError as exc:
        failure = JobFailure(
            ErrorCode.INVALID_PARAMETERS, f"unreadable job payload: {exc.errors()[0]['msg']}"
        )
        _record_failure(rt, job_id, _fallback(raw_payload), failure, failure, time.time())
        raise failure from exc
    members = [(job_id, payload), *((c.job.id, c.payload) for c in batch)]
    started = time.time()
    outcomes: dict[str, Outcome] = {}
    try:
        _run(rt, members, outcomes)
    except Exception as exc:
        # Cut short outside the pipeline call (RQ's time limit as results were committed, Redis
        # gone). A member with no outcome has committed nothing: a claimed one runs again on its
        # own when RQ settles it; this one fails with what cut it short.
        if job_id not in outcomes:
            failure = _classify(exc, payload, rt.runner.pad_to)
            with contextlib.suppress(redis.RedisError):
                _record_failure(rt, job_id, payload, failure, exc, started)
            outcomes[job_id] = failure
    for member_id, _ in members[1:]:
        if member_id in outcomes:
            rt.settled[member_id] = outcomes[member_id]
    return _settle(rt, job_id, outcomes[job_id])


def _settle(rt: Runtime, job_id: str, outcome: Outcome) -> dict[str, Any]:
    if isinstance(outcome, Succeeded):
        return {"images": outcome.images}
    if isinstance(outcome, Canceled):
        rt.stopped_job_id = job_id
        raise JobCanceled
    if isinstance(outcome, Lost):
        rt.lost_job_id = job_id
        raise LeaseLost
    raise outcome


def _run(rt: Runtime, members: list[tuple[str, JobPayload]], outcomes: dict[str, Outcome]) -> None:
    """One pipeline call for all members; each member's outcome goes into `outcomes` as soon as it
    is settled in Redis."""
    r = rt.connection
    model = rt.runner.model
    started = time.time()
    active: list[tuple[str, JobPayload]] = []
    for job_id, payload in members:
        if payload.model != model:
            failure = JobFailure(
                ErrorCode.INVALID_PARAMETERS, f"this worker serves '{model}', not '{payload.model}'"
            )
            outcomes[job_id] = _record_failure(rt, job_id, payload, failure, failure, started)
            continue
        fields: dict[str, str | int | float] = {
            StateField.STEP: 0,
            StateField.TOTAL_STEPS: payload.steps,
            StateField.WORKER: rt.worker_name,
            StateField.INFERENCE_STARTED: started,
            StateField.BATCH_JOBS: len(members),
            StateField.WARNINGS: json.dumps(rt.runner.warnings(payload)),
        }
        keys = [Keys.state(job_id), Keys.cancel(job_id), _rq_key(job_id)]
        token = uuid.uuid4().hex
        start = functools.partial(
            r.eval, _START, len(keys), *keys, rt.settings.job_ttl, token, rt.worker_name, Keys.ENDED,
            job_id, time.time(), *itertools.chain(*fields.items()),
        )  # fmt: skip
        answer = resent_while_away(start, "start", rt.stop_requested, rt.leave)
        if isinstance(answer, bytes | str):  # its images: stored by a worker that died before RQ knew
            outcomes[job_id] = Succeeded(len(json.loads(answer)))
            event(log, "job_already_succeeded", job_id=job_id)
        elif answer == -1:
            outcomes[job_id] = _record_lost(job_id)
        elif answer:
            outcomes[job_id] = _record_canceled(rt, job_id)
        else:
            active.append((job_id, payload))
    if not active:
        return
    first = active[0][1]
    event(
        log, "job_started", job_id=active[0][0], model=model, steps=first.steps,
        images=sum(p.num_images for _, p in active), batch_jobs=len(active),
    )  # fmt: skip

    lost: set[str] = set()
    canceled: set[str] = set()
    interval = rt.settings.progress_interval_ms / 1000
    last_check = -math.inf  # the first step always reports
    images_asked = sum(p.num_images for _, p in active)
    counted = False  # the call in the batch histogram: with the first step's round trip
    splits_before = rt.runner.oom_splits

    def on_step(done: int, total: int) -> bool:
        # Redis is asked after the first step, then once `interval` has passed. After every step,
        # the round trip (0.14 ms in a tight loop) slowed each step by ~0.7 ms: 4-5 % of a 64x64
        # CPU job (docs/benchmarks.md).
        nonlocal last_check, counted
        now = time.monotonic()
        if now - last_check < interval:
            return False
        last_check = now
        asked = [job_id for job_id, _ in active if job_id not in lost and job_id not in canceled]
        observe, counted = not counted, True

        def send() -> list[Any]:
            nonlocal observe
            pipe = r.pipeline(transaction=False)
            if observe:
                _observe(pipe, Keys.batches(model), BATCH_BUCKETS, images_asked)
            for job_id in asked:
                keys = [_rq_key(job_id), Keys.state(job_id), Keys.cancel(job_id)]
                # EVAL, not a registered script: redis-py sends SCRIPT EXISTS before each pipeline
                # that holds one, a second round trip inside the denoising loop.
                pipe.eval(_STEP, len(keys), *keys, rt.worker_name, done, Keys.ENDED, job_id, time.time())
            replies = pipe.execute()
            # Counted once it reached Redis (a refused connection sent nothing); a lost reply, the
            # rarer case, counts the call twice.
            observe = False
            return replies

        replies = resent_while_away(send, "progress", rt.stop_requested, rt.leave)
        for job_id, answer in zip(asked, map(int, replies[len(replies) - len(asked) :]), strict=True):
            if answer < 0:
                lost.add(job_id)
                # Kept now: should the batch be cut short before its commits, RQ must not settle
                # (and so take back) a job that another worker owns.
                outcomes[job_id] = _record_lost(job_id)
            elif answer > 0:  # read `canceled` from now on: nothing after may end it otherwise
                canceled.add(job_id)
                outcomes[job_id] = Canceled()
        # Stop early only when no member still wants its images.
        return len(lost) + len(canceled) == len(active)

    try:
        images, _ = rt.runner.generate([p for _, p in active], on_step)
    except BaseException as exc:
        if isinstance(exc, KeyboardInterrupt | SystemExit):
            raise
        _count_rare(rt, counted, images_asked, rt.runner.oom_splits - splits_before)
        if is_device_broken(exc):
            rt.fatal = True
        for job_id, payload in active:
            if job_id in lost:  # another worker's now: its state is not ours to write
                continue
            if job_id in canceled:
                outcomes[job_id] = _record_canceled(rt, job_id)
                continue
            failure = _classify(exc, payload, rt.runner.pad_to)
            outcomes[job_id] = _record_failure(rt, job_id, payload, failure, exc, started)
        return
    finished = time.time()
    _count_rare(rt, counted, images_asked, rt.runner.oom_splits - splits_before)
    for (job_id, payload), job_images in zip(active, images, strict=True):
        if job_id in lost:
            continue
        committed = CANCELED if job_id in canceled else _commit(rt, job_id, payload, job_images, finished)
        if committed == COMMITTED:
            outcomes[job_id] = Succeeded(len(job_images))  # before anything else can cut us short
            _record_outcome(r, model, JobStatus.SUCCEEDED, seconds=finished - started, counted=True)
            event(log, "job_succeeded", job_id=job_id, seconds=round(finished - started, 3))
        elif committed == CANCELED:
            outcomes[job_id] = _record_canceled(rt, job_id)
        else:
            outcomes[job_id] = _record_lost(job_id)


def _count_rare(rt: Runtime, counted: bool, images: int, splits: int) -> None:
    """What the first step's round trip did not count: a call that failed before its first step,
    and out-of-memory splits."""
    if counted and not splits:
        return
    pipe = rt.connection.pipeline(transaction=False)
    if not counted:
        _observe(pipe, Keys.batches(rt.runner.model), BATCH_BUCKETS, images)
    if splits:
        pipe.hincrby(Keys.batches(rt.runner.model), "oom_splits", splits)
    pipe.execute()


def _rq_key(job_id: str) -> str:
    return f"rq:job:{job_id}"


def _commit(rt: Runtime, job_id: str, payload: JobPayload, images: list[Any], finished: float) -> int:
    """Write a job's images and state at once, if this worker still owns the job and its cancel
    flag is down: COMMITTED, NOT_OURS or CANCELED."""
    # Stated before the images are stored, so it is never later than their actual lapse.
    expires_at = time.time() + rt.settings.results_ttl
    encoded = [encode(image, payload, i) for i, image in enumerate(images)]
    encoded = [(data, m.model_copy(update={"expires_at": expires_at})) for data, m in encoded]
    if withheld := [m.index for _, m in encoded if m.withheld]:
        event(log, "images_withheld", logging.WARNING, job_id=job_id, images=withheld, by="safety_checker")
    fields = {
        StateField.STEP: payload.steps,
        StateField.IMAGES: json.dumps([m.model_dump() for _, m in encoded]),
        StateField.INFERENCE_FINISHED: finished,
    }
    commit = rt.connection.register_script(_COMMIT)
    committed = resent_while_away(
        lambda: commit(
            keys=[
                _rq_key(job_id),
                Keys.state(job_id),
                Keys.cancel(job_id),
                Keys.OUTCOMES,
                *(Keys.image(job_id, i) for i in range(len(encoded))),
            ],
            args=[
                rt.worker_name,
                rt.settings.results_ttl,
                rt.settings.job_ttl,
                json.dumps(fields),
                outcome_field(rt.runner.model, JobStatus.SUCCEEDED),
                GIVEN_UP_SECONDS,
                *(data for data, _ in encoded),
            ],
        ),
        "commit",
        rt.stop_requested,
        rt.leave,
    )
    return int(committed)


def resent_while_away(
    send: Callable[[], T], what: str, stop_requested: Callable[[], bool], leave: Callable[[str], Any] | None
) -> T:
    """`send()`, sent again while Redis cannot be reached, its reply does not come (a restart, a
    failover, a dropped connection) or it refuses for now (full, a replica: `redis_away`), as an
    idle worker waits for it: a job in its run failed on the first such error, and RQ, failing it
    with Redis still gone, stopped the worker. `send` must be safe to run twice (its reply may be
    what was lost). RQ's time limit ends the wait, and so does a stop request: the worker then
    `leave`s its jobs to their leases (under `latentd up`, whose Redis had died, it waited for one
    that would not come back)."""
    delay, waiting = 0.1, False
    while True:
        try:
            answer = send()
        except redis.RedisError as exc:
            if not redis_away(exc):
                raise
            if stop_requested() and leave is not None:
                leave("left_job_redis_unreachable")
            if not waiting:
                event(log, "redis_unreachable_in_job", logging.WARNING, at=what, error=type(exc).__name__)
                waiting = True
            time.sleep(delay)
            delay = min(2 * delay, 2.0)
            continue
        if waiting:
            event(log, "redis_reachable_in_job", at=what)
        return answer


def _record_canceled(rt: Runtime, job_id: str) -> Canceled:
    # Counted if Redis answers: a job that may already read `canceled` (`_STEP`) must not fail for it.
    with contextlib.suppress(redis.RedisError):
        count_canceled(rt.connection, job_id, rt.runner.model, rt.settings.job_ttl)
    event(log, "job_canceled", job_id=job_id)
    return Canceled()


def _record_lost(job_id: str) -> Lost:
    event(log, "job_lease_lost", logging.WARNING, job_id=job_id)
    return Lost()


def _record_failure(
    rt: Runtime, job_id: str, payload: JobPayload, failure: JobFailure, exc: BaseException, started: float
) -> JobFailure:
    r = rt.connection
    if failure.code is ErrorCode.OUT_OF_MEMORY:
        free_accelerator_memory()
    error = JobError(code=failure.code, message=failure.message)
    p = r.pipeline(transaction=False)
    p.hset(
        Keys.state(job_id),
        mapping={StateField.ERROR: error.model_dump_json(), StateField.INFERENCE_FINISHED: time.time()},
    )
    p.expire(Keys.state(job_id), rt.settings.job_ttl)
    p.execute()
    _record_outcome(r, rt.runner.model, JobStatus.FAILED, failure.code.value, seconds=time.time() - started)
    level = logging.WARNING if failure.code is not ErrorCode.GENERATION_FAILED else logging.ERROR
    event(log, "job_failed", level, job_id=job_id, code=failure.code.value, error=type(exc).__name__)
    if failure.code is ErrorCode.GENERATION_FAILED:
        log.error("job_failed_traceback job_id=%s", job_id, exc_info=exc)
    return failure


def _fallback(raw: dict[str, Any]) -> JobPayload:
    """A stand-in payload for messages about a job whose payload did not parse."""
    return JobPayload(
        job_id=str(raw.get("job_id", "?")),
        model="?",
        prompt="?",
        width=0,
        height=0,
        steps=1,
        guidance_scale=0,
        seed=0,
        num_images=1,
    )
