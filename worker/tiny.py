"""A tiny random-weight Stable Diffusion pipeline, built from configs with no download.

Tests use it as their model; `latentd up` serves it while no trained built-in
model is present. Every component is the real diffusers/transformers class,
only small. The weights are seeded, so the same directory comes out each time.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from worker.builtin.tokenizer import bytes_to_unicode

SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")
MAX_TOKENS = 77


def write_tokenizer(directory: Path) -> CLIPTokenizer:
    """A byte-level CLIP tokenizer: every byte a token, with and without the word-end mark."""
    directory.mkdir(parents=True, exist_ok=True)
    alphabet = list(bytes_to_unicode().values())
    tokens = [*alphabet, *(c + "</w>" for c in alphabet), *SPECIAL_TOKENS]
    (directory / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    (directory / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "CLIPTokenizer",
                "model_max_length": MAX_TOKENS,
                "bos_token": SPECIAL_TOKENS[0],
                "eos_token": SPECIAL_TOKENS[1],
                "unk_token": SPECIAL_TOKENS[1],
                "pad_token": SPECIAL_TOKENS[1],
            }
        )
    )
    # Loading the directory (not passing the files) is what transformers 5 honours.
    tokenizer: CLIPTokenizer = CLIPTokenizer.from_pretrained(str(directory))
    return tokenizer


def assemble_pipeline(unet: Any, vae: Any, text_encoder: Any, tokenizer: Any) -> StableDiffusionPipeline:
    """A Stable Diffusion pipeline around these components, with SD's DDIM schedule and no safety checker."""
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        num_train_timesteps=1000,
    )
    return StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def build_tiny_pipeline(directory: Path, seed: int = 0) -> Path:
    """Write a tiny SD pipeline to `directory` (diffusers layout) and return it."""
    torch.manual_seed(seed)
    tokenizer = write_tokenizer(directory / "tokenizer")
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    vae = AutoencoderKL(
        block_out_channels=(32, 64),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            hidden_size=32,
            intermediate_size=37,
            layer_norm_eps=1e-05,
            num_attention_heads=4,
            num_hidden_layers=2,
            vocab_size=len(tokenizer),
            max_position_embeddings=MAX_TOKENS,
        )
    )
    pipe = assemble_pipeline(unet, vae, text_encoder, tokenizer)
    pipe.save_pretrained(str(directory), safe_serialization=True)
    # save_pretrained in transformers 5 writes only tokenizer.json; keep our files too.
    write_tokenizer(directory / "tokenizer")
    return directory
