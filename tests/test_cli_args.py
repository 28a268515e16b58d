"""Arguments and settings a user can get wrong are refused in one line, before anything starts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import redis
from pydantic import ValidationError

from app.config import ApiSettings
from latentd.cli import build_parser, main
from tests.conftest import PRIVATE_DB, RedisServer, start_api, start_worker


@pytest.mark.parametrize("port", ["99999", "65536", "-5"])
def test_up_refuses_a_redis_port_out_of_range(port: str, capsys: pytest.CaptureFixture[str]) -> None:
    # These reached redis-server, whose config error and a Python traceback were all `up` said.
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["up", "--redis-port", port])
    assert exit_.value.code == 2
    assert "--redis-port" in capsys.readouterr().err


def test_up_takes_a_redis_port_in_range() -> None:
    assert build_parser().parse_args(["up", "--redis-port", "7653"]).redis_port == 7653


@pytest.mark.parametrize("workers", ["0", "-1", "65"])
def test_api_refuses_fewer_than_one_worker_process(workers: str, capsys: pytest.CaptureFixture[str]) -> None:
    # Taken silently, and served as one.
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["api", "--workers", workers])
    assert exit_.value.code == 2
    assert "--workers" in capsys.readouterr().err


@pytest.mark.parametrize("url", ["notaurl", "images.example.com", "ftp://example.com", "http://"])
def test_public_url_must_be_an_http_url(url: str) -> None:
    # Taken, and every OpenAI `url` answer then began with it: a link no client can follow.
    with pytest.raises(ValidationError, match="public_url"):
        ApiSettings(public_url=url)


@pytest.mark.parametrize("url", ["https://images.example.com", "http://10.0.0.5:8000/latentd/"])
def test_public_url_takes_an_http_url(url: str) -> None:
    assert ApiSettings(public_url=url).public_url == url


@pytest.mark.parametrize("url", ["foo", "http://127.0.0.1:6379/0", "redis://127.0.0.1:99999/0"])
def test_keys_says_when_its_redis_url_is_malformed(
    url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # redis-py's ValueError came out as a traceback.
    assert main(["keys", "list", "--redis-url", url]) == 2
    err = capsys.readouterr().err
    assert "--redis-url" in err and "Traceback" not in err


@pytest.mark.parametrize("url", ["redis://127.0.0.1:99999/0", "redis://127.0.0.1:port/0"])
def test_a_redis_url_whose_port_cannot_be_read_is_a_bad_setting(url: str) -> None:
    # It passed, and `latentd api` then died with redis-py's traceback, exit 1.
    with pytest.raises(ValidationError, match="redis_url"):
        ApiSettings(redis_url=url)


def test_keys_with_a_data_dir_where_no_up_runs_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # It went on with the default Redis: a key made there leaves the API it meant open.
    for redis_url in (None, "redis://127.0.0.1:6379/0"):  # the one on the command line is meant
        if redis_url is None:
            monkeypatch.delenv("LATENTD_REDIS_URL", raising=False)
        else:
            monkeypatch.setenv("LATENTD_REDIS_URL", redis_url)
        assert main(["keys", "list", "--data-dir", str(tmp_path / "elsewhere")]) == 2
        err = capsys.readouterr().err
        assert "no `latentd up` is running with --data-dir" in err and "--redis-url" in err
    both = ["keys", "list", "--data-dir", str(tmp_path), "--redis-url", "redis://127.0.0.1:6379/0"]
    assert main(both) == 2 and "not both" in capsys.readouterr().err


def test_keys_list_says_when_there_is_no_key(
    redis_server: RedisServer, redis_client: redis.Redis, capsys: pytest.CaptureFixture[str]
) -> None:
    # It printed nothing at all. (`redis_client`: the database flushed.)
    url = redis_server.url_for(PRIVATE_DB)
    assert main(["keys", "list", "--redis-url", url]) == 0
    out = capsys.readouterr()
    assert out.out == "" and "no key in this Redis: the API takes requests without one" in out.err


def test_python_m_latentd_is_the_latentd_command() -> None:
    # "No module named latentd.__main__".
    done = subprocess.run(
        [sys.executable, "-m", "latentd", "--help"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0 and "usage: latentd" in done.stdout, done.stderr


def test_a_misspelt_setting_is_named_as_the_api_and_a_worker_start(
    redis_server: RedisServer, tmp_path: Path, tiny_model_dir: Path
) -> None:
    # It changed nothing, and nothing said so. The other process's settings (a compose file's
    # shared block gives both every one) are no mistake.
    api, _ = start_api(redis_server.url, tmp_path, LATENTD_MAX_PIXLES="4096", LATENTD_MODEL="builtin")
    api.stop()
    worker = start_worker(
        redis_server.url,
        tiny_model_dir,
        tmp_path,
        name="misspelt",  # the session's Redis may hold another test's live `w1`
        LATENTD_LEESE_SECONDS="5",
        LATENTD_MAX_PIXELS="4096",
    )
    worker.stop()
    for said, named in (
        (api.output(), "MAX_PIXLES did_you_mean=LATENTD_MAX_PIXELS"),
        (worker.output(), "LEESE_SECONDS did_you_mean=LATENTD_LEASE_SECONDS"),
    ):
        assert f"unknown_setting variable=LATENTD_{named}" in said and said.count("unknown_setting") == 1, (
            said
        )
