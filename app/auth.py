"""Who is calling: API key authentication and per-key request limits.

Limits are counted in Redis, atomically, so every API replica enforces the same
budget; they key on the API key, never on client-supplied headers such as
X-Forwarded-For.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import math
import re
import secrets
import time
from dataclasses import dataclass
from typing import Annotated

import redis
from fastapi import Depends, Query, Request

from app.errors import STORE_REFUSES, Expired, RateLimited, Unauthorized
from app.serving import GenerationService
from latentd import keys
from latentd.contract import Keys
from latentd.logs import event
from latentd.store import as_text

log = logging.getLogger("latentd.api")

# Whether keys are required is re-read at most this often, so a key created while the API
# runs closes the service within seconds without a Redis round trip per request.
AUTH_STATE_TTL = 2.0

# INCR the window's counter and give it a lifetime on first use; returns the count.
_COUNT = """
local n = redis.call('INCR', KEYS[1])
if n == 1 then redis.call('EXPIRE', KEYS[1], ARGV[1]) end
return n
"""


@dataclass(frozen=True)
class Principal:
    """The caller: the owner its API key's jobs are stored under (`keys.owner_of`), or None
    without a key while the service is open. `signed`: the holder of a signed image URL, who may
    download that image whoever's it is."""

    owner: str | None
    signed: bool = False


class AuthState:
    def __init__(self, static_keys: dict[str, str], require_keys: bool = False) -> None:
        self.static_keys = static_keys  # digest -> name, from LATENTD_API_KEYS
        self.always = require_keys or bool(static_keys)  # whatever Redis holds
        self.required = self.always
        self.checked_at = 0.0


async def auth_required(request: Request, service: GenerationService) -> bool:
    state: AuthState = request.app.state.auth
    if state.always:
        return True
    now = time.monotonic()
    if now - state.checked_at > AUTH_STATE_TTL:
        async with service.aredis.pipeline(transaction=False) as pipe:
            pipe.get(Keys.KEYS_REQUIRED)
            pipe.exists(Keys.API_KEYS)
            flag, a_key_exists = await pipe.execute()
        if now - state.checked_at <= AUTH_STATE_TTL:  # another request read it meanwhile
            return state.required
        state.checked_at = now
        required = keys.required(flag, bool(a_key_exists))
        if required is None and state.required:
            # No key and no flag where keys were required: Redis lost its data (flushed, restarted
            # without its file). Opening then let anyone in. The flag is set again, for the API
            # processes that start from now on (NX: a `latentd keys open` meanwhile wins).
            with contextlib.suppress(*STORE_REFUSES):
                await service.aredis.set(Keys.KEYS_REQUIRED, 1, nx=True)
            note = "Redis held no key and no `latentd keys open`: requests stay refused until either"
            event(log, "auth_state_lost", logging.ERROR, note=note)
            required = True
        elif bool(required) != state.required:  # None: no key was ever made, and it stays open
            if required:
                event(log, "auth_required")
            else:
                event(log, "auth_open", logging.WARNING, note="`latentd keys open`")
        state.required = bool(required)
    return state.required


# A scheme is named back to the caller only if it cannot be a key: shorter than any key the
# service accepts (LATENTD_API_KEYS takes 16 characters and up), of a scheme's characters.
_SHOWN_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9-]{0,14}")


def _unusable_authorization(header: str) -> str:
    """Why an Authorization header is not a bearer key. Never echoes the credential."""
    send = "send `Authorization: Bearer <key>`"
    scheme, _, credentials = header.partition(" ")
    if not header or scheme.lower() == "bearer":
        return f"missing API key: {send}"
    if not credentials:  # a key sent bare, however short: never named back
        return f"the Authorization header is a single word; {send}"
    if _SHOWN_SCHEME.fullmatch(scheme):
        return f"unsupported Authorization scheme '{scheme}'; {send}"
    return f"unsupported Authorization scheme; {send}"


async def authenticate(request: Request) -> Principal:
    """The caller of `request`; a dependency of every route that serves a caller's data. Its one
    parameter FastAPI fills is the request: every nested dependency costs each request's time."""
    service: GenerationService = request.app.state.service
    state: AuthState = request.app.state.auth
    sent = request.headers.getlist("authorization")
    header = sent[0] if sent else ""
    scheme, _, token = header.partition(" ")
    token = token.strip()
    keyless = len(sent) != 1 or scheme.lower() != "bearer" or not token
    try:
        required = await auth_required(request, service)
    except redis.RedisError:
        # Redis away: what it last said stands for a request that could not pass anyway (no key,
        # or two), rather than a 503 that has its client send it again and again.
        if not (keyless and state.required):
            raise
        required = True
    if len(sent) > 1:  # the first won, where a proxy in front may have judged by another
        raise Unauthorized(f"{len(sent)} Authorization headers; send one", param="Authorization")
    if keyless:
        if required:
            raise Unauthorized(_unusable_authorization(header))
        return Principal(owner=None)
    digest = keys.digest(token)
    # A LATENTD_API_KEYS key owns its jobs by its name (it holds no ':', which every stored key's
    # id has), so one given a new secret keeps them.
    name = state.static_keys.get(digest)
    found = (name, name) if name else keys.owner_of(await service.aredis.hget(Keys.API_KEYS, digest))
    if found is None:
        if required:
            raise Unauthorized("invalid API key")
        return Principal(owner=None)
    # A valid key counts while the service is open too: in the seconds before the API reads that
    # a first key was made, that key's jobs were stored as nobody's, then hidden from it.
    name, owner = found
    limit = service.settings.rate_limit_per_minute
    if limit:
        window = int(time.time() // 60)
        try:
            count = int(await service.aredis.eval(_COUNT, 1, Keys.rate(owner, window), 120))
        except STORE_REFUSES:
            count = 0  # a store that takes no writes cannot count: reads still work, writes say why
        if count > limit:
            retry_after = max(1, 60 - int(time.time()) % 60)
            event(log, "rate_limited", key=name, limit=limit)
            raise RateLimited(
                f"more than {limit} requests this minute for this API key", retry_after=retry_after
            )
    return Principal(owner=owner)


PrincipalDep = Annotated[Principal, Depends(authenticate)]


# Image URLs the OpenAI route gives while API keys are on download without a key, as OpenAI's own
# do: what takes a `url` often hands it to a browser or another service. Each is signed (HMAC
# over its path and expiry, with a secret every API process shares through Redis) and lapses with
# the image.


async def _stored_secret(service: GenerationService) -> bytes | None:
    secret = await service.aredis.get(Keys.URL_SECRET)
    return None if secret is None else as_text(secret).encode()


async def url_secret(service: GenerationService) -> bytes:
    """The secret image URLs are signed with, read from Redis at each use: should Redis lose it
    (flushed, or restarted without its file), every process takes up the one made next."""
    while (secret := await _stored_secret(service)) is None:
        await service.aredis.set(Keys.URL_SECRET, secrets.token_hex(32), nx=True)  # the first one stays
    return secret


def _signature(secret: bytes, path: str, expires: int) -> str:
    return hmac.new(secret, f"{path}\n{expires}".encode(), hashlib.sha256).hexdigest()


async def signed_url(request: Request, path: str, expires_at: float) -> str:
    expires = math.ceil(expires_at)
    secret = await url_secret(request.app.state.service)
    return f"{path}?expires={expires}&signature={_signature(secret, path, expires)}"


async def image_caller(
    request: Request,
    expires: Annotated[
        int | None, Query(description="Of a signed URL: when it lapses (unix seconds).")
    ] = None,
    signature: Annotated[
        str | None, Query(description="Of a signed URL, as the OpenAI route gives: downloads without a key.")
    ] = None,
) -> Principal:
    """The caller of an image download: the key's owner, or anyone with a signed URL. A request
    that carries a bearer key and a signature that fails (changed, lapsed, or signed with a secret Redis
    lost) is the key's: a client may send its key with every request."""
    if signature is None:
        return await authenticate(request)
    try:
        return await _signed_caller(request, expires, signature)
    except (Unauthorized, Expired):
        if not request.headers.get("authorization", "").lower().startswith("bearer "):
            raise  # a proxy's Basic login, say: the URL's own error
        return await authenticate(request)


async def _signed_caller(request: Request, expires: int | None, signature: str) -> Principal:
    secret = await _stored_secret(request.app.state.service)  # none: no URL was signed since
    # With no secret nothing was signed: an empty signature matched an empty expectation, and
    # downloaded any image without a key.
    if secret is None or not hmac.compare_digest(
        signature.encode(errors="replace"),
        _signature(secret, request.url.path, -1 if expires is None else expires).encode(),
    ):
        raise Unauthorized("the image URL's signature does not match it; ask for the image again")
    if expires is None or expires < time.time():
        raise Expired("this image URL has expired, as the image has", param="expires")
    return Principal(owner=None, signed=True)


ImageCallerDep = Annotated[Principal, Depends(image_caller)]
