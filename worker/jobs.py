"""The job function RQ runs (`latentd.contract.JOB_FUNCTION`) and the state it writes.

It runs inside the worker process that loaded the pipeline (RQ's SimpleWorker:
no fork), so it reaches that pipeline through the process's `Runtime`.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import redis
import torch
from pydantic import ValidationError
from rq import get_current_job
from rq.timeouts import JobTimeoutException

from latentd.contract import DURATION_BUCKETS, ErrorCode, JobError, JobPayload, JobStatus, Keys, StateField
from latentd.logs import event
from worker.config import WorkerSettings
from worker.encode import encode
from worker.pipeline import Runner, free_accelerator_memory

log = logging.getLogger("latentd.worker")


class JobCanceled(Exception):
    """Raised out of a job whose cancel flag was seen; RQ records it as stopped."""


class JobFailure(Exception):
    """A job that cannot succeed, with the code its client will see."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


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


_runtime: Runtime | None = None


def install(runtime: Runtime) -> None:
    global _runtime
    _runtime = runtime


def current() -> Runtime:
    if _runtime is None:
        raise RuntimeError("no pipeline is loaded in this process; jobs run only inside `latentd worker`")
    return _runtime


def _record_outcome(
    r: redis.Redis, model: str, status: JobStatus, code: str = "", seconds: float | None = None
) -> None:
    pipe = r.pipeline(transaction=False)
    pipe.hincrby(Keys.OUTCOMES, f"{model}|{status.value}|{code}", 1)
    if seconds is not None:
        key = Keys.durations(model)
        for bound in DURATION_BUCKETS:
            if seconds <= bound:
                pipe.hincrby(key, str(bound), 1)
        pipe.hincrby(key, "count", 1)
        pipe.hincrbyfloat(key, "sum", seconds)
    pipe.execute()


def _classify(exc: BaseException, payload: JobPayload) -> JobFailure:
    if isinstance(exc, JobFailure):
        return exc
    if isinstance(exc, JobTimeoutException):
        return JobFailure(ErrorCode.TIMEOUT, "the job ran past its time limit")
    if isinstance(exc, torch.OutOfMemoryError):
        return JobFailure(
            ErrorCode.OUT_OF_MEMORY,
            f"out of accelerator memory for even one {payload.width}x{payload.height} image "
            f"(the request asked for {payload.num_images}); try a smaller size",
        )
    if isinstance(exc, ValueError):
        # diffusers raises ValueError for parameters a model cannot take; its message is for users.
        return JobFailure(ErrorCode.INVALID_PARAMETERS, str(exc).splitlines()[0][:500])
    return JobFailure(ErrorCode.GENERATION_FAILED, f"generation failed ({type(exc).__name__})")


def _device_is_broken(exc: BaseException) -> bool:
    return (
        isinstance(exc, RuntimeError)
        and not isinstance(exc, torch.OutOfMemoryError)
        and ("CUDA error" in str(exc) or "device-side assert" in str(exc))
    )


# One round trip per denoising step: refuse if another worker now owns the job (our lease
# lapsed and it was re-queued), else record progress and report the cancel flag.
_STEP = """
local owner = redis.call('HMGET', KEYS[1], 'status', 'worker_name')
if owner[1] ~= 'started' or owner[2] ~= ARGV[1] then return -1 end
redis.call('HSET', KEYS[2], 'step', ARGV[2])
return redis.call('EXISTS', KEYS[3])
"""

# Results are written once, atomically, and only by the worker that still owns the job.
# KEYS: job, state, image keys...; ARGV: worker, results_ttl, job_ttl, state json, image bytes...
_COMMIT = """
local owner = redis.call('HMGET', KEYS[1], 'status', 'worker_name')
if owner[1] ~= 'started' or owner[2] ~= ARGV[1] then return 0 end
local fields = cjson.decode(ARGV[4])
for k, v in pairs(fields) do redis.call('HSET', KEYS[2], k, v) end
redis.call('HINCRBY', KEYS[2], 'completions', 1)
redis.call('EXPIRE', KEYS[2], ARGV[3])
for i = 3, #KEYS do redis.call('SET', KEYS[i], ARGV[i + 2], 'EX', ARGV[2]) end
return 1
"""


class LeaseLost(Exception):
    """This worker no longer owns the job (it was re-queued while we were frozen): write nothing."""


def generate(raw_payload: dict[str, Any]) -> dict[str, Any]:
    rt = current()
    r = rt.connection
    job = get_current_job()
    job_id = job.id if job is not None else str(raw_payload.get("job_id", "?"))
    job_key = f"rq:job:{job_id}"
    state_key = Keys.state(job_id)
    cancel_key = Keys.cancel(job_id)
    model = rt.runner.model
    started = time.time()
    try:
        try:
            payload = JobPayload.model_validate(raw_payload)
        except ValidationError as exc:
            raise JobFailure(
                ErrorCode.INVALID_PARAMETERS, f"unreadable job payload: {exc.errors()[0]['msg']}"
            ) from exc
        if payload.model != model:
            raise JobFailure(
                ErrorCode.INVALID_PARAMETERS, f"this worker serves '{model}', not '{payload.model}'"
            )
        pipe = r.pipeline(transaction=False)
        pipe.hset(
            state_key,
            mapping={
                StateField.STEP: 0,
                StateField.TOTAL_STEPS: payload.steps,
                StateField.WORKER: rt.worker_name,
                StateField.INFERENCE_STARTED: started,
            },
        )
        pipe.hincrby(state_key, StateField.ATTEMPTS, 1)
        pipe.expire(state_key, rt.settings.job_ttl)
        pipe.exists(cancel_key)
        if pipe.execute()[-1]:
            raise JobCanceled
        event(log, "job_started", job_id=job_id, model=model, steps=payload.steps, images=payload.num_images)

        step_script = r.register_script(_STEP)
        lost = False

        def on_step(done: int, total: int) -> bool:
            nonlocal lost
            answer = int(step_script(keys=[job_key, state_key, cancel_key], args=[rt.worker_name, done]))
            lost = answer < 0
            return answer != 0

        images, interrupted = rt.runner.generate(payload, on_step)
        if lost:
            raise LeaseLost
        if interrupted or r.exists(cancel_key):
            raise JobCanceled
        encoded = [encode(image, payload, i) for i, image in enumerate(images)]
        finished = time.time()
        fields = {
            StateField.STEP: payload.steps,
            StateField.IMAGES: json.dumps([m.model_dump() for _, m in encoded]),
            StateField.INFERENCE_FINISHED: finished,
        }
        committed = r.register_script(_COMMIT)(
            keys=[job_key, state_key, *(Keys.image(job_id, i) for i in range(len(encoded)))],
            args=[
                rt.worker_name,
                rt.settings.results_ttl,
                rt.settings.job_ttl,
                json.dumps(fields),
                *(data for data, _ in encoded),
            ],
        )
        if not committed:
            raise LeaseLost
        _record_outcome(r, model, JobStatus.SUCCEEDED, seconds=finished - started)
        event(log, "job_succeeded", job_id=job_id, seconds=round(finished - started, 3))
        return {"images": len(encoded)}
    except LeaseLost:
        rt.lost_job_id = job_id
        event(log, "job_lease_lost", logging.WARNING, job_id=job_id)
        raise
    except JobCanceled:
        rt.stopped_job_id = job_id
        _record_outcome(r, model, JobStatus.CANCELED)
        event(log, "job_canceled", job_id=job_id)
        raise
    except BaseException as exc:
        if isinstance(exc, KeyboardInterrupt | SystemExit):
            raise
        failure = _classify(exc, payload if "payload" in locals() else _fallback(raw_payload))
        if _device_is_broken(exc):
            rt.fatal = True
        if failure.code is ErrorCode.OUT_OF_MEMORY:
            free_accelerator_memory()
        error = JobError(code=failure.code, message=failure.message)
        p = r.pipeline(transaction=False)
        p.hset(
            state_key,
            mapping={StateField.ERROR: error.model_dump_json(), StateField.INFERENCE_FINISHED: time.time()},
        )
        p.expire(state_key, rt.settings.job_ttl)
        p.execute()
        _record_outcome(r, model, JobStatus.FAILED, failure.code.value, seconds=time.time() - started)
        level = logging.WARNING if failure.code is not ErrorCode.GENERATION_FAILED else logging.ERROR
        event(log, "job_failed", level, job_id=job_id, code=failure.code.value, error=type(exc).__name__)
        if failure.code is ErrorCode.GENERATION_FAILED:
            log.error("job_failed_traceback job_id=%s", job_id, exc_info=exc)
        if failure is exc:
            raise
        raise failure from exc


def record_abandoned(r: redis.Redis, job_id: str, model: str, will_retry: bool) -> None:
    """Called for a job whose worker stopped renewing its lease, as RQ re-queues or fails it."""
    state_key = Keys.state(job_id)
    if will_retry:
        r.hset(state_key, StateField.STEP, 0)
        event(log, "job_requeued", logging.WARNING, job_id=job_id, reason="worker_lost")
        return
    attempts = int(r.hget(state_key, StateField.ATTEMPTS) or 0)
    error = JobError(
        code=ErrorCode.WORKER_LOST,
        message=f"the worker running this job stopped responding, {attempts} time(s); no attempts are left",
    )
    r.hset(
        state_key,
        mapping={StateField.ERROR: error.model_dump_json(), StateField.INFERENCE_FINISHED: time.time()},
    )
    _record_outcome(r, model, JobStatus.FAILED, ErrorCode.WORKER_LOST.value)
    event(log, "job_failed", logging.WARNING, job_id=job_id, code=ErrorCode.WORKER_LOST.value)


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
