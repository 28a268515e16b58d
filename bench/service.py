"""Benchmarks 1 and 2: jobs through HTTP, Redis and a worker, against the direct pipeline loop.

The client is what a real one does: submit, poll the status every `poll` seconds until the job
ends (or, with `poll` 0, long-poll it with `?wait=`), download the image. Direct and service
blocks are interleaved, so a change in the machine's load during the run hits both sides alike.
"""

from __future__ import annotations

import asyncio
import math
import statistics
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import httpx

from bench.direct import DirectLoop
from bench.stats import summary

TERMINAL = ("succeeded", "failed", "canceled")
PROMPTS = ("a red circle on a blue background", "a green square above a yellow triangle")


@dataclass(frozen=True)
class Params:
    """The one set of generation parameters both sides run (the API's defaults, spelled out)."""

    width: int = 64
    height: int = 64
    steps: int = 20
    guidance_scale: float = 5.0

    def pipeline(self, seed: int) -> dict[str, Any]:
        """The job payload's fields that the direct loop and the request share."""
        return {
            "prompt": PROMPTS[seed % len(PROMPTS)],
            "seed": seed,
            "width": self.width,
            "height": self.height,
            "steps": self.steps,
            "guidance_scale": self.guidance_scale,
        }

    def body(self, model: str, seed: int) -> dict[str, Any]:
        return {**self.pipeline(seed), "model": model, "num_images": 1}


def _ts(value: str | None) -> float | None:
    return datetime.fromisoformat(value).timestamp() if value else None


def _breakdown(
    view: dict[str, Any], sent: float, accepted: float, seen: float, done: float
) -> dict[str, float]:
    """Where one job's wall time went, from the client's clock and the server's timestamps."""
    t = view["timings"]
    created, started, finished = _ts(t["created_at"]), _ts(t["started_at"]), _ts(t["finished_at"])
    out = {"latency_s": done - sent, "submit_s": accepted - sent, "download_s": done - seen}
    if created and started and finished:
        out["queue_s"] = started - created
        out["worker_s"] = finished - started
        out["detect_s"] = seen - finished
    if t.get("inference_seconds") is not None:
        out["inference_s"] = float(t["inference_seconds"])
    return out


LONG_POLL_S = 30.0


def _wait(poll: float) -> dict[str, float]:
    """Query parameters of a status read: a long-poll when the client does not poll."""
    return {"wait": LONG_POLL_S} if poll <= 0 else {}


def run_job(http: httpx.Client, body: dict[str, Any], poll: float) -> dict[str, Any]:
    try:
        return _run_job(http, body, poll)
    except httpx.HTTPStatusError as exc:  # counted as a failed job, the run goes on
        return {"status": f"http_{exc.response.status_code}"}


def _run_job(http: httpx.Client, body: dict[str, Any], poll: float) -> dict[str, Any]:
    sent = time.time()
    accepted_response = http.post("/v1/generations", json=body)
    accepted_response.raise_for_status()
    accepted = time.time()
    job_id = accepted_response.json()["id"]
    polls = 0
    while True:
        view: dict[str, Any] = (
            http.get(f"/v1/generations/{job_id}", params=_wait(poll)).raise_for_status().json()
        )
        polls += 1
        if view["status"] in TERMINAL:
            break
        time.sleep(poll)
    seen = time.time()
    if view["status"] != "succeeded":
        return {"status": view["status"], "error": view.get("error")}
    http.get(view["images"][0]["url"]).raise_for_status()
    done = time.time()
    return {"status": "succeeded", "polls": polls, **_breakdown(view, sent, accepted, seen, done)}


def _mean(rows: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in rows if key in r]
    return round(statistics.fmean(values), 4) if values else None


def overhead(
    url: str, model: str, direct: DirectLoop, params: Params, jobs: int, block: int, poll: float
) -> dict[str, Any]:
    """N sequential one-image jobs through the service vs the same N through the direct loop."""
    direct_gen: list[float] = []
    direct_enc: list[float] = []
    rows: list[dict[str, Any]] = []
    with httpx.Client(base_url=url, timeout=120) as http:
        direct.run([params.pipeline(10_000)])  # warm both sides once, unmeasured
        run_job(http, params.body(model, 10_000), poll)
        for start in range(0, jobs, block):
            seeds = list(range(start, min(jobs, start + block)))
            d = direct.run([params.pipeline(seed) for seed in seeds])
            direct_gen += d["generate_s"]
            direct_enc += d["encode_s"]
            rows += [run_job(http, params.body(model, seed), poll) for seed in seeds]
    ok = [r for r in rows if r["status"] == "succeeded"]
    latencies = [r["latency_s"] for r in ok]
    direct_mean = statistics.fmean(direct_gen)
    service_mean = statistics.fmean(latencies) if latencies else math.nan
    return {
        "jobs": jobs,
        "failed": len(rows) - len(ok),
        "poll_s": poll,
        "direct_generate_s": summary(direct_gen),
        "direct_encode_s": summary(direct_enc),
        "service_latency_s": summary(latencies),
        "ratio_mean": round(service_mean / direct_mean, 3),
        "ratio_p50": round(statistics.median(latencies) / statistics.median(direct_gen), 3)
        if latencies
        else None,
        "overhead_ms_mean": round((service_mean - direct_mean) * 1000, 1),
        "breakdown_mean_s": {
            k: _mean(ok, k)
            for k in ("submit_s", "queue_s", "worker_s", "inference_s", "detect_s", "download_s", "latency_s")
        },
        "polls_per_job": _mean(ok, "polls"),
    }


async def _run_job_async(http: httpx.AsyncClient, body: dict[str, Any], poll: float) -> dict[str, Any]:
    try:
        return await _run_job_async_unchecked(http, body, poll)
    except httpx.HTTPStatusError as exc:
        return {"status": f"http_{exc.response.status_code}"}


async def _run_job_async_unchecked(
    http: httpx.AsyncClient, body: dict[str, Any], poll: float
) -> dict[str, Any]:
    sent = time.time()
    response = await http.post("/v1/generations", json=body)
    if response.status_code != 202:
        return {"status": f"http_{response.status_code}"}
    job_id = response.json()["id"]
    polls = 0
    # Held reads, as `latentd generate` makes them: answered when the job ends, else after `poll`.
    held = {"wait": poll if poll > 0 else LONG_POLL_S}
    while True:
        view: dict[str, Any] = (
            (await http.get(f"/v1/generations/{job_id}", params=held)).raise_for_status().json()
        )
        polls += 1
        if view["status"] in TERMINAL:
            break
    if view["status"] != "succeeded":
        return {"status": view["status"]}
    (await http.get(view["images"][0]["url"])).raise_for_status()
    t = view["timings"]
    started, finished = _ts(t["started_at"]), _ts(t["finished_at"])
    return {
        "status": "succeeded",
        "latency_s": time.time() - sent,
        "polls": polls,
        "finished": time.time(),
        "ran": (started, finished) if started and finished else None,
        "inference_s": float(t.get("inference_seconds") or 0.0),
    }


async def _clients(url: str, model: str, params: Params, clients: int, per_client: int, poll: float) -> Any:
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:

        async def client(index: int) -> list[dict[str, Any]]:
            return [
                await _run_job_async(http, params.body(model, 1000 * index + k), poll)
                for k in range(per_client)
            ]

        started = time.time()
        per = await asyncio.gather(*(client(i) for i in range(clients)))
        return started, [row for rows in per for row in rows]


def _covered(intervals: list[tuple[float, float]]) -> float:
    """Seconds covered by the union of the intervals (jobs of one batch overlap)."""
    total, end = 0.0, -math.inf
    for start, stop in sorted(intervals):
        if stop > end:
            total += stop - max(start, end)
            end = stop
    return total


def throughput(
    url: str,
    model: str,
    direct: DirectLoop,
    params: Params,
    levels: list[int],
    min_jobs: int,
    direct_block: int,
    poll: float,
    min_per_client: int = 8,
) -> dict[str, Any]:
    """For each number of concurrent clients: images/s through the service vs the direct loop."""
    results = []
    with httpx.Client(base_url=url, timeout=120) as http:
        run_job(http, params.body(model, 10_000), poll)  # warm, unmeasured
    direct.run([params.pipeline(10_000)])
    for clients in levels:
        # The direct loop runs just before and just after the service's run, so a drift in the
        # machine's speed during the level moves both figures alike.
        before = direct.run([params.pipeline(seed) for seed in range(direct_block)])["generate_s"]
        # Several rounds per client, so the level is measured in steady state: the first batch
        # starts with the first job alone and the last one is partial; with two rounds those two
        # cost the 16-client figure 8-15 % (docs/benchmarks.md).
        per_client = max(min_per_client, math.ceil(min_jobs / clients))
        started, rows = asyncio.run(_clients(url, model, params, clients, per_client, poll))
        after = direct.run([params.pipeline(seed) for seed in range(direct_block)])["generate_s"]
        direct_s = before + after
        direct_rate = len(direct_s) / sum(direct_s)
        ok = [r for r in rows if r["status"] == "succeeded"]
        wall = max(r["finished"] for r in ok) - started if ok else math.nan
        rate = len(ok) / wall
        latencies = [r["latency_s"] for r in ok]
        results.append(
            {
                "clients": clients,
                "jobs": len(rows),
                "failed": len(rows) - len(ok),
                "wall_s": round(wall, 3),
                "images_per_s": round(rate, 3),
                "direct_images_per_s": round(direct_rate, 3),
                "ratio": round(rate / direct_rate, 3),
                "latency_s": summary(latencies),
                "status_polls_per_s": round(sum(r["polls"] for r in ok) / wall, 1),
                # Share of the run in which some job was running: below 1, the service sat idle.
                "busy_fraction": round(_covered([r["ran"] for r in ok if r["ran"]]) / wall, 3),
                # Above the direct figure: the pipeline ran slower inside the service (shared CPU).
                "worker_pipeline_s_mean": _mean(ok, "inference_s"),
                "direct_pipeline_s_mean": round(statistics.fmean(direct_s), 4),
            }
        )
    return {"poll_s": poll, "held_reads": True, "levels": results}
