"""torch.compile for a loaded pipeline; shared by the worker and `bench/gpu_sd15.py`, so the benchmark
measures the worker's own call. It needs torch only, so the benchmark runs on a bare GPU host."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def compile_pipeline(
    pipe: Any, mode: str = "default", backend: str | Callable[..., Any] = "inductor", fullgraph: bool = False
) -> Callable[[], None]:
    """torch.compile the UNet and the VAE decoder: one static graph per input shape, compiled at the
    first call of that shape. Returns a function that puts the eager modules back.

    Static shapes: on an H200 (2026-11-26) dynamo's recompile with a dynamic batch dimension, at the
    second batch size, ran past the end of a 10-minute run; static, batch 4 compiled in 69 s on an
    H100 (docs/benchmarks.md). Past dynamo's recompile limit (8 shapes of a function) a new shape
    runs eager, unless `fullgraph` (which the benchmark uses to prove the UNet is one graph) turns
    that into an error.
    """
    unet, decode = pipe.unet, pipe.vae.decode
    pipe.unet = torch.compile(unet, mode=mode, backend=backend, fullgraph=fullgraph, dynamic=False)
    pipe.vae.decode = torch.compile(decode, mode=mode, backend=backend, dynamic=False)

    def undo() -> None:
        pipe.unet = unet
        pipe.vae.decode = decode

    return undo
