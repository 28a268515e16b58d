"""Summaries of py-spy's raw (collapsed-stack) profiles: where the samples fell.

Each sample goes to the category of its deepest frame that matches one (so a socket read under
an RQ call counts as Redis client work, a pydantic call under a route as pydantic).
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")

# (category, substrings of a frame's "function (file)"), most specific first.
CATEGORIES: list[tuple[str, tuple[str, ...]]] = [
    ("PNG encoding (PIL)", ("PIL/", "worker/encode.py")),
    ("torch / diffusers / transformers", ("torch/", "diffusers/", "transformers/", "safetensors/")),
    ("redis client (commands, socket I/O, parsing)", ("redis/",)),
    ("rq (job records, registries, queue)", ("rq/",)),
    ("pydantic (validation, serialisation)", ("pydantic",)),
    ("json", ("json/",)),
    ("prometheus metrics", ("prometheus_client/", "app/metrics.py")),
    ("uvicorn / httptools (HTTP protocol)", ("uvicorn/", "httptools", "h11/")),
    ("fastapi / starlette (routing, dependencies, responses)", ("fastapi/", "starlette/")),
    ("anyio threadpool hand-off", ("anyio/", "concurrent/futures", "threading.py", "queue.py")),
    ("asyncio event loop", ("asyncio/", "uvloop")),
    ("latentd code (app/, worker/, latentd/)", ("app/", "worker/", "latentd/")),
    ("logging", ("logging/",)),
]


def _short(frame: str) -> str:
    match = _FRAME.match(frame.strip())
    if not match:
        return frame.strip()
    path = match.group("file")
    for marker in ("site-packages/", "/work/main/", "lib/python3.11/", "lib/python3"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{match.group('func')} ({path})"


# Leaf frames in which a thread waits rather than computes. py-spy's own idle detection does not
# work on this kernel, so waits are sorted out by where they block.
WAITING: list[tuple[str, tuple[str, ...]]] = [
    ("waiting on Redis replies (socket read)", ("_read_from_socket (",)),
    (
        "idle (thread waits, sleeps, event-loop polling)",
        (
            "Condition.wait (",
            "Event.wait (",
            "Runner.run (asyncio",
            "select (",
            "BaseSelectorEventLoop.",
            "sleep",
        ),
    ),
]


IDLE_PREFIXES = ("idle", "waiting for the next job")


def _category(frames: list[str]) -> str:
    if "_read_from_socket (" in frames[-1] and any("dequeue" in f for f in frames):
        return "waiting for the next job (RQ's blocking dequeue)"
    if "_read_from_socket (" in frames[-1] and any("PubSub" in f for f in frames):
        return "idle (RQ's pub/sub command listener)"
    for name, needles in WAITING:
        if any(n in frames[-1] for n in needles):
            return name
    for frame in reversed(frames):
        for name, needles in CATEGORIES:
            if any(n in frame for n in needles):
                return name
    return "other (interpreter, stdlib)"


def _caller(frames: list[str]) -> str:
    """The deepest frame of ours or of RQ above a Redis call: who asked Redis."""
    for frame in reversed(frames):
        if any(k in frame for k in ("(app/", "(worker/", "(latentd/", "(rq/")):
            return frame
    return "other"


def summarize(raw: Path, top: int = 10) -> dict[str, Any]:
    by_category: Counter[str] = Counter()
    leaf: Counter[str] = Counter()
    redis_callers: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = [_short(f) for f in stack.split(";")]
        n = int(count)
        total += n
        category = _category(frames)
        by_category[category] += n
        leaf[frames[-1]] += n
        if "Redis" in category or "redis" in category:
            redis_callers[_caller(frames)] += n

    def share(counter: Counter[str], limit: int) -> list[dict[str, Any]]:
        if not total:
            return []
        return [{"name": k, "share": round(v / total, 3)} for k, v in counter.most_common(limit)]

    idle = sum(v for k, v in by_category.items() if k.startswith(IDLE_PREFIXES))
    busy = total - idle

    def busy_share() -> list[dict[str, Any]]:
        ranked = [(k, v) for k, v in by_category.most_common() if not k.startswith(IDLE_PREFIXES)]
        return [{"name": k, "share": round(v / busy, 3)} for k, v in ranked] if busy else []

    return {
        "samples": total,
        "idle_share": round(idle / total, 3) if total else 0.0,
        "categories": share(by_category, len(CATEGORIES) + 4),
        "busy_categories": busy_share(),
        "self": share(leaf, top),
        "redis_by_caller": share(redis_callers, 6),
    }
