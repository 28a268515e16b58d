"""Retrains the built-in model from nothing, on this CPU, from procedurally drawn shapes.

    nice -n 15 .venv/bin/python -m worker.builtin.train --out worker/builtin/model

Stages (each checkpointed under --work, so a stage can be rerun alone with --stage):
  1. vae      AutoencoderKL, 64x64x3 <-> 16x16x4, trained on random 32x32 crops of freshly drawn images.
  2. latents  draw a fixed, seeded set of scenes and encode them once with the trained VAE.
  3. unet     UNet2DConditionModel + CLIPTextModel trained jointly on the cached latents, v-prediction,
              captions re-phrased every time a scene is drawn, 10 % empty captions for guidance,
              EMA weights.
  4. export   writes the diffusers directory (fp32 safetensors) that StableDiffusionPipeline loads.

Everything is seeded (--seed), each stage from its own seed, so running the stages one by one gives the
same model as one run. On a machine that other work keeps busy, --threads 1 is faster than 2 (two
threads wait on each other when one is descheduled). Measured times are in the model card.
Touching <work>/STOP ends the UNet stage early and exports the EMA weights reached so far.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from worker.builtin import data, tokenizer

if TYPE_CHECKING:
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

MAX_TOKENS = 32  # tokenizer model_max_length == text encoder positions; captions are ~15 tokens


@dataclass
class Recipe:
    seed: int = 0
    threads: int = 2
    device: str = "cpu"  # "cuda" runs the same recipe on a GPU (for experiments; results differ in bits)
    # VAE
    vae_channels: tuple[int, ...] = (16, 32, 64)
    vae_groups: int = 8
    vae_steps: int = 1200
    vae_batch: int = 24
    vae_crop: int = 32  # train on random crops: 4x cheaper per image than 64x64, same convolutions
    vae_lr: float = 2e-3
    vae_kl: float = 1e-6
    # cached latents
    scenes: int = 24000
    # UNet + text encoder
    unet_channels: tuple[int, ...] = (32, 64, 64)
    unet_groups: int = 8
    unet_layers: int = 1  # ResNet (and attention) layers per UNet block
    # Attention at the latent's full resolution too, not only at the coarser levels.
    unet_attn_top: bool = False
    # A sense of place. A UNet learns where it is only from the zero padding of its convolutions, and at
    # the high-noise steps that decide the layout its input is zero-mean noise, in which padding shows
    # nothing: without these the position words had no effect at all. center_input_sample (2x - 1) gives
    # the input a mean of -1, so a conv_in wide enough to reach the border from every latent pixel (31
    # on 16x16) reads the pixel's position from the padding, averaged over hundreds of taps, above the
    # noise. scale_shift lets the text scale those features, not only shift them.
    unet_conv_in_kernel: int = 31
    unet_center_input: bool = True
    unet_scale_shift: bool = True
    text_width: int = 128
    text_layers: int = 3
    unet_steps: int = 9000
    unet_batch: int = 64
    unet_lr: float = 1e-3
    empty_caption: float = 0.1
    ema: float = 0.999
    warmup: int = 200
    log_every: int = 50
    stages: list[str] = field(default_factory=lambda: ["vae", "latents", "unet", "export"])


TINY: dict[str, Any] = dict(
    vae_channels=(8, 8, 8),
    vae_groups=4,
    vae_steps=3,
    vae_batch=4,
    vae_crop=16,
    scenes=16,
    unet_channels=(16, 16, 16),
    unet_groups=4,
    text_width=16,
    text_layers=1,
    unet_steps=3,
    unet_batch=4,
    warmup=1,
    log_every=1,
)


# ---------------------------------------------------------------- components


def make_vae(r: Recipe) -> AutoencoderKL:
    from diffusers import AutoencoderKL

    n = len(r.vae_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=r.vae_channels,
        layers_per_block=1,
        latent_channels=4,
        # 8 groups, not 32: with one channel per group GroupNorm erases each image's own colours.
        norm_num_groups=r.vae_groups,
        sample_size=data.IMAGE_SIZE,
    )


def make_unet(r: Recipe) -> UNet2DConditionModel:
    from diffusers import UNet2DConditionModel

    latent = data.IMAGE_SIZE // 2 ** (len(r.vae_channels) - 1)
    top = "CrossAttn" if r.unet_attn_top else ""
    coarser = len(r.unet_channels) - 1
    return UNet2DConditionModel(
        sample_size=latent,
        in_channels=4,
        out_channels=4,
        down_block_types=(f"{top}DownBlock2D",) + ("CrossAttnDownBlock2D",) * coarser,
        up_block_types=("CrossAttnUpBlock2D",) * coarser + (f"{top}UpBlock2D",),
        block_out_channels=r.unet_channels,
        layers_per_block=r.unet_layers,
        norm_num_groups=r.unet_groups,
        cross_attention_dim=r.text_width,
        attention_head_dim=4,
        # The text is also pooled into the timestep embedding (as in unCLIP/Kandinsky), so every
        # ResNet block sees the global facts of the caption (background colour) from the first step.
        addition_embed_type="text",
        addition_embed_type_num_heads=4,
        conv_in_kernel=r.unet_conv_in_kernel,
        center_input_sample=r.unet_center_input,
        resnet_time_scale_shift="scale_shift" if r.unet_scale_shift else "default",
    )


def make_text_encoder(r: Recipe, vocab_size: int) -> CLIPTextModel:
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=r.text_width,
        intermediate_size=r.text_width * 4,
        projection_dim=r.text_width,
        num_hidden_layers=r.text_layers,
        num_attention_heads=4,
        max_position_embeddings=MAX_TOKENS,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )
    return CLIPTextModel(config)


def make_scheduler() -> DDIMScheduler:
    from diffusers import DDIMScheduler

    # Linear betas to 0.02 drive a 16x16 latent to (almost) pure noise at t=999: with SD's
    # scaled_linear the image mean still shows through there and sampling from pure noise mismatches.
    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.0001,
        beta_end=0.02,
        beta_schedule="linear",
        prediction_type="v_prediction",
        clip_sample=False,
        set_alpha_to_one=False,
        timestep_spacing="trailing",
        steps_offset=1,  # unused with trailing spacing; 1 keeps diffusers' deprecation check quiet
    )


# ---------------------------------------------------------------- helpers


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 NHWC -> float NCHW in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def random_crops(x: torch.Tensor, size: int, rng: np.random.Generator) -> torch.Tensor:
    """One random size x size crop per image, at offsets on the x4 latent grid."""
    if size >= x.shape[-1]:
        return x
    offsets = rng.integers(0, (x.shape[-1] - size) // 4 + 1, size=(len(x), 2)) * 4
    return torch.stack(
        [img[:, oy : oy + size, ox : ox + size] for img, (oy, ox) in zip(x, offsets, strict=True)]
    )


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of [-1, 1] images."""
    mse = ((a.clamp(-1, 1) - b.clamp(-1, 1)) / 2).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-10))


def lr_at(step: int, total: int, warmup: int, peak: float) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * progress)))


def token_ids(tok: Any, captions: list[str], cache: dict[str, list[int]]) -> torch.Tensor:
    """Padded token ids of the captions. The grammar repeats its captions and the tokenizer costs ~1 ms
    per caption (60 ms of a 0.5 s step at batch 64), so each distinct caption is tokenized once."""
    new = sorted({c for c in captions if c not in cache})
    if new:
        ids = tok(new, padding="max_length", max_length=MAX_TOKENS, truncation=True).input_ids
        cache.update(zip(new, ids, strict=True))
    return torch.tensor([cache[c] for c in captions])


class Progress:
    """One line per `every` steps: step, loss, rate and time left."""

    def __init__(self, name: str, total: int, every: int) -> None:
        self.name, self.total, self.every = name, total, every
        self.start = time.monotonic()
        self.losses: list[float] = []

    def update(self, step: int, loss: float, **extra: float) -> None:
        self.losses.append(loss)
        done = step + 1
        if done % self.every and done != self.total:
            return
        elapsed = time.monotonic() - self.start
        left = elapsed / done * (self.total - done)
        fields = " ".join(f"{k}={v:.2f}" for k, v in extra.items())
        mean = sum(self.losses) / len(self.losses)
        self.losses.clear()
        print(
            f"[{self.name}] {done}/{self.total} loss={mean:.4f} {fields} "
            f"{elapsed / done:.2f}s/step elapsed={elapsed / 60:.1f}m left={left / 60:.1f}m",
            flush=True,
        )


@dataclass
class Batch:
    """What a UNet training step draws from and trains."""

    tok: Any
    latents: torch.Tensor  # (scenes, 4, 16, 16), scaled, on the training device
    scenes: list[data.Scene]
    unet: UNet2DConditionModel
    text_encoder: CLIPTextModel
    alphas: torch.Tensor  # the scheduler's alphas_cumprod, on the training device
    token_cache: dict[str, list[int]] = field(default_factory=dict)


def batch_loss(r: Recipe, b: Batch, rng: np.random.Generator, t_min: int = 0) -> torch.Tensor:
    """v-prediction MSE of one batch of cached scenes with freshly phrased captions, timesteps >= t_min."""
    idx = rng.integers(len(b.scenes), size=r.unet_batch)
    captions = ["" if rng.random() < r.empty_caption else data.random_caption(b.scenes[i], rng) for i in idx]
    cond = b.text_encoder(token_ids(b.tok, captions, b.token_cache).to(r.device))[0]
    x0 = b.latents[torch.from_numpy(idx).to(r.device)]
    noise = torch.randn(x0.shape).to(r.device)  # drawn on the CPU: same noise on any device
    t = torch.randint(t_min, len(b.alphas), (r.unet_batch,)).to(r.device)
    a = b.alphas[t].view(-1, 1, 1, 1)
    noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
    target = a.sqrt() * noise - (1 - a).sqrt() * x0  # v-prediction
    return F.mse_loss(b.unet(noisy, t, encoder_hidden_states=cond).sample, target)


# ---------------------------------------------------------------- stages


def train_vae(r: Recipe, work: Path) -> None:
    torch.manual_seed(r.seed)
    rng = np.random.default_rng(r.seed)
    vae = make_vae(r).to(r.device)
    opt = torch.optim.AdamW(vae.parameters(), lr=r.vae_lr, weight_decay=0.0)
    held_out = to_tensor(data.batch(np.random.default_rng(r.seed + 1000), 64, data.training_pairs())[0])
    held_out = held_out.to(r.device)
    progress = Progress("vae", r.vae_steps, r.log_every)
    vae.train()
    for step in range(r.vae_steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, r.vae_steps, min(100, r.vae_steps), r.vae_lr)
        x = random_crops(to_tensor(data.batch(rng, r.vae_batch)[0]), r.vae_crop, rng).to(r.device)
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        # L1 keeps edges sharp early; MSE is what PSNR measures.
        loss = F.l1_loss(recon, x) + F.mse_loss(recon, x) + r.vae_kl * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        extra: dict[str, float] = {}
        if (step + 1) % (r.log_every * 10) == 0 or step + 1 == r.vae_steps:
            vae.eval()
            with torch.no_grad():
                out = vae.decode(vae.encode(held_out).latent_dist.mode()).sample
            extra["heldout_psnr"] = psnr(out, held_out).mean().item()
            vae.train()
        progress.update(step, loss.item(), **extra)
    vae.eval()
    vae.cpu().save_pretrained(work / "vae")


def encode_latents(r: Recipe, work: Path) -> None:
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(work / "vae").eval().to(r.device)
    rng = np.random.default_rng(r.seed + 1)
    scenes = [data.random_scene(rng) for _ in range(r.scenes)]
    chunks = []
    start = time.monotonic()
    with torch.no_grad():
        for i in range(0, len(scenes), 256):
            images = np.stack([data.render(s) for s in scenes[i : i + 256]])
            chunks.append(vae.encode(to_tensor(images).to(r.device)).latent_dist.mode().cpu())
            print(
                f"[latents] {min(i + 256, len(scenes))}/{len(scenes)} {time.monotonic() - start:.0f}s",
                flush=True,
            )
    latents = torch.cat(chunks)
    scale = float(1.0 / latents.std())
    torch.save(
        {"latents": latents * scale, "scale": scale, "scenes": [asdict(s) for s in scenes]},
        work / "latents.pt",
    )
    print(f"[latents] scaling_factor={scale:.4f}", flush=True)


def new_unet_batch(r: Recipe, work: Path) -> Batch:
    """A fresh UNet and text encoder of the recipe, with the tokenizer and the latents cached in `work`."""
    from transformers import CLIPTokenizer

    tokenizer.write_tokenizer(work / "tokenizer", data.caption_words(), MAX_TOKENS)
    tok = CLIPTokenizer.from_pretrained(str(work / "tokenizer"))
    cache = torch.load(work / "latents.pt")
    scenes = [data.Scene(**s) for s in cache["scenes"]]
    unet = make_unet(r).to(r.device)
    text_encoder = make_text_encoder(r, len(tok)).to(r.device)
    alphas = make_scheduler().alphas_cumprod.to(r.device)
    return Batch(tok, cache["latents"].to(r.device), scenes, unet, text_encoder, alphas)


def train_unet(r: Recipe, work: Path) -> None:
    torch.manual_seed(r.seed + 2)
    rng = np.random.default_rng(r.seed + 2)
    batch = new_unet_batch(r, work)
    unet, text_encoder = batch.unet, batch.text_encoder
    params = list(unet.parameters()) + list(text_encoder.parameters())
    print(
        f"[unet] unet={sum(p.numel() for p in unet.parameters()) / 1e6:.2f}M "
        f"text_encoder={sum(p.numel() for p in text_encoder.parameters()) / 1e6:.2f}M",
        flush=True,
    )
    opt = torch.optim.AdamW(params, lr=r.unet_lr, weight_decay=0.01)
    ema_unet, ema_text = copy.deepcopy(unet).eval(), copy.deepcopy(text_encoder).eval()
    ema_params = list(ema_unet.parameters()) + list(ema_text.parameters())
    progress = Progress("unet", r.unet_steps, r.log_every)
    unet.train()
    text_encoder.train()
    for step in range(r.unet_steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, r.unet_steps, r.warmup, r.unet_lr)
        loss = batch_loss(r, batch, rng)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(r.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, params, 1 - decay)
        progress.update(step, loss.item())
        if (work / "STOP").exists():  # an operator's early finish: keep the EMA weights so far
            print(f"[unet] stopped early at step {step + 1} ({work / 'STOP'} exists)", flush=True)
            break
    ema_unet.cpu().save_pretrained(work / "unet")
    ema_text.cpu().save_pretrained(work / "text_encoder")


def export(r: Recipe, work: Path, out: Path, fp16: bool = False) -> None:
    """fp32 by default: diffusers loads weights in their stored dtype unless told otherwise, and the
    CPU path needs fp32; the whole model is ~13 MB in fp32, inside the 20 MB budget."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    scale = float(torch.load(work / "latents.pt")["scale"])
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    keep_card = out / "README.md"
    if keep_card.exists():
        shutil.copy(keep_card, tmp / "README.md")
    dtype = torch.float16 if fp16 else torch.float32
    vae = AutoencoderKL.from_pretrained(work / "vae")
    vae.register_to_config(scaling_factor=scale)
    vae.to(dtype).save_pretrained(tmp / "vae", safe_serialization=True)
    UNet2DConditionModel.from_pretrained(work / "unet").to(dtype).save_pretrained(tmp / "unet")
    CLIPTextModel.from_pretrained(work / "text_encoder").to(dtype).save_pretrained(tmp / "text_encoder")
    tokenizer.write_tokenizer(tmp / "tokenizer", data.caption_words(), MAX_TOKENS)
    make_scheduler().save_pretrained(tmp / "scheduler")
    import diffusers

    index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    recipe = {k: v for k, v in asdict(r).items() if k not in ("stages", "threads", "device")}
    (tmp / "training_recipe.json").write_text(json.dumps(recipe, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"[export] {out} {size / 1e6:.1f} MB", flush=True)


def run(r: Recipe, work: Path, out: Path) -> None:
    torch.set_num_threads(r.threads)
    work.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    for stage in r.stages:
        t0 = time.monotonic()
        if stage == "vae":
            train_vae(r, work)
        elif stage == "latents":
            encode_latents(r, work)
        elif stage == "unet":
            train_unet(r, work)
        elif stage == "export":
            export(r, work, out)
        else:
            raise ValueError(f"unknown stage {stage!r}")
        print(f"[{stage}] done in {(time.monotonic() - t0) / 60:.1f} min", flush=True)
    print(f"[train] total {(time.monotonic() - start) / 60:.1f} min", flush=True)


def parse_value(current: object, text: str) -> object:
    """A --set value in the type of the field's current value."""
    if isinstance(current, bool):
        return text.lower() in ("1", "true", "yes", "on")
    if isinstance(current, tuple):
        return tuple(int(x) for x in text.split(","))
    if isinstance(current, int):
        return int(text)
    if isinstance(current, float):
        return float(text)
    return text


def apply_sets(r: Recipe, items: list[str], parser: argparse.ArgumentParser) -> None:
    """Applies --set FIELD=VALUE overrides to the recipe; an unknown field is a usage error."""
    for item in items:
        name, _, value = item.partition("=")
        if name not in Recipe.__dataclass_fields__ or name in ("stages", "threads", "device", "seed"):
            parser.error(f"--set: unknown recipe field {name!r}")
        setattr(r, name, parse_value(getattr(r, name), value))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "model")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "latentd-builtin-train")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--stage", action="append", choices=["vae", "latents", "unet", "export"])
    parser.add_argument("--vae-steps", type=int)
    parser.add_argument("--unet-steps", type=int)
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cuda (default cpu)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override one recipe field, e.g. --set unet_channels=48,96,96 --set unet_attn_top=true",
    )
    parser.add_argument("--tiny", action="store_true", help="a seconds-long smoke run with tiny models")
    args = parser.parse_args(argv)
    r = Recipe(**TINY) if args.tiny else Recipe()
    r.seed, r.threads, r.device = args.seed, args.threads, args.device
    apply_sets(r, args.set, parser)
    if args.stage:
        r.stages = args.stage
    if args.vae_steps is not None:
        r.vae_steps = args.vae_steps
    if args.unet_steps is not None:
        r.unet_steps = args.unet_steps
    run(r, args.work, args.out)


if __name__ == "__main__":
    main()
