"""`python -m bench [all|overhead|throughput|frontend|report|gpu] [--quick] ...`"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import report
from bench.machine import ROOT, describe
from bench.profiles import summarize
from bench.stack import Model, Stack, choose_model, py_spy

SERVICE_BENCHES = ("overhead", "throughput", "frontend")


_T0 = time.monotonic()


def say(message: str) -> None:
    print(f"[bench {time.monotonic() - _T0:6.1f}s] {message}", file=sys.stderr, flush=True)


def _levels(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _setting(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name.startswith("LATENTD_"):
        raise argparse.ArgumentTypeError(f"{text!r} is not LATENTD_NAME=VALUE")
    return name, value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument(
        "what",
        nargs="?",
        default="all",
        choices=["all", *SERVICE_BENCHES, "report", "gpu"],
        help="all: the three service benchmarks; report: re-render the docs from the JSON; "
        "gpu: bench/gpu_sd15.py",
    )
    p.add_argument(
        "--quick", action="store_true", help="tiny sizes and counts: checks the harness, not the service"
    )
    p.add_argument("--model", default="auto", choices=["auto", "builtin", "tiny"])
    p.add_argument("--model-dir", type=Path, help="a diffusers directory to serve instead")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "bench", help="where the JSON results go")
    p.add_argument("--docs", type=Path, default=ROOT / "docs" / "benchmarks.md")
    p.add_argument("--no-docs", action="store_true", help="write the JSON only")
    p.add_argument("--workers", type=int, default=1, help="worker processes (throughput)")
    p.add_argument(
        "--max-batch-images", type=int, help="LATENTD_MAX_BATCH_IMAGES for the workers (micro-batching)"
    )
    p.add_argument(
        "--worker-env",
        type=_setting,
        action="append",
        default=[],
        metavar="LATENTD_NAME=VALUE",
        help="a setting for the workers, for A/B runs: LATENTD_PROGRESS_INTERVAL_MS=0 (repeatable)",
    )
    p.add_argument("--torch-threads", type=int, default=1, help="per worker, and for the direct loop")
    p.add_argument("--steps", type=int, help="denoising steps per image (default 20, quick 2)")
    p.add_argument("--size", type=int, default=64, help="width and height")
    p.add_argument("--jobs", type=int, help="overhead: sequential jobs (default 40, quick 3)")
    p.add_argument(
        "--block",
        type=int,
        default=1,
        help="overhead: jobs per interleaved direct/service block (1: each service job next to a direct "
        "one, so the machine's drifting speed hits both alike)",
    )
    p.add_argument(
        "--poll",
        type=float,
        default=0.01,
        help="overhead: the client's status poll interval (s); 0: long-poll with ?wait=",
    )
    p.add_argument("--clients", type=_levels, help="throughput: client counts (default 1,4,16,32; quick 1,4)")
    p.add_argument("--min-jobs", type=int, help="throughput: jobs per level at least (default 16, quick 2)")
    p.add_argument(
        "--rounds", type=int, default=8, help="throughput: jobs each client runs in turn, at least (quick 1)"
    )
    p.add_argument(
        "--concurrent-poll",
        type=float,
        default=0.2,
        help="throughput: each status read is held up to this long (s, `?wait=`), as `latentd generate` "
        "does (0.2); 0: up to 30 s",
    )
    p.add_argument("--seconds", type=float, help="frontend: seconds per wrk run (default 10, quick 1)")
    p.add_argument("--connections", type=int, default=16, help="frontend: wrk's open connections")
    p.add_argument(
        "--profile", action="store_true", help="run the processes under py-spy; writes *-profiled.json"
    )
    return p


def _write(out: Path, name: str, data: dict[str, Any]) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps(data, indent=2) + "\n")
    say(f"wrote {path}")
    return path


def _model_info(model: Model) -> dict[str, Any]:
    return {"name": model.name, "kind": model.kind, "directory": str(model.directory)}


def run_service(args: argparse.Namespace, benches: list[str]) -> dict[str, dict[str, Any]]:
    from bench.direct import DirectLoop
    from bench.frontend import frontend, wrk_binary
    from bench.service import Params, overhead, throughput

    quick = args.quick
    params = Params(width=args.size, height=args.size, steps=args.steps or (2 if quick else 20))
    model = choose_model("tiny" if quick and args.model == "auto" else args.model, args.model_dir)
    machine = describe(args.argv)
    suffix = "-profiled" if args.profile else ""
    if args.profile and not py_spy():
        raise SystemExit("--profile needs py-spy (pip install py-spy)")
    if args.profile and len(benches) != 1:
        raise SystemExit(
            "--profile takes one benchmark (overhead, throughput or frontend), so profiles do not mix"
        )
    common = {
        "machine": machine,
        "model": _model_info(model),
        "params": {**params.__dict__, "num_images": 1},
        "torch_threads": args.torch_threads,
        "quick": quick,
        "profiled": args.profile,
        "max_batch_images": args.max_batch_images or "worker default",
        "worker_env": dict(args.worker_env),
    }
    results: dict[str, dict[str, Any]] = {}
    names = {
        "overhead": "overhead" + ("-longpoll" if args.poll <= 0 else ""),
        "throughput": "throughput"
        + (f"-w{args.workers}" if args.workers != 1 else "")
        + (f"-b{args.max_batch_images}" if args.max_batch_images else ""),
    }
    needs_worker = "overhead" in benches or "throughput" in benches
    if "frontend" in benches and not wrk_binary():
        results["frontend"] = {**common, "skipped": "wrk is not installed (apt-get install wrk)"}
        benches = [b for b in benches if b != "frontend"]
    with tempfile.TemporaryDirectory(prefix="latentd-bench-profile-") as prof:
        profile_dir = Path(prof) if args.profile else None
        stack = Stack(
            model,
            workers=args.workers,
            max_batch_images=args.max_batch_images,
            worker_settings=dict(args.worker_env),
            torch_threads=args.torch_threads,
            # Front-end submits go to a model no worker drains; the run's length bounds the queue.
            api_env={"LATENTD_MAX_QUEUE_DEPTH": "1000000"},
            profile_dir=profile_dir,
            start_workers=needs_worker,
        )
        say(
            f"starting redis, {args.workers if needs_worker else 0} worker(s) and the API; model {model.kind}"
        )
        # Started first, so it loads torch and the model while the service starts.
        direct = DirectLoop(model.directory, model.name, args.torch_threads) if needs_worker else None
        try:
            with stack.running():
                say(f"service up at {stack.url}")
                if direct and "overhead" in benches:
                    say("overhead: sequential jobs, direct and service blocks in turn")
                    jobs = args.jobs or (3 if quick else 40)
                    result = overhead(
                        stack.url, model.name, direct, params, jobs, min(args.block, jobs), args.poll
                    )
                    results["overhead"] = {**common, "direct": direct.wait_ready(), "workers": args.workers}
                    results["overhead"]["result"] = result
                if direct and "throughput" in benches:
                    say("throughput: concurrent clients")
                    levels = args.clients or ([1, 4] if quick else [1, 4, 16, 32])
                    min_jobs = args.min_jobs or (2 if quick else 16)
                    result = throughput(
                        stack.url,
                        model.name,
                        direct,
                        params,
                        levels,
                        min_jobs,
                        2 if quick else 5,
                        0.05 if quick else args.concurrent_poll,
                        1 if quick else args.rounds,
                    )
                    results["throughput"] = {**common, "direct": direct.wait_ready(), "workers": args.workers}
                    results["throughput"]["result"] = result
                if "frontend" in benches:
                    say("frontend: wrk on status reads, then submits")
                    result = frontend(
                        stack.url,
                        stack.redis.client(),
                        stack.tmp,
                        args.seconds or (1 if quick else 10),
                        args.connections,
                        20 if quick else 200,
                        params.body(model.name, 1),
                    )
                    results["frontend"] = {**common, "result": result}
                say("stopping the service")
        finally:
            if direct:
                direct.close()
        if profile_dir:
            # The raw stacks stay on disk (ignored by git) for flame graphs: flamegraph.pl or speedscope.
            keep = ROOT / ".latentd" / "bench-profiles"
            keep.mkdir(parents=True, exist_ok=True)
            for raw in profile_dir.glob("*.txt"):
                shutil.copy(raw, keep / f"{'-'.join(benches)}-{raw.name}")
            say(f"raw py-spy stacks in {keep}")
            for name in results:
                results[name]["profile"] = {p.stem: summarize(p) for p in sorted(profile_dir.glob("*.txt"))}
    for name, data in results.items():
        _write(args.out, names.get(name, name) + suffix, {"benchmark": name, **data})
    return results


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else argv
    if args.what == "gpu":
        from bench import gpu_sd15

        return gpu_sd15.main(["--out", str(args.out / "gpu_sd15.json")])
    if args.what != "report":
        run_service(args, list(SERVICE_BENCHES) if args.what == "all" else [args.what])
    if not args.no_docs:
        report.update_docs(args.docs, args.out)
        say(f"updated {args.docs}")
    return 0
