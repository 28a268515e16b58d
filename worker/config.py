"""Settings of a worker process."""

from __future__ import annotations

import os
import socket
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from latentd.settings import BUILTIN_MODEL, CommonSettings


class WorkerSettings(CommonSettings):
    model: str = Field(
        default=BUILTIN_MODEL,
        description="What to serve: `builtin`, a diffusers directory, a .safetensors file or a hub id.",
    )
    model_name: str | None = Field(
        default=None, description="Name clients use for this model; derived from `model` when unset."
    )
    device: str = Field(
        default="auto",
        pattern=r"^(auto|cpu|mps|cuda(:\d+)?)$",
        description="auto picks CUDA, then MPS, then CPU; `cuda:1` pins a GPU.",
    )
    dtype: Literal["auto", "float16", "bfloat16", "float32"] = Field(
        default="auto", description="auto: float16 on a GPU, float32 on the CPU."
    )
    worker_name: str | None = Field(default=None, description="Unique worker name; host and pid when unset.")
    heartbeat_interval: float = Field(
        default=5.0, ge=0.1, le=300, description="Seconds between registrations."
    )
    max_batch_images: int = Field(
        default=8,
        ge=1,
        le=64,
        description="Images one pipeline call may gather from compatible queued jobs (1: no batching).",
    )
    batch_invariant: bool = Field(
        default=False,
        description="Pad every pipeline call to max_batch_images images plus a trailing one, so an "
        "image's bytes never depend on the jobs batched with it or its place among them; a lone job "
        "then costs a full batch of compute.",
    )
    batch_wait_ms: float = Field(
        default=5,
        ge=0,
        le=1000,
        description="How long a worker waits for more compatible jobs to batch, when other jobs are "
        "queued as it takes one or were at its pickup before.",
    )
    progress_interval_ms: float = Field(
        default=100,
        ge=0,
        le=60_000,
        description="After the first denoising step, a job's progress is written and its cancel flag "
        "read once this long has passed, at the end of a step (0: after every step).",
    )
    shutdown_grace: float = Field(
        default=600,
        ge=0,
        le=7 * 86400,
        description="After SIGTERM, seconds the current job may still run; past that the worker exits "
        "and the job's lease lapses, so another worker re-runs it.",
    )
    cache_dir: Path = Field(
        default=Path(os.path.expanduser("~/.cache/latentd")),
        description="Where hub downloads and generated local models live.",
    )
    ready_file: Path | None = Field(
        default=None,
        description="Written once the model is loaded, removed on exit (a readiness probe for containers).",
    )
    torch_compile: bool = Field(
        default=False,
        description="torch.compile the UNet and the VAE decoder (for GPU hosts; 1.7-2x the denoising "
        "steps/s at batch 1 on an H100). Each new image size or batch size compiles first, about a "
        "minute; the model's native size is compiled before the worker says ready.",
    )
    torch_threads: int | None = Field(
        default=None, ge=1, le=1024, description="CPU threads for torch; torch's default when unset."
    )

    @model_validator(mode="after")
    def _a_name_requests_can_give(self) -> WorkerSettings:
        # The API takes model names of 1 to 200 characters: a worker served one no request could name.
        name = self.served_name()
        if not 1 <= len(name) <= 200:
            shown = f"{name[:40]!r}{'...' if len(name) > 40 else ''}"
            where = "LATENTD_MODEL_NAME" if self.model_name else "LATENTD_MODEL (set LATENTD_MODEL_NAME)"
            raise ValueError(
                f"{where}: the model's name {shown} has {len(name)} characters; requests name 1 to 200"
            )
        return self

    def served_name(self) -> str:
        if self.model_name:
            return self.model_name
        if self.model == BUILTIN_MODEL:
            return BUILTIN_MODEL
        path = Path(self.model)
        if path.exists():  # by the name given, a link's too ("current" -> "v2" is "current")
            named = Path(os.path.abspath(path))  # "." and ".." named by the directory they are
            return named.stem if path.is_file() else named.name
        return self.model  # a hub id names itself

    def effective_worker_name(self) -> str:
        return self.worker_name or f"{socket.gethostname()}.{os.getpid()}"


@lru_cache
def get_settings() -> WorkerSettings:
    return WorkerSettings()
