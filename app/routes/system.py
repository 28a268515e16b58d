"""Health, readiness, models and metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool

from app.auth import PrincipalDep
from app.deps import ServiceDep
from app.errors import COMMON_RESPONSES, RETRY_AFTER, ErrorResponse, ServiceUnavailable
from app.protocol import Health, ModelList
from latentd.store import UnsafeRedis, check_eviction_policy

router = APIRouter(tags=["system"])
# Each GET route answers HEAD too (RFC 9110): load balancers and uptime checks probe with it.


@router.head("/healthz", include_in_schema=False)
@router.get("/healthz", response_model=Health, summary="The process is alive")
async def healthz() -> Health:
    return Health(status="ok")


@router.head("/readyz", include_in_schema=False)
@router.get(
    "/readyz",
    response_model=Health,
    responses={
        503: {
            "model": ErrorResponse,
            "description": "Redis is unreachable, or its `maxmemory-policy` may evict keys.",
            "headers": RETRY_AFTER,
        }
    },
    summary="Ready to take requests (Redis reachable and safe)",
)
def readyz(service: ServiceDep) -> Health:
    try:
        service.redis.ping()
        check_eviction_policy(service.redis)
    except UnsafeRedis as exc:
        raise ServiceUnavailable(str(exc), retry_after=30) from None
    except Exception:
        raise ServiceUnavailable("the job store (Redis) is unreachable", retry_after=2) from None
    return Health(status="ready")


@router.head("/v1/models", include_in_schema=False)
@router.get(
    "/v1/models",
    response_model=ModelList,
    responses=COMMON_RESPONSES,
    summary="Models served by live workers",
)
def list_models(service: ServiceDep, caller: PrincipalDep) -> ModelList:
    return ModelList(data=service.models())


@router.head("/metrics", include_in_schema=False)
@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text format."}},
    summary="Prometheus metrics",
)
async def metrics(request: Request) -> Response:
    body = await run_in_threadpool(generate_latest, request.app.state.metrics.registry)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
