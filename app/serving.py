"""The work behind the routes: enqueue jobs, read their state, cancel them, fetch images.

RQ is the system of record for a job's status and timestamps; the worker adds
progress, error and image metadata under `Keys.state(job_id)`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import secrets
import time
import urllib.parse
import uuid
import zlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import redis
import redis.asyncio
from rq import Queue, Retry
from rq.exceptions import NoSuchJobError
from rq.job import Job
from rq.serializers import JSONSerializer
from rq.utils import now, utcformat

from app.config import ApiSettings
from app.errors import (
    STORE_DOWN,
    Expired,
    IdempotencyConflict,
    InvalidRequest,
    ModelUnavailable,
    NotCancelable,
    NotFound,
    NotReady,
    QueueFull,
    TooManyJobs,
)
from app.protocol import (
    Generation,
    GenerationList,
    GenerationRequest,
    ImageInfo,
    JobErrorInfo,
    Links,
    ModelInfo,
    Progress,
    ResolvedRequest,
    SubmitResponse,
    Timings,
)
from latentd.contract import (
    JOB_FUNCTION,
    MAX_SEED,
    ImageMeta,
    JobPayload,
    JobStatus,
    Keys,
    StateField,
    WorkerInfo,
)
from latentd.logs import event
from latentd.store import as_text, live_workers, registrations

log = logging.getLogger("latentd.api")

QUEUE_FULL_RETRY_AFTER = 5
# How long a submit trusts the set of served models it read last; a model missing from it is re-read.
SERVED_TTL = 1.0
# A model a worker served or began to load this recently is coming back: a submit for it gets 503
# and Retry-After, not 400. An hour covers a first hub download of a large checkpoint.
COMING_BACK_S = 3600
MODEL_RETRY_AFTER = 5
# How many entries of an owner's list one `GET /v1/generations` looks at, at most: with a status
# filter, a page that finds fewer than `limit` of that status this far ends short, `has_more` set.
LIST_SCAN = 500
# A waiting status read re-reads the job at least this often (seconds), woken or not.
RECHECK = 1.0

# A status read in one round trip: the RQ job hash, latentd's state hash, the cancel flag and,
# while the job is queued, its place in its queue (RQ's `origin` names the queue), -1 otherwise.
# False where the job has no record. One job's read, for `_READ` and `_LIST` alike.
_READ_JOB = """
local function read_job(job_key, state_key, cancel_key, queue_prefix, job_id)
  local job = redis.call('HGETALL', job_key)
  if #job == 0 then return false end
  local status, origin
  for i = 1, #job, 2 do
    if job[i] == 'status' then status = job[i + 1] elseif job[i] == 'origin' then origin = job[i + 1] end
  end
  local position = -1
  if status == 'queued' and origin then
    position = redis.call('LPOS', queue_prefix .. origin, job_id) or -1
  end
  return {job, redis.call('HGETALL', state_key), redis.call('EXISTS', cancel_key), position}
end
"""
# KEYS: job hash, state hash, cancel flag; ARGV: RQ's queue key prefix, job id.
_READ = _READ_JOB + "return read_job(KEYS[1], KEYS[2], KEYS[3], ARGV[1], ARGV[2])"

# A page of an owner's jobs (`Keys.jobs`), newest first, in one round trip: each job's `read_job`,
# from the one after the cursor's, skipping jobs whose record has lapsed and, with a status
# filter, those whose RQ status cannot be it. Stops once it has `want` jobs, has looked at `scan`
# entries, or meets one submitted before the oldest time listed.
# KEYS: the owner's list; ARGV: the oldest submit time listed, the cursor's job id ('' from the
# newest), want, scan, the RQ statuses taken ('' for any, else ',a,b,'), then the key prefixes of
# RQ's jobs, latentd's job states, cancel flags and RQ's queues.
# Returns false for a cursor not in the list, else {{id, read, id, read, ...}, the last id looked
# at ('' for none), 1 if nothing older is listed, else 0}.
_LIST = (
    _READ_JOB
    + """
local start = 0
if ARGV[2] ~= '' then
  local rank = redis.call('ZREVRANK', KEYS[1], ARGV[2])
  if not rank then return false end
  start = rank + 1
end
local oldest, want, scan = tonumber(ARGV[1]), tonumber(ARGV[3]), tonumber(ARGV[4])
local entries = redis.call('ZREVRANGE', KEYS[1], start, start + scan - 1, 'WITHSCORES')
local found, last, taken = {}, '', 0
local ended = #entries < 2 * scan
for i = 1, #entries, 2 do
  if tonumber(entries[i + 1]) < oldest then ended = true break end
  local id = entries[i]
  last = id
  local status = ARGV[5] == '' or redis.call('HGET', ARGV[6] .. id, 'status')
  if status == true or (status and string.find(ARGV[5], ',' .. status .. ',', 1, true)) then
    local read = read_job(ARGV[6] .. id, ARGV[7] .. id, ARGV[8] .. id, ARGV[9], id)
    if read then
      found[#found + 1] = id
      found[#found + 1] = read
      taken = taken + 1
      if taken >= want then
        ended = ended and i + 1 == #entries
        break
      end
    end
  end
end
return {found, last, ended and 1 or 0}
"""
)

# How long a replayed Idempotency-Key waits for the first request's job to be enqueued.
IDEMPOTENT_WAIT_S = 2.0
# How long a claim on an Idempotency-Key lasts before its job is enqueued; the enqueue extends it
# to the job's lifetime. An API that dies in between holds the key no longer than this.
IDEMPOTENT_PENDING_S = 10

# SET NX that returns the value already there (SET NX GET needs Redis 7; this runs on 6).
_CLAIM = """
local earlier = redis.call('GET', KEYS[1])
if earlier then return earlier end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
return false
"""

# RQ's enqueue commands, run only while the queue is under its depth limit: the check and the
# push in one step, so concurrent submits cannot all pass the check and overfill the queue.
# A job whose record exists is not pushed again: the client resends a command whose reply was
# lost (a timeout, a dropped connection), and the job would run twice.
# The job's Idempotency-Key claim, if any, is made to last as long as the job, in the same step.
# So is the job's entry in its owner's list (`Keys.jobs`): a job is listed if and only if it was
# queued, once. The entries older than a job's lifetime go at each write, and the set lapses a
# lifetime after its newest: it holds at most one job lifetime's submits of one owner. Scored by
# Redis's clock as it queues the job, not the job's `created_at`: one made earlier and queued later
# (another API process, a pause) went in behind jobs a client had listed already, and was missed.
# KEYS: the queue, the job's record, the owner's list[, the claim]; ARGV: the limit, a job's lifetime,
# the job's id, then for each command its argument count and its arguments. Returns the queue's
# length after the push; -1: full, nothing written; -2: the job was enqueued already.
_ENQUEUE = """
local resent = redis.call('EXISTS', KEYS[2]) == 1
if not resent and redis.call('LLEN', KEYS[1]) >= tonumber(ARGV[1]) then return -1 end
if KEYS[4] then redis.call('EXPIRE', KEYS[4], ARGV[2]) end
if resent then return -2 end
local now = redis.call('TIME')
now = tonumber(now[1]) + tonumber(now[2]) / 1000000
redis.call('ZADD', KEYS[3], now, ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', '(' .. (now - tonumber(ARGV[2])))
redis.call('EXPIRE', KEYS[3], ARGV[2])
local i = 4
while i <= #ARGV do
  local n = tonumber(ARGV[i])
  redis.call(unpack(ARGV, i + 1, i + n))
  i = i + n + 1
end
return redis.call('LLEN', KEYS[1])
"""

# Raise a job's cancel flag unless its worker has committed its images: Redis orders this against
# the worker's commit, which refuses once the flag is up, so a job whose cancel was accepted
# never ends succeeded. KEYS: the job's state, its cancel flag; ARGV: the flag's lifetime.
_CANCEL = """
if redis.call('HEXISTS', KEYS[1], 'images') == 1 then return 0 end
redis.call('SET', KEYS[2], '1', 'EX', ARGV[1])
return 1
"""


def hung_up(scope: Mapping[str, Any]) -> Callable[[], bool]:
    """Whether a request's client hung up: its connection is closing, as `latentd api`'s protocol
    tells (app.head_limit; elsewhere, never). Not Starlette's `request.is_disconnected`, which
    reads the request's channel: that resumed reading a connection uvicorn had paused, and piled
    pipelined requests up in memory, and it missed a hang-up behind a pipelined request."""
    gone: Callable[[], bool] = scope.get("extensions", {}).get("latentd.gone", lambda: False)
    return gone


# A queued job canceled: off its queue and recorded as RQ's `Job.cancel` records it, in one step, so
# that no failure between the two (a lost reply, a full Redis) leaves it queued on no list, for
# good. 1 if canceled; 0 where a worker has it (RQ moves a job onto the queue's intermediate list,
# then marks it started and takes it off, one step each), or it is queued no longer. A job found
# queued on no list (left so by a cancel of an earlier release) is canceled too.
# KEYS: the queue, its intermediate list, the job, the queue's canceled registry, the outcomes hash.
# ARGV: the job's id, the time, the job's ttl, its outcome's field, the channel of ended jobs.
_CANCEL_QUEUED = """
if redis.call('HGET', KEYS[3], 'status') ~= 'queued' then return 0 end
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 0 and redis.call('LPOS', KEYS[2], ARGV[1]) then return 0 end
redis.call('HSET', KEYS[3], 'status', 'canceled', 'ended_at', ARGV[2])
redis.call('EXPIRE', KEYS[3], ARGV[3])
redis.call('ZADD', KEYS[4], ARGV[4], ARGV[1])
redis.call('HINCRBY', KEYS[5], ARGV[5], 1)
redis.call('PUBLISH', ARGV[6], ARGV[1])
return 1
"""

# Reserve an in-flight slot for an owner: drop members whose job has ended (or that
# never became a job within a minute, or that a worker saw canceled, `_CANCELED_ONCE_SEEN`), then
# add this one if the owner is under its limit.
# KEYS: the owner's in-flight set; ARGV: limit, job id, now, ttl.
_RESERVE = """
local members = redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')
for i = 1, #members, 2 do
  local status = redis.call('HGET', 'rq:job:' .. members[i], 'status')
  local ended = status == 'finished' or status == 'failed' or status == 'canceled' or status == 'stopped'
  ended = ended or redis.call('HEXISTS', 'latentd:job:' .. members[i], 'canceled_at') == 1
  if ended or (not status and tonumber(members[i + 1]) < tonumber(ARGV[3]) - 60) then
    redis.call('ZREM', KEYS[1], members[i])
  end
end
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then return 0 end
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[4])
return 1
"""


@dataclass(frozen=True)
class ImageBlob:
    data: bytes
    content_type: str
    etag: str
    expires_at: float | None = None  # unix seconds; None in records of earlier releases


def _iso(unix: float) -> str:
    return datetime.fromtimestamp(unix, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _aware(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


# What RQ may still say of a job whose worker saw its cancel (`StateField.CANCELED_AT`): started
# until its batch's pipeline call ends; queued, re-queued by a reaper that took its worker for dead.
_CANCELED_ONCE_SEEN = (JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.CANCELED)


def _seconds(start: datetime | None, end: datetime | None) -> float | None:
    if start is None or end is None:
        return None
    return round(max(0.0, (end - start).total_seconds()), 4)


class EndedJobs:
    """Wakes the requests waiting for a job to end: one subscription to `Keys.ENDED` per API
    process (started by the app's lifespan), fanned out to an event per waiting request."""

    def __init__(self, aconnection: redis.asyncio.Redis) -> None:
        self.redis = aconnection
        self.waiters: dict[str, set[asyncio.Event]] = {}
        self.closing = False

    def close(self) -> None:
        """The server is stopping: every held read answers now, with its job's state then."""
        self.closing = True
        for waiting in self.waiters.values():
            for waiter in waiting:
                waiter.set()

    async def listen(self) -> None:
        while True:
            try:
                async with self.redis.pubsub(ignore_subscribe_messages=True) as pubsub:
                    await pubsub.subscribe(Keys.ENDED)
                    while True:
                        if _cancel_requested():
                            raise asyncio.CancelledError
                        message = await pubsub.get_message(timeout=1.0)
                        if message is not None:
                            for waiter in self.waiters.get(as_text(message["data"]), ()):
                                waiter.set()
            except Exception as exc:
                if _cancel_requested():  # a shutdown's cancel, come out as another error
                    raise asyncio.CancelledError from exc
                if not isinstance(exc, redis.RedisError):  # never let the listener die: long-polls
                    event(log, "ended_listener_error", logging.WARNING, error=type(exc).__name__)
                await asyncio.sleep(1.0)  # Redis away: waiters fall back on their periodic re-read

    @contextlib.contextmanager
    def watch(self, job_id: str) -> Iterator[asyncio.Event]:
        waiter = asyncio.Event()
        self.waiters.setdefault(job_id, set()).add(waiter)
        try:
            yield waiter
        finally:
            waiting = self.waiters[job_id]
            waiting.discard(waiter)
            if not waiting:
                del self.waiters[job_id]


def _cancel_requested() -> bool:
    """Whether the running task was asked to stop, the cancel swallowed or not. redis-py sends each
    command under `asyncio.wait_for`, which before Python 3.12 returns the command's result and
    drops the cancel when both land in the same loop turn; the request stays in `cancelling()`. A
    loop that stopped only on the exception ran on, and the API's shutdown then hung for good
    (about one in twenty in-process starts; tests/test_rq_records.py)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _pairs(flat: list[bytes]) -> dict[bytes, bytes]:
    return dict(zip(flat[::2], flat[1::2], strict=True))


def _date(raw: bytes | None) -> datetime | None:
    # RQ writes '%Y-%m-%dT%H:%M:%S.%fZ' (UTC), which fromisoformat reads without strptime's cost.
    return datetime.fromisoformat(raw.decode()) if raw else None


@dataclass(frozen=True)
class JobRecord:
    """What a status read needs from RQ's job hash, read without building an RQ `Job`, whose restore
    parses every field (with strptime) and was a third of a status read. RQ's hash stays the record;
    tests/test_rq_records.py checks this reading against RQ's own."""

    id: str
    rq_status: str
    args: list[object]
    owner: str | None
    created_at: datetime | None
    enqueued_at: datetime | None
    started_at: datetime | None
    ended_at: datetime | None

    @classmethod
    def parse(cls, job_id: str, raw: dict[bytes, bytes]) -> JobRecord:
        data = raw[b"data"]
        with contextlib.suppress(zlib.error):  # RQ stores it uncompressed when that is not smaller
            data = zlib.decompress(data)
        args = json.loads(data)[2]
        meta = json.loads(raw[b"meta"]) if raw.get(b"meta") else {}
        return cls(
            id=job_id,
            rq_status=raw.get(b"status", b"created").decode(),
            args=list(args),
            owner=meta.get("owner"),
            created_at=_date(raw.get(b"created_at")),
            enqueued_at=_date(raw.get(b"enqueued_at")),
            started_at=_date(raw.get(b"started_at")),
            ended_at=_date(raw.get(b"ended_at")),
        )


class GenerationService:
    """The hot paths (submit, status read, the OpenAI wait) use the asyncio client, so they run on
    the event loop without a thread hand-off; the rest uses the blocking client from route threads."""

    def __init__(
        self, connection: redis.Redis, aconnection: redis.asyncio.Redis, settings: ApiSettings
    ) -> None:
        self.redis = connection
        self.aredis = aconnection
        self.settings = settings
        self._queues: dict[str, Queue] = {}
        self._served: dict[str, int | None] = {}
        self._served_at = 0.0
        self._read_sync = connection.register_script(_READ)
        self._read_async = aconnection.register_script(_READ)
        self._enqueue_script = aconnection.register_script(_ENQUEUE)
        self._list_script = aconnection.register_script(_LIST)
        self.ended = EndedJobs(aconnection)

    # -- queues and workers -------------------------------------------------

    def queue(self, model: str) -> Queue:
        # Kept per model: a Queue reads the Redis server version once and caches it.
        queue = self._queues.get(model)
        if queue is None:
            queue = Queue(Keys.queue_name(model), connection=self.redis, serializer=JSONSerializer)
            self._queues[model] = queue
        return queue

    async def served_models(self, model: str) -> dict[str, int | None]:
        """Models with a live worker, with their native image size. Trusted for SERVED_TTL when it
        holds `model`, else re-read."""
        if model in self._served and time.monotonic() - self._served_at < SERVED_TTL:
            return self._served
        names = sorted(as_text(n) for n in await self.aredis.smembers(Keys.WORKERS))
        blobs = await self.aredis.mget([Keys.worker(n) for n in names]) if names else []
        served: dict[str, int | None] = {}
        for w in registrations(names, blobs)[0]:
            served[w.model] = served.get(w.model) or w.native_size
        self._served, self._served_at = served, time.monotonic()
        return served

    def live_workers(self) -> list[WorkerInfo]:
        return live_workers(self.redis)

    def models(self) -> list[ModelInfo]:
        by_model: dict[str, list[WorkerInfo]] = {}
        for w in self.live_workers():
            by_model.setdefault(w.model, []).append(w)
        return [
            ModelInfo(
                id=model,
                created=int(min(w.started_at for w in ws)),
                workers=len(ws),
                devices=sorted({w.device for w in ws}),
                queue_depth=self.queue(model).count,
                native_size=next((w.native_size for w in ws if w.native_size), None),
            )
            for model, ws in sorted(by_model.items())
        ]

    # -- submit ----------------------------------------------------------------

    def resolve(self, req: GenerationRequest, job_id: str, native_size: int | None = None) -> JobPayload:
        """The job a request asks for, its defaults filled in: a size left out is LATENTD_DEFAULT_SIZE,
        else the model's native size (`native_size`, as its workers report it), else 512."""
        s = self.settings
        size = s.default_size or native_size or 512
        width = req.width or size
        height = req.height or size
        if width * height > s.max_pixels:
            source = (
                "LATENTD_DEFAULT_SIZE"
                if s.default_size
                else "the model's size"
                if native_size
                else "the default"
            )
            defaulted = "" if req.width and req.height else f" ({size} where left out: {source})"
            raise InvalidRequest(
                f"width × height = {width * height} pixels{defaulted} exceeds the limit of {s.max_pixels}",
                param="height" if req.height and not req.width else "width",
            )
        if req.num_images > s.max_images:
            raise InvalidRequest(f"num_images must be at most {s.max_images}", param="num_images")
        steps = req.steps or s.default_steps
        work = width * height * req.num_images * steps
        if work > s.max_work:
            # Blame a field the client sent: the OpenAI route has no steps.
            sent = [f for f in ("steps", "num_images", "width", "height") if getattr(req, f) not in (None, 1)]
            raise InvalidRequest(
                f"width × height × num_images × steps = {work} exceeds the limit of {s.max_work}",
                param=(sent or ["steps"])[0],
            )
        return JobPayload(
            job_id=job_id,
            model=req.model or s.default_model,
            prompt=req.prompt,
            negative_prompt=req.negative_prompt,
            width=width,
            height=height,
            steps=steps,
            guidance_scale=s.default_guidance_scale if req.guidance_scale is None else req.guidance_scale,
            seed=secrets.randbelow(MAX_SEED + 1) if req.seed is None else req.seed,
            num_images=req.num_images,
            scheduler=req.scheduler,
            output_format=req.output_format,
        )

    async def submit(
        self, req: GenerationRequest, owner: str | None = None, idempotency_key: str | None = None
    ) -> SubmitResponse:
        job_id = uuid.uuid4().hex
        model = req.model or self.settings.default_model
        # A model nobody serves is refused at enqueue; the smallest size keeps the limits on size
        # and work from speaking first.
        served = await self.served_models(model)
        payload = self.resolve(req, job_id, served.get(model, 64))
        if idempotency_key is None:
            return await self._enqueue(payload, owner, served)
        # Claim the key atomically; a replay finds the first claim and gets its job back.
        scoped = f"{owner or ''}\x00{idempotency_key}"  # one caller's key never reaches another's job
        key = Keys.idempotency(hashlib.sha256(scoped.encode()).hexdigest())
        digest = hashlib.sha256(req.model_dump_json().encode()).hexdigest()
        deadline = time.monotonic() + IDEMPOTENT_WAIT_S
        while isinstance(
            earlier := await self.aredis.eval(_CLAIM, 1, key, f"{job_id}:{digest}", IDEMPOTENT_PENDING_S),
            bytes | str,
        ):
            earlier_id, _, earlier_digest = as_text(earlier).partition(":")
            if earlier_digest != digest:
                raise IdempotencyConflict(
                    "this Idempotency-Key was already used with a different request body",
                    param="Idempotency-Key",
                )
            try:
                view = await self.get(earlier_id, owner)
            except NotFound:
                # The first request with this key is still being accepted, or has just failed
                # and released the key (the next claim is then ours).
                if time.monotonic() > deadline:
                    raise IdempotencyConflict(
                        "a request with this Idempotency-Key is still being accepted; retry",
                        param="Idempotency-Key",
                        retry_after=1,
                    ) from None
                await asyncio.sleep(0.02)
                continue
            return SubmitResponse(
                id=view.id,
                status=view.status,
                queue_position=view.queue_position,
                created_at=view.timings.created_at,
                links=view.links,
            )
        return await self._enqueue(payload, owner, served, claim=key)

    async def _reserve_slot(self, owner: str, job_id: str) -> None:
        limit = self.settings.max_jobs_in_flight
        if not limit:
            return
        granted = await self.aredis.eval(
            _RESERVE, 1, Keys.in_flight(owner), limit, job_id, time.time(), self.settings.job_ttl
        )
        if not granted:
            raise TooManyJobs(
                f"this API key has {limit} jobs queued or running; wait for one to end",
                retry_after=QUEUE_FULL_RETRY_AFTER,
            )

    async def _model_unavailable(self, model: str, served: dict[str, int | None]) -> ModelUnavailable:
        """400 for a model no worker served lately (a typo, most likely); 503 with Retry-After for
        one a worker served, or began to load, within COMING_BACK_S: its worker is restarting or
        loading, and a client that retries (OpenAI's SDKs, `latentd generate`) gets through."""
        listed = f"; served: {', '.join(sorted(served))}" if served else "; no worker is running"
        seen = await self.aredis.hget(Keys.MODELS_SEEN, model)
        ago = time.time() - float(seen) if seen is not None else None
        if ago is None or ago > COMING_BACK_S:
            return ModelUnavailable(f"no live worker serves model '{model}'{listed}", param="model")
        return ModelUnavailable(
            f"no live worker serves model '{model}' right now; one served it or began loading it "
            f"{max(0, round(ago))} s ago (restarting or loading?): retry shortly{listed}",
            param="model",
            status_code=503,
            retry_after=MODEL_RETRY_AFTER,
        )

    async def _enqueue(
        self, payload: JobPayload, owner: str | None, served: dict[str, int | None], claim: str | None = None
    ) -> SubmitResponse:
        """Queue the job, if a live worker serves its model (`served`, as `served_models` read it
        for this submit). Where nothing was accepted, the owner's in-flight slot and the
        Idempotency-Key `claim` are let go.

        Where the enqueue's reply did not come (a timeout, a dropped connection, the request
        given up), the job may stand: the script may have run, or may still run once a stalled
        Redis wakes. Both stay then: the claim, to be found by a replay if the job was taken
        (the script made it last as long as the job) or to lapse in IDEMPOTENT_PENDING_S if not;
        the slot, dropped within a minute if no job came of it (`_RESERVE`). Let go, a replay
        made a second job of the same request."""
        job_id = payload.job_id
        sent = False
        try:
            if payload.model not in served:
                raise await self._model_unavailable(payload.model, served)
            queue = self.queue(payload.model)
            if owner is not None:
                await self._reserve_slot(owner, job_id)
            sent = True
            job, length = await self._rq_enqueue(queue, payload, owner, claim)
            sent = False
            if length < 0:
                depth = self.settings.max_queue_depth
                raise QueueFull(
                    f"the queue for '{payload.model}' holds {depth} jobs; retry later",
                    retry_after=QUEUE_FULL_RETRY_AFTER,
                )
        except BaseException as exc:
            unknown = sent and isinstance(exc, (*STORE_DOWN, asyncio.CancelledError))
            if not unknown and (owner is not None or claim is not None):
                async with self.aredis.pipeline(transaction=False) as release:
                    if owner is not None:
                        release.zrem(Keys.in_flight(owner), job_id)
                    if claim is not None:
                        release.delete(claim)
                    await release.execute()
            raise
        return SubmitResponse(
            id=job_id,
            status=JobStatus.QUEUED,
            queue_position=length - 1,
            created_at=_aware(job.created_at) or datetime.now(UTC),
            links=self.links(job_id),
        )

    async def _rq_enqueue(
        self, queue: Queue, payload: JobPayload, owner: str | None, claim: str | None = None
    ) -> tuple[Job, int]:
        """RQ's own enqueue, sent over the asyncio client: RQ writes its commands into a blocking
        pipeline that is never executed, and the same commands run here in one script, only if
        the queue is under its depth limit. Returns the job and the queue's length right after
        the push (its place plus one), or -1 if the queue was full and nothing was written."""
        job = queue.create_job(
            JOB_FUNCTION,
            args=(payload.model_dump(mode="json"),),
            job_id=payload.job_id,
            timeout=self.settings.job_timeout,
            result_ttl=self.settings.job_ttl,
            failure_ttl=self.settings.job_ttl,
            # Retries are only spent on jobs whose worker died; the worker fails real errors at once.
            retry=Retry(max=self.settings.max_attempts - 1) if self.settings.max_attempts > 1 else None,
            description=f"generate model={payload.model}",
            meta={"owner": owner} if owner is not None else None,
        )
        staged = self.redis.pipeline(transaction=True)
        try:
            queue.enqueue_job(job, pipeline=staged)
            flat: list[str | bytes | int | float] = []
            for args, _ in staged.command_stack:
                flat += [len(args), *args]
        finally:
            staged.reset()
        ttl = self.settings.job_ttl
        length = int(
            await self._enqueue_script(
                keys=[queue.key, job.key, Keys.jobs(owner), *([claim] if claim else [])],
                args=[self.settings.max_queue_depth, ttl, job.id, *flat],
            )
        )
        if length == -2:  # sent again: where it stands now (taken by a worker already: first)
            position = await self.aredis.lpos(queue.key, job.id)
            length = (position if isinstance(position, int) else 0) + 1
        return job, length

    # -- read ------------------------------------------------------------------

    @staticmethod
    def links(job_id: str) -> Links:
        base = f"/v1/generations/{job_id}"
        return Links(self=base, cancel=f"{base}/cancel")

    async def get(self, job_id: str, owner: str | None = None) -> Generation:
        reply = await self._read_async(self._read_keys(job_id), self._read_args(job_id))
        return self._from_read(job_id, reply, owner)

    def read(self, job_id: str, owner: str | None = None) -> Generation:
        """`get` with the blocking client, for route threads."""
        reply = self._read_sync(self._read_keys(job_id), self._read_args(job_id))
        return self._from_read(job_id, reply, owner)

    @staticmethod
    def _read_keys(job_id: str) -> list[str]:
        return [Job.redis_job_namespace_prefix + job_id, Keys.state(job_id), Keys.cancel(job_id)]

    @staticmethod
    def _read_args(job_id: str) -> list[str]:
        return [Queue.redis_queue_namespace_prefix, job_id]

    def _from_read(
        self, job_id: str, reply: object, owner: str | None, any_owner: bool = False
    ) -> Generation:
        """The view of one `_READ` reply; another key's job is as unknown as a missing one, and so
        is a key's job to a caller without one (the service open again, `latentd keys open`)."""
        if not isinstance(reply, list):
            raise NotFound(f"no generation with id '{job_id}'", param="id")
        raw_job, raw_state, cancel_flag, position = reply
        job = JobRecord.parse(job_id, _pairs(raw_job))
        if job.owner != owner and not any_owner:
            raise NotFound(f"no generation with id '{job_id}'", param="id")
        state = {as_text(k): as_text(v) for k, v in _pairs(raw_state).items()}
        return self._view(job, state, bool(cancel_flag), int(position) if int(position) >= 0 else None)

    def _view(
        self, job: JobRecord, state: dict[str, str], cancel_flag: bool, position: int | None
    ) -> Generation:
        request = ResolvedRequest.model_validate(job.args[0])  # the JobPayload, less its envelope
        status = JobStatus.from_rq(job.rq_status)
        step = int(state.get(StateField.STEP, 0))
        total = int(state.get(StateField.TOTAL_STEPS, request.steps))
        if status is JobStatus.SUCCEEDED:
            step = total
        started = job.started_at
        finished = job.ended_at if status.is_terminal() else None
        if StateField.CANCELED_AT in state and status in _CANCELED_ONCE_SEEN:
            # A worker saw the cancel: the job commits nothing. RQ records it so once the pipeline
            # call, which other jobs of its batch may keep running a while, has ended (or a reaper,
            # should that worker die meanwhile); it ended when seen.
            status = JobStatus.CANCELED
            finished = datetime.fromtimestamp(float(state[StateField.CANCELED_AT]), UTC)
        inference = None
        if StateField.INFERENCE_STARTED in state and StateField.INFERENCE_FINISHED in state:
            inference = round(
                float(state[StateField.INFERENCE_FINISHED]) - float(state[StateField.INFERENCE_STARTED]), 4
            )
        images: list[ImageInfo] = []
        if status is JobStatus.SUCCEEDED and StateField.IMAGES in state:
            for meta in json.loads(state[StateField.IMAGES]):
                m = ImageMeta.model_validate(meta)
                images.append(
                    ImageInfo(
                        index=m.index,
                        seed=m.seed,
                        content_type=m.content_type,
                        url=f"/v1/generations/{job.id}/images/{m.index}",
                        withheld=m.withheld,
                        expires_at=None
                        if m.expires_at is None
                        else datetime.fromtimestamp(m.expires_at, UTC),
                    )
                )
        error = None
        if status is JobStatus.FAILED:
            if StateField.ERROR in state:
                error = JobErrorInfo.model_validate_json(state[StateField.ERROR])
            else:
                error = JobErrorInfo(code="generation_failed", message="the job failed in the worker")
        created = job.created_at or datetime.now(UTC)
        return Generation(
            id=job.id,
            status=status,
            queue_position=position if status is JobStatus.QUEUED else None,
            progress=Progress(
                step=step, total_steps=total, fraction=round(step / total, 4) if total else 0.0
            ),
            request=request,
            timings=Timings(
                created_at=created,
                started_at=started,
                finished_at=finished,
                queue_seconds=_seconds(job.enqueued_at or created, started),
                inference_seconds=inference,
            ),
            images=images,
            error=error,
            attempts=int(state.get(StateField.ATTEMPTS, 0)),
            warnings=json.loads(state.get(StateField.WARNINGS, "[]")),
            cancel_requested=cancel_flag and not status.is_terminal(),
            links=self.links(job.id),
        )

    async def image(
        self, job_id: str, index: int, owner: str | None = None, any_owner: bool = False
    ) -> ImageBlob:
        # The record and the bytes at once (one round trip's wait); the bytes count only if the
        # record says the caller may have them.
        reply, data = await asyncio.gather(
            self._read_async(self._read_keys(job_id), self._read_args(job_id)),
            self.aredis.get(Keys.image(job_id, index)),
        )
        status = self._from_read(job_id, reply, owner, any_owner).status
        if not status.is_terminal():
            raise NotReady(
                f"generation '{job_id}' is {status.value}; its images can be fetched once it has succeeded",
                param="id",
            )
        if status is not JobStatus.SUCCEEDED:
            raise NotFound(f"generation '{job_id}' has no images (status {status.value})", param="id")
        state = {as_text(k): as_text(v) for k, v in _pairs(reply[1]).items()}
        raw = state.get(StateField.IMAGES)
        metas = [ImageMeta.model_validate(m) for m in json.loads(raw)] if raw else []
        if not 0 <= index < len(metas):
            raise NotFound(f"generation '{job_id}' has no image {index}", param="index")
        meta = metas[index]
        if data is None:  # the worker's LATENTD_RESULTS_TTL decides when, not this process's
            when = f" at {_iso(meta.expires_at)}" if meta.expires_at else ""
            raise Expired(f"image {index} of generation '{job_id}' has expired{when}", param="index")
        assert isinstance(data, bytes)  # the pool does not decode responses
        return ImageBlob(
            data=data, content_type=meta.content_type, etag=meta.etag, expires_at=meta.expires_at
        )

    # -- list ------------------------------------------------------------------

    async def list_jobs(
        self, owner: str | None, limit: int, after: str | None = None, status: JobStatus | None = None
    ) -> GenerationList:
        """A page of the owner's jobs submitted within LATENTD_JOB_TTL, newest first, older than the
        job `after` if given, read in one round trip (`_LIST`). With `status`, the page may hold
        fewer than `limit` while more follow: one read looks at LIST_SCAN entries at most."""
        taken = ""
        if status is not None:
            statuses = set(status.rq_statuses())
            if status is JobStatus.CANCELED:  # a worker saw its cancel: RQ may say otherwise yet
                statuses |= {rq for seen in _CANCELED_ONCE_SEEN for rq in seen.rq_statuses()}
            taken = "," + ",".join(sorted(statuses)) + ","
        reply = await self._list_script(
            keys=[Keys.jobs(owner)],
            args=[
                time.time() - self.settings.job_ttl,
                after or "",
                limit + 1,  # one more than the page: whether more follow
                max(LIST_SCAN, limit + 1),
                taken,
                Job.redis_job_namespace_prefix,
                Keys.state(""),
                Keys.cancel(""),
                Queue.redis_queue_namespace_prefix,
            ],
        )
        if not isinstance(reply, list):
            raise InvalidRequest(
                f"after: no generation '{after}' among yours submitted in the last "
                f"{self.settings.job_ttl} s (LATENTD_JOB_TTL); use an id from `data`, as `next` does",
                param="after",
            )
        found, last, ended = reply
        views: list[Generation] = []
        for job_id, read in zip(found[::2], found[1::2], strict=True):
            try:
                view = self._from_read(as_text(job_id), read, owner)
            except NotFound:  # not the owner's (never so: the list is the owner's own), as in a read
                continue
            if status is None or view.status is status:
                views.append(view)
        resume: str | None
        if len(views) > limit:
            views, resume = views[:limit], views[limit - 1].id
        else:
            # Fewer than asked: the end, unless the read stopped at its LIST_SCAN or at `limit + 1`
            # jobs of which the filter dropped some; it resumes after the last it looked at.
            resume = None if int(ended) else as_text(last)
        next_page = None
        if resume is not None:
            query = {"limit": limit, "after": resume, **({"status": status.value} if status else {})}
            next_page = f"/v1/generations?{urllib.parse.urlencode(query)}"
        return GenerationList(data=views, has_more=next_page is not None, next=next_page)

    # -- cancel ----------------------------------------------------------------

    def cancel(self, job_id: str, owner: str | None = None) -> Generation:
        status = self.read(job_id, owner).status
        if status.is_terminal():
            raise NotCancelable(f"generation '{job_id}' already ended with status {status.value}", param="id")
        # The flag first: a worker that takes the job at this very moment sees it
        # before its first step; one already running sees it at its next step, or at its commit.
        if not self.redis.eval(_CANCEL, 2, Keys.state(job_id), Keys.cancel(job_id), self.settings.job_ttl):
            raise NotCancelable(
                f"generation '{job_id}' has finished: its images are stored, and it ends succeeded",
                param="id",
            )
        if status is JobStatus.QUEUED:
            self._cancel_queued(job_id)
        return self.read(job_id, owner)

    def _cancel_queued(self, job_id: str) -> None:
        """Cancel a job still in its queue, unless a worker takes it meanwhile: then the flag
        stops it, before its first step or at its next one."""
        try:
            job = Job.fetch(job_id, connection=self.redis, serializer=JSONSerializer)
        except NoSuchJobError:
            return  # expired meanwhile
        queue = Queue(job.origin, connection=self.redis, serializer=JSONSerializer)
        model = str(job.args[0].get("model", "?")) if job.args else "?"
        at = now()
        keys = (
            queue.key,
            queue.intermediate_queue_key,
            job.key,
            queue.canceled_job_registry.key,
            Keys.OUTCOMES,
        )
        args = (job_id, utcformat(at), self.settings.job_ttl, int(at.timestamp()))
        self.redis.eval(
            _CANCEL_QUEUED, len(keys), *keys, *args, f"{model}|{JobStatus.CANCELED.value}|", Keys.ENDED
        )

    # -- waiting (OpenAI-style endpoint) -----------------------------------------

    async def wait(
        self, job_id: str, owner: str | None, timeout: float, gone: Callable[[], bool] = lambda: False
    ) -> Generation:
        """The job's view as soon as it ends, when `timeout` passes, when the server stops, or when
        the client is `gone` (a client that hung up was waited for to the end, a Redis read a
        second each). Woken by `Keys.ENDED`; the record is re-read every RECHECK seconds too, in
        case a message was missed."""
        deadline = time.monotonic() + timeout
        with self.ended.watch(job_id) as ended:
            while True:
                view = await self.get(job_id, owner)
                if _cancel_requested():
                    raise asyncio.CancelledError
                left = deadline - time.monotonic()
                if view.status.is_terminal() or left <= 0 or self.ended.closing or gone():
                    return view
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(ended.wait(), min(left, RECHECK))
                ended.clear()
