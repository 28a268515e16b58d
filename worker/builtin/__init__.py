"""The built-in model: a small Stable-Diffusion-architecture model trained here on drawn shapes.

`MODEL_DIR` is the shipped diffusers directory; `data` draws the training images, `checker` judges
generated ones from pixels, `train` retrains the model from nothing and `evaluate` scores it.
"""

from pathlib import Path

MODEL_DIR = Path(__file__).resolve().parent / "model"
