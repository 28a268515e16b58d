"""LATENTD_TORCH_COMPILE: the worker compiles its UNet and VAE decoder and runs one call at the model's
native size before it says ready; jobs then get the image eager PyTorch gives.

On the CPU, inductor compiles C++ (74 s cold for the tiny model here); the speed it buys is a
GPU matter, measured by `bench/gpu_sd15.py` with the same `compile_pipeline`."""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from latentd.contract import JobPayload
from tests.conftest import HTTP, TINY_MODEL, cluster_with_worker
from worker.pipeline import Runner, load_pipeline

pytestmark = pytest.mark.integration

BODY = {"prompt": "a red circle", "width": 64, "height": 64, "steps": 3, "guidance_scale": 6.0, "seed": 5}


@pytest.mark.timeout(600)  # two cold compiles on two CPU cores: 146 s here
def test_a_compiled_worker_warms_up_before_ready_and_gives_the_eager_image(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    for cluster, worker in cluster_with_worker(
        tmp_path, tiny_model_dir, "compiled", LATENTD_TORCH_COMPILE="true", TORCH_LOGS="recompiles"
    ):
        log = worker.output()
        warm = re.search(r"pipeline_compiled size=(\d+) images=1 seconds=\S+ graphs=(\d+)", log)
        assert warm, log[-3000:]
        # The UNet and the VAE decoder, compiled at 64x64 (the tiny model's native size).
        assert warm.group(1) == "64" and int(warm.group(2)) >= 2
        assert log.index("pipeline_compiled") < log.index("worker_ready")

        job_id = cluster.submit(BODY)
        view = cluster.wait_terminal(job_id, timeout=300)
        assert view["status"] == "succeeded", view
        png = HTTP.get(f"{cluster.url}{view['images'][0]['url']}").content
        assert "Recompiling function" not in worker.output()  # the warm-up's graphs served it

        # Guidance off halves the UNet's batch: a new shape, compiled in this job, which dynamo
        # logs (the VAE decoder's shape is unchanged, which kept this compile to 43 s here).
        other = cluster.wait_terminal(cluster.submit({**BODY, "guidance_scale": 1.0}), timeout=300)
        assert other["status"] == "succeeded", other
        assert "Recompiling function" in worker.output()
        # A compile inside a job did not cost the job its 30 s lease.
        assert "job_lease_lost" not in worker.output()
    served = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)

    pipe = load_pipeline(str(tiny_model_dir), torch.device("cpu"), torch.float32, tmp_path)
    eager = Runner(pipe=pipe, device=torch.device("cpu"), model=TINY_MODEL)
    payload = JobPayload(job_id="eager", model=TINY_MODEL, num_images=1, **BODY)  # type: ignore[arg-type]
    [[image]], _ = eager.generate([payload], lambda done, total: False)
    assert np.abs(served - np.asarray(image).astype(int)).max() <= 1
