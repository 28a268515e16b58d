"""Settings both process kinds read. Each process kind extends `CommonSettings`."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
BUILTIN_MODEL = "builtin"


class CommonSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LATENTD_", extra="ignore")

    redis_url: str | None = Field(
        default=None,
        description="Redis URL. Unset: `latentd up` starts an embedded redis-server; "
        f"`latentd api` and `latentd worker` use {DEFAULT_REDIS_URL}.",
    )
    results_ttl: int = Field(default=3600, ge=10, description="Seconds images are kept after a job ends.")
    job_ttl: int = Field(
        default=86400,
        ge=10,
        description="Seconds a finished job's record (status, parameters, error) is kept; "
        "longer than results_ttl so an expired image answers `expired`, not `not_found`.",
    )
    log_level: str = Field(default="info", description="debug, info, warning or error.")

    @property
    def effective_redis_url(self) -> str:
        return self.redis_url or DEFAULT_REDIS_URL
