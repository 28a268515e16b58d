"""Public request and response models of the HTTP API (v1).

These are separate from `latentd.contract.JobPayload`, which is what crosses
Redis: a request leaves blanks that `serving` resolves from configuration.
"""

from __future__ import annotations

import re
import unicodedata
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from latentd.contract import MAX_SEED, JobStatus, OutputFormat, Scheduler

MAX_PROMPT_CHARS = 2000


# Letters and marks that draw nothing: the Braille blank, the Hangul fillers, the combining
# grapheme joiner, the Khmer inherent vowels and the Mongolian variation selectors.
_DRAW_NOTHING = frozenset("\u2800\u3164\u115f\u1160\uffa0\u034f\u17b4\u17b5\u180b\u180c\u180d\u180f")
# Format characters that do draw: the prepended concatenation marks (Arabic number signs, ...).
_FORMAT_DRAWN = frozenset(
    "\u0600\u0601\u0602\u0603\u0604\u0605\u06dd\u070f\u0890\u0891\u08e2\U000110bd\U000110cd"
)


def _blank(c: str) -> bool:
    """Draws nothing: whitespace and separators (Z*), controls (Cc), noncharacters (U+FFFF, ...),
    format characters (Cf: soft hyphen, zero-width and direction marks, BOM) but those that draw,
    variation selectors and the characters above. str.isspace() misses most."""
    category = unicodedata.category(c)
    if category == "Cf":
        return c not in _FORMAT_DRAWN
    return (
        (category[0] == "Z" and c != "\u1680")  # the Ogham space mark is a stroke
        or category == "Cc"
        # Noncharacters, never to be assigned (not every Cn: one may be an emoji newer than
        # this Python's Unicode tables).
        or "\ufdd0" <= c <= "\ufdef"
        or ord(c) & 0xFFFE == 0xFFFE
        or c in _DRAW_NOTHING
        or "\ufe00" <= c <= "\ufe0f"
        or "\U000e0100" <= c <= "\U000e01ef"
    )


def _not_blank(value: str) -> str:
    if all(_blank(c) for c in value):
        raise ValueError("must contain a visible character")
    return value


def _no_nul(value: str) -> str:
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    return value


Prompt = Annotated[
    str,
    Field(min_length=1, max_length=MAX_PROMPT_CHARS, description="What to draw."),
    AfterValidator(_not_blank),
    AfterValidator(_no_nul),
]
Side = Annotated[int, Field(ge=64, le=2048, multiple_of=8)]


class _Body(BaseModel):
    """A request body whose optional fields take their defaults when sent as null, all alike (as
    clients that serialize unset fields as null send them)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _null_is_the_default(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        fields = cls.model_fields
        return {k: v for k, v in data.items() if v is not None or k not in fields or fields[k].is_required()}


class GenerationRequest(_Body):
    """Body of `POST /v1/generations`. Omitted fields, and fields sent as null, take the
    configured defaults."""

    prompt: Prompt
    negative_prompt: Annotated[str, Field(max_length=MAX_PROMPT_CHARS), AfterValidator(_no_nul)] = ""
    model: Annotated[str, Field(min_length=1, max_length=200)] | None = None
    width: Side | None = Field(default=None, description="Pixels, a multiple of 8 in 64–2048.")
    height: Side | None = Field(default=None, description="Pixels, a multiple of 8 in 64–2048.")
    steps: Annotated[int, Field(ge=1, le=150)] | None = Field(default=None, description="Denoising steps.")
    guidance_scale: Annotated[float, Field(ge=0, le=30, allow_inf_nan=False)] | None = None
    seed: Annotated[int, Field(ge=0, le=MAX_SEED)] | None = Field(
        default=None, description="Chosen at random and recorded when absent."
    )
    num_images: Annotated[int, Field(ge=1)] = Field(default=1, description="1 to the configured maximum.")
    scheduler: Scheduler | None = Field(default=None, description="The model's own scheduler when absent.")
    output_format: OutputFormat = "png"


class ResolvedRequest(BaseModel):
    """The request as it runs: every default filled in, the seed included."""

    prompt: str
    negative_prompt: str
    model: str
    width: int
    height: int
    steps: int
    guidance_scale: float
    seed: int
    num_images: int
    scheduler: str | None = Field(
        description="null: the model's own scheduler (the PNG's `parameters` text names the one it ran)."
    )
    output_format: str


class Links(BaseModel):
    self: str
    cancel: str


QUEUE_POSITION = (
    "Jobs ahead of this one in its model's queue (0: it is next). `null` once a worker has taken it, "
    "in the moment before its start that it still reads `queued`, and once it is no longer queued."
)


class SubmitResponse(BaseModel):
    id: str
    status: JobStatus
    queue_position: int | None = Field(description=QUEUE_POSITION)
    created_at: datetime
    links: Links


class Progress(BaseModel):
    step: int
    total_steps: int
    fraction: float


class Timings(BaseModel):
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    queue_seconds: float | None = None
    inference_seconds: float | None = None


class ImageInfo(BaseModel):
    index: int
    seed: int
    content_type: str
    url: str
    withheld: bool = Field(
        default=False,
        description="The model's own safety checker flagged this image: the file is black.",
    )
    expires_at: datetime | None = Field(
        default=None,
        description="When the service drops the image (LATENTD_RESULTS_TTL after the job ended); "
        "from then on `url` answers 404 `expired`.",
    )


class JobErrorInfo(BaseModel):
    code: str
    message: str


class Generation(BaseModel):
    id: str
    status: JobStatus
    queue_position: int | None = Field(default=None, description=QUEUE_POSITION)
    progress: Progress
    request: ResolvedRequest
    timings: Timings
    images: list[ImageInfo] = []
    error: JobErrorInfo | None = None
    attempts: int = Field(
        default=0,
        description="Times a worker ran it (2+ after a lost worker; not the start that finds the "
        "images a lost worker stored, which runs nothing).",
    )
    warnings: list[str] = Field(
        default=[],
        description="What of the request the model does not use, once a worker has started it: a "
        "prompt longer than the model reads, a negative prompt the model ignores (at guidance_scale "
        "1 or less, on an LCM- or guidance-distilled model, or on one that takes none).",
    )
    cancel_requested: bool = False
    links: Links


class GenerationList(BaseModel):
    """A page of `GET /v1/generations`: the caller's generations, newest first."""

    object: Literal["list"] = "list"
    data: list[Generation] = Field(
        description="Each as `GET /v1/generations/{id}` answers it. Fewer than `limit` (none, even) "
        "does not mean the end: `has_more` says."
    )
    has_more: bool = Field(description="Older generations may follow: fetch `next`.")
    next: str | None = Field(
        description="The path of the next page (`/v1/generations?limit=..&after=<id>`, with the same "
        "`status`); null where `has_more` is false."
    )


class ModelInfo(BaseModel):
    id: str
    object: Literal["model"] = "model"
    # OpenAI's model object has both, and clients that type it strictly require them.
    created: int = Field(
        description="When the longest-serving live worker of the model started (unix seconds)."
    )
    owned_by: str = Field(default="latentd", description="Always `latentd`: the service that serves it.")
    workers: int
    devices: list[str]
    queue_depth: int
    native_size: int | None = Field(
        default=None,
        description="The side of the images the model was made for: a request's default size, "
        "unless the service sets LATENTD_DEFAULT_SIZE.",
    )


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelInfo]


class Health(BaseModel):
    status: str


# OpenAI Images API compatibility (`POST /v1/images/generations`).

# ASCII digits only: pydantic's \d, and int(), take any script's digits (fullwidth, Arabic-Indic, ...).
_SIZE = re.compile("[0-9]{1,5}x[0-9]{1,5}|auto")


def _size(value: str) -> str:
    if not _SIZE.fullmatch(value):
        raise ValueError("must be WIDTHxHEIGHT (e.g. 512x512) or auto")
    return value


# Checked by _size, whose message a client can read (a pattern's error shows the regex); the
# pattern is still documented in the schema.
Size = Annotated[str, Field(json_schema_extra={"pattern": f"^({_SIZE.pattern})$"}), AfterValidator(_size)]


class OpenAIImageRequest(_Body):
    prompt: Prompt
    model: Annotated[str, Field(min_length=1, max_length=200)] | None = None
    n: Annotated[int, Field(ge=1)] | None = Field(default=1, description="null: 1, as OpenAI's API has it.")
    size: Size | None = Field(
        default=None, description='"WIDTHxHEIGHT", e.g. "512x512"; "auto" (or none): the default size.'
    )
    response_format: Literal["url", "b64_json"] = "url"
    output_format: Literal["png", "jpeg", "webp"] | None = Field(
        default=None, description="The image format (OpenAI's newer models take it too); none: png."
    )
    # Accepted for compatibility with OpenAI clients; they do not change the output.
    quality: str | None = None
    style: str | None = None
    user: str | None = None


class OpenAIImage(BaseModel):
    url: str | None = None
    b64_json: str | None = None
    revised_prompt: str | None = None


class OpenAIImageResponse(BaseModel):
    created: int
    data: list[OpenAIImage]
