"""API keys: created by `latentd keys create NAME`, stored in Redis only as SHA-256 digests.

A key is shown once, when it is created. The service is open while no key exists and
requires `Authorization: Bearer <key>` on every API route as soon as one does.
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
    connection.hset(Keys.API_KEYS, digest(key), json.dumps({"name": name, "created_at": time.time()}))
    return key


def list_keys(connection: redis.Redis) -> list[dict[str, object]]:
    return [json.loads(v) for v in connection.hgetall(Keys.API_KEYS).values()]


def revoke(connection: redis.Redis, name: str) -> bool:
    for field, value in connection.hgetall(Keys.API_KEYS).items():
        if json.loads(value).get("name") == name:
            connection.hdel(Keys.API_KEYS, field)
            return True
    return False


def name_of(record: bytes | str | None) -> str | None:
    """The key name in a stored key record (None for no record)."""
    if record is None:
        return None
    name: str = json.loads(record)["name"]
    return name
