"""Does a recipe's UNet learn where to put the shape? A check for recipe variants in minutes, not an hour.

    .venv/bin/python -m worker.builtin.probe [--work DIR] [--set FIELD=VALUE ...] [--steps 1200]

Trains a fresh UNet and text encoder of the recipe (train.py's, changed by --set) on the latents a
training run cached in --work (run `train --stage vae --stage latents` first), on high-noise timesteps
only (t >= --t-min). That is where an image's layout is decided, and where the noisy input shows nothing
of it, so the position words are all the model has to go by. Every --every steps it predicts x0 from the
same pure noise for "a large yellow circle <position> on a black background", decodes it, and prints
how far the shape's centre moves between "on the left" and "on the right" (dx) and between "at the top"
and "at the bottom" (dy), in pixels. The anchors are 28 pixels apart; a model that ignores the position
words gives 0.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from worker.builtin import data, train

if TYPE_CHECKING:
    from diffusers import AutoencoderKL

POSITIONS = ("left", "right", "top", "bottom")


def centres(b: train.Batch, vae: AutoencoderKL, scale: float, noise: torch.Tensor) -> dict[str, np.ndarray]:
    """Mean (x, y) in pixels of the bright shape decoded from x0 predicted at t=999, per position word."""
    b.unet.eval()
    b.text_encoder.eval()
    t = len(b.alphas) - 1
    a = b.alphas[t]
    ys, xs = np.mgrid[0:64, 0:64]
    out = {}
    with torch.no_grad():
        for name in POSITIONS:
            scene = data.place("yellow", "circle", "black", "large", name)
            captions = [data.canonical_caption(scene)] * len(noise)
            cond = b.text_encoder(train.token_ids(b.tok, captions, b.token_cache).to(noise.device))[0]
            v = b.unet(noise, torch.full((len(noise),), t, device=noise.device), encoder_hidden_states=cond)
            x0 = a.sqrt() * noise - (1 - a).sqrt() * v.sample
            lum = vae.decode(x0 / scale).sample.mean(1).cpu().numpy()
            w = np.clip(lum - lum.min(axis=(1, 2), keepdims=True), 0, None)
            out[name] = np.array([(w * xs).sum() / w.sum(), (w * ys).sum() / w.sum()])
    b.unet.train()
    b.text_encoder.train()
    return out


def probe(r: train.Recipe, work: Path, steps: int, t_min: int, every: int) -> list[tuple[int, float, float]]:
    """Trains `steps` high-noise steps; returns (step, dx, dy) every `every` steps."""
    from diffusers import AutoencoderKL

    torch.manual_seed(r.seed + 2)
    rng = np.random.default_rng(r.seed + 2)
    b = train.new_unet_batch(r, work)
    vae = AutoencoderKL.from_pretrained(work / "vae").eval().to(r.device)
    scale = float(torch.load(work / "latents.pt")["scale"])
    noise = torch.randn(4, *b.latents.shape[1:], generator=torch.Generator().manual_seed(123)).to(r.device)
    params = list(b.unet.parameters()) + list(b.text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=r.unet_lr, weight_decay=0.01)
    start, losses, rows = time.monotonic(), [], []
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = train.lr_at(step, steps, min(100, steps), r.unet_lr)
        loss = train.batch_loss(r, b, rng, t_min=t_min)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(loss.item())
        if (step + 1) % every == 0 or step + 1 == steps:
            c = centres(b, vae, scale, noise)
            dx, dy = c["right"][0] - c["left"][0], c["bottom"][1] - c["top"][1]
            rows.append((step + 1, float(dx), float(dy)))
            print(
                f"[probe] {step + 1}/{steps} loss={np.mean(losses):.4f} dx={dx:.2f} dy={dy:.2f} "
                f"{time.monotonic() - start:.0f}s",
                flush=True,
            )
            losses.clear()
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "latentd-builtin-train")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--t-min", type=int, default=700)
    parser.add_argument("--every", type=int, default=150)
    parser.add_argument("--tiny", action="store_true", help="tiny models (for the test suite)")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE")
    args = parser.parse_args(argv)
    r = train.Recipe(**train.TINY) if args.tiny else train.Recipe()
    r.device = args.device
    train.apply_sets(r, args.set, parser)
    torch.set_num_threads(args.threads)
    probe(r, args.work, args.steps, args.t_min, args.every)


if __name__ == "__main__":
    main()
