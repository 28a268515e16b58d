"""Load one diffusers pipeline and run jobs through it.

The pipeline is loaded once per worker process. A job picks its scheduler, gets
one seeded generator per image, and reports each denoising step to a callback
that may interrupt the run (cancellation).
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import inspect
import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import diffusers.utils.logging
import torch
import transformers.utils.logging
from diffusers import (
    DDIMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LCMScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)
from diffusers.utils import is_accelerate_available
from PIL import Image
from rq.timeouts import BaseTimeoutException
from torch._dynamo.exc import TorchDynamoException

from latentd.contract import JobPayload
from latentd.logs import event
from latentd.settings import BUILTIN_MODEL
from worker.compiled import compile_pipeline
from worker.config import WorkerSettings

log = logging.getLogger("latentd.worker")

BUILTIN_DIR = Path(__file__).resolve().parent / "builtin" / "model"

SCHEDULER_CLASSES: dict[str, Any] = {
    "ddim": DDIMScheduler,
    "euler": EulerDiscreteScheduler,
    "euler_a": EulerAncestralDiscreteScheduler,
    "dpmpp_2m": DPMSolverMultistepScheduler,
    "lcm": LCMScheduler,
    "pndm": PNDMScheduler,
}

# What each name means, whatever variant the model's own scheduler is: a requested scheduler takes
# the model's noise schedule from its config, and these settings over it. A model that ships DPM++
# 2M SDE Karras made `dpmpp_2m` stochastic and `euler` Karras, and one whose final sigma is
# sigma_min made both stop short of 0. PNDM as Stable Diffusion ships
# it: without the Runge-Kutta warm-up steps, which ran steps + 9 denoising steps (progress past
# 100 %) and failed below 4 steps.
_PLAIN_SIGMAS = {"use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False}
SCHEDULER_OPTIONS: dict[str, dict[str, Any]] = {
    "dpmpp_2m": {
        **_PLAIN_SIGMAS,
        "algorithm_type": "dpmsolver++",
        "solver_order": 2,
        "solver_type": "midpoint",
        "use_lu_lambdas": False,
        "euler_at_final": False,
        "lower_order_final": True,
        "final_sigmas_type": "zero",
    },
    "euler": {**_PLAIN_SIGMAS, "final_sigmas_type": "zero"},
    "ddim": {"clip_sample": False},  # latents are not images in [-1, 1]; the default clips them
    "pndm": {"skip_prk_steps": True},
}

# Set in a PIL image's `info` when the model's safety checker blacked it out.
WITHHELD = "latentd_withheld"
# Set in a PIL image's `info`: the class of the scheduler that made it.
SCHEDULER_RAN = "latentd_scheduler"

# Called after each denoising step with (step_done, total_steps); returns True to interrupt.
StepCallback = Callable[[int, int], bool]


class ModelLoadError(RuntimeError):
    """The configured model cannot be loaded: the worker must not start."""


class DeviceBroken(ModelLoadError):
    """The accelerator failed as the model loaded or was checked (a CUDA error, not the model's):
    the worker exits as it does when the device breaks under a job, for its supervisor to start
    it again."""


def is_device_broken(exc: BaseException) -> bool:
    """A CUDA error that leaves the device's context unusable for the rest of the process."""
    return (
        isinstance(exc, RuntimeError)
        and not is_out_of_memory(exc)
        and ("CUDA error" in str(exc) or "device-side assert" in str(exc))
    )


def pick_device(requested: str) -> torch.device:
    if requested != "auto":
        device = torch.device(requested)
        if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
            raise ModelLoadError(
                f"LATENTD_DEVICE={requested}: this host has {torch.cuda.device_count()} CUDA devices"
            )
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise ModelLoadError(f"LATENTD_DEVICE={requested}: MPS is not available on this host")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def pick_dtype(requested: str, device: torch.device) -> torch.dtype:
    if requested != "auto":
        dtype: torch.dtype = getattr(torch, requested)
        if device.type == "cpu" and dtype is torch.float16:  # asked for, it is served; said once
            event(log, "dtype_slow_on_cpu", logging.WARNING, dtype=requested, faster="float32")
        return dtype
    return torch.float32 if device.type == "cpu" else torch.float16


def resolve_source(settings: WorkerSettings) -> str:
    """Turn LATENTD_MODEL into something diffusers can load."""
    if settings.model != BUILTIN_MODEL:
        return settings.model
    if (BUILTIN_DIR / "model_index.json").exists():
        return str(BUILTIN_DIR)
    # Until a trained built-in model ships, serve a seeded random tiny one so the
    # service still runs end to end on a machine with no network.
    from worker.tiny import build_tiny_pipeline

    target = settings.cache_dir / "tiny-random"
    if not (target / "model_index.json").exists():
        event(log, "builtin_model_missing", logging.WARNING, building=str(target))
        build_tiny_pipeline(target)
    return str(target)


def load_pipeline(
    source: str, device: torch.device, dtype: torch.dtype, cache_dir: Path
) -> DiffusionPipeline:
    path = Path(source)
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    # Loading's chatter stays out of the log: diffusers' and transformers' progress bars (a hub
    # download keeps its own), and diffusers' warning at each start that accelerate would load
    # faster: an SD 1.5-sized model loaded in 0.8 s without it, 0.5 s with it (docs/benchmarks.md).
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    accelerate = is_accelerate_available()
    try:
        if path.is_file() and path.suffix.lower() in (".safetensors", ".ckpt"):
            pipe = _load_single_file(path, dtype, cache_dir / "hub")
        elif path.is_dir():
            pipe = _text_to_image(path).from_pretrained(
                str(path), dtype=dtype, local_files_only=True, low_cpu_mem_usage=accelerate
            )
        elif path.is_file():
            raise ModelLoadError(
                f"model file {source} is not a .safetensors or .ckpt checkpoint; "
                "give one of those, a diffusers directory or a hub id"
            )
        elif path.is_absolute() or source.startswith("."):
            raise ModelLoadError(f"model path {source} does not exist")
        else:  # a hub id
            from diffusers import AutoPipelineForText2Image

            pipe = AutoPipelineForText2Image.from_pretrained(
                source,
                dtype=dtype,
                cache_dir=str(cache_dir / "hub"),
                local_files_only=offline,
                low_cpu_mem_usage=accelerate,
            )
    except ModelLoadError:
        raise
    except Exception as exc:
        if _not_on_this_host(exc) and path.is_file():
            raise ModelLoadError(
                f"cannot load checkpoint {source}: diffusers reads the configuration of its base model "
                f"from the hub, which has not cached it in {cache_dir / 'hub'} and could not give it "
                f"({type(exc).__name__}); serve a diffusers directory instead"
            ) from exc
        if _not_on_this_host(exc):
            where = (
                "HF_HUB_OFFLINE is set" if offline else "the hub could not be reached or has no such model"
            )
            raise ModelLoadError(
                f"cannot load model {source!r}: not a local path, not in the cache {cache_dir / 'hub'}, "
                f"and {where} ({type(exc).__name__})"
            ) from exc
        raise ModelLoadError(
            f"cannot load model {source!r}: {type(exc).__name__}: {' '.join(str(exc).split())[:500]}"
        ) from exc
    try:
        pipe = pipe.to(device)
    except Exception as exc:
        free_accelerator_memory()
        if is_out_of_memory(exc):
            raise ModelLoadError(f"model {source!r} does not fit on {device} in {dtype}") from exc
        broken = DeviceBroken if is_device_broken(exc) else ModelLoadError
        raise broken(
            f"cannot move model {source!r} to {device}: {type(exc).__name__}: {first_line(exc)[:300]}"
        ) from exc
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _text_to_image(path: Path) -> Any:
    """The class that loads the diffusers directory `path` for text to image: the Stable Diffusion
    pipelines themselves, else diffusers' auto pipeline (it maps an image-to-image or inpainting
    directory to its text-to-image class). That one is imported only here: its module imports every
    pipeline diffusers has, about 1 s of each worker's start on two CPU cores."""
    try:
        named = json.loads((path / "model_index.json").read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError):
        named = None  # the auto pipeline says what is wrong with the directory
    for cls in (StableDiffusionPipeline, StableDiffusionXLPipeline):
        if named == cls.__name__:
            return cls
    from diffusers import AutoPipelineForText2Image

    return AutoPipelineForText2Image


def _not_on_this_host(exc: BaseException) -> bool:
    """Whether loading failed because the files are not in the cache and the hub did not give
    them (offline, unreachable, no such repository), rather than for what is in them."""
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled, RepositoryNotFoundError

    missing = (LocalEntryNotFoundError, OfflineModeIsEnabled, RepositoryNotFoundError, ConnectionError)
    return _within(exc, missing) is not None


def _load_single_file(path: Path, dtype: torch.dtype, hub_cache: Path) -> DiffusionPipeline:
    """A .safetensors or .ckpt checkpoint; diffusers reads its base model's configuration from
    the hub, cached in `hub_cache` as a hub id's files are."""
    from safetensors import safe_open

    is_xl = False
    if path.suffix.lower() == ".safetensors":
        with safe_open(str(path), framework="pt") as f:
            is_xl = any(k.startswith("conditioner.embedders.1") for k in f.keys())  # noqa: SIM118
    cls = StableDiffusionXLPipeline if is_xl else StableDiffusionPipeline
    return cls.from_single_file(str(path), dtype=dtype, cache_dir=str(hub_cache))


@dataclass
class Runner:
    """A loaded pipeline plus what a job needs to run on it."""

    pipe: DiffusionPipeline
    device: torch.device
    model: str
    # When set, every pipeline call is padded to this many images, plus one: the kernels give
    # results that depend on the batch size, and at a tensor's end on the place in it, so a fixed
    # size makes an image's bytes independent of the jobs it ran with (see `generate`).
    pad_to: int | None = None
    # Set while the UNet and VAE decoder run compiled: puts the eager modules back.
    uncompile: Callable[[], None] | None = None
    # The weights' `fingerprint`, taken at load.
    weights: str = ""

    @property
    def native_size(self) -> int | None:
        """The side of the images the model was trained at (512 for Stable Diffusion 1.5)."""
        sample = getattr(getattr(self.pipe, "unet", None), "config", {}).get("sample_size")
        factor = getattr(self.pipe, "vae_scale_factor", None)
        return sample * factor if isinstance(sample, int) and isinstance(factor, int) else None

    @property
    def zeros_empty_negatives(self) -> bool:
        """Whether the model guides a job without a negative prompt against zeros (SDXL does): such
        a job and one with a negative prompt cannot share a call."""
        return bool(getattr(self.pipe, "config", {}).get("force_zeros_for_empty_prompt", False))

    def warnings(self, payload: JobPayload) -> list[str]:
        """What of a job's request the model will not use, for its client to read (`warnings`).
        Advice only: whatever fails here leaves the job without it, never fails the job."""
        try:
            return self._warnings(payload)
        except Exception as exc:
            event(log, "warnings_failed", logging.WARNING, error=type(exc).__name__)
            return []

    def _warnings(self, payload: JobPayload) -> list[str]:
        said = []
        if self._reader is not None:
            tokenizer, reads = self._reader
            for name in ("prompt", "negative_prompt"):
                text = getattr(payload, name)
                count = len(tokenizer(text, add_special_tokens=False, verbose=False).input_ids) if text else 0
                if count > reads:
                    said.append(
                        f"{name}: {count} tokens, of which the model reads the first {reads}; "
                        "the rest was ignored"
                    )
        if payload.negative_prompt and (why := self._negative_ignored(payload)):
            said.append(f"negative_prompt: ignored, as {why}")
        return said

    def _negative_ignored(self, payload: JobPayload) -> str | None:
        """Why the model will not guide the job against its negative prompt, if it will not."""
        if self._call_parameters and "negative_prompt" not in self._call_parameters:
            return "this model takes none"
        unet = getattr(self.pipe, "unet", None)
        if getattr(getattr(unet, "config", None), "time_cond_proj_dim", None) is not None:
            return "this model (LCM-distilled) does not guide against it"
        if "prior_guidance_scale" in self._call_parameters:
            return None  # Kandinsky: its prior guides against it, at a scale of its own
        true_cfg = self._call_parameters.get("true_cfg_scale")
        if true_cfg is not None:  # Flux, Qwen-Image: a scale of its own, left at its default
            if isinstance(true_cfg.default, int | float) and true_cfg.default > 1:
                return None
            return (
                "this model reads it only with a true_cfg_scale over 1, which latentd leaves at its default"
            )
        if "negative_prompt" in self._call_parameters and payload.guidance_scale <= 1:
            return "guidance_scale is at most 1"  # classifier-free guidance runs only above 1
        return None

    def _longest_reader(self) -> tuple[Any, int] | None:
        """The pipeline's tokenizer that reads the most of a prompt, and how many tokens it reads:
        CLIP's 75 on Stable Diffusion; a T5's up to the pipeline's `max_sequence_length` where
        one rides along (SD3: 255, Flux: 511; both also read the first 75 through CLIP)."""
        longest = self._call_parameters.get("max_sequence_length")
        cap = longest.default if longest is not None and isinstance(longest.default, int) else None
        best: tuple[Any, int] | None = None
        for suffix in ("", "_2", "_3"):
            tokenizer = getattr(self.pipe, f"tokenizer{suffix}", None)
            encoder = getattr(self.pipe, f"text_encoder{suffix}", None)
            if tokenizer is None or encoder is None:  # SD3 may be loaded without its T5
                continue
            # The pipelines cut CLIP's input at its own length, any other's at the cap.
            clip = type(encoder).__name__.startswith("CLIP")
            length = tokenizer.model_max_length if clip or cap is None else cap
            reads = length - tokenizer.num_special_tokens_to_add()
            if best is None or reads > best[1]:
                best = (tokenizer, reads)
        return best

    def __post_init__(self) -> None:
        # Its call's parameters, for `warnings` and the negative prompt: a pipeline whose signature
        # cannot be read still serves, with no advice and every argument passed.
        self._call_parameters: Mapping[str, inspect.Parameter] = {}
        self._reader = None
        try:
            self._call_parameters = inspect.signature(type(self.pipe).__call__).parameters
            self._reader = self._longest_reader()
        except Exception as exc:
            event(log, "warnings_failed", logging.WARNING, error=type(exc).__name__)
        self._default_scheduler = self.pipe.scheduler
        self._schedulers: dict[str, Any] = {}
        self.oom_splits = 0  # calls split in two after an out-of-memory error, since start

    def _scheduler(self, name: str | None) -> Any:
        if name is None:
            return self._default_scheduler
        if name not in self._schedulers:
            self._schedulers[name] = SCHEDULER_CLASSES[name].from_config(
                self._default_scheduler.config, **SCHEDULER_OPTIONS.get(name, {})
            )
        return self._schedulers[name]

    def generate(
        self, payloads: list[JobPayload], on_step: StepCallback
    ) -> tuple[list[list[Image.Image]], bool]:
        """Run jobs that share their pipeline parameters (see `batch_key`) as one pipeline call.

        Returns each job's images, and whether the run was interrupted. Every image has its
        own generator seeded from its job. On an accelerator out-of-memory error (`is_out_of_memory`)
        the images are split in two halves, each run on its own; a single image that still does
        not fit raises that error to the caller, and so does any call padded to `pad_to` (each
        half would be padded back to the same size).
        """
        first = payloads[0]
        self.pipe.scheduler = self._scheduler(first.scheduler)
        most = self.pipe.scheduler.config.get("original_inference_steps")
        if isinstance(self.pipe.scheduler, LCMScheduler) and most and first.steps > most:
            # diffusers' own message speaks of `original_steps x strength`, fields clients never see
            raise ValueError(f"steps: the lcm scheduler takes at most {most} steps with this model")
        slots = [(j, i) for j, p in enumerate(payloads) for i in range(p.num_images)]
        # Padded calls take at most `pad_to` images: more run as several calls, progress spread
        # over them.
        pending = (
            [slots[i : i + self.pad_to] for i in range(0, len(slots), self.pad_to)]
            if self.pad_to
            else [slots]
        )
        threads = torch.get_num_threads()
        if self.pad_to and self.device.type == "cpu":
            # More threads split a tensor's values between them where they please, each part with
            # its own scalar tail: an image's values then depend on its place in the batch (seen
            # with two threads on an AVX-512 host). One thread leaves one tail, in the padding.
            torch.set_num_threads(1)
        try:
            return self._calls(payloads, pending, on_step)
        finally:
            torch.set_num_threads(threads)

    def _calls(
        self, payloads: list[JobPayload], pending: list[list[tuple[int, int]]], on_step: StepCallback
    ) -> tuple[list[list[Image.Image]], bool]:
        first = payloads[0]
        images: list[list[Image.Image]] = [[] for _ in payloads]
        calls = len(pending)
        while pending:
            chunk_slots = pending.pop(0)
            before = calls - len(pending) - 1

            def chunk_step(done: int, total: int, before: int = before) -> bool:
                return on_step((before * total + done) // calls, total)

            try:
                chunk, interrupted = self._run(payloads, chunk_slots, chunk_step if calls > 1 else on_step)
            except TorchDynamoException as exc:
                # A new shape's compile failed (in the job that brought it): eager from now on.
                if self.uncompile is None:
                    raise
                # The job's time limit (a signal) as the compile ran: dynamo wraps what is raised in
                # its tracing, and the job ran on eager with no limit left.
                if (limit := _within(exc, BaseTimeoutException)) is not None:
                    raise limit from None
                self.run_eager(exc)
                pending.insert(0, chunk_slots)
                continue
            except Exception as exc:
                if not is_out_of_memory(exc):
                    raise
                free_accelerator_memory()
                if len(chunk_slots) == 1 or self.pad_to:
                    raise
                half = len(chunk_slots) // 2
                self.oom_splits += 1
                event(
                    log, "out_of_memory_split", logging.WARNING, job_id=first.job_id, images=len(chunk_slots)
                )
                pending[:0] = [chunk_slots[:half], chunk_slots[half:]]
                continue
            if interrupted:
                return images, True
            for (j, _), image in zip(chunk_slots, chunk, strict=True):
                images[j].append(image)
        return images, False

    def run_eager(self, cause: BaseException) -> None:
        """After a failed compile: the eager modules back, for the rest of this process."""
        if self.uncompile is None:
            return
        self.uncompile()
        self.uncompile = None
        free_accelerator_memory()
        root: BaseException = cause
        # dynamo wraps the backend's own error (BackendCompilerFailed.inner_exception)
        while (inner := getattr(root, "inner_exception", None) or root.__cause__) is not None:
            root = inner
        reason = f"{type(root).__name__}: {first_line(root)}"[:300]
        event(log, "pipeline_compile_failed", logging.ERROR, running="eager", error=reason)

    def _run(
        self, payloads: list[JobPayload], slots: list[tuple[int, int]], on_step: StepCallback
    ) -> tuple[list[Image.Image], bool]:
        first = payloads[0]
        # CPU generators: the same seed gives the same latents on any device and in any batch.
        generators = [torch.Generator("cpu").manual_seed(payloads[j].image_seed(i)) for j, i in slots]
        prompts = [payloads[j].prompt for j, _ in slots]
        negatives = [payloads[j].negative_prompt for j, _ in slots]
        # Padded calls have one row more than `pad_to`, always padding, and always last: elementwise
        # kernels finish a tensor's last few values on another code path (a scalar tail; seen in
        # the text encoder's activation on an AVX2 host), so no image may sit at the batch's end.
        padding = self.pad_to + 1 - len(slots) if self.pad_to else 0
        generators += [torch.Generator("cpu").manual_seed(0) for _ in range(padding)]
        prompts += [""] * padding
        negatives += [""] * padding

        def step_end(pipe: Any, step: int, timestep: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
            # In the client's steps: a scheduler may take a few more model calls (PNDM: one).
            calls = max(first.steps, getattr(pipe, "num_timesteps", 0) or 0)
            if on_step(-(-(step + 1) * first.steps // calls), first.steps):
                # Out of the call at once: diffusers' own `_interrupt` skips the remaining steps
                # but still decodes the latents and runs the safety checker, for nothing.
                raise _Stopped
            return kwargs

        # None where no job gave one on a model that then guides against zeros, not against the
        # text "" (SDXL: `zeros_empty_negatives`, which `batch_key` keeps apart). Elsewhere "" for
        # each: an image then does not depend on its batch mates, and pipelines whose negative
        # prompt must be a string (Sana) run. None at all to a pipeline that takes none (LCM's,
        # Flux 2's): it refused the call.
        negative: dict[str, Any] = {}
        if not self._call_parameters or "negative_prompt" in self._call_parameters:
            negative["negative_prompt"] = (
                None if self.zeros_empty_negatives and not any(negatives) else negatives
            )
        with torch.inference_mode():
            try:
                result = self.pipe(
                    prompt=prompts,
                    **negative,
                    width=first.width,
                    height=first.height,
                    num_inference_steps=first.steps,
                    guidance_scale=first.guidance_scale,
                    generator=generators,
                    callback_on_step_end=step_end,
                    output_type="pil",
                )
            except _Stopped:
                return [], True
        images = list(result.images)[: len(slots)]
        # A model that ships a safety checker (Stable Diffusion 1.5's does) returns a flagged
        # image black; the image says so, for its job to tell the client.
        for image, flagged in zip(images, getattr(result, "nsfw_content_detected", None) or [], strict=False):
            if flagged:
                image.info[WITHHELD] = True
        for image in images:
            image.info[SCHEDULER_RAN] = type(self.pipe.scheduler).__name__
        return images, False


class _Stopped(Exception):
    """Raised from the step callback to leave a pipeline call its jobs no longer want."""


def compile_runner(runner: Runner, backend: str | Callable[..., Any] = "inductor") -> bool:
    """Compile the runner's pipeline and warm it up; whether the warm-up ran. A compile that fails,
    now or for a later job's new shape (an image without the C compiler Triton or inductor needs,
    say), is logged and leaves the pipeline eager, still serving; the job that met it runs eager."""
    runner.uncompile = compile_pipeline(runner.pipe, backend=backend)
    try:
        warm_up(runner)
    except Exception as exc:  # the warm-up failed other than as a compile error `generate` handles
        runner.run_eager(exc)
        return False
    return True


def check_runs(runner: Runner) -> None:
    """One short eager call before the worker says ready: a model whose parts do not fit together
    (an inpainting UNet, a text encoder of another width) loaded, said ready, and failed every job.
    One image at half the native size: on a CPU, Stable Diffusion's 512 took half a minute to
    decode. Four steps: PNDM without `skip_prk_steps` takes no fewer, and serves jobs of more. A
    ValueError, as for jobs (`invalid_parameters`), is about these parameters, not the model."""
    size = max(64, (runner.native_size or 512) // 128 * 64)
    check = JobPayload(
        job_id="check", model=runner.model, prompt="check", width=size, height=size, steps=4,
        guidance_scale=7.5, seed=0, num_images=1,
    )  # fmt: skip
    try:
        Runner(pipe=runner.pipe, device=runner.device, model=runner.model).generate(
            [check], lambda d, t: False
        )
    except Exception as exc:
        reason = f"{type(exc).__name__}: {first_line(exc)[:300]}"
        if isinstance(exc, ValueError) or is_out_of_memory(exc):
            event(log, "model_check_inconclusive", logging.WARNING, size=size, error=reason)
            return
        if is_device_broken(exc):
            raise DeviceBroken(
                f"{runner.device} failed as model {runner.model!r} was checked: {reason}"
            ) from exc
        raise ModelLoadError(f"model {runner.model!r} loads but cannot generate an image: {reason}") from exc


def warm_up(runner: Runner) -> None:
    """Run one short call at the model's native size, so its graphs compile before the first job."""
    from torch._dynamo.utils import counters

    size = runner.native_size or 512
    images = runner.pad_to or 1
    warm = JobPayload(
        job_id="warm-up", model=runner.model, prompt="warm-up", width=size, height=size, steps=2,
        guidance_scale=7.5, seed=0, num_images=images,
    )  # fmt: skip
    started = time.perf_counter()
    try:
        runner.generate([warm], lambda done, total: False)
    except Exception as exc:
        if not is_out_of_memory(exc):
            raise
        # generate() has freed what it could. Not even one image of the native size fits: jobs of
        # that size will fail with out_of_memory, smaller ones may still run, and each shape
        # compiles in its first job.
        event(log, "pipeline_warm_up_out_of_memory", logging.WARNING, size=size)
        return
    if runner.uncompile is None:  # the compile failed and the warm-up ran eager
        return
    event(
        log,
        "pipeline_compiled",
        size=size,
        images=images,
        seconds=round(time.perf_counter() - started, 1),
        graphs=counters["stats"]["unique_graphs"],
    )


def batch_key(payload: JobPayload, zeros_empty_negatives: bool = False) -> tuple[object, ...]:
    """Jobs with equal keys can run as one pipeline call (see `Runner.zeros_empty_negatives`)."""
    return (
        payload.model,
        payload.width,
        payload.height,
        payload.steps,
        payload.guidance_scale,
        payload.scheduler,
        zeros_empty_negatives and not payload.negative_prompt,
    )


def is_out_of_memory(exc: BaseException) -> bool:
    """torch's OutOfMemoryError, or the plain RuntimeError CUDA libraries raise when an allocation
    outside PyTorch's caching allocator fails (a cuBLAS handle or workspace, say), or torch's CPU
    allocator does (a size the host's memory cannot hold), or Python's MemoryError. None leaves
    the device unusable."""
    if isinstance(exc, torch.OutOfMemoryError | MemoryError):
        return True
    message = str(exc)
    return isinstance(exc, RuntimeError) and any(
        sign in message
        for sign in (
            "CUDA error: out of memory",
            "CUBLAS_STATUS_ALLOC_FAILED",
            "DefaultCPUAllocator:",  # "can't allocate memory"; on Windows "not enough memory"
        )
    )


def _within(
    exc: BaseException, kinds: type[BaseException] | tuple[type[BaseException], ...]
) -> BaseException | None:
    """`exc`, or the first exception of `kinds` among those it was raised from or while handling."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, kinds):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def first_line(exc: BaseException, default: str = "") -> str:
    """An exception's message up to its first line break (a client or a log line gets no more)."""
    return (str(exc).splitlines() or [default])[0]


def free_accelerator_memory() -> None:
    """Best effort, called while another error is handled: a CUDA context that error left broken
    raises here too, and must not hide it."""
    gc.collect()
    if torch.cuda.is_available():
        with contextlib.suppress(RuntimeError):
            torch.cuda.empty_cache()


def fingerprint(pipe: DiffusionPipeline) -> str:
    """A short digest of the weights a pipeline holds, in their dtype: each tensor's name, shape,
    and first and last values. Workers that serve one name with other weights (a fine-tune on one
    host, float16 on another) give other images for one seed; they are told apart by this."""
    digest = hashlib.sha256()
    try:
        for part, module in sorted(pipe.components.items()):
            if not isinstance(module, torch.nn.Module):
                continue
            for name, tensor in module.state_dict().items():
                flat = tensor.detach().reshape(-1)
                sample = torch.cat([flat[:8], flat[-8:]]).cpu().contiguous()
                digest.update(f"{part}.{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
                digest.update(sample.view(torch.uint8).numpy().tobytes())
    except Exception as exc:  # advice only (weights offloaded to the meta device, say): none then
        event(log, "weights_fingerprint_failed", logging.WARNING, error=first_line(exc))
        return ""
    return digest.hexdigest()[:16]


def load_runner(settings: WorkerSettings) -> Runner:
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    device = pick_device(settings.device)
    dtype = pick_dtype(settings.dtype, device)
    source = resolve_source(settings)
    pipe = load_pipeline(source, device, dtype, settings.cache_dir)
    event(log, "model_loaded", model=settings.served_name(), source=source, device=device, dtype=dtype)
    gc.enable()  # `latentd worker` turned collections off for the imports and this load (see there)
    pad_to = settings.max_batch_images if settings.batch_invariant else None  # 1 too: a job of several images
    runner = Runner(
        pipe=pipe, device=device, model=settings.served_name(), pad_to=pad_to, weights=fingerprint(pipe)
    )
    if not (settings.torch_compile and compile_runner(runner)):  # a warm-up that ran shows it runs
        check_runs(runner)
    return runner
