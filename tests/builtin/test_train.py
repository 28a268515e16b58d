"""The training script runs end to end on a tiny config, and what it exports loads as a pipeline."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
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


def test_recipe_overrides_reach_the_exported_model(tmp_path: Path) -> None:
    """`--set` changes the recipe: a 4-level UNet with attention at full resolution, 2 layers a block."""
    out = tmp_path / "model"
    base = ["--tiny", "--threads", "1", "--work", str(tmp_path / "work"), "--out", str(out)]
    sets = ["--set", "unet_channels=16,16,16,16", "--set", "unet_attn_top=true", "--set", "unet_layers=2"]
    train.main([*base, *sets])
    unet = json.loads((out / "unet" / "config.json").read_text())
    assert unet["down_block_types"] == ["CrossAttnDownBlock2D"] * 4
    assert unet["up_block_types"] == ["CrossAttnUpBlock2D"] * 4
    assert unet["layers_per_block"] == 2
    recipe = json.loads((out / "training_recipe.json").read_text())
    assert recipe["unet_channels"] == [16, 16, 16, 16] and recipe["unet_attn_top"] is True


def test_unknown_recipe_field_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        train.main(["--tiny", "--work", str(tmp_path), "--set", "no_such_field=1"])


def test_position_probe_runs_on_a_training_runs_latents(tmp_path: Path) -> None:
    from worker.builtin import probe

    work = tmp_path / "work"
    train.main(["--tiny", "--threads", "1", "--work", str(work), "--stage", "vae", "--stage", "latents"])
    r = train.Recipe(**train.TINY)
    rows = probe.probe(r, work, steps=2, t_min=700, every=1)
    assert [step for step, _, _ in rows] == [1, 2]
    assert all(np.isfinite([dx, dy]).all() for _, dx, dy in rows)
