"""API keys: created by `latentd keys create NAME`, stored in Redis only as SHA-256 digests.

A key is shown once, when it is created. The service is open until the first key is made
and requires `Authorization: Bearer <key>` on every API route from then on, also once the
last key is revoked (then it refuses everyone), until `latentd keys open`.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time

import redis

from latentd.contract import Keys

KEY_PREFIX = "ltd_"


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def create(connection: redis.Redis, name: str) -> str:
    """Store a new key under `name` and return it; the plain key is never stored."""
    if any(k.get("name") == name for k in list_keys(connection)):
        raise ValueError(f"a key named '{name}' exists; revoke it first")
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    pipe = connection.pipeline()  # MULTI: the key and the flag together
    pipe.hset(Keys.API_KEYS, digest(key), json.dumps({"name": name, "created_at": time.time()}))
    pipe.set(Keys.KEYS_REQUIRED, 1)
    pipe.execute()
    return key


# Keys are required while either exists (a key exists, or one did). An empty hash does not exist,
# so one EXISTS of both answers; a key made before the flag existed counts too.
REQUIRED_WHILE = (Keys.KEYS_REQUIRED, Keys.API_KEYS)


def required(connection: redis.Redis) -> bool:
    """Whether the service requires keys (the API's event loop asks the same of `REQUIRED_WHILE`)."""
    return bool(connection.exists(*REQUIRED_WHILE))


def open_service(connection: redis.Redis) -> bool:
    """Let the service run without keys again; False, changing nothing, while a key exists."""
    opened = connection.eval(
        "if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end redis.call('DEL', KEYS[1]) return 1",
        2,
        Keys.KEYS_REQUIRED,
        Keys.API_KEYS,
    )
    return bool(opened)


def list_keys(connection: redis.Redis) -> list[dict[str, object]]:
    return [json.loads(v) for v in connection.hgetall(Keys.API_KEYS).values()]


def revoke(connection: redis.Redis, name: str) -> bool:
    for field, value in connection.hgetall(Keys.API_KEYS).items():
        if json.loads(value).get("name") == name:
            pipe = connection.pipeline()  # MULTI: a key made before the flag existed sets it here
            pipe.hdel(Keys.API_KEYS, field)
            pipe.set(Keys.KEYS_REQUIRED, 1)
            pipe.execute()
            return True
    return False


def name_of(record: bytes | str | None) -> str | None:
    """The key name in a stored key record (None for no record)."""
    if record is None:
        return None
    name: str = json.loads(record)["name"]
    return name
