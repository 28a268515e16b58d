"""`latentd generate`: a small HTTP client that submits, shows progress and saves the images."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import httpx

EXTENSIONS = {"image/png": "png", "image/jpeg": "jpg", "image/webp": "webp"}


class ClientError(RuntimeError):
    pass


def _check(response: httpx.Response) -> dict[str, Any]:
    if response.status_code >= 400:
        try:
            err = response.json()["error"]
            detail = f"{err['code']}: {err['message']}"
        except Exception:
            detail = response.text[:200]
        raise ClientError(f"HTTP {response.status_code} {detail}")
    body: dict[str, Any] = response.json()
    return body


def _bar(fraction: float, width: int = 30) -> str:
    filled = round(fraction * width)
    return "[" + "#" * filled + "-" * (width - filled) + f"] {fraction * 100:5.1f}%"


def generate(
    base_url: str, body: dict[str, Any], out_dir: Path, poll: float = 0.2, api_key: str | None = None
) -> list[Path]:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        with httpx.Client(base_url=base_url, headers=headers, timeout=30) as http:
            return _generate(http, body, out_dir, poll)
    except httpx.HTTPError as exc:
        raise ClientError(f"cannot talk to {base_url}: {type(exc).__name__}: {exc}") from None


def _generate(http: httpx.Client, body: dict[str, Any], out_dir: Path, poll: float) -> list[Path]:
    job = _check(http.post("/v1/generations", json=body))
    job_id = job["id"]
    print(f"submitted {job_id}", file=sys.stderr)
    try:
        return _follow(http, job_id, out_dir, poll)
    except KeyboardInterrupt:  # Ctrl-C: the job is no longer wanted
        canceled = http.post(f"/v1/generations/{job_id}/cancel").status_code in (200, 202)
        outcome = "canceled" if canceled else "left as it was"
        print(f"\ninterrupted: generation {job_id} {outcome}", file=sys.stderr)
        raise


def _follow(http: httpx.Client, job_id: str, out_dir: Path, poll: float) -> list[Path]:
    while True:
        # A held read: answered as soon as the generation ends, else after `poll` seconds with
        # its progress then, so the bar moves and the end is seen at once.
        view = _check(http.get(f"/v1/generations/{job_id}", params={"wait": poll}))
        status = view["status"]
        if status == "queued":
            msg = f"queued (position {view.get('queue_position')})"
        else:
            msg = f"{status} {_bar(view['progress']['fraction'])}"
        print(f"\r{msg:60s}", end="", file=sys.stderr, flush=True)
        if status in ("succeeded", "failed", "canceled"):
            print(file=sys.stderr)
            break
    if status != "succeeded":
        err = view.get("error") or {}
        raise ClientError(f"generation {status}: {err.get('code', '')} {err.get('message', '')}".strip())
    paths = []
    for image in view["images"]:
        response = http.get(image["url"])
        if response.status_code != 200:
            _check(response)
        ext = EXTENSIONS.get(image["content_type"], "bin")
        path = out_dir / f"{job_id}-{image['index']}.{ext}"
        path.write_bytes(response.content)
        paths.append(path)
    return paths
