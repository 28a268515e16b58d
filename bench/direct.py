"""The baseline: the worker's own pipeline code called in one process, no HTTP, no Redis.

Run as a child process (`python -m bench.direct MODEL_DIR`) so the harness never loads torch
and the baseline gets the same torch thread count as the worker. It loads the model with
`worker.pipeline.load_pipeline`, then answers one JSON line per request line on stdin:
`{"jobs": [{prompt, width, height, steps, guidance_scale, seed}, ...]}` →
`{"generate_s": [...], "encode_s": [...]}`, one figure per job, each a one-image
`Runner.generate` call exactly as a one-image job runs it, then its encoding timed apart.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.machine import ROOT


def serve(model_dir: str, model_name: str, threads: int) -> int:
    import torch

    from latentd.contract import JobPayload
    from worker.encode import encode
    from worker.pipeline import Runner, load_pipeline, pick_device, pick_dtype

    torch.set_num_threads(threads)
    device = pick_device("auto")
    pipe = load_pipeline(model_dir, device, pick_dtype("auto", device), Path(model_dir).parent)
    runner = Runner(pipe=pipe, device=device, model=model_name)
    print(json.dumps({"ready": True, "device": str(device), "torch": torch.__version__}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        generate_s, encode_s = [], []
        for fields in request["jobs"]:
            payload = JobPayload(job_id="direct", model=model_name, num_images=1, **fields)
            t0 = time.perf_counter()
            [images], _ = runner.generate([payload], lambda done, total: False)
            t1 = time.perf_counter()
            encode(images[0], payload, 0)
            t2 = time.perf_counter()
            generate_s.append(t1 - t0)
            encode_s.append(t2 - t1)
        print(json.dumps({"generate_s": generate_s, "encode_s": encode_s}), flush=True)
    return 0


class DirectLoop:
    """A child process holding the loaded pipeline, asked for blocks of images in turn."""

    def __init__(self, model_dir: Path, model_name: str, threads: int) -> None:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.direct", str(model_dir), model_name, "--threads", str(threads)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            cwd=ROOT,
            env=env,
        )
        self.info: dict[str, Any] = {}

    def wait_ready(self) -> dict[str, Any]:
        if not self.info:
            self.info = self._read()
        return self.info

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the direct baseline process exited with {self.proc.wait()}")
        result: dict[str, Any] = json.loads(line)
        return result

    def run(self, jobs: list[dict[str, Any]]) -> dict[str, list[float]]:
        self.wait_ready()
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"jobs": jobs}) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model_dir")
    parser.add_argument("model_name")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    return serve(args.model_dir, args.model_name, args.threads)


if __name__ == "__main__":
    sys.exit(main())
