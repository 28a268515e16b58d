"""Crash load test: 2,000 jobs submitted as fast as the API takes them, two workers, one of
them SIGKILLed midway and restarted. Every accepted job must end `succeeded`, exactly once.

    .venv/bin/python -m bench.crash_load [--jobs 2000] [--clients 32] [--out docs/bench/crash-load.json]
"""

from __future__ import annotations

import argparse
import json
import signal
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

from tests.conftest import RedisServer, start_api, start_worker
from worker.tiny import build_tiny_pipeline

TERMINAL = ("succeeded", "failed", "canceled")


def run(jobs: int, clients: int, lease: int) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="latentd-crash-load-"))
    model = build_tiny_pipeline(tmp / "tiny")
    server = RedisServer(tmp / "redis")
    server.start()
    lease_env = {"LATENTD_LEASE_SECONDS": str(lease)}
    workers = {
        name: start_worker(server.url, model, tmp, name=name, **lease_env)
        for name in ("worker-a", "worker-b")
    }
    api, url = start_api(server.url, tmp, LATENTD_MAX_QUEUE_DEPTH=str(jobs * 2))
    accepted: list[str] = []
    refused: Counter[int] = Counter()
    lock = threading.Lock()
    started = time.monotonic()
    try:
        with httpx.Client(base_url=url, timeout=30, limits=httpx.Limits(max_connections=clients)) as http:

            def submit(i: int) -> None:
                response = http.post("/v1/generations", json={"prompt": f"job {i}", "steps": 1, "seed": i})
                with lock:
                    if response.status_code == 202:
                        accepted.append(response.json()["id"])
                    else:
                        refused[response.status_code] += 1

            with ThreadPoolExecutor(clients) as pool:
                list(pool.map(submit, range(jobs // 2)))
                submitted_half = time.monotonic() - started
                # Kill one worker mid-job, while the second half of the jobs arrives.
                victim = workers["worker-a"]
                victim.proc.send_signal(signal.SIGKILL)
                victim.proc.wait()
                killed_at = time.monotonic() - started
                list(pool.map(submit, range(jobs // 2, jobs)))
            submit_seconds = time.monotonic() - started
            workers["worker-a2"] = start_worker(server.url, model, tmp, name="worker-a2", **lease_env)

            r = server.client()
            deadline = time.monotonic() + 1800
            while True:
                pipe = r.pipeline(transaction=False)
                for job_id in accepted:
                    pipe.hget(f"rq:job:{job_id}", "status")
                statuses = Counter((s or b"missing").decode() for s in pipe.execute())
                done = statuses["finished"] + statuses["failed"] + statuses["canceled"] + statuses["stopped"]
                if done == len(accepted) or time.monotonic() > deadline:
                    break
                time.sleep(1)
            drain_seconds = time.monotonic() - started
            views = [http.get(f"/v1/generations/{job_id}").json() for job_id in accepted]
            pipe = r.pipeline(transaction=False)
            for job_id in accepted:
                pipe.hget(f"latentd:job:{job_id}", "completions")
            completions = Counter(int(c or 0) for c in pipe.execute())
    finally:
        api.stop()
        for w in workers.values():
            w.stop()
        server.stop()
    outcome = Counter(v["status"] for v in views)
    attempts = Counter(v["attempts"] for v in views)
    return {
        "jobs_submitted": jobs,
        "accepted": len(accepted),
        "refused_by_status": dict(refused),
        "unique_ids": len(set(accepted)),
        "outcomes": dict(outcome),
        "completions_per_job": {str(k): v for k, v in sorted(completions.items())},
        "attempts_per_job": {str(k): v for k, v in sorted(attempts.items())},
        "submit_seconds": round(submit_seconds, 1),
        "first_half_submitted_at_s": round(submitted_half, 1),
        "worker_killed_at_s": round(killed_at, 1),
        "all_ended_at_s": round(drain_seconds, 1),
        "lease_seconds": lease,
        "ok": outcome == Counter({"succeeded": len(accepted)}) and completions == Counter({1: len(accepted)}),
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--lease", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("docs/bench/crash-load.json"))
    args = parser.parse_args()
    result = run(args.jobs, args.clients, args.lease)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
