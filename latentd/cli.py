"""The `latentd` command: api, worker, up (everything locally) and generate (a client)."""

from __future__ import annotations

import argparse
import contextlib
import gc
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

API_STOP_GRACE = 8  # seconds
# `latentd up` starts a failed worker again at most this often in this many seconds.
WORKER_RESTARTS = 3
WORKER_RESTART_WINDOW = 600


def _stop_at_once_while_starting() -> None:
    """Until the server's or the worker's own signal handlers take over, SIGTERM (and Ctrl-C)
    ends the process at once, exit 0. A container's PID 1 gets only the signals it handles: a
    worker loading its model (imports, a download, a compile warm-up: minutes) ignored a stop,
    and Docker or Kubernetes waited out the whole stop grace before killing it. At once: not by
    SystemExit, which would wait for a hub download's threads to finish their files; before it
    is ready a process has nothing to put away."""

    def stop(signum: int, frame: object) -> None:
        with contextlib.suppress(OSError, ValueError):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(0)

    signal.signal(signal.SIGTERM, stop)
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not one ignored (nohup)
        signal.signal(signal.SIGINT, stop)


def cmd_api(args: argparse.Namespace) -> int:
    import redis
    import uvicorn

    from app.config import get_settings
    from latentd.logs import configure
    from latentd.store import UnsafeRedis, check_eviction_policy

    settings = get_settings()
    configure(settings.log_level)
    _say_unknown_settings("latentd.api")
    probe = redis.Redis.from_url(settings.effective_redis_url, socket_connect_timeout=1.0, socket_timeout=2.0)
    try:  # as the worker does: refuse, in one line, a Redis that may evict jobs
        check_eviction_policy(probe)
    except UnsafeRedis as exc:
        print(f"latentd api: {exc}", file=sys.stderr)
        return 4
    except redis.RedisError:
        pass  # unreachable: the API starts anyway, and /readyz answers 503 until Redis is there
    finally:
        probe.close()
    http: type | str
    try:
        from app.head_limit import BoundedHttpToolsProtocol

        http = BoundedHttpToolsProtocol
    except ImportError:  # no httptools (uvicorn without its `standard` extra): h11 bounds heads itself
        http = "h11"
    if settings.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"latentd api: listening on {settings.host}:{settings.port}", file=sys.stderr)
    uvicorn.run(
        "app.main:create_app",
        factory=True,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=False,
        # Client addresses are never trusted or used (limits key on the API key), so skip
        # uvicorn's X-Forwarded-For handling.
        proxy_headers=False,
        # On SIGTERM held reads answer at once (app.main); a request still open after this is
        # cancelled, inside Docker's default 10 s stop grace (and Kubernetes' 30 s).
        timeout_graceful_shutdown=API_STOP_GRACE,
        workers=args.workers,
        http=http,
        ws="none",
    )
    return 0


def cmd_worker(_: argparse.Namespace) -> int:
    import logging

    from latentd.logs import configure, event
    from worker.config import get_settings

    settings = get_settings()  # a bad setting is named before torch loads (about 5 s)
    configure(settings.log_level)
    if settings.ready_file:  # one a killed worker left (the same container, a reused volume)
        try:  # says ready before the model is loaded; and where it cannot be written, say so now
            settings.ready_file.unlink(missing_ok=True)
            settings.ready_file.parent.mkdir(parents=True, exist_ok=True)
            tempfile.TemporaryFile(dir=settings.ready_file.parent).close()
        except OSError as exc:
            print(f"latentd: invalid configuration: LATENTD_READY_FILE: {exc}", file=sys.stderr)
            return 2
    event(logging.getLogger("latentd.worker"), "worker_starting", model=settings.served_name())
    _say_unknown_settings("latentd.worker")
    # Importing torch, diffusers and transformers and loading the weights make ~450,000 objects that
    # live as long as the process, and few cycles: the collections they set off were a quarter of a
    # worker's start (1 s of 3.8 on 2 cores). Off until the weights are in (`load_runner`).
    gc.disable()
    from worker.main import run

    return run(settings)


def _say_unknown_settings(logger: str) -> None:
    """A LATENTD_* variable no latentd process reads, misspelt most likely: it changed nothing,
    and nothing said so. Those of the other process (the API's in a worker's environment, as a
    compose file's shared block gives them) are no mistake."""
    import difflib
    import logging

    from app.config import ApiSettings
    from latentd.logs import event
    from worker.config import WorkerSettings

    known = {f"LATENTD_{name.upper()}" for name in (*ApiSettings.model_fields, *WorkerSettings.model_fields)}
    known |= {"LATENTD_URL", "LATENTD_API_KEY"}  # `latentd generate`'s
    for name in sorted(os.environ):
        if name.upper().startswith("LATENTD_") and name.upper() not in known:
            close = difflib.get_close_matches(name.upper(), sorted(known), n=1)
            fields = {"did_you_mean": close[0]} if close else {}
            event(logging.getLogger(logger), "unknown_setting", logging.WARNING, variable=name, **fields)


def cmd_up(args: argparse.Namespace) -> int:
    """Embedded Redis (unless LATENTD_REDIS_URL is set), one worker and the API, supervised together."""
    from app.config import ApiSettings
    from latentd.embedded import child_options, lock_data_dir, start_redis, url_file
    from latentd.settings import CommonSettings
    from worker.config import WorkerSettings

    # Every setting is checked before anything starts: a bad one must not leave a Redis behind.
    settings = CommonSettings()
    worker_settings = WorkerSettings()
    host = ApiSettings().host
    data_dir = Path(args.data_dir)
    lock = lock_data_dir(data_dir)
    served = worker_settings.served_name()
    env = dict(os.environ)
    env.setdefault("LATENTD_DEFAULT_MODEL", served)  # requests that name no model get this worker's
    # The worker writes this once its model is loaded: until then a submit is refused
    # (model_unavailable), so say when it is there.
    ready = Path(env.setdefault("LATENTD_READY_FILE", str(data_dir / "worker.ready")))
    ready.unlink(missing_ok=True)  # left by a worker that was killed
    me = [sys.executable, "-m", "latentd.cli"]
    children: list[tuple[str, subprocess.Popen[bytes]]] = []
    signals = 0

    def stop(signum: int, _: Any) -> None:
        nonlocal signals
        signals += 1
        if signals > 1:  # asked again: stop now; a running job goes back to the queue
            for name, proc in children:
                if name != "redis" and proc.poll() is None:
                    proc.kill()

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, stop)
    code = 0
    try:
        if settings.redis_url is None:
            # Redis holds the data directory's lock too: until it has stopped, no other `up` starts.
            redis_proc, url = start_redis(
                data_dir / "redis", port=args.redis_port, pass_fds=(lock.fileno(),), **child_options()
            )
            children.append(("redis", redis_proc))
            env["LATENTD_REDIS_URL"] = url
            url_file(data_dir).write_text(url)
            _say(f"embedded Redis at {url} (data in {data_dir}/redis, AOF on)")
        children.append(("worker", subprocess.Popen([*me, "worker"], env=env, **child_options())))
        children.append(("api", subprocess.Popen([*me, "api"], env=env, **child_options())))
        port = env.get("LATENTD_PORT", "8000")
        wildcard = host in ("0.0.0.0", "::")  # noqa: S104 (compared with, not bound to)
        shown = "127.0.0.1" if wildcard else f"[{host}]" if ":" in host else host
        _say(f"API on http://{shown}:{port} (docs at /docs); Ctrl-C stops")
        _say("the worker is loading its model ...")
        loading = True
        restarts: list[float] = []  # when a worker that had served was started again
        while not signals and not code:
            if loading and ready.exists():
                _say(f"ready: the worker serves model '{served}'")
                loading = False
            for i, (name, proc) in enumerate(children):
                if proc.poll() is None:
                    continue
                # A worker that had served and then failed (a CUDA error: 70; killed by the kernel's
                # OOM killer; RQ quitting) is started again, as a container's restart policy would:
                # its job runs again once its lease lapses. One that never got ready (a bad model,
                # a broken device) or ended as asked (0), or one failing again and again, stops all.
                restarts = [t for t in restarts if time.monotonic() - t < WORKER_RESTART_WINDOW]
                again = name == "worker" and not loading and proc.returncode != 0
                if again and len(restarts) < WORKER_RESTARTS and not signals:
                    restarts.append(time.monotonic())
                    _say(
                        f"worker exited with {proc.returncode}; starting another "
                        f"({len(restarts)} of {WORKER_RESTARTS} in {WORKER_RESTART_WINDOW // 60} min) ..."
                    )
                    ready.unlink(missing_ok=True)  # left by a worker that was killed
                    children[i] = (name, subprocess.Popen([*me, "worker"], env=env, **child_options()))
                    loading = True
                    continue
                _say(f"{name} exited with {proc.returncode}; stopping")
                # killed by a signal: 128 + its number, as a shell reports it; ended of its own: 1
                code = 128 - proc.returncode if proc.returncode < 0 else proc.returncode or 1
                break
            time.sleep(0.2)
    finally:
        if signals:
            _say("stopping (the worker finishes its job; Ctrl-C again to stop now)")
        # API and worker first (the worker finishes its job), Redis last.
        for name, proc in reversed(children):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=worker_settings.shutdown_grace + 30 if name == "worker" else 60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        with contextlib.suppress(OSError):
            url_file(data_dir).unlink(missing_ok=True)
        lock.close()
    return code


def _say(message: str) -> None:
    """A line from `latentd up`. Its terminal may be gone (the hangup that stops it): the line is
    lost then, and the stop goes on."""
    with contextlib.suppress(OSError):
        print(f"latentd up: {message}", file=sys.stderr, flush=True)


def _ranged(low: int, high: int | None = None) -> Any:
    """An argparse type: an integer from `low` to `high`, else argparse's one-line usage error."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
        if value < low or (high is not None and value > high):
            span = f"from {low} to {high}" if high is not None else f"at least {low}"
            raise argparse.ArgumentTypeError(f"{text} is out of range: give an integer {span}")
        return value

    return parse


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def cmd_generate(args: argparse.Namespace) -> int:
    from latentd.client import ClientError, generate

    body: dict[str, Any] = {
        "prompt": args.prompt,
        "num_images": args.num_images,
        "output_format": args.format,
    }
    for field in (
        "negative_prompt",
        "model",
        "width",
        "height",
        "steps",
        "guidance_scale",
        "seed",
        "scheduler",
    ):
        value = getattr(args, field)
        if value is not None:
            body[field] = value
    for field in ("prompt", "negative_prompt"):
        try:
            (getattr(args, field) or "").encode()
        except UnicodeEncodeError:
            print(f"latentd generate: the {field} is not valid UTF-8 text", file=sys.stderr)
            return 2
    try:
        paths = generate(args.url, body, Path(args.out), api_key=os.environ.get("LATENTD_API_KEY"))
    except (ClientError, OSError) as exc:
        print(f"latentd generate: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    for path in paths:
        print(path)
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    import redis

    from latentd.embedded import url_file
    from latentd.settings import CommonSettings, shown_url

    if args.action in ("create", "revoke") and not args.name.strip():
        print(f"latentd keys {args.action}: a NAME is required", file=sys.stderr)
        return 2
    settings = CommonSettings()
    if args.redis_url and args.data_dir is not None:
        print("latentd keys: give --redis-url or --data-dir, not both", file=sys.stderr)
        return 2
    # --data-dir before LATENTD_REDIS_URL: the one on the command line is the one meant.
    url = args.redis_url or (settings.redis_url if args.data_dir is None else None)
    embedded = url_file(Path(args.data_dir or ".latentd"))
    if url is None and embedded.exists():  # `latentd up` is running here: its Redis, on a free port
        url = embedded.read_text().strip()
        print(f"latentd keys: using the embedded Redis of `latentd up` at {url}", file=sys.stderr)
    elif url is None and args.data_dir is not None:  # it went on with another Redis, and said so
        print(
            f"latentd keys: no `latentd up` is running with --data-dir {args.data_dir}; "
            "start it, or give --redis-url",
            file=sys.stderr,
        )
        return 2
    elif url is None:  # say so: a key made in a Redis the API does not use leaves it open
        print(
            f"latentd keys: using {settings.effective_redis_url} (LATENTD_REDIS_URL unset)", file=sys.stderr
        )
    url = url or settings.effective_redis_url
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=5)
    except ValueError as exc:  # a scheme or port redis-py cannot read: it raised a traceback
        print(f"latentd keys: --redis-url {shown_url(url)}: {exc}", file=sys.stderr)
        return 2
    try:
        return _keys(args, client)
    except redis.RedisError as exc:
        print(f"latentd keys: cannot reach Redis at {shown_url(url)}: {exc}", file=sys.stderr)
        return 1


def _keys(args: argparse.Namespace, connection: Any) -> int:
    from latentd import keys

    if args.action == "create":
        try:
            key = keys.create(connection, args.name)
        except ValueError as exc:
            print(f"latentd keys: {exc}", file=sys.stderr)
            return 1
        print(key)
        print(f"key '{args.name}' created; it is shown only this once", file=sys.stderr)
    elif args.action == "revoke":
        if not keys.revoke(connection, args.name):
            print(f"latentd keys: no key named '{args.name}'", file=sys.stderr)
            return 1
        if not keys.list_keys(connection):
            print(
                "no key is left: the API refuses every request until `latentd keys create NAME`, "
                "or `latentd keys open` lets anyone in",
                file=sys.stderr,
            )
    elif args.action == "open":
        if not keys.open_service(connection):
            print("latentd keys: keys exist; revoke them first", file=sys.stderr)
            return 1
        print(
            "within 2 s the API takes requests without a key, unless LATENTD_API_KEYS gives it keys "
            "of its own or LATENTD_REQUIRE_KEYS is true: anyone who reaches it can use it",
            file=sys.stderr,
        )
    else:
        listed = keys.list_keys(connection)
        if not listed:
            if keys.read_required(connection):
                print(
                    "no key in this Redis: the API refuses every request (`latentd keys create NAME`)",
                    file=sys.stderr,
                )
            else:
                print("no key in this Redis: the API takes requests without one", file=sys.stderr)
        for entry in sorted(listed, key=lambda e: float(e.get("created_at") or 0)):
            made = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(float(entry.get("created_at") or 0)))
            print(f"{entry['name']}\t{made} UTC")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="latentd", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    api = sub.add_parser("api", help="run the HTTP API (LATENTD_HOST, LATENTD_PORT)")
    api.add_argument(
        "--workers",
        # 1000 took minutes to start, one process after another, deaf to SIGTERM meanwhile.
        type=_ranged(1, 64),
        default=1,
        help="uvicorn worker processes, 1-64 (each keeps its own HTTP metrics, and /metrics answers "
        "from one)",
    )
    api.set_defaults(func=cmd_api)

    sub.add_parser("worker", help="run one worker serving LATENTD_MODEL").set_defaults(func=cmd_worker)

    up = sub.add_parser("up", help="embedded Redis + one worker + the API, for local use")
    up.add_argument("--data-dir", default=".latentd", help="where the embedded Redis keeps its AOF")
    up.add_argument(
        "--redis-port",
        type=_ranged(1, 65535),
        default=None,
        help="embedded Redis port (a free one by default)",
    )
    up.set_defaults(func=cmd_up)

    keys = sub.add_parser(
        "keys",
        help="API keys: create NAME (prints the key once), list, revoke NAME, "
        "open (no key left: take requests without one again)",
    )
    actions = keys.add_subparsers(dest="action", required=True, metavar="{create,list,revoke,open}")
    # Where to find Redis, given before the action or after it (its default then left alone).
    where = [keys]
    for action, what, named in (
        ("create", "make a key named NAME and print it, once", True),
        ("list", "the keys' names and when they were made (UTC)", False),
        ("revoke", "delete the key named NAME", True),
        ("open", "with no key left, take requests without one again", False),
    ):
        parser_of = actions.add_parser(action, help=what, description=what)
        if named:
            parser_of.add_argument("name", metavar="NAME")
        where.append(parser_of)
    for i, p in enumerate(where):
        keep: dict[str, Any] = {} if i == 0 else {"default": argparse.SUPPRESS}
        p.add_argument(
            "--redis-url",
            help="the Redis the API uses (default: LATENTD_REDIS_URL, else that of a `latentd up` "
            "running with --data-dir, else redis://127.0.0.1:6379/0)",
            **keep,
        )
        p.add_argument(
            "--data-dir",
            help="the data directory of a running `latentd up` (default: .latentd, if one runs there)",
            **({"default": None} | keep),
        )
    keys.set_defaults(func=cmd_keys, name="")

    gen = sub.add_parser(
        "generate",
        help="submit a prompt, show progress, save the images",
        description="Submit a prompt, show its progress, save its images. With API keys on, the key "
        "is read from LATENTD_API_KEY (never from the command line, where other users see it).",
    )
    gen.add_argument("prompt")
    gen.add_argument(
        "--url",
        default=os.environ.get("LATENTD_URL", "http://127.0.0.1:8000"),
        help="the API (default: LATENTD_URL, else http://127.0.0.1:8000)",
    )
    gen.add_argument("--out", default=".", help="directory for the images")
    gen.add_argument("-n", "--num-images", type=int, default=1)
    gen.add_argument("--negative-prompt")
    gen.add_argument("--model")
    gen.add_argument("--width", type=int)
    gen.add_argument("--height", type=int)
    gen.add_argument("--steps", type=int)
    gen.add_argument("--guidance-scale", type=_finite)
    gen.add_argument("--seed", type=int)
    gen.add_argument("--scheduler")
    gen.add_argument("--format", default="png", choices=["png", "jpeg", "webp"])
    gen.set_defaults(func=cmd_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.func in (cmd_api, cmd_worker, cmd_up):
        _stop_at_once_while_starting()  # before any import it could interrupt
    try:
        return _run(args)
    except KeyboardInterrupt:  # Ctrl-C while `keys` or `generate` imports what it needs
        return 130


def _run(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from latentd.embedded import StartError

    try:
        code: int = args.func(args)
        sys.stdout.flush()  # here, where a reader that stopped early is caught
    except ValidationError as exc:  # a bad LATENTD_* value: say which, without a traceback
        for err in exc.errors():
            where = "LATENTD_" + "_".join(str(p) for p in err["loc"]).upper() + ": " if err["loc"] else ""
            message = str(err["msg"]).removeprefix("Value error, ")
            print(f"latentd: invalid configuration: {where}{message}", file=sys.stderr)
        return 2
    except StartError as exc:
        print(f"latentd: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # its reader stopped early (`| head`): stop quietly, as other tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the exit's flush, too
        return 1
    return code


if __name__ == "__main__":
    raise SystemExit(main())
