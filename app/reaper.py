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

import redis
from redis.exceptions import NoPermissionError
from rq import Queue

from latentd import reaping
from latentd.contract import Keys
from latentd.logs import event
from latentd.store import redis_away

log = logging.getLogger("latentd.api")


class Reaper(threading.Thread):
    """Every third of a lease, while no worker is alive: each model's jobs whose lease lapsed go to
    RQ, which re-queues them or fails them, as a worker's reaper would.

    Never within a lease of this process's start, or of Redis's return from trouble it saw (no
    answer, full or read-only, or a Redis restarted since its last look): a live worker renews its
    leases every third of a lease once Redis is back, and registers again, but until then its
    jobs' leases and its registration may read as lapsed. Nor before its looks have found no
    worker alive for a lease: a Redis frozen between two passes, and long enough to lapse the
    registrations and leases of workers with shorter leases than this process's, went unseen.
    The lease waited is the longest any worker has held jobs under (`reaping.record_lease`), or
    this process's own if longer."""

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
        self.reap_from: float | None = None  # a lease from Redis's first answer (its return)
        self.wait = lease_seconds  # the longest lease, read with each return of Redis
        self.alone_since: float | None = None  # the first look of those that found no worker alive
        self.beats: object = ()  # the count of workers' beats (`Keys.BEATS`) at the last look
        self.redis_run: object = None  # the Redis server's run id at the last look
        self.info_refused = False  # INFO is disabled (an ACL, a renamed command): no run id
        self.failures = reaping.Failures(log)
        self._queues: dict[str, Queue] = {}

    def run(self) -> None:
        while not self.stopped.wait(self.lease / 3):
            try:
                self.reap()
                self.failures.ok("redis")
            except Exception as exc:
                if redis_away(exc):
                    # Out of reach, full or read-only: no worker could renew a lease or register
                    # meanwhile, so a lease from its return (a full Redis's jobs ran twice).
                    self.reap_from = None
                else:  # a refused command, say: logged once, tried again
                    self.failures.failed("redis", exc)

    def reap(self) -> None:
        began = time.monotonic()
        self._look_for_a_restart()
        if self.reap_from is None:
            self.wait = reaping.longest_lease(self.connection, self.lease)
            self.reap_from = time.monotonic() + self.wait
            self.alone_since = None  # as long again from now: a worker may have come meanwhile
        self._look_for_workers()
        alone_since = self.alone_since
        if time.monotonic() < self.reap_from or alone_since is None or self._stalled(began):
            return

        def reap_one(queue: Queue) -> None:
            # Under the queue's lock, which Redis may have held up too. Taking it is a write, which a
            # full Redis or a replica refuses, ending the pass (a lease waited from its return): so
            # with no worker alive, from the first look, though it reaps only after a lease of them.
            if not self._stalled(began) and time.monotonic() - alone_since >= self.wait:
                reaping.reap(queue, self.job_ttl, self.handler)

        reaping.reap_each(
            self.connection,
            reaping.model_queues(self.connection, self._queues),
            self.holder,
            self.failures,
            reap_one,
            stopped=lambda: self.stopped.is_set() or self._stalled(began),
        )

    def _look_for_workers(self) -> None:
        """`alone_since`: the first of the looks, up to this one, that found no worker alive: none
        registered, and none that beat since the look before (each beat counts in `Keys.BEATS`). A
        worker that came, took a job and lapsed, all between two looks, was never seen registered."""
        beats = self.connection.get(Keys.BEATS)
        alive = self.any_worker_alive() or beats != self.beats
        self.beats = beats
        if alive:
            self.alone_since = None
        elif self.alone_since is None:
            self.alone_since = time.monotonic()

    def _stalled(self, since: float) -> bool:
        """Whether Redis kept this pass waiting a third of a lease or more: frozen or swapping, with no
        error to show for it. Live workers could neither renew their leases nor their registrations
        (a few seconds' TTL) meanwhile, and the pass that woke with Redis found no worker alive and
        re-queued their running jobs. As after an outage, no reaping for a lease."""
        if time.monotonic() - since < self.lease / 3:
            return False
        if self.reap_from is not None:  # said once
            event(log, "redis_stalled", logging.WARNING, seconds=round(time.monotonic() - since, 1))
        self.reap_from = None
        return True

    def _look_for_a_restart(self) -> None:
        if self.info_refused:
            return
        try:
            run = self.connection.info("server").get("run_id")
        except redis.ResponseError as exc:
            # Refused by an ACL, or renamed away (unknown); any other (BUSY: a slow script) is
            # this pass's only.
            if not isinstance(exc, NoPermissionError) and "unknown command" not in str(exc).lower():
                raise
            self.info_refused = True
            event(log, "redis_info_refused", logging.WARNING, error=str(exc)[:200], note="restarts go unseen")
            return
        if run != self.redis_run:
            if self.redis_run is not None:  # restarted: its data may be older than the leases
                self.reap_from = None
            self.redis_run = run

    def stop(self) -> None:
        self.stopped.set()
        self.join(timeout=5)
