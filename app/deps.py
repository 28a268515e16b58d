"""Dependencies the routes receive: resources opened in the app's lifespan."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Header, Request

from app.config import ApiSettings
from app.errors import InvalidRequest
from app.serving import GenerationService


async def get_service(request: Request) -> GenerationService:
    service: GenerationService = request.app.state.service
    return service


async def get_api_settings(request: Request) -> ApiSettings:
    settings: ApiSettings = request.app.state.settings
    return settings


ServiceDep = Annotated[GenerationService, Depends(get_service)]
SettingsDep = Annotated[ApiSettings, Depends(get_api_settings)]


async def get_idempotency_key(
    request: Request,
    idempotency_key: Annotated[
        str | None,
        Header(
            min_length=1,
            max_length=255,
            description="Retry-safe submits: the same key and body return the same job.",
        ),
    ] = None,
) -> str | None:
    """The request's Idempotency-Key. Two are refused: the first won, where a proxy in front may
    join them into one other key ("k1, k2"), and a retry through it would run the job again."""
    sent = request.headers.getlist("idempotency-key")
    if len(sent) > 1:
        raise InvalidRequest(f"{len(sent)} Idempotency-Key headers; send one", param="Idempotency-Key")
    return idempotency_key


# Both submit routes take it: a replay of a request gets the first one's job.
IdempotencyKey = Annotated[str | None, Depends(get_idempotency_key)]
