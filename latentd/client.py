"""`latentd generate`: a small HTTP client that submits, shows progress and saves the images."""

from __future__ import annotations

import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

from latentd import keys

EXTENSIONS = {"image/png": "png", "image/jpeg": "jpg", "image/webp": "webp"}
# How long a read of a queued job is held (its end still answers at once).
QUEUED_POLL_S = 2.0


class ClientError(RuntimeError):
    pass


# A 429 or 503 says "later", with Retry-After: the client waits and asks again, this long at most.
PATIENCE_S = 600.0


def _send(
    http: httpx.Client, method: str, url: str, unreachable_too: bool = False, **kwargs: Any
) -> httpx.Response:
    """The request, asked again while the service answers 429 or 503 (rate limit, full queue,
    Redis away), as long as `PATIENCE_S` allows. With `unreachable_too` (reads of a job already
    submitted), also while the API cannot be reached: one restarting, or one of its replicas
    going away in a rollout. A first request that cannot connect fails at once (a wrong --url)."""
    deadline = time.monotonic() + PATIENCE_S
    while True:
        try:
            response = http.request(method, url, **kwargs)
        except httpx.TransportError as exc:
            if not unreachable_too or time.monotonic() > deadline:
                raise
            why, pause = f"{type(exc).__name__}", 1.0
        else:
            if response.status_code not in (429, 503) or time.monotonic() > deadline:
                return response
            retry_after = response.headers.get("retry-after", "")
            why = f"HTTP {response.status_code}"
            pause = min(30.0, float(retry_after)) if retry_after.isdigit() else 1.0
        print(f"\r{f'{why}: waiting {pause:.0f} s':60s}", end="", file=sys.stderr, flush=True)
        time.sleep(pause)


def _check(response: httpx.Response) -> dict[str, Any]:
    """The reply's JSON object; ClientError for an error, or for a reply that is not the service's."""
    if response.status_code >= 400:
        try:
            err = response.json()["error"]
            detail = f"{err['code']}: {err['message']}"
        except Exception:
            detail = response.text[:200]
        if response.status_code == 401:  # the one place a `latentd generate` user can give a key
            sent = "Authorization" in response.request.headers
            detail += "; check LATENTD_API_KEY" if sent else "; set LATENTD_API_KEY to an API key"
        raise ClientError(f"HTTP {response.status_code} {detail}")
    try:
        body = response.json() if 200 <= response.status_code < 300 else None
    except ValueError:
        body = None
    if not isinstance(body, dict):
        kind = response.headers.get("content-type", "no content type")
        raise ClientError(
            f"unexpected reply from {response.request.url} (HTTP {response.status_code}, {kind}): "
            f"{response.text[:100]!r}; is --url a latentd API?"
        )
    return body


def _bar(fraction: float, width: int = 30) -> str:
    filled = round(fraction * width)
    return "[" + "#" * filled + "-" * (width - filled) + f"] {fraction * 100:5.1f}%"


def generate(
    base_url: str, body: dict[str, Any], out_dir: Path, poll: float = 0.2, api_key: str | None = None
) -> list[Path]:
    api_key = (api_key or "").strip()  # a key read from a file keeps its newline
    if api_key and not keys.KEY_CHARS.fullmatch(api_key):  # never echoed: httpx's error quoted it
        raise ClientError(
            "LATENTD_API_KEY holds a character no key has (a space inside, or one outside ASCII)"
        )
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        with httpx.Client(base_url=base_url, headers=headers, timeout=30) as http:
            return _generate(http, body, out_dir, poll)
    except httpx.InvalidURL as exc:
        raise ClientError(f"invalid URL {base_url!r}: {exc}") from None
    except httpx.HTTPError as exc:
        raise ClientError(f"cannot talk to {base_url}: {type(exc).__name__}: {exc}") from None


def _generate(http: httpx.Client, body: dict[str, Any], out_dir: Path, poll: float) -> list[Path]:
    # The key makes the submit safe to send again (after a 503, say): one job, whatever happens.
    key = {"Idempotency-Key": uuid.uuid4().hex}
    job = _check(_send(http, "POST", "/v1/generations", json=body, headers=key))
    job_id = job.get("id")
    if not isinstance(job_id, str):
        raise ClientError(f"unexpected reply to the submit: {str(job)[:100]}; is --url a latentd API?")
    print(f"submitted {job_id}", file=sys.stderr)
    try:
        return _follow(http, job_id, out_dir, poll)
    except httpx.HTTPError as exc:  # say which job goes on without us
        raise ClientError(
            f"cannot talk to {http.base_url}: {type(exc).__name__}: {exc} (generation {job_id} goes on: "
            f"GET /v1/generations/{job_id})"
        ) from None
    except KeyboardInterrupt:  # Ctrl-C: the job is no longer wanted
        try:
            canceled = http.post(f"/v1/generations/{job_id}/cancel").status_code in (200, 202)
        except httpx.HTTPError:  # the API it was waiting for is still away
            canceled = False
        outcome = "canceled" if canceled else "left as it was"
        print(f"\ninterrupted: generation {job_id} {outcome}", file=sys.stderr)
        raise


def _follow(http: httpx.Client, job_id: str, out_dir: Path, poll: float) -> list[Path]:
    status = "queued"
    while True:
        # A held read: answered as soon as the generation ends, else after a while with its
        # progress then, so the bar moves and the end is seen at once. A queued job has no
        # progress to show: asked less often, it spends less of the key's rate limit.
        wait = max(poll, QUEUED_POLL_S) if status == "queued" else poll
        try:
            reply = _send(
                http, "GET", f"/v1/generations/{job_id}", unreachable_too=True, params={"wait": wait}
            )
            view = _check(reply)
            status = view["status"]
        except ClientError as exc:
            raise ClientError(f"{exc} (generation {job_id}: GET /v1/generations/{job_id})") from None
        if status == "queued":
            msg = f"queued (position {view.get('queue_position')})"
        else:
            msg = f"{status} {_bar(view['progress']['fraction'])}"
        print(f"\r{msg:60s}", end="", file=sys.stderr, flush=True)
        if status in ("succeeded", "failed", "canceled"):
            print(file=sys.stderr)
            break
    for warning in view.get("warnings", []):
        print(f"warning: {warning}", file=sys.stderr)
    if status != "succeeded":
        err = view.get("error") or {}
        raise ClientError(f"generation {status}: {err.get('code', '')} {err.get('message', '')}".strip())
    paths = []
    for image in view["images"]:
        response = _send(http, "GET", image["url"], unreachable_too=True)
        if response.status_code != 200:
            _check(response)
        ext = EXTENSIONS.get(image["content_type"], "bin")
        path = out_dir / f"{job_id}-{image['index']}.{ext}"
        partial = path.with_name(path.name + ".part")  # never a torn image under the real name
        partial.write_bytes(response.content)
        partial.replace(path)
        paths.append(path)
        if image.get("withheld"):
            print(f"{path}: withheld by the model's safety checker (the image is black)", file=sys.stderr)
    return paths
