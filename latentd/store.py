"""What both processes require of the Redis they use."""

from __future__ import annotations

import logging

import redis

from latentd.contract import Keys, WorkerInfo
from latentd.logs import event

SAFE_POLICIES = ("noeviction",)

# What Redis answers, in a plain error, while it refuses for a time what it will take again: writes
# after a failed save, a blocked command as it turns replica, writes short of replicas.
_REFUSING_FOR_NOW = ("MISCONF", "UNBLOCKED", "NOREPLICAS")


def redis_away(exc: BaseException) -> bool:
    """Whether `exc` says Redis cannot serve now but may soon: out of reach, no reply in time,
    loading its data, full (`maxmemory`), read-only (a replica, mid-failover), or refusing writes
    after a failed save. A worker waits such an error out, as an outage; it is never the job's
    fault nor a reason to exit."""
    if isinstance(exc, redis.ConnectionError | redis.TimeoutError):  # loading too (BusyLoadingError)
        return True
    if isinstance(
        exc, redis.exceptions.OutOfMemoryError | redis.ReadOnlyError | redis.exceptions.MasterDownError
    ):
        return True
    return isinstance(exc, redis.ResponseError) and str(exc).startswith(_REFUSING_FOR_NOW)


def as_text(value: bytes | str) -> str:
    """A Redis reply as text, whether or not the client decodes responses."""
    return value.decode() if isinstance(value, bytes) else value


def registrations(names: list[str], blobs: list[bytes | str | None]) -> tuple[list[WorkerInfo], list[str]]:
    """The live workers among `names` (their registration blobs, in order), and the expired names."""
    workers = [WorkerInfo.model_validate_json(blob) for blob in blobs if blob is not None]
    return workers, [name for name, blob in zip(names, blobs, strict=True) if blob is None]


# Names whose registration had expired at a look leave the workers' set, each only if it is still
# expired (a worker that registered again since stays). KEYS: the set, then each name's
# registration; ARGV: the names.
_FORGET_EXPIRED = """
for i, name in ipairs(ARGV) do
  if redis.call('EXISTS', KEYS[i + 1]) == 0 then redis.call('SREM', KEYS[1], name) end
end
"""


def live_workers(connection: redis.Redis) -> list[WorkerInfo]:
    """Every worker whose registration (its heartbeat) is alive; expired names leave the set."""
    names = sorted(as_text(n) for n in connection.smembers(Keys.WORKERS))
    blobs = connection.mget([Keys.worker(n) for n in names]) if names else []
    workers, stale = registrations(names, blobs)
    if stale:
        forget_expired(connection, stale)
    return workers


def forget_expired(connection: redis.Redis, names: list[str]) -> None:
    keys = [Keys.WORKERS, *(Keys.worker(n) for n in names)]
    connection.eval(_FORGET_EXPIRED, len(keys), *keys, *names)


class UnsafeRedis(RuntimeError):
    pass


def warn_if_keeps_nothing(connection: redis.Redis, log: logging.Logger) -> None:
    """Log `redis_keeps_nothing` where Redis writes nothing to disk (no AOF, no snapshots): a
    restart of it loses every job. Silent where CONFIG is disabled (managed services, which persist
    on their own terms)."""
    try:  # one parameter a call: Redis 6 takes no more
        appendonly = connection.config_get("appendonly").get("appendonly")
        save = connection.config_get("save").get("save")
    except redis.ResponseError:
        return
    if appendonly in ("no", b"no") and save is not None and not as_text(save).strip():
        note = "Redis writes nothing to disk: its restart loses every job and image; set `appendonly yes`"
        event(log, "redis_keeps_nothing", logging.WARNING, note=note)


def check_eviction_policy(connection: redis.Redis) -> None:
    """Refuse a Redis that may evict keys: an evicted key is a lost job.

    Managed Redis services that disable CONFIG pass, as do servers that answer it without the
    policy: it cannot be read here, and the deployment guide says to set it.
    """
    try:
        policy = connection.config_get("maxmemory-policy").get("maxmemory-policy")
    except redis.ResponseError:
        return
    if policy is None:  # refused as "maxmemory-policy is 'None'", API and worker alike
        return
    if isinstance(policy, bytes):
        policy = policy.decode()
    if policy not in SAFE_POLICIES:
        raise UnsafeRedis(
            f"Redis maxmemory-policy is '{policy}': it may evict queued jobs and results. "
            "Set `maxmemory-policy noeviction` (and `appendonly yes`) on this Redis."
        )
