"""Summaries of py-spy's raw (collapsed-stack) profiles: where the samples fell."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")


def _short(frame: str) -> str:
    match = _FRAME.match(frame.strip())
    if not match:
        return frame.strip()
    path = match.group("file")
    for marker in ("site-packages/", "/work/main/", "lib/python3"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{match.group('func')} ({path})"


def summarize(raw: Path, top: int = 15, within: str | None = None) -> dict[str, Any]:
    """Top functions by inclusive and by self samples; `within` keeps only stacks through that function."""
    inclusive: Counter[str] = Counter()
    leaf: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = [_short(f) for f in stack.split(";")]
        if within and not any(within in f for f in frames):
            continue
        n = int(count)
        total += n
        for name in set(frames):
            inclusive[name] += n
        leaf[frames[-1]] += n

    def share(counter: Counter[str]) -> list[dict[str, Any]]:
        return (
            [{"function": k, "share": round(v / total, 3)} for k, v in counter.most_common(top)]
            if total
            else []
        )

    return {"samples": total, "within": within, "inclusive": share(inclusive), "self": share(leaf)}
