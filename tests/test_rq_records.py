"""The API writes and reads RQ's job records itself on its hot paths (RQ's enqueue commands sent over
the asyncio client; status reads parsed without an RQ Job). These tests hold both to RQ's own code."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest
import redis
import redis.asyncio
import redis.asyncio.client
from fastapi.testclient import TestClient
from rq import Retry
from rq.job import Job
from rq.serializers import JSONSerializer

from app import serving
from app.config import ApiSettings
from app.errors import NotFound
from app.main import create_app
from app.serving import GenerationService, JobRecord
from latentd.contract import JOB_FUNCTION, JobPayload, JobStatus, Keys
from tests.conftest import PRIVATE_DB, RedisServer

PAYLOAD = JobPayload(
    job_id="ours",
    model="m",
    prompt="a red circle",
    negative_prompt="",
    width=64,
    height=64,
    steps=2,
    guidance_scale=5.0,
    seed=1,
    num_images=1,
    scheduler="ddim",
    output_format="png",
)


def run_with_service(server: RedisServer, client: redis.Redis, scenario: Callable[..., Any]) -> Any:
    """Runs `scenario(service)` on one event loop, with a service on the private database."""
    url = server.url_for(PRIVATE_DB)

    async def main() -> Any:
        aclient = redis.asyncio.Redis.from_url(url)
        try:
            return await scenario(GenerationService(client, aclient, ApiSettings(redis_url=url)))
        finally:
            await aclient.aclose()

    return asyncio.run(main())


def _hash(r: redis.Redis, job_id: str) -> dict[str, bytes]:
    return {k.decode(): v for k, v in r.hgetall(f"rq:job:{job_id}").items()}


def test_enqueue_writes_what_rq_enqueue_writes(redis_server: RedisServer, redis_client: redis.Redis) -> None:
    async def scenario(service: GenerationService) -> tuple[GenerationService, Job, int]:
        job, length = await service._rq_enqueue(service.queue("m"), PAYLOAD, owner="alice")
        return service, job, length

    service, job, length = run_with_service(redis_server, redis_client, scenario)
    assert length == 1
    queue = service.queue("m")
    theirs = queue.enqueue(
        JOB_FUNCTION,
        PAYLOAD.model_copy(update={"job_id": "theirs"}).model_dump(mode="json"),
        job_id="theirs",
        job_timeout=service.settings.job_timeout,
        result_ttl=service.settings.job_ttl,
        failure_ttl=service.settings.job_ttl,
        retry=Retry(max=service.settings.max_attempts - 1),
        description=job.description,
        meta={"owner": "alice"},
    )
    ours_hash, theirs_hash = _hash(redis_client, "ours"), _hash(redis_client, "theirs")
    assert set(ours_hash) == set(theirs_hash)
    differ = {k for k in ours_hash if ours_hash[k] != theirs_hash[k]}
    assert differ <= {"created_at", "enqueued_at", "data"}, differ  # times, and the job id inside the args
    assert redis_client.lrange(queue.key, 0, -1) == [b"ours", b"theirs"]
    assert redis_client.sismember("rq:queues", queue.key)
    assert redis_client.ttl("rq:job:ours") == redis_client.ttl("rq:job:theirs")
    fetched = Job.fetch("ours", connection=redis_client, serializer=JSONSerializer)
    assert fetched.args[0] == PAYLOAD.model_dump(mode="json")
    assert fetched.get_status() == theirs.get_status() == "queued"


def test_a_queued_jobs_cancel_writes_what_rq_cancel_writes(
    redis_server: RedisServer, redis_client: redis.Redis
) -> None:
    async def scenario(service: GenerationService) -> GenerationService:
        for job_id in ("ours", "theirs"):
            await service._rq_enqueue(
                service.queue("m"), PAYLOAD.model_copy(update={"job_id": job_id}), owner="a"
            )
        return service

    service = run_with_service(redis_server, redis_client, scenario)
    queue = service.queue("m")
    service._cancel_queued("ours")
    Job.fetch("theirs", connection=redis_client, serializer=JSONSerializer).cancel()
    ours_hash, theirs_hash = _hash(redis_client, "ours"), _hash(redis_client, "theirs")
    assert set(ours_hash) == set(theirs_hash)
    differ = {k for k in theirs_hash if ours_hash[k] != theirs_hash[k]}
    assert differ <= {"created_at", "enqueued_at", "data", "ended_at"}, differ
    assert theirs_hash["ended_at"] == b""  # RQ's cancel leaves it unset; ours says when
    assert Job.fetch("ours", connection=redis_client, serializer=JSONSerializer).ended_at is not None
    assert ours_hash["status"] == b"canceled"
    assert redis_client.llen(queue.key) == 0
    registry = queue.canceled_job_registry
    assert sorted(registry.get_job_ids(cleanup=False)) == ["ours", "theirs"]
    assert abs(redis_client.zscore(registry.key, "ours") - redis_client.zscore(registry.key, "theirs")) <= 1  # type: ignore[operator]
    assert redis_client.ttl("rq:job:ours") == service.settings.job_ttl
    assert Job.fetch("ours", connection=redis_client, serializer=JSONSerializer).is_canceled


def test_status_read_matches_rq_restore(redis_server: RedisServer, redis_client: redis.Redis) -> None:
    async def enqueue(service: GenerationService) -> None:
        await service._rq_enqueue(service.queue("m"), PAYLOAD, owner="bob")

    run_with_service(redis_server, redis_client, enqueue)
    job = Job.fetch("ours", connection=redis_client, serializer=JSONSerializer)
    job.started_at = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
    job.ended_at = datetime(2026, 1, 2, 3, 4, 9, tzinfo=UTC)
    job.save()
    job.set_status("finished")
    rq_job = Job.fetch("ours", connection=redis_client, serializer=JSONSerializer)
    record = JobRecord.parse("ours", redis_client.hgetall("rq:job:ours"))  # type: ignore[arg-type]
    assert record.rq_status == rq_job.get_status() == "finished"
    assert record.args == list(rq_job.args)
    assert record.owner == rq_job.meta["owner"] == "bob"
    for field in ("created_at", "enqueued_at", "started_at", "ended_at"):
        assert getattr(record, field) == getattr(rq_job, field), field

    async def read(service: GenerationService) -> None:
        view = await service.get("ours", owner="bob")
        assert view.status == "succeeded" and view.timings.finished_at == job.ended_at
        with pytest.raises(NotFound):  # another key's job is as unknown as a missing one
            await service.get("ours", owner="mallory")

    run_with_service(redis_server, redis_client, read)


def test_a_waiting_read_wakes_on_the_ended_message(
    redis_server: RedisServer, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`wait` answers when `Keys.ENDED` names the job, not at its periodic re-read (made 30 s here)."""
    monkeypatch.setattr(serving, "RECHECK", 30.0)

    async def scenario(service: GenerationService) -> float:
        await service._rq_enqueue(service.queue("m"), PAYLOAD, owner=None)
        listener = asyncio.create_task(service.ended.listen())
        try:
            await asyncio.sleep(0.2)  # subscribed
            waiter = asyncio.create_task(service.wait("ours", None, timeout=25))
            await asyncio.sleep(0.2)
            assert not waiter.done()
            started = time.monotonic()
            await service.aredis.hset("rq:job:ours", "status", "canceled")  # as RQ's cancel does
            await service.aredis.publish(Keys.ENDED, "ours")
            view = await asyncio.wait_for(waiter, 20)
            assert view.status == "canceled"
            return time.monotonic() - started
        finally:
            listener.cancel()

    assert run_with_service(redis_server, redis_client, scenario) < 10


async def drop_a_cancel() -> None:
    """A shutdown's cancel arrives at the running task and is dropped, as `asyncio.wait_for`
    drops one that lands in the turn its awaitable finishes; the request stays counted."""
    task = asyncio.current_task()
    assert task is not None
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.sleep(0)


def test_the_ended_listener_stops_on_a_cancel_that_redis_py_swallowed(
    redis_server: RedisServer, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """redis-py sends under `asyncio.wait_for`, which before Python 3.12 drops a cancel that lands
    in the turn its command finishes: the call returns normally, the request stays counted. Here a
    read gets such a cancel and drops it. Before, the listener read on, and the API's shutdown
    waited on it for ever."""
    real = redis.asyncio.client.PubSub.get_message
    swallowed: list[bool] = []

    async def get_message(self: redis.asyncio.client.PubSub, *args: Any, **kwargs: Any) -> Any:
        if not swallowed:
            swallowed.append(True)
            await drop_a_cancel()  # while the channel is being read
            return None
        return await real(self, *args, **kwargs)

    monkeypatch.setattr(redis.asyncio.client.PubSub, "get_message", get_message)

    async def scenario(service: GenerationService) -> bool:
        listener = asyncio.create_task(service.ended.listen())
        await asyncio.wait({listener}, timeout=5)
        return listener.cancelled()

    assert run_with_service(redis_server, redis_client, scenario)
    assert swallowed == [True]


def test_the_api_shuts_down_at_once_every_time(redis_server: RedisServer) -> None:
    """The swallowed cancel above, as it happens: about one in twenty in-process starts had hung at
    exit (5 s of waiting, then for ever in asyncio's own clean-up)."""
    settings = ApiSettings(redis_url=redis_server.url_for(PRIVATE_DB))
    for _ in range(60):
        with TestClient(create_app(settings)) as client:
            assert client.get("/healthz").status_code == 200
            started = time.monotonic()
        assert time.monotonic() - started < 3


def test_a_waiting_read_stops_on_a_cancel_that_redis_py_swallowed(
    redis_server: RedisServer, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same swallowed cancel, in a long-poll's re-read. Before, the read waited out its timeout
    (up to LATENTD_SYNC_TIMEOUT on the OpenAI route), and held the API's shutdown as long."""
    real = GenerationService.get
    swallowed: list[bool] = []

    async def get(self: GenerationService, *args: Any, **kwargs: Any) -> Any:
        if not swallowed:
            swallowed.append(True)
            await drop_a_cancel()  # while the record is being read
        return await real(self, *args, **kwargs)

    monkeypatch.setattr(GenerationService, "get", get)

    async def scenario(service: GenerationService) -> bool:
        await service._rq_enqueue(service.queue("m"), PAYLOAD, owner=None)
        waiter = asyncio.create_task(service.wait("ours", None, timeout=30))
        await asyncio.wait({waiter}, timeout=5)
        return waiter.cancelled()

    assert run_with_service(redis_server, redis_client, scenario)
    assert swallowed == [True]


def _worker(r: redis.Redis) -> tuple[Any, Any]:
    from rq import Queue

    from worker.main import LatentdWorker

    queue = Queue("latentd:m", connection=r, serializer=JSONSerializer)
    worker = LatentdWorker([queue], connection=r, name="t", serializer=JSONSerializer, model="m")
    worker.register_birth()
    return worker, queue


def test_lapsed_leases_are_no_deaths_within_a_lease_of_redis_trouble(redis_client: redis.Redis) -> None:
    # Back from an outage, RQ's maintenance in a live worker took other live workers' running
    # jobs for lost (their leases lapsed while no one could renew them).
    worker, queue = _worker(redis_client)
    queue.enqueue(JOB_FUNCTION, PAYLOAD.model_dump(mode="json"), job_id="ours")
    job, _ = queue.dequeue_any([queue], None, connection=redis_client, serializer=JSONSerializer)
    execution = worker.prepare_execution(job)
    worker.prepare_job_execution(
        job, remove_from_intermediate_queue=True
    )  # started, as RQ's perform_job does
    redis_client.zadd(queue.started_job_registry.key, {f"ours:{execution.id}": 1})  # lapsed long ago
    worker.redis_trouble()  # Redis was out of reach just now
    worker.clean_registries()  # RQ's maintenance
    assert Job.fetch("ours", connection=redis_client, serializer=JSONSerializer).get_status() == "started"
    worker.reap_from = 0.0  # a lease later
    worker.clean_registries()
    assert Job.fetch("ours", connection=redis_client, serializer=JSONSerializer).get_status() == "failed"


def test_rqs_maintenance_reaps_nothing_while_the_heartbeat_is_late(redis_client: redis.Redis) -> None:
    # Redis frozen just after a worker said ready: its main thread, in RQ's start, met Redis as it
    # woke, and RQ's maintenance re-queued a live worker's job whose lease lapsed meanwhile, a
    # millisecond before the heartbeat thread, kept waiting too, said so (helper-60).
    worker, queue = _worker(redis_client)
    _lapsed(redis_client, queue, "theirs")
    worker.beat_late = 2.0
    worker.beaten = time.monotonic() - 5  # its heartbeat's last beat, before the freeze
    worker.clean_registries()
    assert Job.fetch("theirs", connection=redis_client, serializer=JSONSerializer).get_status() == "started"
    worker.beaten = time.monotonic()  # on time again
    worker.clean_registries()
    assert Job.fetch("theirs", connection=redis_client, serializer=JSONSerializer).get_status() == "failed"


def test_rqs_maintenance_counts_leases_lapsed_as_of_before_redis_kept_it_waiting(
    redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Redis frozen as a worker's maintenance began (its loop's first turn), the heartbeat on time when
    # it looked: RQ took the time after its first calls, as Redis woke, when a live worker's lease
    # had lapsed unrenewed, and re-queued its running job (helper-61).
    worker, queue = _worker(redis_client)
    _lapsed(redis_client, queue, "theirs")
    redis_client.zadd(queue.started_job_registry.key, {"theirs:run": time.time() + 1.5})  # renewed lately
    worker.beat_late = 10.0
    worker.beaten = time.monotonic()
    call = redis.Redis.execute_command
    frozen = [True]

    def answered_late(self: redis.Redis, *args: Any, **options: Any) -> Any:
        if frozen:
            frozen.clear()
            time.sleep(3)  # the maintenance's first call, until Redis woke
        return call(self, *args, **options)

    monkeypatch.setattr(redis.Redis, "execute_command", answered_late)
    worker.clean_registries()
    assert Job.fetch("theirs", connection=redis_client, serializer=JSONSerializer).get_status() == "started"
    worker.clean_registries()  # the next turn: lapsed as of its start, taken for lost
    assert Job.fetch("theirs", connection=redis_client, serializer=JSONSerializer).get_status() == "failed"


def test_a_taken_job_canceled_before_it_goes_back_to_its_queue_stays_canceled(
    redis_client: redis.Redis,
) -> None:
    # Its requeue took it off the intermediate list, then enqueued it: a cancel in between found it
    # queued on no list and canceled it, and the enqueue saved it queued again.
    from worker.main import STUCK_IN_INTERMEDIATE_QUEUE

    worker, queue = _worker(redis_client)
    for job_id in ("canceled", "taken"):
        queue.enqueue(JOB_FUNCTION, PAYLOAD.model_dump(mode="json"), job_id=job_id)
        redis_client.lmove(queue.key, queue.intermediate_queue_key, "LEFT", "RIGHT")  # its worker died
    redis_client.hset("rq:job:canceled", "status", "canceled")
    for job_id in ("canceled", "taken"):
        job = Job.fetch(job_id, connection=redis_client, serializer=JSONSerializer)
        worker.handle_job_failure(job, queue, exc_string=STUCK_IN_INTERMEDIATE_QUEUE)
    assert redis_client.hget("rq:job:canceled", "status") == b"canceled"
    assert redis_client.lrange(queue.key, 0, -1) == [b"taken"]
    assert redis_client.llen(queue.intermediate_queue_key) == 0


def test_the_reaper_trims_canceled_jobs_past_their_records_lifetime(redis_client: redis.Redis) -> None:
    from latentd.contract import WorkerInfo
    from worker.main import Heartbeat

    worker, queue = _worker(redis_client)
    info = WorkerInfo(name="t", model="m", device="cpu", pid=1, hostname="h", started_at=0)
    now = time.time()
    redis_client.zadd(queue.canceled_job_registry.key, {"old": now - worker.job_ttl - 10, "new": now})
    Heartbeat(worker, info, 1.0, queue).reap()
    assert redis_client.zrange(queue.canceled_job_registry.key, 0, -1) == [b"new"]


def _lapsed(r: redis.Redis, queue: Any, job_id: str) -> None:
    """A job its worker took and started, then died: its lease lapsed long ago."""
    queue.enqueue(JOB_FUNCTION, PAYLOAD.model_dump(mode="json"), job_id=job_id)
    r.lrem(queue.key, 1, job_id)
    r.hset(f"rq:job:{job_id}", "status", "started")
    r.zadd(queue.started_job_registry.key, {f"{job_id}:run": 1})


def _api_reaper(r: redis.Redis, lease: int = 2) -> Any:
    """One whose looks have found no worker alive for an hour."""
    from app.reaper import Reaper

    reaper = Reaper(r, lease, 3600, "a", any_worker_alive=lambda: False)
    reaper.alone_since = time.monotonic() - 3600
    reaper.beats = r.get(Keys.BEATS)
    return reaper


def test_the_apis_reaper_waits_until_its_looks_found_no_worker_alive_for_a_lease(
    redis_client: redis.Redis,
) -> None:
    # A Redis frozen between two of its passes, long enough to lapse the registrations and leases
    # of workers with a shorter lease than the API's: its next pass found no worker alive, no stall
    # of its own, and re-queued a live worker's running job before the worker renewed its lease.
    from rq import Queue

    r = redis_client
    _lapsed(r, Queue("latentd:a", connection=r, serializer=JSONSerializer), "running")
    reaper = _api_reaper(r, lease=30)
    reaper.alone_since = None
    reaper.reap_from = 0.0  # a lease after its start
    reaper.reap()  # the first look that finds none
    assert Job.fetch("running", connection=r, serializer=JSONSerializer).get_status() == "started"
    reaper.any_worker_alive = lambda: True  # its worker registered again
    reaper.reap()
    assert reaper.alone_since is None
    reaper.any_worker_alive = lambda: False
    reaper.reap()
    assert Job.fetch("running", connection=r, serializer=JSONSerializer).get_status() == "started"
    reaper.reap_from = None  # Redis came back from trouble: a worker may have come meanwhile
    reaper.alone_since -= 3600
    reaper.reap()
    assert reaper.alone_since is not None and time.monotonic() - reaper.alone_since < 5
    reaper.reap_from = 0.0
    reaper.alone_since -= 30  # none alive at any look for a lease: the job's worker is gone
    reaper.reap()
    assert Job.fetch("running", connection=r, serializer=JSONSerializer).get_status() == "failed"


def test_the_apis_reaper_drops_a_job_it_cannot_read_and_reaps_the_rest(redis_client: redis.Redis) -> None:
    # RQ's pass stopped at a job it could not read, before it saved any: the jobs after it, and
    # every queue after its own, were never reaped; those before it were counted lost at each pass.
    from rq import Queue

    r = redis_client
    first, second = (Queue(f"latentd:{m}", connection=r, serializer=JSONSerializer) for m in "ab")
    for queue, job_id in ((first, "a-bad"), (first, "a-good"), (second, "b-good")):
        _lapsed(r, queue, job_id)
    r.hset("rq:job:a-bad", "status", "no status RQ knows")
    reaper = _api_reaper(r)
    reaper.reap_from = 0.0  # a lease after its start
    reaper.reap()
    reaper.reap()
    for job_id in ("a-good", "b-good"):  # one attempt each: failed, as lost
        assert Job.fetch(job_id, connection=r, serializer=JSONSerializer).get_status() == "failed"
    assert r.hgetall(Keys.OUTCOMES) == {b"a|failed|worker_lost": b"1", b"b|failed|worker_lost": b"1"}
    assert r.zcard(first.started_job_registry.key) == 0 and r.hget("rq:job:a-bad", "status")


def test_the_apis_reaper_reaps_where_redis_refuses_info(redis_server: RedisServer) -> None:
    # INFO (its restarts' sign) refused, by an ACL (`-@dangerous`) or a renamed command: each pass
    # failed on it and was taken for Redis trouble, and nothing was ever reaped.
    from rq import Queue

    admin = redis.Redis.from_url(redis_server.url_for(PRIVATE_DB))
    admin.flushdb()
    admin.acl_setuser(
        "no-info", enabled=True, nopass=True, keys=["*"], channels=["*"], commands=["+@all", "-info"]
    )
    try:
        r = redis.Redis.from_url(redis_server.url_for(PRIVATE_DB), username="no-info", password="x")
        with pytest.raises(redis.exceptions.NoPermissionError):
            r.info("server")
        _lapsed(r, Queue("latentd:a", connection=r, serializer=JSONSerializer), "lost")
        reaper = _api_reaper(r)
        reaper.reap_from = 0.0
        reaper.reap()
        assert Job.fetch("lost", connection=r, serializer=JSONSerializer).get_status() == "failed"
    finally:
        admin.acl_deluser("no-info")
        admin.flushdb()


def test_the_apis_reaper_waits_the_longest_workers_lease_after_redis_trouble(
    redis_client: redis.Redis,
) -> None:
    # An API given a shorter lease than its workers' reaped a live worker's running job as Redis
    # came back, before the worker renewed the lease it had let lapse while Redis was gone.
    from rq import Queue

    from latentd import reaping

    r = redis_client
    reaping.record_lease(r, 30)
    reaping.record_lease(r, 10)  # the longest is kept
    assert reaping.longest_lease(r, 2) == 30 and reaping.longest_lease(r, 45) == 45
    _lapsed(r, Queue("latentd:a", connection=r, serializer=JSONSerializer), "running")
    reaper = _api_reaper(r, lease=2)
    reaper.reap_from = None  # Redis just answered again
    reaper.reap()
    assert reaper.reap_from is not None and reaper.reap_from - time.monotonic() > 25
    assert Job.fetch("running", connection=r, serializer=JSONSerializer).get_status() == "started"


@pytest.mark.parametrize("where", ["look_for_workers", "queue_lock"])
def test_the_apis_reaper_leaves_running_jobs_alone_after_redis_kept_it_waiting(
    redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, where: str
) -> None:
    # Redis frozen (SIGSTOP, swapping) for more than a lease but less than the API's socket timeout:
    # no error, and as it woke the workers' registrations (TTL 2 s) and their jobs' leases read as
    # lapsed. The API's pass re-queued a live worker's running job.
    from rq import Queue

    from latentd import reaping

    r = redis_client
    _lapsed(r, Queue("latentd:a", connection=r, serializer=JSONSerializer), "running")
    reaper = _api_reaper(r, lease=3)
    reaper.reap_from = 0.0  # a lease after its start

    def frozen() -> None:
        time.sleep(1.1)  # a third of the lease and more

    if where == "look_for_workers":
        reaper.any_worker_alive = lambda: bool(frozen())
    else:
        locks = reaping.reaper_locks

        @contextlib.contextmanager
        def slow_locks(*args: Any) -> Any:
            frozen()
            with locks(*args) as taken:
                yield taken

        monkeypatch.setattr(reaping, "reaper_locks", slow_locks)
    reaper.reap()
    assert Job.fetch("running", connection=r, serializer=JSONSerializer).get_status() == "started"
    assert reaper.reap_from is None  # a lease from the next pass
    assert sum(rec.getMessage().startswith("redis_stalled") for rec in caplog.records) == 1


def test_the_reapers_look_for_unreadable_jobs_drops_none_for_a_redis_error(
    redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A timeout reading a job dropped it from the registry: never reaped, `running` for good.
    from rq import Queue

    from latentd import reaping

    r = redis_client
    queue = Queue("latentd:a", connection=r, serializer=JSONSerializer)
    _lapsed(r, queue, "lost")
    fetch = Job.fetch.__func__  # type: ignore[attr-defined]
    calls = iter([redis.TimeoutError("slow")])

    def slow_once(cls: Any, *args: Any, **kwargs: Any) -> Any:
        if (error := next(calls, None)) is not None:
            raise error
        return fetch(cls, *args, **kwargs)

    monkeypatch.setattr(Job, "fetch", classmethod(slow_once))
    reaping.reap(queue, 3600, reaping.abandoned_handler(r, "a", 3600))
    assert Job.fetch("lost", connection=r, serializer=JSONSerializer).get_status() == "failed"


def test_the_apis_reaper_looks_for_restarts_again_after_a_busy_redis(redis_client: redis.Redis) -> None:
    # A BUSY answer to INFO (a slow script) turned the restart check off for good.
    reaper = _api_reaper(redis_client)
    info = reaper.connection.info

    def answers(*args: Any, **kwargs: Any) -> Any:
        raise redis.ResponseError("BUSY Redis is busy running a script. You can only call SCRIPT KILL")

    reaper.connection.info = answers  # type: ignore[method-assign]
    with pytest.raises(redis.ResponseError):
        reaper.reap()
    reaper.connection.info = info  # type: ignore[method-assign]
    reaper.reap()
    assert not reaper.info_refused and reaper.redis_run is not None


def test_a_worker_waits_the_longest_lease_after_redis_trouble(redis_client: redis.Redis) -> None:
    # A worker of a short lease reaped a live worker's job of a longer one as Redis came back.
    from latentd import reaping

    worker, _ = _worker(redis_client)
    worker.lease_seconds = 3
    reaping.record_lease(redis_client, 60)
    worker.longest_lease = reaping.longest_lease(redis_client, worker.lease_seconds)
    worker.redis_trouble()
    assert not worker.may_reap() and worker.reap_from - time.monotonic() > 55


def test_a_worker_registered_again_since_the_look_stays_in_the_workers_set(redis_client: redis.Redis) -> None:
    # The look found its registration expired; it registered again before the expired names were
    # removed from the set, and went unlisted (no model, no reaper's "alive") until its next beat.
    from latentd.store import forget_expired

    r = redis_client
    r.sadd(Keys.WORKERS, "back", "gone")
    r.set(Keys.worker("back"), "{}")  # registered again since the look
    forget_expired(r, ["back", "gone"])
    assert r.smembers(Keys.WORKERS) == {b"back"}


def test_the_apis_reaper_counts_a_worker_that_came_between_its_looks_as_alive(
    redis_client: redis.Redis,
) -> None:
    # helper-57: after a long time with no worker, a worker (short lease) starts and takes a job
    # between two of the API's passes (a third of the API's lease apart), then Redis freezes, still
    # between passes, long enough to lapse its registration and its job's lease. No look ever saw
    # the worker, so `alone_since` still dates from before it came: the next pass re-queues the
    # live worker's running job at once, the very reap 0caabcc meant to stop.
    from rq import Queue

    from latentd.contract import WorkerInfo
    from latentd.store import live_workers
    from worker.main import Heartbeat

    r = redis_client
    reaper = _api_reaper(r, lease=30)  # no worker seen alive for an hour
    reaper.any_worker_alive = lambda: bool(live_workers(r))
    reaper.reap_from = 0.0
    reaper.reap()  # a look: still none alive
    # Between passes: a worker starts (its first beat, as worker.main does) and takes a job ...
    worker, _ = _worker(r)
    info = WorkerInfo(name="t", model="a", device="cpu", pid=1, hostname="h", started_at=time.time())
    Heartbeat(worker, info, 1.0, Queue("latentd:a", connection=r, serializer=JSONSerializer)).beat()
    _lapsed(r, Queue("latentd:a", connection=r, serializer=JSONSerializer), "running")
    # ... and Redis freezes: its registration (TTL 3 s) and the job's lease lapse unseen.
    r.delete(Keys.worker("t"))
    reaper.reap()
    assert Job.fetch("running", connection=r, serializer=JSONSerializer).get_status() == "started"


def test_a_job_seen_canceled_reaped_on_its_last_attempt_after_its_flag_lapsed_stays_canceled(
    redis_server: RedisServer, redis_client: redis.Redis
) -> None:
    # helper-57: 6223f62's case on the job's last attempt. Its worker saw the cancel (`canceled_at`)
    # and froze; the flag lapsed, then its lease. handle_abandoned goes by the flag alone: it fails
    # the job `worker_lost`, and a job that read `canceled` (terminal) now reads `failed`.
    from rq import Queue

    r = redis_client
    _lapsed(r, Queue("latentd:a", connection=r, serializer=JSONSerializer), "seen")  # no retries left
    r.hset(Keys.state("seen"), mapping={"canceled_at": time.time() - 60, "attempts": 1})

    async def view(service: GenerationService) -> Any:
        return await service.get("seen")

    before = run_with_service(redis_server, r, view)
    assert before.status.value == "canceled"
    reaper = _api_reaper(r)
    reaper.reap_from = 0.0
    reaper.reap()
    assert r.hget("rq:job:seen", "status") != b"started"  # reaped
    after = run_with_service(redis_server, r, view)
    assert after.status.value == "canceled", (after.status, after.error)


def test_a_canceled_job_ended_by_a_reaper_and_by_its_waking_worker_is_counted_once(
    redis_client: redis.Redis,
) -> None:
    # A worker frozen with a canceled job of its batch: a reaper ended the job canceled and counted
    # it, then the worker woke and counted it again (helper-55's soak: 724 canceled counted, 722 so).
    from latentd import reaping
    from latentd.reaping import outcome_field

    r = redis_client
    r.hset(Keys.state("j"), "attempts", 1)
    reaping.record_abandoned(r, "j", "m", will_retry=False, settle=False, ttl=60, canceled=True)
    reaping.count_canceled(r, "j", "m", 60)  # the worker's `_record_canceled`, waking
    assert r.hget(Keys.OUTCOMES, outcome_field("m", JobStatus.CANCELED)) == b"1"
    reaping.count_canceled(r, "gone", "m", 60)  # a job whose state had lapsed: counted, and the mark lapses
    assert r.hget(Keys.OUTCOMES, outcome_field("m", JobStatus.CANCELED)) == b"2"
    assert 0 < r.ttl(Keys.state("gone")) <= 60


def test_the_apis_reaper_reaps_while_a_worker_that_never_loads_restarts_again_and_again(
    redis_client: redis.Redis,
) -> None:
    # helper-59: no worker alive, the job's worker long dead; a worker whose model fails to load
    # (a broken device, a GPU held by another process) is restarted by its supervisor again and
    # again (docker's backoff resets after 10 s up). Each start marks its load in models_seen and
    # each failure takes the mark back: the reaper took both for beats, found a worker alive at
    # every lease, and the job read `running` for good (its cancel changed nothing).
    from rq import Queue

    from worker.main import _FORGET_LOAD, _MARK_LOAD

    r = redis_client
    r.hset(Keys.MODELS_SEEN, "a", time.time() - 600)  # served lately, by the job's dead worker
    _lapsed(r, Queue("latentd:a", connection=r, serializer=JSONSerializer), "running")
    reaper = _api_reaper(r, lease=2)
    reaper.alone_since = None
    reaper.reap_from = 0.0  # a lease after its start
    reaper.wait = 2
    began = time.monotonic()
    next_start = began
    while time.monotonic() - began < 5 * reaper.wait:  # five leases, no worker registered at any look
        if time.monotonic() >= next_start:  # a start: the load's mark, a failure, the mark taken back
            loading = str(time.time())
            before = r.eval(_MARK_LOAD, 1, Keys.MODELS_SEEN, "a", loading) or b""
            reaper.reap()
            time.sleep(0.3)
            r.eval(_FORGET_LOAD, 1, Keys.MODELS_SEEN, "a", loading, before)
            next_start = time.monotonic() + 1.2  # the load and the supervisor's delay
        reaper.reap()
        time.sleep(reaper.lease / 3)
    assert Job.fetch("running", connection=r, serializer=JSONSerializer).get_status() == "failed"


def test_the_apis_reaper_meets_a_full_redis_from_its_first_lone_look(redis_client: redis.Redis) -> None:
    # Its first lease of lone looks wrote nothing, so a Redis full meanwhile (it refuses writes, not
    # reads) went unseen: the lease waited after trouble did not start, and as Redis took writes
    # again the reaper re-queued a live worker's job before the worker renewed its lease.
    from rq import Queue

    r = redis_client
    _lapsed(r, Queue("latentd:a", connection=r, serializer=JSONSerializer), "running")
    reaper = _api_reaper(r, lease=30)
    reaper.alone_since = None  # this is its first look that finds no worker
    reaper.reap_from = 0.0
    r.config_set("maxmemory", 1)
    try:
        with pytest.raises(redis.OutOfMemoryError):  # `run` takes it for trouble: a lease from its end
            reaper.reap()
    finally:
        r.config_set("maxmemory", 0)
    assert Job.fetch("running", connection=r, serializer=JSONSerializer).get_status() == "started"
