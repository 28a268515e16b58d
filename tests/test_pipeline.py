"""The pipeline runner in-process, on the tiny model: out-of-memory recovery.

No accelerator here, so the test makes the real UNet raise torch's own
OutOfMemoryError for batches over a size, as a too-small GPU would.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from latentd.contract import JobPayload
from tests.conftest import ROOT, TINY_MODEL, flag_everything_checker
from worker.encode import encode
from worker.pipeline import (
    ModelLoadError,
    Runner,
    compile_runner,
    fingerprint,
    load_pipeline,
    pick_dtype,
    warm_up,
)


@pytest.fixture(scope="module")
def runner(tiny_model_dir: Path) -> Runner:
    pipe = load_pipeline(str(tiny_model_dir), torch.device("cpu"), torch.float32, tiny_model_dir)
    return Runner(pipe=pipe, device=torch.device("cpu"), model="tiny")


def payload(n: int) -> JobPayload:
    return JobPayload(
        job_id="oom", model="tiny", prompt="a red circle", width=64, height=64, steps=2,
        guidance_scale=5.0, seed=11, num_images=n,
    )  # fmt: skip


def limit_unet_batch(
    runner: Runner,
    monkeypatch: pytest.MonkeyPatch,
    max_batch: int,
    error: Exception = torch.OutOfMemoryError("CUDA out of memory (injected)"),
) -> list[int]:
    seen: list[int] = []
    real = runner.pipe.unet.forward

    def forward(sample: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        seen.append(sample.shape[0])
        if sample.shape[0] > max_batch:
            raise error
        return real(sample, *args, **kwargs)

    monkeypatch.setattr(runner.pipe.unet, "forward", forward)
    return seen


def never(done: int, total: int) -> bool:
    return False


def test_out_of_memory_splits_the_batch_and_keeps_each_images_seed(
    runner: Runner, monkeypatch: pytest.MonkeyPatch
) -> None:
    alone = [
        np.asarray(runner.generate([payload(1).model_copy(update={"seed": 11 + i})], never)[0][0][0])
        for i in range(4)
    ]
    seen = limit_unet_batch(runner, monkeypatch, max_batch=2)  # one image with guidance = a batch of 2
    [images], interrupted = runner.generate([payload(4)], never)
    assert not interrupted and len(images) == 4
    assert 8 in seen and 4 in seen and seen[-1] == 2  # 4 images, then 2, then 1 at a time
    for got, want in zip(images, alone, strict=True):
        assert np.abs(np.asarray(got).astype(int) - want.astype(int)).max() <= 1


def cpu_allocation_failure() -> RuntimeError:
    """What torch's CPU allocator raises for memory the host does not have (a real one)."""
    try:
        torch.empty(2**50, dtype=torch.uint8)
    except RuntimeError as exc:
        return exc
    raise AssertionError("a 1 PiB allocation succeeded")


@pytest.mark.parametrize(
    "error",
    [
        lambda: RuntimeError(
            "CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported"
        ),
        lambda: RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"),
        cpu_allocation_failure,
        MemoryError,
    ],
    ids=["cuda", "cublas", "cpu", "python"],
)
def test_what_allocators_outside_the_caching_one_raise_for_memory_counts_as_out_of_memory(
    runner: Runner, monkeypatch: pytest.MonkeyPatch, error: Callable[[], Exception]
) -> None:
    """Allocations outside PyTorch's CUDA caching allocator, and the CPU's, fail as a plain
    RuntimeError: split, then `out_of_memory` (on a CPU host it was `generation_failed`), and the
    device is not taken for broken (which would stop the worker)."""
    from worker.jobs import _classify
    from worker.pipeline import is_device_broken

    seen = limit_unet_batch(runner, monkeypatch, max_batch=2, error=error())
    [images], _ = runner.generate([payload(2)], never)
    assert len(images) == 2 and seen[0] == 4 and set(seen[1:]) == {2}  # split, one image a call
    limit_unet_batch(runner, monkeypatch, max_batch=1, error=error())
    with pytest.raises((RuntimeError, MemoryError)) as raised:
        runner.generate([payload(1)], never)
    assert _classify(raised.value, payload(1)).code == "out_of_memory"
    assert not is_device_broken(raised.value)
    assert is_device_broken(RuntimeError("CUDA error: an illegal memory access was encountered"))


def test_a_single_image_that_does_not_fit_raises(runner: Runner, monkeypatch: pytest.MonkeyPatch) -> None:
    limit_unet_batch(runner, monkeypatch, max_batch=1)
    with pytest.raises(torch.OutOfMemoryError):
        runner.generate([payload(2)], never)


def test_a_time_limit_that_lands_in_a_compile_ends_the_job(
    runner: Runner, monkeypatch: pytest.MonkeyPatch
) -> None:
    # dynamo wraps what is raised inside its tracing: the limit read as a failed compile, and the
    # job ran on eager with no limit left.
    from rq.timeouts import JobTimeoutException
    from torch._dynamo.exc import InternalTorchDynamoError

    def compiling(*_: Any) -> Any:
        try:
            raise JobTimeoutException("Task exceeded maximum timeout value (1 seconds)")
        except JobTimeoutException as exc:
            raise InternalTorchDynamoError("JobTimeoutException: while tracing") from exc

    uncompiled: list[bool] = []
    monkeypatch.setattr(runner, "_run", compiling)
    monkeypatch.setattr(runner, "uncompile", lambda: uncompiled.append(True))
    with pytest.raises(JobTimeoutException):
        runner.generate([payload(1)], never)
    assert not uncompiled


def test_a_padded_call_that_does_not_fit_is_not_split(
    runner: Runner, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under LATENTD_BATCH_INVARIANT each half would be padded back to the same size: no retries."""
    from worker.jobs import _classify

    padded = Runner(pipe=runner.pipe, device=runner.device, model="tiny", pad_to=4)
    seen = limit_unet_batch(runner, monkeypatch, max_batch=4)  # 2 padded images fit, 4 do not
    with pytest.raises(torch.OutOfMemoryError) as raised:
        padded.generate([payload(2)], never)
    assert seen == [10]  # one try at 4 + 1 images (guidance doubles the UNet batch), no split
    failure = _classify(raised.value, payload(2), pad_to=4)
    assert failure.code == "out_of_memory"
    assert "64x64" in failure.message and "pads every call to 5 images" in failure.message


def test_out_of_memory_fails_the_job_with_a_message_naming_the_size() -> None:
    from worker.jobs import _classify

    failure = _classify(torch.OutOfMemoryError("CUDA out of memory"), payload(3))
    assert failure.code == "out_of_memory"
    assert "64x64" in failure.message and "3" in failure.message


@pytest.mark.parametrize("threads", [1, 2])
def test_padded_batches_give_the_same_bytes_as_a_lone_run(runner: Runner, threads: int) -> None:
    """With `pad_to` (LATENTD_BATCH_INVARIANT) an image does not depend on its batch mates, nor on
    where in the batch it sits, whatever torch's thread count: with one thread on an AVX2 host the
    last row of a full batch came out different, and with two on an AVX-512 host, a row moved."""
    from worker.encode import encode

    mates = [  # as test_batching's end-to-end test: there, the last image came out different
        payload(1).model_copy(update={"job_id": "a", "seed": 1, "steps": 4, "prompt": "a red circle"}),
        payload(1).model_copy(
            update={
                "job_id": "b",
                "seed": 20,
                "steps": 4,
                "prompt": "a blue square",
                "negative_prompt": "blurry",
            }
        ),
        payload(2).model_copy(update={"job_id": "c", "seed": 300, "steps": 4, "prompt": "a green triangle"}),
    ]
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        # All four in one call, the last image last; two calls, c split over both; one each.
        for pad_to in (4, 3, 1):
            padded = Runner(pipe=runner.pipe, device=runner.device, model="tiny", pad_to=pad_to)
            seen: list[int] = []

            def progress(done: int, total: int, seen: list[int] = seen) -> bool:
                seen.append(done)
                return False

            together, _ = padded.generate(mates, progress)
            assert seen == sorted(seen) and seen[-1] == 4, seen
            for mate, images in zip(mates, together, strict=True):
                alone, _ = padded.generate([mate], never)
                for i, (a, b) in enumerate(zip(images, alone[0], strict=True)):
                    assert encode(a, mate, i)[0] == encode(b, mate, i)[0], (pad_to, mate.job_id, i)
    finally:
        torch.set_num_threads(before)


def test_a_warm_up_that_runs_out_of_memory_leaves_the_worker_serving(
    runner: Runner, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    limit_unet_batch(runner, monkeypatch, max_batch=0)  # not even one image fits
    with caplog.at_level("WARNING", logger="latentd.worker"):
        warm_up(runner)
    assert "pipeline_warm_up_out_of_memory size=64" in caplog.text


@pytest.fixture
def fresh(tiny_model_dir: Path) -> Runner:
    """A runner of its own, for tests that compile its modules."""
    pipe = load_pipeline(str(tiny_model_dir), torch.device("cpu"), torch.float32, tiny_model_dir)
    return Runner(pipe=pipe, device=torch.device("cpu"), model="tiny")


def test_a_compile_that_fails_is_logged_and_the_pipeline_serves_eager(
    fresh: Runner, caplog: pytest.LogCaptureFixture
) -> None:
    pipe = fresh.pipe
    unet, decode = pipe.unet, pipe.vae.decode

    def no_compiler(graph: Any, example_inputs: Any) -> Any:  # what an image without gcc gives
        raise RuntimeError("Failed to find C compiler. Please specify via CC environment variable.")

    with caplog.at_level("ERROR", logger="latentd.worker"):
        compile_runner(fresh, backend=no_compiler)
    assert (
        'pipeline_compile_failed running=eager error="RuntimeError: Failed to find C compiler' in caplog.text
    )
    assert pipe.unet is unet and pipe.vae.decode == decode
    [images], interrupted = fresh.generate([payload(2)], never)
    assert not interrupted and len(images) == 2


def test_a_compile_that_fails_for_a_later_shape_runs_that_job_eager_and_stops_compiling(
    fresh: Runner, caplog: pytest.LogCaptureFixture
) -> None:
    """A job whose new shape does not compile still gets its images, and later shapes do not retry."""
    pipe = fresh.pipe
    unet, decode = pipe.unet, pipe.vae.decode
    eager = [np.asarray(image) for image in fresh.generate([payload(2)], never)[0][0]]
    compiles: list[bool] = []
    warm_up_done = False

    def fails_after_warm_up(graph: Any, example_inputs: Any) -> Any:  # no compile: dynamo's graph
        compiles.append(warm_up_done)
        if warm_up_done:
            raise RuntimeError("triton: out of shared memory for this shape")
        return graph.forward

    with caplog.at_level("INFO", logger="latentd.worker"):
        compile_runner(fresh, backend=fails_after_warm_up)
        assert "pipeline_compiled size=64 images=1" in caplog.text and pipe.unet is not unet
        warm_up_done = True
        [images], interrupted = fresh.generate([payload(2)], never)  # batch 2: a new shape
    assert 'pipeline_compile_failed running=eager error="RuntimeError: triton: out of shared' in caplog.text
    assert not interrupted and len(images) == 2
    for got, want in zip(images, eager, strict=True):
        assert np.array_equal(np.asarray(got), want)
    assert pipe.unet is unet and pipe.vae.decode == decode
    tried = len(compiles)
    fresh.generate([payload(3)], never)
    assert len(compiles) == tried and compiles.count(True) == 1


@pytest.mark.parametrize("scheduler", ["pndm", "ddim", "euler", "dpmpp_2m"])
@pytest.mark.parametrize("steps", [1, 3, 10])
def test_progress_counts_the_steps_the_client_asked_for(runner: Runner, scheduler: str, steps: int) -> None:
    # PNDM ran steps + 9 model calls (progress reached 145 %), and failed below 4 steps.
    seen: list[tuple[int, int]] = []

    def record(done: int, total: int) -> bool:
        seen.append((done, total))
        return False

    job = payload(1).model_copy(update={"scheduler": scheduler, "steps": steps})
    images, _ = runner.generate([job], record)
    assert len(images[0]) == 1
    assert {total for _, total in seen} == {steps}
    done = [d for d, _ in seen]
    assert done == sorted(done) and done[0] >= 1 and done[-1] == steps, done


def test_an_image_the_models_safety_checker_blacks_out_is_marked_withheld(
    runner: Runner, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Stable Diffusion 1.5 ships a safety checker: a flagged image comes back black, and the job
    # succeeded as if it were a picture. Here diffusers' own checker, tiny and random, with
    # thresholds that flag every image.
    checker, feature_extractor = flag_everything_checker()
    monkeypatch.setattr(runner.pipe, "safety_checker", checker)
    monkeypatch.setattr(runner.pipe, "feature_extractor", feature_extractor)
    [images], _ = runner.generate([payload(2)], never)
    metas = [encode(image, payload(2), i)[1] for i, image in enumerate(images)]
    assert [m.withheld for m in metas] == [True, True]
    assert all(np.asarray(image).max() == 0 for image in images)  # what the client downloads: black

    monkeypatch.setattr(runner.pipe, "safety_checker", None)
    [images], _ = runner.generate([payload(1)], never)
    assert not encode(images[0], payload(1), 0)[1].withheld


def test_a_call_its_jobs_no_longer_want_stops_at_once(
    runner: Runner, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A cancel is answered within a step: the half-denoised latents are not decoded (at 1024x1024
    # on the CPU the decode had held the worker for another 25 s), and the next run is unchanged.
    decoded: list[int] = []
    real = runner.pipe.vae.decode

    def decode(*args: Any, **kwargs: Any) -> Any:
        decoded.append(1)
        return real(*args, **kwargs)

    job = payload(1).model_copy(update={"steps": 6})
    before, _ = runner.generate([job], never)
    monkeypatch.setattr(runner.pipe.vae, "decode", decode)
    steps: list[int] = []
    images, interrupted = runner.generate([job], lambda done, total: bool(steps.append(done)) or done >= 2)
    assert interrupted and images == [[]] and steps == [1, 2] and decoded == []
    after, _ = runner.generate([job], never)
    assert np.array_equal(np.asarray(before[0][0]), np.asarray(after[0][0])) and decoded == [1]


def test_a_requested_scheduler_is_the_one_named_whatever_the_models_own_is(
    runner: Runner, monkeypatch: pytest.MonkeyPatch
) -> None:
    from diffusers import DPMSolverMultistepScheduler, EulerDiscreteScheduler

    shipped = DPMSolverMultistepScheduler.from_config(
        runner.pipe.scheduler.config,
        algorithm_type="sde-dpmsolver++",
        use_karras_sigmas=True,
        final_sigmas_type="sigma_min",
        lower_order_final=False,
    )
    monkeypatch.setattr(runner.pipe, "scheduler", shipped)
    own = Runner(pipe=runner.pipe, device=runner.device, model="tiny")
    dpmpp = own._scheduler("dpmpp_2m").config
    assert (dpmpp.algorithm_type, dpmpp.solver_order, dpmpp.use_karras_sigmas) == ("dpmsolver++", 2, False)
    assert (dpmpp.final_sigmas_type, dpmpp.lower_order_final) == ("zero", True)
    euler = own._scheduler("euler").config
    assert (euler.use_karras_sigmas, euler.final_sigmas_type) == (False, "zero")
    # A config that does not say (SDXL's Euler may not) left DDIM clipping latents to [-1, 1].
    unsaid = {k: v for k, v in runner.pipe.scheduler.config.items() if k != "clip_sample"}
    monkeypatch.setattr(runner.pipe, "scheduler", EulerDiscreteScheduler.from_config(unsaid))
    assert (
        Runner(pipe=runner.pipe, device=runner.device, model="tiny")._scheduler("ddim").config.clip_sample
        is False
    )
    # The model's noise schedule is kept.
    assert dpmpp.prediction_type == shipped.config.prediction_type
    assert dpmpp.timestep_spacing == shipped.config.timestep_spacing


def test_model_load_failures_past_reading_the_files_are_one_line_errors(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from diffusers import StableDiffusionPipeline
    from huggingface_hub.errors import LocalEntryNotFoundError

    import worker.pipeline as pipeline

    # A model too large for the card fails as it moves there: exit 3 with a message, not a traceback.
    def too_big(self: Any, *args: Any, **kwargs: Any) -> Any:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB")

    def context_broken() -> None:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    with monkeypatch.context() as patch:
        patch.setattr(StableDiffusionPipeline, "to", too_big)
        with pytest.raises(ModelLoadError, match=r"does not fit on cpu in torch.float32"):
            load_pipeline(str(tiny_model_dir), torch.device("cpu"), torch.float32, tmp_path)
        # Freeing memory on a CUDA context the error broke raises too: the load error still shows.
        patch.setattr(torch.cuda, "is_available", lambda: True)
        patch.setattr(torch.cuda, "empty_cache", context_broken)
        with pytest.raises(ModelLoadError, match=r"does not fit on cpu in torch.float32"):
            load_pipeline(str(tiny_model_dir), torch.device("cpu"), torch.float32, tmp_path)

    # A checkpoint whose base configuration diffusers cannot fetch: said so, not "not a local path".
    checkpoint = tmp_path / "model.SAFETENSORS"  # the suffix in any case
    checkpoint.write_bytes(b"\0")

    def offline(path: Path, dtype: torch.dtype, hub_cache: Path) -> Any:
        raise LocalEntryNotFoundError("offline")

    monkeypatch.setattr(pipeline, "_load_single_file", offline)
    with pytest.raises(ModelLoadError, match=r"configuration of its base model") as raised:
        load_pipeline(str(checkpoint), torch.device("cpu"), torch.float32, tmp_path)
    assert "not a local path" not in str(raised.value)


def test_a_model_whose_parts_do_not_fit_together_is_refused_at_load(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """A UNet that reads another width of text than the text encoder gives (or an inpainting UNet)
    loaded, said ready, and failed every job."""
    from diffusers import UNet2DConditionModel

    from worker.config import WorkerSettings
    from worker.pipeline import load_runner

    unfit = tmp_path / "unfit"
    shutil.copytree(tiny_model_dir, unfit)
    config = dict(UNet2DConditionModel.load_config(str(tiny_model_dir / "unet")))
    unet = UNet2DConditionModel.from_config(
        {**config, "cross_attention_dim": 2 * config["cross_attention_dim"]}
    )
    unet.save_pretrained(unfit / "unet")
    with pytest.raises(
        ModelLoadError, match=r"loads but cannot generate an image: RuntimeError: mat1"
    ) as raised:
        load_runner(WorkerSettings(model=str(unfit), cache_dir=tmp_path))
    assert "\n" not in str(raised.value)
    # A configuration its weights do not fit: a line per mismatched tensor was printed, now one.
    (unfit / "unet" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=r"cannot load model .*size mismatch") as raised:
        load_runner(WorkerSettings(model=str(unfit), cache_dir=tmp_path))
    assert "\n" not in str(raised.value)
    # A scheduler that cannot take few steps (PNDM without skip_prk_steps: 4 and up) still serves.
    pndm = tmp_path / "pndm"
    shutil.copytree(tiny_model_dir, pndm)
    scheduler = json.loads((pndm / "scheduler" / "scheduler_config.json").read_text())
    scheduler.update(_class_name="PNDMScheduler", skip_prk_steps=False)
    (pndm / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler))
    index = json.loads((pndm / "model_index.json").read_text())
    (pndm / "model_index.json").write_text(json.dumps({**index, "scheduler": ["diffusers", "PNDMScheduler"]}))
    assert (
        type(load_runner(WorkerSettings(model=str(pndm), cache_dir=tmp_path)).pipe.scheduler).__name__
        == "PNDMScheduler"
    )
    # LATENTD_BATCH_INVARIANT with one image a call: a job of several images ran in one call,
    # and its images differed from lone runs.
    settings = WorkerSettings(
        model=str(tiny_model_dir), cache_dir=tmp_path, max_batch_images=1, batch_invariant=True
    )
    assert load_runner(settings).pad_to == 1


def test_the_collector_is_on_again_once_the_weights_are_loaded(tiny_model_dir: Path, tmp_path: Path) -> None:
    # `latentd worker` turns it off for its imports and the load: left off, every job's cycles stayed.
    import gc

    from worker.config import WorkerSettings
    from worker.pipeline import load_runner

    gc.disable()
    try:
        load_runner(WorkerSettings(model=str(tiny_model_dir), cache_dir=tmp_path))
        assert gc.isenabled()
    finally:
        gc.enable()


@pytest.fixture(scope="module")
def tiny_xl(tmp_path_factory: pytest.TempPathFactory) -> Runner:
    """A tiny SDXL pipeline, random weights, loaded as the worker loads a directory."""
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from worker.tiny import write_tokenizer

    directory = tmp_path_factory.mktemp("tiny-xl")
    torch.manual_seed(0)
    tokenizer = write_tokenizer(directory / "tokenizer")
    text = CLIPTextConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, vocab_size=len(tokenizer), hidden_size=32,
        intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, projection_dim=32,
        max_position_embeddings=tokenizer.model_max_length,
    )  # fmt: skip
    StableDiffusionXLPipeline(
        unet=UNet2DConditionModel(
            block_out_channels=(32, 64), layers_per_block=1, sample_size=32,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=80, cross_attention_dim=64, norm_num_groups=1,
        ),
        vae=AutoencoderKL(
            block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8,
        ),
        text_encoder=CLIPTextModel(text),
        text_encoder_2=CLIPTextModelWithProjection(text),
        tokenizer=tokenizer,
        tokenizer_2=write_tokenizer(directory / "tokenizer_2"),
        scheduler=EulerDiscreteScheduler(
            beta_schedule="scaled_linear", timestep_spacing="leading", steps_offset=1
        ),
    ).save_pretrained(directory)  # fmt: skip
    pipe = load_pipeline(str(directory), torch.device("cpu"), torch.float32, directory)
    return Runner(pipe=pipe, device=torch.device("cpu"), model="xl")


def test_a_job_without_a_negative_prompt_runs_as_the_model_is_meant_to(
    runner: Runner, tiny_xl: Runner
) -> None:
    # SDXL guides a prompt without a negative one against zeros; given the text "" it did not.
    from worker.pipeline import batch_key

    assert tiny_xl.zeros_empty_negatives and not runner.zeros_empty_negatives
    for each in (runner, tiny_xl):
        job = payload(1).model_copy(update={"steps": 3, "seed": 5})
        [[ours]], _ = each.generate([job], never)
        each.pipe.scheduler = each._scheduler(None)
        [theirs] = each.pipe(
            job.prompt, width=64, height=64, num_inference_steps=3, guidance_scale=job.guidance_scale,
            generator=torch.Generator("cpu").manual_seed(5),
        ).images  # fmt: skip
        assert np.array_equal(np.asarray(ours), np.asarray(theirs)), each.model
    # So on such a model, a job with a negative prompt and one without do not share a call.
    plain, negative = payload(1), payload(1).model_copy(update={"negative_prompt": "blurry"})
    assert batch_key(plain, True) != batch_key(negative, True)
    assert batch_key(plain, False) == batch_key(negative, False)


def test_a_job_without_a_negative_prompt_calls_the_pipeline_alike_alone_or_batched(
    runner: Runner, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a model that does not guide against zeros (not SDXL), a missing negative prompt is "",
    batched with one that has a negative prompt or not: passing None alone made an image depend on
    its batch mates where a pipeline treats None apart (QwenImage's true CFG), and failed Sana."""
    seen: list[object] = []
    real = runner.pipe

    class Spy:
        def __getattr__(self, name: str) -> object:
            return getattr(real, name)

        def __call__(self, **kwargs: object) -> object:
            seen.append(kwargs["negative_prompt"])
            return real(**kwargs)

    monkeypatch.setattr(runner, "pipe", Spy())
    assert not runner.zeros_empty_negatives
    base = {
        "model": TINY_MODEL,
        "width": 64,
        "height": 64,
        "steps": 1,
        "guidance_scale": 7.0,
        "num_images": 1,
    }
    plain = JobPayload(job_id="a", prompt="cat", seed=1, **base)  # type: ignore[arg-type]
    negative = JobPayload(job_id="b", prompt="dog", seed=2, negative_prompt="blurry", **base)  # type: ignore[arg-type]
    runner.generate([plain], lambda done, total: False)
    runner.generate([plain, negative], lambda done, total: False)
    assert seen == [[""], ["", "blurry"]]


def test_a_prompt_is_counted_against_the_text_encoder_that_reads_the_most(tmp_path: Path) -> None:
    """SD3 reads a prompt's first 75 tokens through CLIP and up to `max_sequence_length` (256)
    through T5 (Flux: 512): a prompt past 75 tokens was told that the model ignored its rest. Its
    transformer and VAE play no part; the third tokenizer stands in for T5's, whose vocabulary
    would need a download."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    from transformers import (
        CLIPTextConfig,
        CLIPTextModelWithProjection,
        CLIPTokenizer,
        T5Config,
        T5EncoderModel,
    )

    from worker.tiny import write_tokenizer

    clip = write_tokenizer(tmp_path / "clip")
    text = CLIPTextConfig(
        vocab_size=len(clip), hidden_size=32, intermediate_size=37, num_attention_heads=4,
        num_hidden_layers=1, projection_dim=32, max_position_embeddings=clip.model_max_length,
    )  # fmt: skip
    t5 = T5Config(vocab_size=len(clip), d_model=32, d_ff=37, d_kv=8, num_heads=4, num_layers=1)
    parts = {
        "transformer": None, "vae": None, "scheduler": FlowMatchEulerDiscreteScheduler(),
        "text_encoder": CLIPTextModelWithProjection(text), "tokenizer": clip,
        "text_encoder_2": CLIPTextModelWithProjection(text), "tokenizer_2": clip,
        "text_encoder_3": T5EncoderModel(t5),
        "tokenizer_3": CLIPTokenizer.from_pretrained(clip.name_or_path, model_max_length=512),
    }  # fmt: skip
    sd3 = Runner(pipe=StableDiffusion3Pipeline(**parts), device=torch.device("cpu"), model="sd3")
    # A token per byte, the last with the word-end mark: "abc " is 3 tokens.
    assert sd3.warnings(payload(1).model_copy(update={"prompt": "abc " * 60})) == []  # 180 tokens
    told = sd3.warnings(payload(1).model_copy(update={"prompt": "abc " * 90}))  # 270
    assert told == ["prompt: 270 tokens, of which the model reads the first 254; the rest was ignored"]
    # Loaded without its T5, it reads through CLIP alone.
    no_t5 = StableDiffusion3Pipeline(**{**parts, "text_encoder_3": None})
    told = Runner(pipe=no_t5, device=torch.device("cpu"), model="sd3").warnings(
        payload(1).model_copy(update={"prompt": "abc " * 60})
    )
    assert told == ["prompt: 180 tokens, of which the model reads the first 75; the rest was ignored"]


def test_a_negative_prompt_is_said_to_be_ignored_by_an_lcm_distilled_unet(tiny_model_dir: Path) -> None:
    # An LCM-distilled UNet takes guidance as an embedding and never guides against the negative
    # prompt, whatever guidance_scale says; the job was not told.
    from diffusers import UNet2DConditionModel

    pipe = load_pipeline(str(tiny_model_dir), torch.device("cpu"), torch.float32, tiny_model_dir)
    pipe.register_modules(
        unet=UNet2DConditionModel.from_config({**pipe.unet.config, "time_cond_proj_dim": 32})
    )
    lcm = Runner(pipe=pipe, device=torch.device("cpu"), model="lcm")
    job = payload(1).model_copy(update={"negative_prompt": "blurry", "guidance_scale": 7.0, "steps": 1})
    assert lcm.warnings(job) == [
        "negative_prompt: ignored, as this model (LCM-distilled) does not guide against it"
    ]
    lcm.generate([job], never)
    assert not pipe.do_classifier_free_guidance  # as diffusers ran it


def test_a_pipeline_that_takes_no_negative_prompt_is_not_given_one(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Flux 2's, FluxControl's and GLM-Image's pipelines have no negative_prompt: every job failed
    on the unexpected argument, with or without one. LCM's (run here) has none either, and
    swallows it in **kwargs; the job was not told it was ignored."""
    from diffusers import LatentConsistencyModelPipeline, LCMScheduler, UNet2DConditionModel

    base = load_pipeline(str(tiny_model_dir), torch.device("cpu"), torch.float32, tiny_model_dir)
    pipe = LatentConsistencyModelPipeline(
        vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer,
        unet=UNet2DConditionModel.from_config({**base.unet.config, "time_cond_proj_dim": 32}),
        scheduler=LCMScheduler.from_config(base.scheduler.config), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    lcm = Runner(pipe=pipe, device=torch.device("cpu"), model="lcm")
    seen: list[set[str]] = []

    def call(**kwargs: Any) -> Any:
        seen.append(set(kwargs))
        return pipe(**kwargs)

    monkeypatch.setattr(lcm, "pipe", call)
    plain = payload(1).model_copy(update={"steps": 1})
    negative = plain.model_copy(update={"job_id": "neg", "negative_prompt": "blurry"})
    [[alone], [batched]], _ = lcm.generate([plain, negative], never)
    assert alone.size == batched.size == (64, 64)
    assert seen and "negative_prompt" not in seen[0]
    assert lcm.warnings(negative) == ["negative_prompt: ignored, as this model takes none"]


def test_a_warning_that_cannot_be_worked_out_leaves_the_job_alone(
    runner: Runner, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # The advice ran in the worker before the call, unguarded: its failure failed every job batched.
    def broken(self: Any, text: str, **kwargs: Any) -> Any:
        raise RuntimeError("tokenizer broke")

    monkeypatch.setattr(type(runner.pipe.tokenizer), "__call__", broken)
    assert runner.warnings(payload(1)) == []
    assert "warnings_failed" in caplog.text


def test_a_negative_prompt_is_said_to_be_ignored_where_the_pipeline_ignores_it() -> None:
    """Flux guides by a learned embedding and reads a negative prompt only with a `true_cfg_scale`
    over 1 (latentd leaves it at 1); PixArt, with no `do_classifier_free_guidance` to look up,
    guides only above 1 as Stable Diffusion does. Neither job was told. Their models play no part."""
    from diffusers import (
        DPMSolverMultistepScheduler,
        FlowMatchEulerDiscreteScheduler,
        FluxPipeline,
        PixArtAlphaPipeline,
    )

    parts = dict.fromkeys(("vae", "text_encoder", "tokenizer", "transformer"))
    flux = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), text_encoder_2=None, tokenizer_2=None, **parts
    )
    pixart = PixArtAlphaPipeline(scheduler=DPMSolverMultistepScheduler(), **parts)
    negative = payload(1).model_copy(update={"negative_prompt": "blurry", "guidance_scale": 3.5})
    told = Runner(pipe=flux, device=torch.device("cpu"), model="flux").warnings(negative)
    assert told == [
        "negative_prompt: ignored, as this model reads it only with a true_cfg_scale over 1, "
        "which latentd leaves at its default"
    ]
    pixart_runner = Runner(pipe=pixart, device=torch.device("cpu"), model="pixart")
    assert pixart_runner.warnings(negative) == []
    at_one = negative.model_copy(update={"guidance_scale": 1.0})
    assert pixart_runner.warnings(at_one) == ["negative_prompt: ignored, as guidance_scale is at most 1"]
    # Kandinsky's prior guides against it at a scale of its own, whatever guidance_scale says.
    from diffusers import DDPMScheduler, KandinskyV22CombinedPipeline, UnCLIPScheduler, VQModel

    kandinsky = KandinskyV22CombinedPipeline(
        unet=None, scheduler=DDPMScheduler(), movq=VQModel(), prior_prior=None, prior_image_encoder=None,
        prior_text_encoder=None, prior_tokenizer=None, prior_scheduler=UnCLIPScheduler(),
        prior_image_processor=None,
    )  # fmt: skip
    assert Runner(pipe=kandinsky, device=torch.device("cpu"), model="kandinsky").warnings(at_one) == []


def test_a_model_is_served_by_the_name_it_is_given(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A link to a directory was served by its target's name, a link to a file by its own."""
    from worker.config import WorkerSettings

    (tmp_path / "current").symlink_to(tiny_model_dir)
    (tmp_path / "weights.safetensors").write_bytes(b"")
    (tmp_path / "latest.safetensors").symlink_to(tmp_path / "weights.safetensors")
    monkeypatch.chdir(tmp_path)
    for model, name in [
        (tmp_path / "current", "current"),
        (tmp_path / "latest.safetensors", "latest"),
        (tiny_model_dir, tiny_model_dir.name),
        (".", tmp_path.name),
        ("current/..", tmp_path.name),
    ]:
        assert WorkerSettings(model=str(model)).served_name() == name, model


def test_a_stable_diffusion_directory_loads_without_diffusers_auto_pipeline(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """The auto pipeline's module imports every pipeline diffusers has, about 1 s of each worker's
    start here: a Stable Diffusion directory loads without it, and a directory of another pipeline
    (image to image here) still loads for text to image through it."""
    load = (
        f"load_pipeline({str(tiny_model_dir)!r}, torch.device('cpu'), torch.float32, Path({str(tmp_path)!r}))"
    )
    code = (
        "import sys, torch; from pathlib import Path; from worker.pipeline import load_pipeline;"
        f"{load}; print('diffusers.pipelines.auto_pipeline' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.split()[-1] == "False", out.stdout
    other = tmp_path / "img2img"
    shutil.copytree(tiny_model_dir, other)
    index = json.loads((other / "model_index.json").read_text())
    (other / "model_index.json").write_text(
        json.dumps({**index, "_class_name": "StableDiffusionImg2ImgPipeline"})
    )
    pipe = load_pipeline(str(other), torch.device("cpu"), torch.float32, tmp_path)
    assert type(pipe).__name__ == "StableDiffusionPipeline"


def test_half_precision_asked_for_on_a_cpu_is_served_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    # Slower there than float32 (6.8x with the built-in model here, quiet), and nothing said so.
    with caplog.at_level("WARNING", logger="latentd.worker"):
        assert pick_dtype("float16", torch.device("cpu")) is torch.float16
        assert pick_dtype("auto", torch.device("cpu")) is torch.float32
        assert pick_dtype("bfloat16", torch.device("cpu")) is torch.bfloat16
    assert caplog.text.count("dtype_slow_on_cpu") == 1, caplog.text


def test_a_fingerprint_tells_other_weights_apart(tiny_model_dir: Path, tmp_path: Path) -> None:
    def loaded(dtype: torch.dtype) -> Any:
        return load_pipeline(str(tiny_model_dir), torch.device("cpu"), dtype, tmp_path)

    pipe = loaded(torch.float32)
    assert fingerprint(pipe) == fingerprint(loaded(torch.float32))  # the same files, loaded again
    assert fingerprint(pipe) != fingerprint(loaded(torch.bfloat16))
    before = fingerprint(pipe)
    with torch.no_grad():
        pipe.unet.conv_out.weight[-1, -1, -1, -1] += 0.001  # tuned: every tensor moves, this one too
    assert fingerprint(pipe) != before
    # Advice only: weights it cannot read (offloaded to the meta device) give none, and the worker serves.
    pipe.unet.conv_out.weight = torch.nn.Parameter(
        torch.empty(pipe.unet.conv_out.weight.shape, device="meta")
    )
    assert fingerprint(pipe) == ""
