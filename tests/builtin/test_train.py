"""The training script runs end to end on a tiny config, and what it exports loads as a pipeline."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from worker.builtin import train


def test_tiny_training_run_exports_a_loadable_pipeline(tmp_path: Path) -> None:
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "model"
    train.main(["--tiny", "--threads", "1", "--work", str(tmp_path / "work"), "--out", str(out)])
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["safety_checker"] == [None, None] and index["requires_safety_checker"] is False
    pipe = StableDiffusionPipeline.from_pretrained(out, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    image = pipe(
        "a red circle on a blue background",
        height=64,
        width=64,
        num_inference_steps=2,
        generator=torch.Generator("cpu").manual_seed(0),
        output_type="np",
    ).images[0]
    assert image.shape == (64, 64, 3) and np.isfinite(image).all()


def test_lr_schedule_warms_up_then_decays() -> None:
    lrs = [train.lr_at(s, 100, 10, 1.0) for s in range(100)]
    assert lrs[0] < lrs[9] == 1.0 and lrs[-1] < 0.05
