"""Render the JSON results as the tables in docs/benchmarks.md.

Only the text between this module's markers is rewritten; everything else in the file (other
sections, the hand-written analysis under each table) is left as it is.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

TARGETS = {
    "overhead_ratio": 1.10,
    "throughput_ratio_16": 2.0,
    "submits_per_s": 800.0,
    "status_per_s": 2000.0,
    "p99_ms": 50.0,
    "h100_steps_per_s_b1_eager": 55.0,
    "batch8_over_batch1": 1.8,
}

SECTIONS = {
    "service": "## Service benchmarks",
    "gpu": "## GPU benchmark",
}


def _load(out: Path, name: str) -> dict[str, Any] | None:
    path = out / f"{name}.json"
    if not path.exists():
        return None
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}" + ("" if count == 1 else "s")


def _batching(data: dict[str, Any]) -> str:
    batch = data.get("max_batch_images")
    if not isinstance(batch, int):
        return ", the worker's default batching" if data.get("benchmark") == "throughput" else ""
    return f", micro-batching up to {batch} images" if batch > 1 else ", micro-batching off"


def _met(ok: bool) -> str:
    return "yes" if ok else "**no**"


def _run_line(name: str, data: dict[str, Any]) -> str:
    m = data["machine"]
    load = " / ".join(f"{x:.2f}" for x in m["load_average_at_start"])
    model = data["model"]
    p = data["params"]
    return (
        f"- `{name}.json`: {m['date']}, {m['nproc']} × {m['cpu_model']}, load average at start {load} "
        f"(1/5/15 min), commit {m['commit']}; `{m['command']}`; model **{model['kind']}** "
        f"({model['name']}), {p['width']}×{p['height']}, {p['steps']} steps, "
        f"guidance {p['guidance_scale']:g}, "
        f"one image per job, {data['torch_threads']} torch thread(s) per worker and for the direct loop"
        + (", **quick mode (not a measurement)**" if data.get("quick") else "")
    )


def _own(r: dict[str, Any]) -> str:
    """The service's own time per job: its latency less the worker's pipeline time. Unlike the ratio
    it does not move with the pipeline's speed in one process against another (see "Reading")."""
    b = r["breakdown_mean_s"]
    if b.get("inference_s") is None or b.get("latency_s") is None:
        return ""
    return (
        f"; its own time +{(b['latency_s'] - b['inference_s']) * 1000:.0f} ms, ratio "
        f"{b['latency_s'] / b['inference_s']:.3f} to the worker's own pipeline time"
    )


def service_markdown(out: Path) -> str:
    overhead, frontend = _load(out, "overhead"), _load(out, "frontend")
    found = out.glob("throughput*.json") if out.exists() else iter(())
    # throughput.json (one worker) first, then throughput-w2.json and so on.
    throughputs = sorted((p for p in found if "profiled" not in p.name), key=lambda p: (len(p.stem), p.stem))
    lines: list[str] = []
    summary = ["| benchmark | measured | target | met |", "|---|---|---|---|"]
    extra_overheads = sorted(out.glob("overhead-*.json")) if out.exists() else []
    for data in [overhead, *(json.loads(p.read_text()) for p in extra_overheads if "profiled" not in p.name)]:
        if not data:
            continue
        r = data["result"]
        summary.append(
            f"| 1. service overhead, {r['jobs']} sequential jobs, {_polling(r['poll_s'], 'the client')} | "
            f"ratio **{r['ratio_mean']:.3f}** (service "
            f"{r['service_latency_s']['mean']:.3f} s vs direct "
            f"{r['direct_generate_s']['mean']:.3f} s per image, "
            f"+{r['overhead_ms_mean']:.0f} ms){_own(r)} | ≤ {TARGETS['overhead_ratio']:.2f} | "
            f"{_met(r['ratio_mean'] <= TARGETS['overhead_ratio'])} |"
        )
    for path in throughputs:
        data = json.loads(path.read_text())
        for level in data["result"]["levels"]:
            target = f"≥ {TARGETS['throughput_ratio_16']:.1f}×" if level["clients"] == 16 else "—"
            met = _met(level["ratio"] >= TARGETS["throughput_ratio_16"]) if level["clients"] == 16 else ""
            summary.append(
                f"| 2. throughput, {_n(level['clients'], 'client')}, {_n(data['workers'], 'worker')}"
                f"{_batching(data)} | "
                f"**{level['ratio']:.2f}×** direct ({level['images_per_s']:.2f} vs "
                f"{level['direct_images_per_s']:.2f} images/s) | {target} | {met} |"
            )
    if frontend and "result" in frontend:
        for kind, target in (("submit", "submits_per_s"), ("status", "status_per_s")):
            r = frontend["result"][kind]
            ok = (
                r["requests_per_s"] >= TARGETS[target]
                and r["p99_ms"] <= TARGETS["p99_ms"]
                and not r["errors"]
            )
            summary.append(
                f"| 3. {kind} requests, one API process | **{r['requests_per_s']:.0f}/s**, "
                f"p50 {r['p50_ms']:.1f} ms, "
                f"p99 {r['p99_ms']:.1f} ms, {r['errors']} errors | ≥ {TARGETS[target]:.0f}/s, "
                f"p99 ≤ {TARGETS['p99_ms']:.0f} ms | {_met(ok)} |"
            )
    elif frontend:
        summary.append(f"| 3. front end | not run: {frontend.get('skipped')} | | |")
    lines += summary
    lines += ["", "Runs:", ""]
    if overhead:
        lines.append(_run_line("overhead", overhead))
    for path in extra_overheads:
        if "profiled" not in path.name:
            lines.append(_run_line(path.stem, json.loads(path.read_text())))
    for path in throughputs:
        lines.append(_run_line(path.stem, json.loads(path.read_text())))
    if frontend:
        lines.append(_run_line("frontend", frontend))
    if overhead:
        r = overhead["result"]
        b = r["breakdown_mean_s"]
        lines += [
            "",
            f"Where a sequential job's time goes (means, seconds; {_polling(r['poll_s'], 'the client')}; "
            f"direct loop: pipeline {r['direct_generate_s']['mean']:.4f}, PNG encoding "
            f"{r['direct_encode_s']['mean']:.4f}):",
            "",
            "| submit (HTTP) | queue (enqueued → worker took it) | worker (took → ended) | of which "
            "pipeline + encode | seen by the client after it ended | image download | total |",
            "|---|---|---|---|---|---|---|",
            "| " + " | ".join(f"{b[k]:.4f}" if b.get(k) is not None else "—" for k in (
                "submit_s", "queue_s", "worker_s", "inference_s", "detect_s", "download_s", "latency_s"
            )) + " |",
        ]  # fmt: skip
    for path in throughputs:
        data = json.loads(path.read_text())
        lines += [
            "",
            f"Throughput, {_n(data['workers'], 'worker')}{_batching(data)}, "
            f"{_polling(data['result']['poll_s'], 'clients', data['result'].get('held_reads', False))} "
            f"(`{path.name}`):",
            "",
            "| clients | jobs | failed | images/s | direct images/s | ratio | latency p50 | p95 | p99 (s) "
            "| status polls/s | some job running | pipeline s per job in worker / direct |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for v in data["result"]["levels"]:
            lat = v["latency_s"]
            lines.append(
                f"| {v['clients']} | {v['jobs']} | {v['failed']} | {v['images_per_s']:.3f} | "
                f"{v['direct_images_per_s']:.3f} | {v['ratio']:.3f} | {lat.get('p50', 0):.3f} | "
                f"{lat.get('p95', 0):.3f} | {lat.get('p99', 0):.3f} | {v['status_polls_per_s']} | "
                f"{v.get('busy_fraction', 0) * 100:.0f} % | "
                f"{v.get('worker_pipeline_s_mean') or 0:.3f} / {v.get('direct_pipeline_s_mean', 0):.3f} |"
            )
    if frontend and "result" in frontend:
        r = frontend["result"]
        lines += [
            "",
            f"Front end: {r['tool']}, {r['connections']} connections, {r['seconds']:g} s per run, from "
            f"its own process; status reads of {r['status_reads_of_queued_jobs']} queued jobs in turn; "
            f"submits to a registered model with no running worker ({r['queue_depth_flushed']} queued "
            "jobs deleted afterwards).",
            "",
            "| request | requests/s | p50 ms | p90 ms | p99 ms | max ms | errors |",
            "|---|---|---|---|---|---|---|",
        ]
        for kind in ("submit", "status"):
            v = r[kind]
            lines.append(
                f"| {kind} | {v['requests_per_s']:.0f} | {v['p50_ms']:.2f} | {v['p90_ms']:.2f} | "
                f"{v['p99_ms']:.2f} | {v['max_ms']:.1f} | {v['errors']} |"
            )
    for path in sorted(out.glob("*-profiled.json")) if out.exists() else []:
        data = json.loads(path.read_text())
        lines += [
            "",
            f"Profile (py-spy at 200 Hz; the API's samples only where a thread held the GIL, the "
            f"worker's all threads; {_run_line(path.stem, data)[2:]}):",
            "",
        ]
        for process, prof in data.get("profile", {}).items():
            cats = ", ".join(
                f"{c['name']} {c['share'] * 100:.0f} %" for c in prof["busy_categories"] if c["share"] >= 0.01
            )
            hot = ", ".join(f"`{f['name']}` {f['share'] * 100:.0f} %" for f in prof["self"][:5])
            callers = ", ".join(
                f"`{f['name']}` {f['share'] * 100:.0f} %" for f in prof["redis_by_caller"][:4]
            )
            lines.append(
                f"- {process}, {prof['samples']} samples, {prof['idle_share'] * 100:.0f} % idle or waiting "
                f"for work; of the rest: {cats}. Hottest functions (all samples): {hot}. "
                f"Redis time by caller (all samples): {callers}."
            )
    return "\n".join(lines)


def _polling(poll_s: float, who: str, held: bool = False) -> str:
    if held and poll_s > 0:
        return f"{who}' status reads held up to {poll_s} s (`?wait=`, as `latentd generate` makes them)"
    if poll_s <= 0:
        return f"{who} long-polling the status (`?wait=`)"
    return f"{who} polling every {poll_s} s"


def gpu_markdown(out: Path) -> str:
    data = _load(out, "gpu_sd15")
    command = "`python -m bench gpu` (the same as `python bench/gpu_sd15.py --out docs/bench/gpu_sd15.json`)"
    if not data:
        return (
            f"Not run yet: no session so far had a CUDA device. Command: {command}. Targets on an H100: "
            f"≥ {TARGETS['h100_steps_per_s_b1_eager']:.0f} denoising steps/s at batch 1 eager; "
            f"batch-8 images/s ≥ {TARGETS['batch8_over_batch1']}× batch 1."
        )
    lines = [
        f"{data['device']}, torch {data['torch']}, {data['date']}; {data['dtype']}, "
        f"{data['size']}×{data['size']}, "
        f"{data['steps']} steps, guidance {data['guidance_scale']:g}. Command: `{data['command']}`.",
        "",
        "| mode | batch | denoising steps/s | images/s | images/s vs batch 1 |",
        "|---|---|---|---|---|",
    ]
    for row in data["results"]:
        lines.append(
            f"| {row['mode']} | {row['batch']} | {row['steps_per_s']:.1f} | {row['images_per_s']:.2f} | "
            f"{row['images_per_s_vs_batch1']:.2f} |"
        )
    lines += [
        "",
        f"Targets (H100): ≥ {TARGETS['h100_steps_per_s_b1_eager']:.0f} steps/s at batch 1 eager; "
        f"batch-8 images/s ≥ {TARGETS['batch8_over_batch1']}× batch 1.",
    ]
    profile = data.get("profile")
    if profile and profile.get("gpu_busy_fraction") is not None:
        top = ", ".join(
            f"{k['name'].split('<')[0].split('::')[-1].removeprefix('void ')} "
            f"{k['ms'] / profile['steps']:.1f} ms"
            for k in profile["top_kernels"][:3]
        )
        lines += [
            "",
            f"Profile of one eager batch-{profile['batch']} call (torch.profiler): "
            f"{profile['kernels_per_step']:.0f} kernels and {profile['aten_ops_per_step']:.0f} aten ops "
            f"per denoising step; the GPU was busy {profile['gpu_busy_ms']:.0f} ms of the "
            f"{profile['gpu_span_ms']:.0f} ms between the first and the last kernel "
            f"({profile['gpu_busy_fraction']:.0%}). Longest kernels, their time in the whole call / "
            f"steps: {top}.",
        ]
    identity = data.get("identity")
    if identity:
        lines += [
            "",
            f"Batch invariance (mode `identity`, {identity['jobs']} jobs of mixed seeds and prompts, eager, "
            f"the worker's Runner): padded to {identity['jobs']} images as `LATENTD_BATCH_INVARIANT` does, "
            f"{identity['padded_identical']} of {identity['jobs']} batched images were pixel-identical to "
            f"their lone runs (largest difference {identity['padded_max_diff']} of 255); unpadded, "
            f"{identity['unpadded_identical']} (largest difference {identity['unpadded_max_diff']}); mean "
            f"pixel standard deviation {identity['pixel_std']}.",
        ]
    if data.get("notes"):
        lines += ["", str(data["notes"])]
    return "\n".join(lines)


def _markers(key: str) -> tuple[str, str]:
    return (
        f"<!-- bench:{key}:begin (generated by `python -m bench` from docs/bench/*.json; "
        "edit outside these markers) -->",
        f"<!-- bench:{key}:end -->",
    )


def replace_section(text: str, key: str, body: str) -> str:
    """Put `body` between the section's markers, adding the section at the end if it is missing."""
    begin, end = _markers(key)
    block = f"{begin}\n{body}\n{end}"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        _, tail = rest.split(end, 1)
        return head + block + tail
    heading = SECTIONS[key]
    lines = text.splitlines(keepends=True)
    for i, line in enumerate(lines):
        if line.rstrip() == heading:
            return "".join(lines[: i + 1]) + "\n" + block + "\n" + "".join(lines[i + 1 :])
    return text.rstrip("\n") + ("\n\n" if text.strip() else "") + f"{heading}\n\n{block}\n"


def update_docs(docs: Path, out: Path) -> None:
    bodies = {"service": service_markdown(out), "gpu": gpu_markdown(out)}
    # Read as late as possible: other sections of this file are written by other hands.
    text = docs.read_text() if docs.exists() else "# Benchmarks\n"
    for key, body in bodies.items():
        text = replace_section(text, key, body)
    docs.parent.mkdir(parents=True, exist_ok=True)
    docs.write_text(text)
