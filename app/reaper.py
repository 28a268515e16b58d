"""The API's reaper: with no worker alive, nobody re-queued or failed a job whose worker died, and
it read `running` for good (its cancel, `202`, changed nothing) until some worker started. Live
workers reap every model's queue (worker/main.py `Heartbeat.reap`); an API process does it only
while none is alive, with the same code and under the same per-queue locks."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import redis
from rq import Queue

from latentd import reaping

log = logging.getLogger("latentd.api")


class Reaper(threading.Thread):
    """Every third of a lease, while no worker is alive: each model's jobs whose lease lapsed go to
    RQ, which re-queues them or fails them, as a worker's reaper would. Never within a lease of this
    process's start or of Redis trouble it saw (an error, or a Redis restarted since its last look):
    a live worker renews its leases every third of a lease once Redis is back, and re-registers,
    but until then its jobs' leases and its registration may read as lapsed."""

    def __init__(
        self,
        connection: redis.Redis,
        lease_seconds: int,
        job_ttl: int,
        default_model: str,
        any_worker_alive: Callable[[], bool],
    ) -> None:
        super().__init__(name="latentd-reaper", daemon=True)
        self.connection = connection
        self.lease = lease_seconds
        self.job_ttl = job_ttl
        self.any_worker_alive = any_worker_alive
        self.holder = f"api:{socket.gethostname()}:{os.getpid()}"
        self.handler = reaping.abandoned_handler(connection, default_model, job_ttl)
        self.stopped = threading.Event()
        self.reap_from = time.monotonic() + lease_seconds
        self.redis_run: Any = None  # the Redis server's run id at the last look
        self._queues: dict[str, Queue] = {}

    def run(self) -> None:
        while not self.stopped.wait(self.lease / 3):
            try:
                self.reap()
            except redis.RedisError:
                self.reap_from = time.monotonic() + self.lease
            except Exception:  # a job RQ cannot read, say: the next pass tries again
                log.exception("reaper_failed")

    def reap(self) -> None:
        run = self.connection.info("server").get("run_id")
        if run != self.redis_run:
            if self.redis_run is not None:  # restarted: its data may be older than the leases
                self.reap_from = time.monotonic() + self.lease
            self.redis_run = run
        if time.monotonic() < self.reap_from or self.any_worker_alive():
            return
        for queue in reaping.model_queues(self.connection, self._queues):
            with reaping.reaper_locks(self.connection, [queue.name], self.holder) as taken:
                if taken and not self.stopped.is_set():
                    reaping.reap(queue, self.job_ttl, self.handler)

    def stop(self) -> None:
        self.stopped.set()
        self.join(timeout=5)
