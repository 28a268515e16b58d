"""`POST /v1/images/generations`: the OpenAI Images API shape over our queue."""

from __future__ import annotations

import base64
import time
from datetime import UTC, datetime

from fastapi import APIRouter, Request, Response

from app.auth import PrincipalDep, signed_url, url_secret
from app.config import ApiSettings
from app.deps import IdempotencyKey, ServiceDep, SettingsDep
from app.errors import (
    IDEMPOTENCY_CONFLICT_409,
    MODEL_UNAVAILABLE_400,
    RETRY_AFTER,
    STORE_DOWN,
    STORE_REFUSES,
    SUBMIT_RESPONSES,
    SUBMIT_UNAVAILABLE_503,
    ErrorResponse,
    Headers,
    IdempotencyConflict,
    InvalidRequest,
    ServiceError,
    ServiceUnavailable,
    WaitTimeout,
    header,
    internal_error_response,
    maybe,
    service_error_response,
    store_down_response,
)
from app.json_body import OnceEachRoute
from app.protocol import GenerationRequest, OpenAIImage, OpenAIImageRequest, OpenAIImageResponse
from app.serving import GenerationService, hung_up
from latentd.contract import ErrorCode, JobStatus

router = APIRouter(tags=["openai"], route_class=OnceEachRoute)

# How a failed job's code maps onto the HTTP status of a synchronous answer.
_FAILURE_STATUS = {
    ErrorCode.INVALID_PARAMETERS: 422,
    ErrorCode.TIMEOUT: 504,
    ErrorCode.OUT_OF_MEMORY: 507,
}


# On an error once the job is accepted, and on an Idempotency-Key reused with another body (`create_image`).
SHOULD_NOT_RETRY: Headers = {
    "x-should-retry": header(
        "`false`: OpenAI's SDKs do not send the request again, which would queue it again."
    )
}


# On every answer once the job is accepted: OpenAI's shape has no place for it, and a client whose
# wait ended (its own timeout, a 504) had no way to find the job again.
GENERATION_ID: Headers = {
    "x-generation-id": header(
        "The id of the generation this request made: `GET /v1/generations/{id}` reads it."
    )
}
# What an error once the job is accepted carries.
ACCEPTED: Headers = maybe(SHOULD_NOT_RETRY) | maybe(GENERATION_ID)


def _parse_size(size: str) -> tuple[int, int]:
    w, h = (int(p) for p in size.split("x"))
    for side in (w, h):
        if not 64 <= side <= 2048 or side % 8:
            raise InvalidRequest("size: each side must be a multiple of 8 in 64–2048", param="size")
    return w, h


@router.post(
    "/v1/images/generations",
    response_model=OpenAIImageResponse,
    responses={
        **SUBMIT_RESPONSES,
        200: {"description": "The images.", "headers": GENERATION_ID},
        400: {
            "model": ErrorResponse,
            "description": MODEL_UNAVAILABLE_400
            + ", or the model's safety checker withheld every image (`content_policy_violation`).",
            "headers": ACCEPTED,
        },
        409: {
            "model": ErrorResponse,
            "description": "The job was canceled while waiting (`canceled`), or an "
            + IDEMPOTENCY_CONFLICT_409
            + ".",
            "headers": maybe(RETRY_AFTER) | ACCEPTED,
        },
        422: {
            "model": ErrorResponse,
            "description": "Invalid request (`invalid_request`; `param` names the field), or the "
            "job failed: the model cannot take these parameters (`invalid_parameters`).",
            "headers": ACCEPTED,
        },
        500: {
            "model": ErrorResponse,
            "description": "The job failed in the worker (`generation_failed`, `worker_lost`), or a "
            "fault of the service itself (`internal_error`).",
            "headers": ACCEPTED,
        },
        503: {
            "model": ErrorResponse,
            "description": SUBMIT_UNAVAILABLE_503 + ". Or this API process is stopping "
            "(`service_unavailable` without `Retry-After`: the job goes on; poll it).",
            "headers": maybe(RETRY_AFTER) | ACCEPTED,
        },
        504: {
            "model": ErrorResponse,
            "description": "Not finished within LATENTD_SYNC_TIMEOUT (`wait_timeout`: the job goes on; "
            "poll it), or the job failed over LATENTD_JOB_TIMEOUT (`timeout`).",
            "headers": SHOULD_NOT_RETRY | GENERATION_ID,
        },
        507: {
            "model": ErrorResponse,
            "description": "The job failed: out of memory (`out_of_memory`).",
            "headers": SHOULD_NOT_RETRY | GENERATION_ID,
        },
    },
    summary="OpenAI-compatible image generation (waits for the result)",
)
async def create_image(
    body: OpenAIImageRequest,
    request: Request,
    response: Response,
    service: ServiceDep,
    settings: SettingsDep,
    caller: PrincipalDep,
    idempotency_key: IdempotencyKey = None,
) -> OpenAIImageResponse | Response:
    width, height = _parse_size(body.size) if body.size and body.size != "auto" else (None, None)
    req = GenerationRequest.model_validate(
        {
            "prompt": body.prompt,
            "model": body.model,
            "num_images": body.n or 1,
            "width": width,
            "height": height,
            "output_format": body.output_format or "png",
        }
    )
    if caller.owner is not None and body.response_format != "b64_json":
        # The secret its URLs are signed with is made, if need be, while a store that refuses
        # writes still leaves the request safe to send again: before the job is accepted.
        await url_secret(service)
    try:
        accepted = await service.submit(req, caller.owner, idempotency_key)
    except InvalidRequest as exc:  # speak the caller's dialect: name the field it sent
        message = exc.message.replace("num_images", "n")
        if exc.param == "num_images":
            raise InvalidRequest(message, param="n") from None
        if exc.param in ("width", "height"):
            raise InvalidRequest(f"size {body.size or 'auto'}: {message}", param="size") from None
        raise
    except IdempotencyConflict as exc:
        if exc.retry_after is not None:  # the first request is still being accepted: retry
            raise
        conflict = service_error_response(exc)  # another body: the same each time it is sent
        conflict.headers["x-should-retry"] = "false"
        return conflict
    # The job is accepted. OpenAI's SDKs send a request again on a 409, a 429 or any status from
    # 500 (twice, by default), and each time would queue the job again, or undo its cancel. Their
    # header says not to.
    # Nor would a client that heeds Retry-After: a 503 or a 500 of the service's own says to poll.
    goes_on = f"generation '{accepted.id}' goes on: poll /v1/generations/{accepted.id}"
    response.headers["x-generation-id"] = accepted.id
    try:
        return await _answer(accepted.id, body, request, service, settings, caller.owner)
    except ServiceError as exc:
        refused = service_error_response(exc)
    except (*STORE_DOWN, *STORE_REFUSES) as exc:
        refused = store_down_response(exc, instead=goes_on)
    except Exception as exc:
        refused = internal_error_response(request, exc, f"internal error while waiting; {goes_on}")
    refused.headers["x-should-retry"] = "false"
    refused.headers["x-generation-id"] = accepted.id
    return refused


async def _answer(
    job_id: str,
    body: OpenAIImageRequest,
    request: Request,
    service: GenerationService,
    settings: ApiSettings,
    owner: str | None,
) -> OpenAIImageResponse:
    view = await service.wait(job_id, owner, settings.sync_timeout, hung_up(request.scope))
    if view.status is JobStatus.SUCCEEDED:
        # A black picture the model's safety checker withheld is no answer to an OpenAI client;
        # OpenAI itself refuses such a prompt with this code.
        shown = [image for image in view.images if not image.withheld]
        if not shown:
            raise ServiceError(
                f"the model's safety checker withheld every image of generation '{view.id}'",
                code=ErrorCode.CONTENT_POLICY_VIOLATION,
                status_code=400,
                param="prompt",
            )
        base = (settings.public_url or str(request.base_url)).rstrip("/")
        data = []
        for image in shown:
            if body.response_format == "b64_json":
                blob = await service.image(view.id, image.index, owner)
                data.append(
                    OpenAIImage(b64_json=base64.b64encode(blob.data).decode(), revised_prompt=body.prompt)
                )
            else:
                url = image.url
                if owner is not None:  # keys are on: a URL that downloads without one, as OpenAI's
                    expires_at = image.expires_at or datetime.fromtimestamp(
                        time.time() + settings.results_ttl, UTC
                    )
                    url = await signed_url(request, url, expires_at.timestamp())
                data.append(OpenAIImage(url=base + url, revised_prompt=body.prompt))
        return OpenAIImageResponse(created=int(time.time()), data=data)
    if view.status is JobStatus.FAILED and view.error is not None:
        raise ServiceError(
            view.error.message,
            code=ErrorCode(view.error.code),
            status_code=_FAILURE_STATUS.get(ErrorCode(view.error.code), 500),
        )
    if view.status is JobStatus.CANCELED:
        raise ServiceError(f"generation '{view.id}' was canceled", code=ErrorCode.CANCELED, status_code=409)
    if service.ended.closing:
        raise ServiceUnavailable(
            f"this API process is stopping; generation '{view.id}' goes on: poll /v1/generations/{view.id}"
        )
    raise WaitTimeout(
        f"generation '{view.id}' did not finish within {settings.sync_timeout:g} s; "
        f"poll /v1/generations/{view.id}",
    )
