"""A property-based fuzz of the whole API from its own OpenAPI schema (schemathesis), over
HTTP against a real API process: no 5xx, and every response matches the documented schema."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import RedisServer, start_api, start_worker

pytestmark = pytest.mark.integration


@pytest.fixture
def fuzz_target(tmp_path: Path, tiny_model_dir: Path) -> Iterator[str]:
    """The API and a worker, limited so that every job the fuzz gets accepted is small
    (64x64, one image, a few steps): accepted jobs run and end while the fuzz goes on."""
    server = RedisServer(tmp_path / "redis")
    server.start()
    worker = start_worker(server.url, tiny_model_dir, tmp_path)
    api, url = start_api(
        server.url,
        tmp_path,
        LATENTD_MAX_PIXELS=str(64 * 64),
        LATENTD_MAX_IMAGES="1",
        LATENTD_DEFAULT_STEPS="2",
        LATENTD_MAX_WORK=str(64 * 64 * 10),
        LATENTD_SYNC_TIMEOUT="60",
    )
    try:
        yield url
    finally:
        api.stop()
        worker.stop()
        server.stop()
    assert "Traceback" not in api.output()


def test_schemathesis_finds_no_server_error_and_no_schema_violation(fuzz_target: str, tmp_path: Path) -> None:
    st = shutil.which("st", path=str(Path(sys.executable).parent))
    assert st, "schemathesis is a dev dependency"
    result = subprocess.run(
        [
            st, "run", f"{fuzz_target}/openapi.json",
            "--checks", "not_a_server_error,response_schema_conformance,status_code_conformance,"
            "content_type_conformance,response_headers_conformance",
            "--phases", "coverage,fuzzing",
            "--max-examples", "15",
            "--seed", "1",
            "--request-timeout", "20",
        ],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert "❌" not in result.stdout and " passed" in result.stdout
