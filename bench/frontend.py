"""Benchmark 3: submit and status requests per second for one API process, driven by wrk.

wrk (a C load generator, apt package `wrk`) runs as its own process with a fixed number of
open connections. Submits go to a model that has a worker registration but no worker, so
nothing runs them; the queue is bounded by the run's length and deleted afterwards.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import redis

from latentd.contract import Keys, WorkerInfo

GHOST_MODEL = "bench-frontend"
GHOST_WORKER = "bench-frontend-ghost"

DONE = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests":%.0f,"duration_us":%.0f,"non_2xx":%.0f,"socket_errors":%.0f,"timeouts":%.0f,'
    .. '"p50_ms":%.3f,"p90_ms":%.3f,"p99_ms":%.3f,"max_ms":%.3f,"mean_ms":%.3f}\\n',
    summary.requests, summary.duration, e.status, e.connect + e.read + e.write, e.timeout,
    latency:percentile(50) / 1000, latency:percentile(90) / 1000, latency:percentile(99) / 1000,
    latency.max / 1000, latency.mean / 1000))
end
"""


def submit_script(body: dict[str, Any]) -> str:
    return (
        'wrk.method = "POST"\n'
        f"wrk.body = [[{json.dumps(body)}]]\n"
        'wrk.headers["Content-Type"] = "application/json"\n' + DONE
    )


def status_script(ids_file: Path) -> str:
    return (
        "local ids = {}\n"
        f'for line in io.lines("{ids_file}") do ids[#ids + 1] = line end\n'
        "local i = 0\n"
        "request = function()\n"
        "  i = i % #ids + 1\n"
        '  return wrk.format("GET", "/v1/generations/" .. ids[i])\n'
        "end\n" + DONE
    )


def wrk_binary() -> str | None:
    return shutil.which("wrk")


def run_wrk(url: str, script: Path, seconds: float, connections: int, threads: int = 1) -> dict[str, Any]:
    binary = wrk_binary()
    assert binary, "wrk is not installed (apt-get install wrk)"
    duration = f"{max(1, round(seconds))}s"
    command = [binary, "-t", str(threads), "-c", str(connections), "-d", duration, "--timeout", "5s"]
    out = subprocess.run(
        [*command, "-s", str(script), url], capture_output=True, text=True, check=True, timeout=seconds + 60
    ).stdout
    match = re.search(r"^BENCH_JSON (.*)$", out, flags=re.M)
    if not match:
        raise RuntimeError(f"wrk printed no summary:\n{out}")
    raw: dict[str, Any] = json.loads(match.group(1))
    seconds_run = raw["duration_us"] / 1e6
    return {
        "requests": int(raw["requests"]),
        "requests_per_s": round(raw["requests"] / seconds_run, 1),
        "errors": int(raw["non_2xx"] + raw["socket_errors"] + raw["timeouts"]),
        **{k: round(raw[k], 2) for k in ("p50_ms", "p90_ms", "p99_ms", "max_ms", "mean_ms")},
    }


def register_ghost(r: redis.Redis, ttl: int) -> None:
    info = WorkerInfo(
        name=GHOST_WORKER, model=GHOST_MODEL, device="none", pid=0, hostname="bench", started_at=time.time()
    )
    r.set(Keys.worker(GHOST_WORKER), info.model_dump_json(), ex=ttl)
    r.sadd(Keys.WORKERS, GHOST_WORKER)


def flush_ghost(r: redis.Redis) -> int:
    """Delete the ghost model's queue, its jobs and its registration; returns how many jobs went."""
    queue_key = f"rq:queue:{Keys.queue_name(GHOST_MODEL)}"
    ids = [i.decode() if isinstance(i, bytes) else str(i) for i in r.lrange(queue_key, 0, -1)]
    for start in range(0, len(ids), 1000):
        chunk = ids[start : start + 1000]
        r.delete(*(f"rq:job:{i}" for i in chunk), *(Keys.state(i) for i in chunk))
    r.delete(queue_key, Keys.worker(GHOST_WORKER))
    r.srem(Keys.WORKERS, GHOST_WORKER)
    return len(ids)


def frontend(
    url: str,
    r: redis.Redis,
    tmp: Path,
    seconds: float,
    connections: int,
    status_jobs: int,
    body: dict[str, Any],
) -> dict[str, Any]:
    body = {**body, "model": GHOST_MODEL}
    register_ghost(r, ttl=int(3 * seconds) + 120)
    try:
        with httpx.Client(base_url=url, timeout=30) as http:
            ids = [
                http.post("/v1/generations", json=body).raise_for_status().json()["id"]
                for _ in range(status_jobs)
            ]
        ids_file = tmp / "ids.txt"
        ids_file.write_text("\n".join(ids) + "\n")
        status_lua, submit_lua = tmp / "status.lua", tmp / "submit.lua"
        status_lua.write_text(status_script(ids_file))
        submit_lua.write_text(submit_script(body))
        status = run_wrk(url, status_lua, seconds, connections)
        submit = run_wrk(url + "/v1/generations", submit_lua, seconds, connections)
    finally:
        flushed = flush_ghost(r)
    return {
        "tool": "wrk",
        "connections": connections,
        "seconds": seconds,
        "status_reads_of_queued_jobs": status_jobs,
        "status": status,
        "submit": submit,
        "queue_depth_flushed": flushed,
    }
