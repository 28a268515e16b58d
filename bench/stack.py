"""The service under test: a redis-server of its own, worker processes and one API process.

It starts them exactly as the integration tests do (`tests/conftest.py`), optionally under
py-spy so a run can say where the time went.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

import tests.conftest as fixtures
from bench.machine import ROOT
from tests.conftest import Proc, RedisServer, base_env, start_api, start_worker

BUILTIN_DIR = ROOT / "worker" / "builtin" / "model"
TINY_CACHE = Path(os.path.expanduser("~/.cache/latentd")) / "tiny-random"


@dataclass(frozen=True)
class Model:
    directory: Path
    name: str
    kind: str  # "builtin", "tiny" or "path"


def choose_model(spec: str, model_dir: Path | None = None) -> Model:
    """`auto`: the trained built-in model when it is there, else the tiny random one (as the worker does)."""
    if model_dir is not None:
        return Model(model_dir, model_dir.resolve().name, "path")
    if spec == "builtin" or (spec == "auto" and (BUILTIN_DIR / "model_index.json").exists()):
        if not (BUILTIN_DIR / "model_index.json").exists():
            raise SystemExit(f"no trained built-in model in {BUILTIN_DIR}")
        return Model(BUILTIN_DIR, "builtin", "builtin")
    if not (TINY_CACHE / "model_index.json").exists():
        # In a child, so the harness itself never imports torch.
        code = f"import pathlib, worker.tiny as t; t.build_tiny_pipeline(pathlib.Path({str(TINY_CACHE)!r}))"
        subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, capture_output=True)
    return Model(TINY_CACHE, "tiny", "tiny")


def py_spy() -> str | None:
    found = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    return found if Path(found).exists() else None


def _spawn_under_py_spy(profile_dir: Path) -> Any:
    """A stand-in for `tests.conftest.spawn` that runs the process as py-spy's child.

    py-spy here cannot attach to a running process, only start one; it writes its raw
    (collapsed-stack) profile when the child exits.
    """
    binary = py_spy()
    assert binary, "py-spy is not installed (pip install py-spy)"

    def spawn(args: list[str], env: dict[str, str], log: Path) -> Proc:
        handle = log.open("wb")
        out = profile_dir / f"{log.stem}.txt"
        command = [binary, "record", "--format", "raw", "--rate", "200", "-o", str(out)]
        if args[0] == "api":
            # The API's cost is interpreter time: count only samples that hold the GIL.
            command.append("--gil")
        proc = subprocess.Popen(
            [*command, "--", sys.executable, "-m", "latentd.cli", *args],
            env=env,
            stdout=handle,
            stderr=handle,
            cwd=ROOT,
        )
        return Proc(proc, log)

    return spawn


def stop_profiled(proc: Proc, timeout: float = 30) -> None:
    """Stop py-spy's child first (SIGTERM, the worker's graceful stop), so py-spy writes its profile."""
    children = Path(f"/proc/{proc.proc.pid}/task/{proc.proc.pid}/children")
    with contextlib.suppress(OSError):
        for pid in children.read_text().split():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGTERM)
    try:
        proc.proc.wait(timeout)
    except subprocess.TimeoutExpired:
        # py-spy writes its profile on Ctrl-C (and ends its child); SIGTERM would lose it.
        proc.proc.send_signal(signal.SIGINT)
        try:
            proc.proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.stop(5)


@dataclass
class Stack:
    model: Model
    workers: int = 1
    # LATENTD_MAX_BATCH_IMAGES for the workers (micro-batching); None: the worker's default.
    max_batch_images: int | None = None
    # Any other LATENTD_ settings for the workers (A/B runs).
    worker_settings: dict[str, str] = field(default_factory=dict)
    torch_threads: int = 1
    api_env: dict[str, str] = field(default_factory=dict)
    profile_dir: Path | None = None
    start_workers: bool = True
    redis: RedisServer = field(init=False)
    url: str = field(init=False, default="")
    procs: list[Proc] = field(init=False, default_factory=list)
    tmp: Path = field(init=False)

    @property
    def env(self) -> dict[str, str]:
        return base_env(self.redis.url)

    def worker_env(self) -> dict[str, str]:
        return (
            {
                "LATENTD_MODEL_NAME": self.model.name,
                "LATENTD_TORCH_THREADS": str(self.torch_threads),
                "LATENTD_HEARTBEAT_INTERVAL": "2",
            }
            | ({"LATENTD_MAX_BATCH_IMAGES": str(self.max_batch_images)} if self.max_batch_images else {})
            | self.worker_settings
        )

    @contextlib.contextmanager
    def running(self) -> Iterator[Stack]:
        with tempfile.TemporaryDirectory(prefix="latentd-bench-") as tmp:
            self.tmp = Path(tmp)
            self.redis = RedisServer(self.tmp / "redis")
            self.redis.start()
            patch = (
                mock.patch.object(fixtures, "spawn", _spawn_under_py_spy(self.profile_dir))
                if self.profile_dir
                else contextlib.nullcontext()
            )
            try:
                with patch, ThreadPoolExecutor() as pool:
                    # Workers and the API start at once: each waits only for its own readiness.
                    workers = [
                        pool.submit(
                            start_worker,
                            self.redis.url,
                            self.model.directory,
                            self.tmp,
                            f"w{i}",
                            **self.worker_env(),
                        )
                        for i in range(self.workers if self.start_workers else 0)
                    ]
                    api = pool.submit(
                        start_api,
                        self.redis.url,
                        self.tmp,
                        LATENTD_DEFAULT_MODEL=self.model.name,
                        LATENTD_LOG_LEVEL="warning",
                        **self.api_env,
                    )
                    failures: list[BaseException] = []
                    for worker in workers:
                        try:
                            self.procs.append(worker.result())
                        except BaseException as exc:  # what did start is stopped below
                            failures.append(exc)
                    try:
                        api_proc, self.url = api.result()
                        self.procs.append(api_proc)
                    except BaseException as exc:
                        failures.append(exc)
                    if failures:
                        raise failures[0]
                yield self
            finally:
                # In parallel: a worker's graceful stop takes a moment, and they need not queue up.
                with ThreadPoolExecutor() as pool:
                    list(pool.map(stop_profiled if self.profile_dir else Proc.stop, self.procs))
                self.procs.clear()
                self.redis.stop()
