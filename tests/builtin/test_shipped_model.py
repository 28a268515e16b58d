"""The model shipped in the repository loads offline as a Stable Diffusion pipeline and draws."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from worker.builtin import MODEL_DIR, checker


@pytest.fixture(scope="module")
def pipe():
    from diffusers import AutoPipelineForText2Image

    pipe = AutoPipelineForText2Image.from_pretrained(MODEL_DIR, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_directory_is_a_small_stable_diffusion_pipeline() -> None:
    index = json.loads((MODEL_DIR / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["safety_checker"] == [None, None] and index["feature_extractor"] == [None, None]
    assert index["requires_safety_checker"] is False
    files = [p for p in MODEL_DIR.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 20 * 1024 * 1024
    assert not [p for p in files if p.suffix in (".bin", ".pt", ".ckpt")], "weights must be safetensors"
    assert (MODEL_DIR / "README.md").exists()


def test_loads_offline_and_draws_what_it_is_asked(pipe) -> None:
    from diffusers import StableDiffusionPipeline

    assert isinstance(pipe, StableDiffusionPipeline)
    assert pipe.unet.dtype == torch.float32  # a plain from_pretrained must give a CPU-ready model
    assert pipe.tokenizer.model_max_length == pipe.text_encoder.config.max_position_embeddings
    seeds = [0, 1, 2, 3]
    images = pipe(
        ["a red circle on a blue background"] * len(seeds),
        height=64,
        width=64,
        num_inference_steps=20,
        guidance_scale=5.0,
        generator=[torch.Generator("cpu").manual_seed(s) for s in seeds],
        output_type="np",
    ).images
    assert images.shape == (4, 64, 64, 3)
    judged = [checker.judge((img * 255).round().astype(np.uint8)) for img in images]
    right = [(j.shape_colour, j.background_colour, j.shape) == ("red", "blue", "circle") for j in judged]
    assert sum(right) >= 3, judged


def test_scores_on_a_spread_of_prompts(pipe) -> None:
    """80 canonical prompts of the evaluation (seeded): every word of the caption steers the picture.
    The thresholds sit below what this model scores on them (colours 100 %, class 91 %, position 90 %)
    and well above what a model that ignores a word gets (position 20 % by chance; the model shipped
    before the UNet had a sense of place scored 35 % on the full evaluation)."""
    from worker.builtin import data, evaluate

    todo = evaluate.cases(data.training_pairs(), 80, seed=5)
    _, judged = evaluate.run_cases(pipe, todo, evaluate.DEFAULT_GUIDANCE)
    scores = evaluate.score(todo, judged)
    assert scores["shape_colour"] >= 0.95 and scores["background_colour"] >= 0.95, scores
    assert scores["shape"] >= 0.75, scores
    assert scores["position"] >= 0.7, scores
