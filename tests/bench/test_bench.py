"""The benchmark harness, run end to end in quick mode so it cannot rot; the GPU script's CPU path."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from bench import report
from bench.stack import Model, Stack
from tests.conftest import ROOT

OTHER_SECTION = "## Built-in model\n\nWritten by someone else; must survive.\n"


def test_quick_run_writes_results_and_docs(tiny_model_dir: Path, tmp_path: Path) -> None:
    out, docs = tmp_path / "bench", tmp_path / "benchmarks.md"
    docs.write_text("# Benchmarks\n\n" + OTHER_SECTION)
    command = [sys.executable, "-m", "bench", "--quick", "--model-dir", str(tiny_model_dir)]
    setting = "LATENTD_PROGRESS_INTERVAL_MS=0"
    run = subprocess.run(
        [*command, "--out", str(out), "--docs", str(docs), "--worker-env", setting],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=150,
    )
    assert run.returncode == 0, run.stderr[-3000:]

    overhead = json.loads((out / "overhead.json").read_text())
    assert overhead["result"]["failed"] == 0
    assert overhead["result"]["ratio_mean"] > 0
    assert overhead["machine"]["nproc"] and overhead["model"]["kind"] == "path"
    assert overhead["worker_env"] == {"LATENTD_PROGRESS_INTERVAL_MS": "0"}
    assert setting in overhead["machine"]["command"]
    levels = json.loads((out / "throughput.json").read_text())["result"]["levels"]
    assert [level["clients"] for level in levels] == [1, 4]
    assert all(level["failed"] == 0 and level["images_per_s"] > 0 for level in levels)
    frontend = json.loads((out / "frontend.json").read_text())
    if "skipped" not in frontend:  # wrk is an apt package; .ci/run installs it
        for kind in ("submit", "status"):
            assert frontend["result"][kind]["requests_per_s"] > 0
            assert frontend["result"][kind]["errors"] == 0

    text = docs.read_text()
    assert OTHER_SECTION in text
    assert "## Service benchmarks" in text and "## GPU benchmark" in text
    assert "quick mode (not a measurement)" in text
    assert "to the worker's own pipeline time" in text  # the overhead without the pipeline's drift
    # A second render replaces the generated block in place instead of adding another.
    report.update_docs(docs, out)
    assert docs.read_text() == text


def test_worker_settings_reach_the_workers_and_bad_ones_are_refused(tiny_model_dir: Path) -> None:
    stack = Stack(
        Model(tiny_model_dir, "tiny", "path"), worker_settings={"LATENTD_PROGRESS_INTERVAL_MS": "0"}
    )
    assert stack.worker_env()["LATENTD_PROGRESS_INTERVAL_MS"] == "0"
    run = subprocess.run(
        [sys.executable, "-m", "bench", "overhead", "--worker-env", "PROGRESS=0"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 2 and "is not LATENTD_NAME=VALUE" in run.stderr


def test_gpu_script_cpu_smoke_path(tmp_path: Path) -> None:
    out = tmp_path / "gpu_sd15.json"
    flags = ["--device", "cpu", "--tiny", "--batches", "1,2", "--warmup", "1", "--threads", "1", "--profile"]
    run = subprocess.run(
        [sys.executable, "bench/gpu_sd15.py", *flags, "--modes", "eager,worker,identity", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(out.read_text())
    rows = [(r["mode"], r["batch"]) for r in result["results"]]
    assert rows == [("eager", 1), ("eager", 2), ("worker", 1), ("worker", 2)]
    assert all(r["steps_per_s"] > 0 and r["images_per_s"] > 0 for r in result["results"])
    # No GPU here: the profile counts the ops a step costs, and finds no kernels to time.
    assert result["profile"]["aten_ops_per_step"] > 100 and result["profile"]["kernels_per_step"] == 0
    # Padded calls keep every image's pixels; the images are not flat (which would prove nothing).
    identity = result["identity"]
    assert identity["jobs"] == 2 and identity["padded_identical"] == 2 and identity["padded_max_diff"] == 0
    assert identity["pixel_std"] > 1
    markdown = report.gpu_markdown(tmp_path)
    assert "| eager | 2 |" in markdown and "2 of 2 batched images were pixel-identical" in markdown


def test_gpu_script_without_cuda_says_so() -> None:
    if torch.cuda.is_available():
        return  # the real benchmark would run here; nothing to check on this path
    run = subprocess.run(
        [sys.executable, "bench/gpu_sd15.py"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 2
    assert "no CUDA device" in run.stderr
