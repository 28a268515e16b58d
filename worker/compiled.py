"""torch.compile for a loaded pipeline; shared by the worker and `bench/gpu_sd15.py`, so the benchmark
measures the worker's own call. It needs torch only, so the benchmark runs on a bare GPU host."""

from __future__ import annotations

from typing import Any

import torch


def compile_pipeline(
    pipe: Any, mode: str = "default", backend: str = "inductor", fullgraph: bool = False
) -> None:
    """torch.compile the UNet and the VAE decoder: one static graph per input shape.

    Static shapes: on an H200 (2026-11-26) dynamo's recompile with a dynamic batch dimension, at the
    second batch size, ran past the end of a 10-minute run; static, batch 4 compiled in 69 s on an
    H100 (docs/benchmarks.md). Past dynamo's recompile limit (8 shapes of
    a function) a new shape runs eager, unless `fullgraph` (which the benchmark uses to prove the
    UNet is one graph) turns that into an error.
    """
    pipe.unet = torch.compile(pipe.unet, mode=mode, backend=backend, fullgraph=fullgraph, dynamic=False)
    pipe.vae.decode = torch.compile(pipe.vae.decode, mode=mode, backend=backend, dynamic=False)
