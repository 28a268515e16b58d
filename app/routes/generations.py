"""`/v1/generations`: submit, list, poll, download, cancel."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Coroutine
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from app.auth import ImageCallerDep, PrincipalDep, authenticate
from app.deps import IdempotencyKey, ServiceDep
from app.errors import (
    COMMON_RESPONSES,
    IDEMPOTENCY_CONFLICT_409,
    INVALID_REQUEST_422,
    MODEL_UNAVAILABLE_400,
    RETRY_AFTER,
    STORE_DOWN,
    STORE_REFUSES,
    SUBMIT_RESPONSES,
    WWW_AUTHENTICATE,
    ErrorResponse,
    Headers,
    NotFound,
    ServiceError,
    header,
    maybe,
    service_error_response,
    store_down_response,
)
from app.json_body import OnceEachRoute
from app.protocol import Generation, GenerationList, GenerationRequest, SubmitResponse
from app.serving import GenerationService, hung_up
from latentd.contract import JobStatus

PREFIX = "/v1/generations"
MAX_WAIT = 60.0  # seconds a status read may be held open (`?wait=`)

ID_CHAR = "[A-Za-z0-9_-]"
MAX_ID_CHARS = 64
MAX_INDEX = 63
DEFAULT_LIMIT, MAX_LIMIT = 20, 100  # generations per page of a list
# The path says {id}, as the README and every error's `param` name it (`id` is a builtin's name in Python).
JobId = Annotated[
    str,
    Path(
        alias="id",
        min_length=1,
        max_length=MAX_ID_CHARS,
        pattern=f"^{ID_CHAR}+$",
        description="The generation's id, as its submit answered it.",
    ),
]
ImageIndex = Annotated[
    int, Path(ge=0, le=MAX_INDEX, description="The image's `index` in the generation's `images`.")
]
_ID_RULE = f"ids are 1–{MAX_ID_CHARS} characters of A–Z, a–z, 0–9, _ and -"


def _shown(value: str) -> str | None:
    """`value` as a message may quote it: not one too long to echo or that cannot be printed."""
    return value if len(value) <= MAX_ID_CHARS and value.isprintable() else None


def _names_nothing(exc: RequestValidationError, path_params: dict[str, Any]) -> NotFound | None:
    """The 404 for a path that fails its own check (a malformed or over-long id; an index out of
    range or not a number): it can name no generation or image, as an unknown one names none,
    and the README answers both alike. The id is named first, whatever the order of the errors."""
    failed = {
        loc[1] for err in exc.errors() if len(loc := tuple(err.get("loc", ()))) == 2 and loc[0] == "path"
    }
    if "id" in failed:
        shown = _shown(str(path_params.get("id", "")))
        named = f"id '{shown}'" if shown is not None else "this id"
        return NotFound(f"no generation with {named}: {_ID_RULE}", param="id")
    if "index" in failed:  # true of every generation: the id is not looked up
        shown = _shown(str(path_params.get("index", "")))
        named = f"image {shown}" if shown is not None else "an image at this index"
        return NotFound(f"no generation has {named}: images are numbered 0–{MAX_INDEX}", param="index")
    return None


class GenerationRoute(OnceEachRoute):
    """A route of /v1/generations, whose path parameters answer 404 where they cannot name
    anything, rather than FastAPI's 422."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handle = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                return await handle(request)
            except RequestValidationError as exc:
                if (not_found := _names_nothing(exc, request.path_params)) is not None:
                    raise not_found from None
                raise

        return route


router = APIRouter(prefix=PREFIX, tags=["generations"], route_class=GenerationRoute)
NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorResponse, "description": "Unknown id, or one no generation can have (`not_found`)."}
}
# An image's answer, 200 or 304.
IMAGE_HEADERS: Headers = {
    "ETag": header("The image's tag, for If-None-Match: its bytes never change."),
    "Cache-Control": header("`private, max-age=<seconds until the image expires>, immutable`."),
}


@router.post(
    "",
    status_code=202,
    response_model=SubmitResponse,
    responses={
        **SUBMIT_RESPONSES,
        202: {
            "description": "Accepted: the job is queued.",
            "headers": {"Location": header("The generation's URL: `links.self`.")},
        },
        400: {
            "model": ErrorResponse,
            "description": MODEL_UNAVAILABLE_400 + ".",
        },
        409: {
            "model": ErrorResponse,
            "description": IDEMPOTENCY_CONFLICT_409 + ".",
            "headers": maybe(RETRY_AFTER),
        },
    },
    summary="Submit a generation",
)
async def submit(
    body: GenerationRequest,
    service: ServiceDep,
    caller: PrincipalDep,
    idempotency_key: IdempotencyKey = None,
) -> JSONResponse:
    accepted = await service.submit(body, caller.owner, idempotency_key)
    return JSONResponse(
        accepted.model_dump(mode="json"), status_code=202, headers={"Location": accepted.links.self}
    )


# HEAD: as every GET route has; documented with the GET.
@router.head("", response_class=Response, include_in_schema=False)
@router.get(
    "",
    response_model=GenerationList,
    responses={**COMMON_RESPONSES, **INVALID_REQUEST_422},
    summary="The caller's generations, newest first, a page at a time",
    description="Those submitted within LATENTD_JOB_TTL whose records remain: with API keys on, "
    "the key's own; while the service is open, those submitted without a key. Each as "
    "`GET /v1/generations/{id}` answers it. Follow `next` while `has_more` is true; a page "
    "filtered by `status` may hold fewer than `limit`, none even, and still have more after it.",
)
async def list_generations(
    service: ServiceDep,
    caller: PrincipalDep,
    limit: Annotated[
        int, Query(ge=1, le=MAX_LIMIT, description=f"Generations per page, 1–{MAX_LIMIT}.")
    ] = DEFAULT_LIMIT,
    after: Annotated[
        str | None,
        Query(
            min_length=1,
            max_length=MAX_ID_CHARS,
            pattern=f"^{ID_CHAR}+$",
            description="A generation's id from an earlier page: list those submitted before it. "
            "`next` carries it.",
        ),
    ] = None,
    status: Annotated[JobStatus | None, Query(description="Only generations of this status.")] = None,
) -> Response:
    page = await service.list_jobs(caller.owner, limit, after, status)
    # Serialised here, as a status read's: FastAPI would validate the model against response_model again.
    return Response(page.model_dump_json(), media_type="application/json")


# HEAD: the status line and headers a GET gets, for `curl -I` and monitors; documented with the GET.
@router.head("/{id}", response_class=Response, include_in_schema=False)
@router.get(
    "/{id}",
    response_model=Generation,
    responses={**COMMON_RESPONSES, **INVALID_REQUEST_422, **NOT_FOUND},
    summary="Status, progress, timings and image links of a generation",
)
async def get_generation(
    job_id: JobId,
    request: Request,
    service: ServiceDep,
    caller: PrincipalDep,
    wait: Annotated[
        float,
        Query(
            ge=0,
            le=MAX_WAIT,
            allow_inf_nan=False,
            description="Long-poll: answer as soon as the generation ends, or after this many seconds "
            "with its state then. 0 (the default) answers at once.",
        ),
    ] = 0,
) -> Response:
    # A HEAD answers at once, its `wait` checked but not waited out: a held read ends in the 200 it
    # would get now, only its body (which a HEAD does not get) different.
    view = await (
        service.wait(job_id, caller.owner, wait, hung_up(request.scope))
        if wait and request.method == "GET"
        else service.get(job_id, caller.owner)
    )
    return status_response(view)


def status_response(view: Generation) -> Response:
    """A status read's answer, from the route and from `StatusReads` alike. Serialised here:
    FastAPI would validate the returned model against response_model again."""
    return Response(view.model_dump_json(), media_type="application/json")


@router.post(
    "/{id}/cancel",
    response_model=Generation,
    responses={
        **COMMON_RESPONSES,
        **NOT_FOUND,
        202: {
            "model": Generation,
            "description": "Running: it stops within about 0.1 s plus one denoising step.",
        },
        409: {
            "model": ErrorResponse,
            "description": "The generation already ended, or its images are stored and it ends "
            "succeeded (`not_cancelable`).",
        },
    },
    summary="Cancel a queued or running generation",
)
def cancel_generation(job_id: JobId, service: ServiceDep, caller: PrincipalDep) -> JSONResponse:
    view = service.cancel(job_id, caller.owner)
    return JSONResponse(view.model_dump(mode="json"), status_code=200 if view.status.is_terminal() else 202)


# HEAD: the headers alone (size, type, ETag), e.g. before a download; documented with the GET.
@router.head("/{id}/images/{index}", response_class=Response, include_in_schema=False)
@router.get(
    "/{id}/images/{index}",
    response_class=Response,
    responses={
        **COMMON_RESPONSES,
        **INVALID_REQUEST_422,  # of a signed URL's query
        200: {
            "content": {"image/png": {}, "image/jpeg": {}, "image/webp": {}},
            "description": "The image.",
            "headers": IMAGE_HEADERS,
        },
        304: {"description": "Not modified (If-None-Match matched the ETag).", "headers": IMAGE_HEADERS},
        401: {
            "model": ErrorResponse,
            "description": "API keys exist and this request has none, or a wrong one, or a signed "
            "URL's signature does not match it and no key came with it (`unauthorized`).",
            "headers": WWW_AUTHENTICATE,
        },
        404: {
            "model": ErrorResponse,
            "description": "Unknown id or index, or one no generation or image can have, or a job "
            "that failed or was canceled (`not_found`); the image, or its signed URL, expired "
            "(`expired`).",
        },
        409: {"model": ErrorResponse, "description": "The job is still queued or running (`not_ready`)."},
    },
    summary="Download one image of a generation",
)
async def get_image(
    job_id: JobId,
    index: ImageIndex,
    request: Request,
    service: ServiceDep,
    caller: ImageCallerDep,
) -> Response:
    blob = await service.image(job_id, index, caller.owner, any_owner=caller.signed)
    # Content never changes for a given id and index, but it expires when the worker said it would.
    left = service.settings.results_ttl if blob.expires_at is None else blob.expires_at - time.time()
    headers = {"ETag": blob.etag, "Cache-Control": f"private, max-age={max(0, int(left))}, immutable"}
    if _matches(request.headers.get("if-none-match"), blob.etag):
        return Response(status_code=304, headers=headers)
    return Response(blob.data, media_type=blob.content_type, headers=headers)


def _matches(if_none_match: str | None, etag: str) -> bool:
    """RFC 9110's weak comparison, which If-None-Match uses: any listed tag, W/ or not, or *."""
    if not if_none_match:
        return False
    tags = [tag.strip().removeprefix("W/") for tag in if_none_match.split(",")]
    return "*" in tags or etag in tags


class StatusReads:
    """`GET /v1/generations/{id}` (and its HEAD) with no query string, answered before FastAPI's routing,
    dependency injection and response wrapping, which took about half of the API's time per
    status read (docs/benchmarks.md, "Reading the service figures"): the read clients poll is
    the API's hottest request. The same authentication, the same read and the same error envelope as
    `get_generation`, which still answers every other form of the request (`?wait=`, an id that
    does not match the pattern) and documents it. An unexpected exception goes on to the app's
    500 handler, as it would from the route."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.path = re.compile(f"{PREFIX}/({ID_CHAR}{{1,{MAX_ID_CHARS}}})")  # what JobId admits
        # The route it stands in for: the metrics middleware labels requests by scope["route"].
        self.route = next(r for r in router.routes if getattr(r, "endpoint", None) is get_generation)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        match = None
        if scope["type"] == "http" and scope["method"] in ("GET", "HEAD") and not scope["query_string"]:
            match = self.path.fullmatch(scope["path"])
        if match is None:
            await self.app(scope, receive, send)
            return
        scope["route"] = self.route
        request = Request(scope, receive)
        service: GenerationService = request.app.state.service
        response: Response
        try:
            caller = await authenticate(request)
            view = await service.get(match.group(1), caller.owner)
            response = status_response(view)
        except ServiceError as exc:
            response = service_error_response(exc)
        except (*STORE_DOWN, *STORE_REFUSES) as exc:
            response = store_down_response(exc)
        await response(scope, receive, send)
