"""The contract between the API and the workers.

Everything both sides must agree on lives here and nowhere else: the job
payload that crosses Redis, the status enum, the error codes, and the Redis key
and queue names. Nothing in this module may import torch, diffusers or FastAPI.
"""

from __future__ import annotations

import enum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

SCHEMA_VERSION = 1

# The job function a worker runs, named by import path so the API never imports it.
JOB_FUNCTION = "worker.jobs.generate"

SCHEDULERS = ("ddim", "euler", "euler_a", "dpmpp_2m", "lcm", "pndm")
Scheduler = Literal["ddim", "euler", "euler_a", "dpmpp_2m", "lcm", "pndm"]
OutputFormat = Literal["png", "jpeg", "webp"]
CONTENT_TYPES: dict[str, str] = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}

MAX_SEED = 2**32 - 1

# Bounds (seconds) of the job-duration histogram the workers keep in Redis.
DURATION_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
# Bounds of the images-per-pipeline-call histogram (micro-batching) the workers keep in Redis.
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


class JobStatus(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"

    def is_terminal(self) -> bool:
        return self in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED)

    @classmethod
    def from_rq(cls, rq_status: str | None) -> JobStatus:
        """Map RQ's job status (the system of record) onto ours."""
        return _FROM_RQ.get(rq_status or "", JobStatus.QUEUED)

    def rq_statuses(self) -> tuple[str, ...]:
        """The RQ statuses `from_rq` maps onto this one."""
        return tuple(rq for rq, ours in _FROM_RQ.items() if ours is self)


_FROM_RQ = {
    "queued": JobStatus.QUEUED,
    "deferred": JobStatus.QUEUED,
    "scheduled": JobStatus.QUEUED,
    "created": JobStatus.QUEUED,
    "started": JobStatus.RUNNING,
    "finished": JobStatus.SUCCEEDED,
    "failed": JobStatus.FAILED,
    # RQ marks a running job that was stopped on request STOPPED: for us that
    # is a cancel that took effect between two denoising steps.
    "stopped": JobStatus.CANCELED,
    "canceled": JobStatus.CANCELED,
}


class ErrorCode(enum.StrEnum):
    """Stable, machine-readable codes: clients branch on these, never on messages."""

    # Request errors (API side)
    INVALID_REQUEST = "invalid_request"
    NOT_FOUND = "not_found"
    EXPIRED = "expired"
    MODEL_UNAVAILABLE = "model_unavailable"
    QUEUE_FULL = "queue_full"
    NOT_CANCELABLE = "not_cancelable"
    NOT_READY = "not_ready"
    SERVICE_UNAVAILABLE = "service_unavailable"
    WAIT_TIMEOUT = "wait_timeout"
    CANCELED = "canceled"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    HEADERS_TOO_LARGE = "headers_too_large"
    IDEMPOTENCY_CONFLICT = "idempotency_conflict"
    UNAUTHORIZED = "unauthorized"
    RATE_LIMITED = "rate_limited"
    TOO_MANY_JOBS = "too_many_jobs"
    INTERNAL_ERROR = "internal_error"
    CONTENT_POLICY_VIOLATION = "content_policy_violation"  # OpenAI's code, on its route only
    METHOD_NOT_ALLOWED = "method_not_allowed"
    HTTP_ERROR = "http_error"  # any other HTTP-level refusal of the framework's
    # Job failures (worker side)
    INVALID_PARAMETERS = "invalid_parameters"
    GENERATION_FAILED = "generation_failed"
    TIMEOUT = "timeout"
    OUT_OF_MEMORY = "out_of_memory"
    WORKER_LOST = "worker_lost"


class JobPayload(BaseModel):
    """What the API enqueues and a worker runs: fully resolved, no defaults left to guess."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: int = SCHEMA_VERSION
    job_id: str
    model: str
    prompt: str
    negative_prompt: str = ""
    width: int
    height: int
    steps: int
    guidance_scale: float
    seed: int = Field(ge=0, le=MAX_SEED)
    num_images: int = Field(ge=1)
    scheduler: Scheduler | None = None
    output_format: OutputFormat = "png"

    def image_seed(self, index: int) -> int:
        """Image i of a job is drawn from its own generator seeded with seed + i."""
        return (self.seed + index) % (MAX_SEED + 1)


class WorkerInfo(BaseModel):
    """A worker's registration, refreshed with every heartbeat."""

    name: str
    model: str
    device: str
    capacity: int = 1
    pid: int
    hostname: str
    started_at: float
    # The side, in pixels, of the images the model was trained at: requests without a size get it.
    native_size: int | None = None
    # A digest of the weights it serves (`worker.pipeline.fingerprint`); None from earlier releases.
    weights: str | None = None


class Keys:
    """Redis key names. RQ owns `rq:*`; everything of ours lives under `latentd:`."""

    PREFIX = "latentd"
    WORKERS = f"{PREFIX}:workers"
    # Hash sha256(key) -> {"name", "created_at"}: API keys, stored only as digests.
    API_KEYS = f"{PREFIX}:apikeys"
    # "1" from the first key on, kept when the last is revoked: revoking a leaked key must not
    # open the service. Only `latentd keys open` sets it to "0" (latentd.keys.required).
    KEYS_REQUIRED = f"{PREFIX}:keys_required"
    # Hash model -> when a worker last served it, or began to load it (unix seconds): a model
    # without a live worker that had one lately is coming back (a restart, a load), not unknown.
    MODELS_SEEN = f"{PREFIX}:models_seen"
    URL_SECRET = f"{PREFIX}:url_secret"  # signs the image URLs the OpenAI route gives (app.auth)
    # The longest lease a worker has held jobs under (seconds), kept for good: how long an API
    # process waits after Redis trouble before it reaps in place of workers (app.reaper).
    LONGEST_LEASE = f"{PREFIX}:longest_lease"
    # Counts every live worker's beats: the API's reaper reads a change between two looks as a worker
    # alive, though it lapsed since (app/reaper.py).
    BEATS = f"{PREFIX}:beats"

    @staticmethod
    def rate(owner: str, minute: int) -> str:
        return f"{Keys.PREFIX}:rate:{owner}:{minute}"

    @staticmethod
    def in_flight(owner: str) -> str:
        """Sorted set of the owner's jobs that may not have ended yet."""
        return f"{Keys.PREFIX}:inflight:{owner}"

    @staticmethod
    def jobs(owner: str | None) -> str:
        """Sorted set of the owner's job ids, scored by submit time (unix seconds), for
        `GET /v1/generations`: a key's jobs, or (owner None) those submitted without a key. An owner
        is never empty, so no key's set is the keyless one."""
        return f"{Keys.PREFIX}:jobs" if owner is None else f"{Keys.PREFIX}:jobs:{owner}"

    # Hash "model|status|error_code" -> count of jobs that ended so.
    OUTCOMES = f"{PREFIX}:stats:outcomes"
    # Pub/sub channel: the id of each job that just ended (workers, and the API for a queued cancel),
    # so long-polling status reads answer at once. A hint only: readers re-read the job's record.
    ENDED = f"{PREFIX}:ended"

    @staticmethod
    def reaper_lock(queue_name: str) -> str:
        """Held while a worker hands its queue's expired jobs to RQ: its reaper, or RQ's maintenance."""
        return f"{Keys.PREFIX}:reaper:{queue_name}"

    @staticmethod
    def durations(model: str) -> str:
        """Hash of a histogram of job run times: one field per bucket bound, plus sum and count."""
        return f"{Keys.PREFIX}:stats:durations:{model}"

    @staticmethod
    def batches(model: str) -> str:
        """Hash of a histogram of images per pipeline call (one field per bucket bound, sum, count),
        plus `oom_splits`: calls split in two after an out-of-memory error."""
        return f"{Keys.PREFIX}:stats:batches:{model}"

    @staticmethod
    def queue_name(model: str) -> str:
        return f"{Keys.PREFIX}:{model}"

    @staticmethod
    def worker(name: str) -> str:
        return f"{Keys.PREFIX}:worker:{name}"

    @staticmethod
    def state(job_id: str) -> str:
        """Hash of progress, timings, error and image metadata written by the worker."""
        return f"{Keys.PREFIX}:job:{job_id}"

    @staticmethod
    def idempotency(digest: str) -> str:
        """`job_id:body_digest` for an Idempotency-Key (stored by its digest)."""
        return f"{Keys.PREFIX}:idempotency:{digest}"

    @staticmethod
    def cancel(job_id: str) -> str:
        return f"{Keys.PREFIX}:cancel:{job_id}"

    @staticmethod
    def image(job_id: str, index: int) -> str:
        return f"{Keys.PREFIX}:image:{job_id}:{index}"


class StateField:
    """Field names inside `Keys.state(job_id)`."""

    STEP = "step"
    TOTAL_STEPS = "total_steps"
    ERROR = "error"  # JSON {"code", "message"}
    IMAGES = "images"  # JSON list of ImageMeta
    INFERENCE_STARTED = "inference_started_at"
    INFERENCE_FINISHED = "inference_finished_at"
    WORKER = "worker"
    ATTEMPTS = "attempts"  # how many times a worker started the job
    BATCH_JOBS = "batch_jobs"  # how many jobs shared its pipeline call
    COMPLETIONS = "completions"  # how many times results were written: never more than 1
    WARNINGS = "warnings"  # JSON list of what of the request the model does not use
    # When its worker saw the cancel flag (unix seconds): it ends canceled, once its pipeline call ends.
    CANCELED_AT = "canceled_at"
    # Its cancel is in the outcome counts: a frozen worker that wakes, a reaper and a worker that
    # took it again may each end it canceled, and it is counted once.
    CANCELED_COUNTED = "canceled_counted"


class ImageMeta(BaseModel):
    index: int
    seed: int
    content_type: str
    bytes: int
    etag: str
    # The model's safety checker flagged the image, and the pipeline blacked it out.
    withheld: bool = False
    # When the stored bytes lapse (unix seconds); None in records written before it was kept.
    expires_at: float | None = None


class JobError(BaseModel):
    code: ErrorCode
    message: str
