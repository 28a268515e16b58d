"""Out of memory, end to end: a real worker whose UNet runs out of memory past a size, as a too-small
GPU would. A batch that does not fit is split and still succeeds, each image keeping its seed; a
single image that does not fit fails with `out_of_memory` naming its size; the worker serves on.

The failure is injected into the worker process only, by a `sitecustomize` module on its
PYTHONPATH that wraps diffusers' UNet: the worker's own code runs unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import HTTP, Cluster, Proc, cluster_with_worker, sitecustomize
from tests.test_batching import pixels

pytestmark = pytest.mark.integration

# One 64x64 image of the tiny model (VAE factor 2) with guidance on: a UNet batch of 2 latents of
# 4x32x32. Anything larger "does not fit".
FITS = 2 * 4 * 32 * 32

INJECT = f"""
import torch
from diffusers import UNet2DConditionModel

_forward = UNet2DConditionModel.forward


def _forward_that_runs_out_of_memory(self, sample, *args, **kwargs):
    if sample.numel() > {FITS}:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected by a test)")
    return _forward(self, sample, *args, **kwargs)


UNet2DConditionModel.forward = _forward_that_runs_out_of_memory
"""


@pytest.fixture
def small_gpu(tmp_path: Path, tiny_model_dir: Path) -> Iterator[tuple[Cluster, Proc]]:
    yield from cluster_with_worker(
        tmp_path, tiny_model_dir, "small-gpu", PYTHONPATH=sitecustomize(tmp_path, INJECT)
    )


def test_out_of_memory_splits_or_fails_the_job_and_the_worker_serves_on(
    small_gpu: tuple[Cluster, Proc],
) -> None:
    cluster, worker = small_gpu
    base = {"prompt": "a red circle", "steps": 2, "width": 64, "height": 64}

    # Two images do not fit in one call: split, each image as its seed gives it alone.
    pair = cluster.wait_terminal(cluster.submit({**base, "seed": 40, "num_images": 2}))
    assert pair["status"] == "succeeded" and len(pair["images"]) == 2, pair
    assert "out_of_memory_split" in worker.output()
    for i in range(2):
        alone = cluster.wait_terminal(cluster.submit({**base, "seed": 40 + i}))
        assert (pixels(cluster, pair, i) == pixels(cluster, alone)).all()

    # One image too large for the device: a clear failure that names the size.
    big = cluster.wait_terminal(cluster.submit({**base, "seed": 1, "width": 128, "height": 128}))
    assert big["status"] == "failed", big
    assert big["error"]["code"] == "out_of_memory"
    assert "128x128" in big["error"]["message"] and "Traceback" not in big["error"]["message"]

    metrics = HTTP.get(f"{cluster.url}/metrics").text
    assert 'latentd_out_of_memory_splits_total{model="tiny"} 1.0' in metrics  # the pair's call only

    # The worker is still there and takes the next job.
    assert worker.proc.poll() is None
    after = cluster.wait_terminal(cluster.submit({**base, "seed": 2}))
    assert after["status"] == "succeeded", after
