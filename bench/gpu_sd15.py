"""GPU benchmark: the Stable Diffusion 1.5 architecture with random weights, no download.

UNet, VAE and CLIP ViT-L/14 text encoder are built from SD 1.5's configurations with random
weights (the speed of a step does not depend on the weights), the tokenizer is the offline
byte-level one of `worker.tiny`. At 512×512 in float16, for batches 1, 4 and 8, eager and
under `torch.compile`, it reports:

- denoising steps/s: UNet steps (classifier-free guidance on, so the UNet sees 2 × batch),
  timed between the ends of the first and the last step, so text encoding, warm-up and VAE
  decoding are outside it;
- images/s: batch / the whole pipeline call (text encoding, all steps, VAE decode, tensor out);
- modes `worker` and `worker-compile` time the worker's own Runner instead (one job of `batch`
  images, PNG-ready PIL images out), the latter after the compile and warm-up that
  `LATENTD_TORCH_COMPILE` runs; they need the worker's dependencies (pydantic), the others torch,
  diffusers and transformers only;
- with `--profile`, first one eager batch-1 call under torch.profiler: kernels per step and how
  much of the call the GPU is busy, which tells a launch-bound step from a compute-bound one;
- mode `identity` checks `LATENTD_BATCH_INVARIANT` on this device: jobs of mixed seeds and prompts
  (as many as the largest of `--batches`, eager, through the worker's Runner) run alone and then as
  one call, padded to that size and not; it reports how many images came out pixel-identical and
  the largest difference in 0-255 steps.

    python -m bench gpu                    # or: python bench/gpu_sd15.py --out docs/bench/gpu_sd15.json
    python bench/gpu_sd15.py --device cpu --tiny --modes eager   # the CPU smoke path the tests run

Without CUDA (and without `--device cpu`) it exits with status 2 and says so.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Run as a script (`python bench/gpu_sd15.py`), the repository root is not on the path.
if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from worker.compiled import compile_pipeline

EXIT_NO_CUDA = 2
PROMPT = "a photograph of an astronaut riding a horse"
MODES = ("eager", "compile", "worker", "worker-compile", "identity")

# SD 1.5's UNet (runwayml/stable-diffusion-v1-5 unet/config.json), written out.
UNET_SD15: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": (
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
}
VAE_SD: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 512,
}
# CLIP ViT-L/14's text tower, as SD 1.5 uses it.
TEXT_VIT_L14: dict[str, Any] = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "max_position_embeddings": 77,
    "vocab_size": 49408,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
}
# The same shapes shrunk, for the CPU smoke path.
UNET_TINY: dict[str, Any] = {
    **UNET_SD15,
    "sample_size": 8,
    "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
    "block_out_channels": (32, 64),
    "layers_per_block": 1,
    "cross_attention_dim": 32,
    "norm_num_groups": 8,
}
VAE_TINY: dict[str, Any] = {
    **VAE_SD,
    "down_block_types": ("DownEncoderBlock2D",) * 2,
    "up_block_types": ("UpDecoderBlock2D",) * 2,
    "block_out_channels": (32, 64),
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "sample_size": 64,
}
TEXT_TINY: dict[str, Any] = {
    **TEXT_VIT_L14,
    "hidden_size": 32,
    "intermediate_size": 37,
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "projection_dim": 32,
}


def build_pipeline(
    device: torch.device, dtype: torch.dtype, tiny: bool, workdir: Path, channels_last: bool = False
) -> Any:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from worker.tiny import assemble_pipeline, write_tokenizer

    tokenizer = write_tokenizer(workdir / "tokenizer")
    torch.manual_seed(0)
    # Initialised where they will run: random init of 860M parameters on the CPU takes a while.
    with torch.device(device):
        unet = UNet2DConditionModel(**(UNET_TINY if tiny else UNET_SD15))
        vae = AutoencoderKL(**(VAE_TINY if tiny else VAE_SD))
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                **(TEXT_TINY if tiny else TEXT_VIT_L14),
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
    pipe = assemble_pipeline(unet, vae, text_encoder, tokenizer)
    pipe = pipe.to(device=device, dtype=dtype)
    if channels_last:
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rate(marks: list[float], steps: int) -> float:
    """Denoising steps/s between the ends of the first and the last step."""
    return (steps - 1) / (marks[-1] - marks[0]) if len(marks) == 2 and marks[-1] > marks[0] else 0.0


def time_call(
    pipe: Any, device: torch.device, batch: int, steps: int, size: int, guidance: float
) -> dict[str, float]:
    """One pipeline call: whole-call seconds and the denoising rate between first and last step."""
    marks: list[float] = []

    def on_step(p: Any, step: int, timestep: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        if step in (0, steps - 1):
            _sync(device)
            marks.append(time.perf_counter())
        return kwargs

    generator = torch.Generator("cpu").manual_seed(0)
    _sync(device)
    start = time.perf_counter()
    with torch.inference_mode():
        pipe(
            prompt=[PROMPT] * batch,
            height=size,
            width=size,
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=generator,
            output_type="pt",
            callback_on_step_end=on_step,
        )
    _sync(device)
    total = time.perf_counter() - start
    return {"seconds": total, "steps_per_s": _rate(marks, steps)}


def worker_call(
    runner: Any, device: torch.device, batch: int, steps: int, size: int, guidance: float
) -> dict[str, float]:
    """One job of `batch` images through the worker's own Runner: per-image generators, PIL out."""
    from latentd.contract import JobPayload

    marks: list[float] = []

    def on_step(done: int, total: int) -> bool:
        if done in (1, total):
            _sync(device)
            marks.append(time.perf_counter())
        return False

    job = JobPayload(
        job_id="bench", model=runner.model, prompt=PROMPT, width=size, height=size, steps=steps,
        guidance_scale=guidance, seed=0, num_images=batch,
    )  # fmt: skip
    _sync(device)
    start = time.perf_counter()
    runner.generate([job], on_step)
    total = time.perf_counter() - start
    return {"seconds": total, "steps_per_s": _rate(marks, steps)}


def identity_check(
    pipe: Any, device: torch.device, size: int, steps: int, guidance: float, jobs: int
) -> dict[str, Any]:
    """Each image of a batch against the same job run alone, with every call padded to `jobs`
    images plus the trailing one (what `LATENTD_BATCH_INVARIANT` does) and without padding."""
    import numpy as np

    from latentd.contract import JobPayload
    from worker.pipeline import Runner

    prompts = [PROMPT, "a red circle on a blue background", "a lighthouse at dusk, watercolor"]
    payloads = [
        JobPayload(
            job_id=f"identity-{i}",
            model="sd15",
            prompt=prompts[i % len(prompts)],
            negative_prompt="blurry" if i % 2 else "",
            width=size,
            height=size,
            steps=steps,
            guidance_scale=guidance,
            seed=1000 + 7 * i,
            num_images=1,
        )
        for i in range(jobs)
    ]

    def pixels(runner: Runner, batch: list[JobPayload]) -> list[Any]:
        images, _ = runner.generate(batch, lambda done, total: False)
        return [np.asarray(job_images[0], dtype=int) for job_images in images]

    result: dict[str, Any] = {"jobs": jobs}
    for label, pad_to in (("padded", jobs), ("unpadded", None)):
        runner = Runner(pipe=pipe, device=device, model="sd15", pad_to=pad_to)
        alone = [pixels(runner, [p])[0] for p in payloads]
        pairs = list(zip(alone, pixels(runner, payloads), strict=True))
        result[f"{label}_identical"] = sum(np.array_equal(a, b) for a, b in pairs)
        result[f"{label}_max_diff"] = max(int(np.abs(a - b).max()) for a, b in pairs)
        # Flat images (a random model's fp16 overflow, say) would be identical and prove nothing.
        result.setdefault("pixel_std", round(float(np.mean([a.std() for a in alone])), 2))
    return result


def profile_call(pipe: Any, device: torch.device, steps: int, size: int, guidance: float) -> dict[str, Any]:
    """One batch-1 call under torch.profiler: how busy the GPU is and how many kernels a step costs.

    The profiler slows the host side, so the fractions it gives are a lower bound for the GPU's
    share; the kernel count and the kernel times are what it measures exactly.
    """
    from torch.autograd import DeviceType  # type: ignore[attr-defined]
    from torch.profiler import ProfilerActivity, profile

    time_call(pipe, device, 1, steps, size, guidance)  # warm: allocator, cuDNN/cuBLAS choices
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        call = time_call(pipe, device, 1, steps, size, guidance)
    events = prof.events()
    kernels = sorted(
        (e.time_range.start, e.time_range.end) for e in events if e.device_type == DeviceType.CUDA
    )
    busy_us, reach = 0.0, float("-inf")
    for start, end in kernels:  # the union of the kernels' intervals
        busy_us += max(0.0, end - max(start, reach))
        reach = max(reach, end)
    span_us = kernels[-1][1] - kernels[0][0] if kernels else 0.0
    top = sorted(
        (a for a in prof.key_averages() if a.device_type == DeviceType.CUDA),
        key=lambda a: a.self_device_time_total,
        reverse=True,
    )[:8]
    return {
        "batch": 1,
        "steps": steps,
        "call_s_under_profiler": round(call["seconds"], 3),
        "aten_ops_per_step": round(sum(e.name.startswith("aten::") for e in events) / steps, 1),
        "kernels_per_step": round(len(kernels) / steps, 1),
        "gpu_busy_ms": round(busy_us / 1000, 1),
        "gpu_span_ms": round(span_us / 1000, 1),
        "gpu_busy_fraction": round(busy_us / span_us, 3) if span_us else None,
        "top_kernels": [
            {"name": a.key[:90], "count": a.count, "ms": round(a.self_device_time_total / 1000, 2)}
            for a in top
        ],
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    import diffusers

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    results: list[dict[str, Any]] = []
    result: dict[str, Any] = {
        "benchmark": "gpu_sd15",
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": "python bench/gpu_sd15.py " + shlex.join(args.argv),
        "architecture": "tiny (smoke)"
        if args.tiny
        else "SD 1.5 (UNet 860M, VAE, CLIP ViT-L/14 text), random",
        "dtype": args.dtype,
        "size": args.size,
        "steps": args.steps,
        "guidance_scale": args.guidance,
        "compile_mode": args.compile_mode if "compile" in args.modes else None,
        "memory_format": "channels_last" if args.channels_last else "contiguous",
        "results": results,
    }
    with tempfile.TemporaryDirectory(prefix="sd15-bench-") as tmp:
        if args.profile:
            pipe = build_pipeline(device, dtype, args.tiny, Path(tmp), args.channels_last)
            result["profile"] = profile_call(pipe, device, args.steps, args.size, args.guidance)
            print(json.dumps(result["profile"]), file=sys.stderr, flush=True)
            write(args.out, result)
            del pipe
        for mode in args.modes:
            if mode == "identity":
                pipe = build_pipeline(device, dtype, args.tiny, Path(tmp), args.channels_last)
                jobs = max(args.batches)
                result["identity"] = identity_check(pipe, device, args.size, args.steps, args.guidance, jobs)
                print(json.dumps(result["identity"]), file=sys.stderr, flush=True)
                write(args.out, result)
                del pipe
                continue
            # A fresh pipeline per mode, so compiled graphs never leak into the eager figures.
            pipe = build_pipeline(device, dtype, args.tiny, Path(tmp), args.channels_last)
            call: Callable[..., dict[str, float]] = time_call
            target: Any = pipe
            extra: dict[str, float] = {}
            if mode == "compile":
                compile_pipeline(pipe, args.compile_mode, args.compile_backend, fullgraph=True)
            elif mode.startswith("worker"):  # the worker's Runner, and LATENTD_TORCH_COMPILE's path
                from worker.pipeline import Runner, compile_runner

                call, target = worker_call, Runner(pipe=pipe, device=device, model="sd15")
                if mode == "worker-compile":
                    started = time.perf_counter()
                    compile_runner(target)  # compiles and warms up the native size, as the worker does
                    extra = {"compile_runner_s": round(time.perf_counter() - started, 1)}
            base: float | None = None
            for batch in args.batches:
                started = time.perf_counter()
                for _ in range(args.warmup):  # the first calls compile (once per batch size)
                    call(target, device, batch, args.steps, args.size, args.guidance)
                warmup_s = time.perf_counter() - started
                calls = [
                    call(target, device, batch, args.steps, args.size, args.guidance)
                    for _ in range(args.repeats)
                ]
                seconds = statistics.median(c["seconds"] for c in calls)
                images_per_s = batch / seconds
                base = images_per_s if base is None else base
                row = {
                    "mode": mode,
                    "batch": batch,
                    "steps_per_s": round(statistics.median(c["steps_per_s"] for c in calls), 2),
                    "images_per_s": round(images_per_s, 3),
                    "images_per_s_vs_batch1": round(images_per_s / base, 3),
                    "seconds_per_call": round(seconds, 4),
                    "warmup_s": round(warmup_s, 1),
                    **extra,
                }
                if device.type == "cuda":
                    row["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
                results.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
                write(args.out, result)  # row by row, so a run cut short keeps what it measured
            del pipe, target
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
    return result


def write(out: Path | None, result: dict[str, Any]) -> None:
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gpu_sd15", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="tiny shapes (the CPU smoke path); not a measurement")
    p.add_argument(
        "--dtype", default=None, choices=["float16", "bfloat16", "float32"], help="default float16"
    )
    p.add_argument("--size", type=int, help="width and height (default 512, tiny 32)")
    p.add_argument("--steps", type=int, help="denoising steps per call (default 30, tiny 2)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default torch's)")
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--batches", type=_ints, default=[1, 4, 8])
    p.add_argument(
        "--modes",
        type=lambda s: s.split(","),
        default=["eager", "compile"],
        help="eager, compile: the pipeline called directly; worker, worker-compile: the worker's Runner "
        "(one job per call), the latter after LATENTD_TORCH_COMPILE's compile and warm-up; identity: "
        "batched images against lone runs, padded and not",
    )
    p.add_argument("--compile-mode", default="default", help="torch.compile mode (e.g. max-autotune)")
    p.add_argument("--compile-backend", default="inductor")
    p.add_argument(
        "--channels-last", action="store_true", help="UNet and VAE weights in channels-last (NHWC) layout"
    )
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, help="timed calls per row, median taken (default 5, tiny 1)")
    p.add_argument("--out", type=Path, help="write the results as JSON here (after each row)")
    p.add_argument(
        "--profile",
        action="store_true",
        help="first profile one eager batch-1 call: kernels per step, how busy the GPU is",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else argv
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(
            "gpu_sd15: no CUDA device here (torch.cuda.is_available() is False); this benchmark needs an "
            "NVIDIA GPU. `--device cpu --tiny` runs the smoke path.",
            file=sys.stderr,
        )
        return EXIT_NO_CUDA
    cpu = args.device == "cpu"
    args.dtype = args.dtype or ("float32" if cpu else "float16")
    args.size = args.size or (32 if args.tiny else 512)
    args.steps = args.steps or (2 if args.tiny else 30)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.repeats = args.repeats or (1 if args.tiny else 5)
    unknown = set(args.modes) - set(MODES)
    if unknown:
        raise SystemExit(f"gpu_sd15: unknown mode(s) {', '.join(sorted(unknown))}")
    result = run(args)
    write(args.out, result)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
