"""API keys: created by `latentd keys create NAME`, stored in Redis only as SHA-256 digests.

A key is shown once, when it is created. The service is open until the first key is made
and requires `Authorization: Bearer <key>` on every API route from then on, also once the
last key is revoked (then it refuses everyone), until `latentd keys open`.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import time
from typing import Any

import redis

from latentd.contract import Keys

KEY_PREFIX = "ltd_"

# A name is shown in `latentd keys list` and in logs, one per line: no control characters.
_NAME = re.compile(r"[^\x00-\x1f\x7f]{1,64}")
NAME_RULE = "1 to 64 characters, no control character (a newline, a tab), no space at either end"
# What a key may hold: a request's key is read from a header, as Latin-1, and stripped.
KEY_CHARS = re.compile(r"[!-~]+")


def check_name(name: str) -> None:
    if not _NAME.fullmatch(name) or name.strip() != name:
        raise ValueError(f"a key's name is {NAME_RULE}: {name!r} is not")


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def owner_of(record: bytes | str | None) -> tuple[str, str] | None:
    """The name and the owner of a stored key's jobs, from its record (None for no record). The
    owner is the key's own id: by name, a key made again under a revoked key's name saw the revoked
    key's jobs. A key made before ids (no `id`) owns its jobs by name, as it did then."""
    if record is None:
        return None
    fields = json.loads(record)
    name: str = fields["name"]
    return name, f"key:{fields['id']}" if "id" in fields else name


# The name is checked free and the key stored in one step: two creates of one name made two keys.
# KEYS: the keys hash, the flag; ARGV: name, digest, record.
_CREATE = """
for _, record in ipairs(redis.call('HVALS', KEYS[1])) do
    if cjson.decode(record)['name'] == ARGV[1] then return 0 end
end
redis.call('HSET', KEYS[1], ARGV[2], ARGV[3])
redis.call('SET', KEYS[2], '1')
return 1
"""

# Every key of the name (two creates of one name could make two, before _CREATE), and the flag
# set: a key made before the flag existed sets it here. Returns how many went.
_REVOKE = """
local gone = 0
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
    if cjson.decode(all[i + 1])['name'] == ARGV[1] then
        redis.call('HDEL', KEYS[1], all[i])
        gone = gone + 1
    end
end
if gone > 0 then redis.call('SET', KEYS[2], '1') end
return gone
"""


def create(connection: redis.Redis, name: str) -> str:
    """Store a new key under `name` and return it; the plain key is never stored."""
    check_name(name)
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    record = json.dumps({"name": name, "created_at": time.time(), "id": secrets.token_hex(8)})
    if not connection.eval(_CREATE, 2, Keys.API_KEYS, Keys.KEYS_REQUIRED, name, digest(key), record):
        raise ValueError(f"a key named '{name}' exists; revoke it first")
    return key


def required(flag: bytes | str | None, a_key_exists: bool) -> bool | None:
    """Whether the service requires keys, by the flag and whether a key is stored: None where
    neither says, as in a Redis where no key was ever made, or one that lost its data."""
    if a_key_exists or flag in (b"1", "1"):
        return True  # a key stored by a latentd that set no flag counts too
    if flag in (b"0", "0"):
        return False  # `latentd keys open`
    return None


def read_required(connection: redis.Redis) -> bool | None:
    """`required` of what Redis holds (the API's event loop asks the same)."""
    with connection.pipeline(transaction=False) as pipe:
        pipe.get(Keys.KEYS_REQUIRED)
        pipe.exists(Keys.API_KEYS)
        flag, exists = pipe.execute()
    return required(flag, bool(exists))


def open_service(connection: redis.Redis) -> bool:
    """Let the service run without keys again; False, changing nothing, while a key exists."""
    opened = connection.eval(
        "if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end redis.call('SET', KEYS[1], '0') return 1",
        2,
        Keys.KEYS_REQUIRED,
        Keys.API_KEYS,
    )
    return bool(opened)


def list_keys(connection: redis.Redis) -> list[dict[str, Any]]:
    return [json.loads(v) for v in connection.hgetall(Keys.API_KEYS).values()]


def revoke(connection: redis.Redis, name: str) -> bool:
    return bool(connection.eval(_REVOKE, 2, Keys.API_KEYS, Keys.KEYS_REQUIRED, name))
