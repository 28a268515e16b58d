"""Settings both process kinds read. Each process kind extends `CommonSettings`."""

from __future__ import annotations

import re
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
BUILTIN_MODEL = "builtin"
MAX_TTL = 2**31 - 1  # 68 years; Redis refused expiries of 1e16 s, and every job failed


def shown_url(url: str) -> str:
    """`url` as messages and logs may show it: its password, in the user part or the query, hidden."""
    url = re.sub(r"(?i)([?&]password=)[^&]*", r"\1***", url)
    return re.sub(r"(?i)^([a-z]+://)([^:@/?#]*:)?[^/?#]*@", lambda m: f"{m[1]}{m[2] or ''}***@", url)


class CommonSettings(BaseSettings):
    # An empty variable is an unset one (`LATENTD_REDIS_URL=` in a compose file, say); no setting
    # takes inf or nan.
    model_config = SettingsConfigDict(
        env_prefix="LATENTD_", extra="ignore", env_ignore_empty=True, allow_inf_nan=False
    )

    redis_url: str | None = Field(
        default=None,
        description="Redis URL. Unset: `latentd up` starts an embedded redis-server; "
        f"`latentd api` and `latentd worker` use {DEFAULT_REDIS_URL}.",
    )
    results_ttl: int = Field(
        default=3600, ge=10, le=MAX_TTL, description="Seconds images are kept after a job ends."
    )
    job_ttl: int = Field(
        default=86400,
        ge=10,
        le=MAX_TTL,
        description="Seconds a finished job's record (status, parameters, error) is kept; "
        "longer than results_ttl so an expired image answers `expired`, not `not_found`.",
    )
    lease_seconds: int = Field(
        default=30,
        ge=2,
        le=60,
        description="A running job's lease: if its worker stops renewing it (killed, frozen) for this "
        "long, a live worker re-queues the job, or an API process when no worker is alive.",
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        default="info", description="debug, info, warning or error."
    )

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower_case(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis://, rediss:// or unix:// (e.g. redis://127.0.0.1:6379/0)")
        if value is not None:
            try:
                _ = urlsplit(value).port  # redis-py raised it later, as a traceback
            except ValueError as exc:
                raise ValueError(f"{exc} (e.g. redis://127.0.0.1:6379/0)") from None
        return value

    @model_validator(mode="after")
    def _records_outlive_results(self) -> CommonSettings:
        if self.job_ttl < self.results_ttl:  # an image would outlive the record that finds it
            raise ValueError(
                f"LATENTD_JOB_TTL ({self.job_ttl}) must be at least LATENTD_RESULTS_TTL ({self.results_ttl})"
            )
        return self

    @property
    def effective_redis_url(self) -> str:
        return self.redis_url or DEFAULT_REDIS_URL
