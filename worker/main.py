"""The worker process: load the pipeline once, announce it, then serve its model's queue."""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading
import time
from typing import Any

import redis
from rq import Queue, SimpleWorker
from rq.serializers import JSONSerializer

from latentd.contract import Keys, WorkerInfo
from latentd.logs import configure, event
from worker import jobs
from worker.config import WorkerSettings, get_settings
from worker.pipeline import ModelLoadError, load_runner

log = logging.getLogger("latentd.worker")

EXIT_MODEL_LOAD_FAILED = 3
EXIT_REDIS_UNREACHABLE = 4
EXIT_DEVICE_BROKEN = 70


class LatentdWorker(SimpleWorker):
    """RQ's in-process worker, with cancellation recorded the way RQ records a stopped job."""

    def handle_job_failure(
        self,
        job: Any,
        queue: Any,
        started_job_registry: Any = None,
        exc_string: str = "",
        execution: Any = None,
    ) -> None:
        rt = jobs.current()
        if rt.stopped_job_id == job.id:
            self._stopped_job_id = job.id  # RQ then marks it STOPPED, never retried
            rt.stopped_job_id = None
        super().handle_job_failure(
            job, queue, started_job_registry=started_job_registry, exc_string=exc_string, execution=execution
        )

    def execute_job(self, job: Any, queue: Any) -> None:
        super().execute_job(job, queue)
        if jobs.current().fatal:
            event(log, "device_broken_exiting", logging.ERROR, job_id=job.id)
            self.register_death()
            raise SystemExit(EXIT_DEVICE_BROKEN)


class Heartbeat(threading.Thread):
    """Keeps this worker's registration alive; the API routes and lists models from it."""

    def __init__(self, connection: redis.Redis, info: WorkerInfo, interval: float) -> None:
        super().__init__(name="latentd-heartbeat", daemon=True)
        self.connection = connection
        self.info = info
        self.interval = interval
        self.stopped = threading.Event()

    def beat(self) -> None:
        p = self.connection.pipeline(transaction=False)
        p.set(Keys.worker(self.info.name), self.info.model_dump_json(), ex=max(2, int(self.interval * 3)))
        p.sadd(Keys.WORKERS, self.info.name)
        p.execute()

    def run(self) -> None:
        failing = False
        while not self.stopped.wait(self.interval):
            try:
                self.beat()
                if failing:
                    event(log, "heartbeat_recovered")
                failing = False
            except redis.RedisError as exc:
                if not failing:
                    event(log, "heartbeat_failed", logging.WARNING, error=type(exc).__name__)
                failing = True

    def stop(self) -> None:
        self.stopped.set()
        try:
            p = self.connection.pipeline(transaction=False)
            p.delete(Keys.worker(self.info.name))
            p.srem(Keys.WORKERS, self.info.name)
            p.execute()
        except redis.RedisError:
            pass  # the registration expires on its own


def _connect(url: str, wait: float = 30.0) -> redis.Redis:
    connection = redis.Redis.from_url(url, socket_connect_timeout=2, health_check_interval=30)
    deadline = time.monotonic() + wait
    while True:
        try:
            connection.ping()
            return connection
        except redis.RedisError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.5)


def run(settings: WorkerSettings | None = None) -> int:
    settings = settings or get_settings()
    configure(settings.log_level)
    name = settings.effective_worker_name()
    try:
        connection = _connect(settings.effective_redis_url)
    except redis.RedisError as exc:
        print(f"latentd worker: cannot reach Redis at {settings.effective_redis_url}: {exc}", file=sys.stderr)
        return EXIT_REDIS_UNREACHABLE
    try:
        runner = load_runner(settings)
    except ModelLoadError as exc:
        print(f"latentd worker: {exc}", file=sys.stderr)
        return EXIT_MODEL_LOAD_FAILED
    runtime = jobs.Runtime(runner=runner, connection=connection, settings=settings, worker_name=name)
    jobs.install(runtime)
    info = WorkerInfo(
        name=name,
        model=runner.model,
        device=str(runner.device),
        pid=os.getpid(),
        hostname=socket.gethostname(),
        started_at=time.time(),
    )
    heartbeat = Heartbeat(connection, info, settings.heartbeat_interval)
    heartbeat.beat()
    heartbeat.start()
    if settings.ready_file:
        settings.ready_file.parent.mkdir(parents=True, exist_ok=True)
        settings.ready_file.write_text(name)
    queue = Queue(Keys.queue_name(runner.model), connection=connection, serializer=JSONSerializer)
    worker = LatentdWorker([queue], connection=connection, name=name, serializer=JSONSerializer)
    event(log, "worker_ready", worker=name, model=runner.model, queue=queue.name)
    code = 0
    try:
        worker.work(logging_level=settings.log_level.upper(), with_scheduler=False)
    except SystemExit as exc:
        code = int(exc.code or 0)
    finally:
        heartbeat.stop()
        if settings.ready_file:
            settings.ready_file.unlink(missing_ok=True)
        event(log, "worker_stopped", worker=name, exit_code=code)
    return code
