"""A running job's progress and cancel flag go through Redis once per LATENTD_PROGRESS_INTERVAL_MS,
not after every denoising step: the round trip slowed a small CPU job by 4-5 %."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import Proc, wait_until
from tests.test_recovery import LONG_JOB, Cluster, cluster_with_worker

pytestmark = pytest.mark.integration


@pytest.fixture
def rare_checks(tmp_path: Path, tiny_model_dir: Path) -> Iterator[tuple[Cluster, Proc]]:
    # An interval longer than any job: Redis hears of a job after its first step, then not again.
    yield from cluster_with_worker(tmp_path, tiny_model_dir, "w", LATENTD_PROGRESS_INTERVAL_MS="60000")


def test_progress_and_cancel_are_read_once_per_interval(rare_checks: tuple[Cluster, Proc]) -> None:
    cluster, _ = rare_checks
    job_id = cluster.submit(LONG_JOB)
    wait_until(lambda: cluster.status(job_id)["progress"]["step"] > 0, 60, what="the first step")
    assert httpx.post(f"{cluster.url}/v1/generations/{job_id}/cancel").status_code == 202
    seen = set()
    while (view := cluster.status(job_id))["status"] == "running":
        seen.add(view["progress"]["step"])
    assert seen <= {1}, f"progress was written after later steps too: {sorted(seen)}"
    # The cancel is still honoured: the flag is read once more when the pipeline returns.
    assert view["status"] == "canceled" and view["images"] == []


@pytest.fixture
def every_step(tmp_path: Path, tiny_model_dir: Path) -> Iterator[tuple[Cluster, Proc]]:
    yield from cluster_with_worker(tmp_path, tiny_model_dir, "w", LATENTD_PROGRESS_INTERVAL_MS="0")


def test_each_progress_check_is_one_round_trip(every_step: tuple[Cluster, Proc]) -> None:
    cluster, _ = every_step
    job_id = cluster.submit({"prompt": "a red circle", "steps": 6})
    assert cluster.wait_terminal(job_id)["status"] == "succeeded"
    stats = cluster.redis.client().info("commandstats")
    # One EVAL per step; redis-py would precede each pipeline holding a registered script with
    # SCRIPT EXISTS, a second round trip inside the denoising loop.
    assert stats.get("cmdstat_eval", {}).get("calls", 0) >= 6, stats.keys()
    assert "cmdstat_script|exists" not in stats, stats["cmdstat_script|exists"]
