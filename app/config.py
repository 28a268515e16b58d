"""Settings of the API process."""

from __future__ import annotations

from functools import lru_cache

from pydantic import Field, SecretStr, field_validator, model_validator

from latentd import keys
from latentd.settings import BUILTIN_MODEL, CommonSettings

# Including .env.example's: uncommented as it stands, it put the API behind a published key.
PLACEHOLDER_KEYS = {
    "changeme",
    "change-me-please",
    "changethis",
    "secret",
    "password",
    "xxxxxxxxxxxxxxxx",
    "replace-with-a-long-random-key",
}


class ApiSettings(CommonSettings):
    host: str = Field(default="127.0.0.1", description="Address the API binds to.")
    port: int = Field(default=8000, ge=1, le=65535)
    default_model: str = Field(default=BUILTIN_MODEL, description="Model used when a request names none.")
    max_pixels: int = Field(
        default=1024 * 1024, ge=64 * 64, description="Largest width × height one request may ask for."
    )
    max_images: int = Field(default=4, ge=1, le=64, description="Largest num_images (and OpenAI `n`).")
    max_work: int = Field(
        default=200_000_000,
        ge=64 * 64,
        description="Cap on one request's total work: width × height × num_images × steps.",
    )
    default_steps: int = Field(default=20, ge=1, le=150)
    default_guidance_scale: float = Field(default=5.0, ge=0, le=30)
    default_size: int | None = Field(
        default=None,
        ge=64,
        le=2048,
        multiple_of=8,
        description="Width and height when a request omits them, a multiple of 8; unset: the model's "
        "native size, as its workers report it (64 for the built-in model, 512 for Stable Diffusion 1.5).",
    )
    max_queue_depth: int = Field(
        default=1000, ge=1, description="Queued jobs per model before submits get 429."
    )
    job_timeout: int = Field(
        default=600,
        ge=1,
        le=7 * 86400,  # a batch's limit is this many times its jobs, and must fit a C int
        description="Seconds one job may run before it fails with `timeout` "
        "(a batch of n jobs: n times that).",
    )
    max_attempts: int = Field(
        default=3,
        ge=1,
        le=10,
        description="Times a job is started before a lost worker fails it with `worker_lost`.",
    )
    sync_timeout: float = Field(
        default=120.0, gt=0, description="Seconds the OpenAI-style endpoint waits for its job."
    )
    request_read_timeout: float = Field(
        default=30,
        ge=1,
        le=3600,
        description="Seconds a connection may take to send a request's line, headers and body "
        "(from its first byte, or from when it opened); a slower one is closed.",
    )
    max_body_bytes: int = Field(
        default=64 * 1024, ge=1024, description="Largest request body; larger ones get 413 unread."
    )
    api_keys: SecretStr | None = Field(
        default=None,
        description="Comma-separated NAME:KEY pairs (e.g. from a Kubernetes Secret), besides the keys "
        "`latentd keys create` stores in Redis; only their digests are kept in memory.",
    )
    require_keys: bool = Field(
        default=False,
        description="Refuse requests without a valid key even while Redis holds no key and no "
        "`latentd keys open` (a Redis that lost its data, at this API's start).",
    )
    rate_limit_per_minute: int = Field(
        default=600, ge=0, description="Requests per minute per API key (0: no limit); only with keys."
    )
    max_jobs_in_flight: int = Field(
        default=32, ge=0, description="Queued plus running jobs per API key (0: no limit); only with keys."
    )
    public_url: str | None = Field(
        default=None, description="Base URL used in absolute image links (OpenAI `url` responses)."
    )

    cors_origins: str | None = Field(
        default=None,
        description="Browser origins allowed to call the API (CORS), comma-separated, or `*` for any.",
    )

    @field_validator("cors_origins")
    @classmethod
    def _origins(cls, value: str | None) -> str | None:
        # An origin with a path or a trailing slash never equals the one a browser sends: the
        # service would look configured and every browser call would still fail.
        for origin in filter(None, (o.strip() for o in (value or "").split(","))):
            scheme, sep, host = origin.partition("://")
            if origin != "*" and (
                not sep or scheme.lower() not in ("http", "https") or not host or "/" in host
            ):
                raise ValueError(
                    f"{origin!r} is not an origin: give scheme://host[:port] (e.g. https://app.example.com), "
                    "comma-separated, or *"
                )
        return value

    def allowed_origins(self) -> list[str]:
        """As a browser writes its Origin: lower case, no default port (an origin written
        `https://App.example.com:443` matched none)."""
        origins = []
        for origin in filter(None, (o.strip().lower() for o in (self.cors_origins or "").split(","))):
            for default in ("http://", ":80"), ("https://", ":443"):
                if origin.startswith(default[0]) and origin.endswith(default[1]):
                    origin = origin.removesuffix(default[1])
            origins.append(origin)
        return origins

    @field_validator("public_url")
    @classmethod
    def _public_url_is_http(cls, value: str | None) -> str | None:
        # Every OpenAI `url` answer begins with it: one without a scheme or host is a link no
        # client can follow, and that showed only in the clients.
        if value is not None:
            scheme, sep, rest = value.partition("://")
            if not sep or scheme.lower() not in ("http", "https") or not rest.split("/", 1)[0]:
                raise ValueError(
                    "must be an http:// or https:// URL with a host (e.g. https://images.example.com)"
                )
        return value

    @model_validator(mode="after")
    def _check(self) -> ApiSettings:
        if self.default_size is not None and self.default_size * self.default_size > self.max_pixels:
            raise ValueError(
                f"LATENTD_DEFAULT_SIZE squared ({self.default_size**2}) exceeds "
                f"LATENTD_MAX_PIXELS ({self.max_pixels})"
            )
        self.static_key_digests()  # refuse malformed or placeholder keys at startup
        return self

    def static_key_digests(self) -> dict[str, str]:
        """digest -> name for the keys in `api_keys`."""
        if self.api_keys is None:
            return {}
        digests: dict[str, str] = {}
        for pair in filter(None, (p.strip() for p in self.api_keys.get_secret_value().split(","))):
            name, _, key = pair.partition(":")
            # A key of other characters passed here and then matched no request: a request's key
            # is read as Latin-1 (a letter outside ASCII), and stripped (a space at either end).
            if len(key) < 16 or not keys.KEY_CHARS.fullmatch(key) or key.lower() in PLACEHOLDER_KEYS:
                raise ValueError(
                    "LATENTD_API_KEYS: each entry must be NAME:KEY with a KEY of at least 16 printable "
                    "ASCII characters, no spaces, that is not a placeholder (generate one with "
                    "`latentd keys create NAME`)"
                )
            try:
                keys.check_name(name)
            except ValueError as exc:
                raise ValueError(f"LATENTD_API_KEYS: {exc}") from None
            digests[keys.digest(key)] = name
        return digests


@lru_cache
def get_settings() -> ApiSettings:
    return ApiSettings()
