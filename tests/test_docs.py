"""The README names every setting the processes read and every error code a client can get."""

import re
from pathlib import Path

from app.config import ApiSettings
from latentd.contract import ErrorCode
from worker.config import WorkerSettings

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def test_every_setting_is_documented() -> None:
    documented = set(re.findall(r"^\| `(LATENTD_[A-Z_]+)` \|", README, flags=re.M))
    read = {f"LATENTD_{name.upper()}" for cls in (ApiSettings, WorkerSettings) for name in cls.model_fields}
    assert read - documented == set(), "settings missing from the README"
    assert documented - read == set(), "README documents settings nothing reads"


def test_every_error_code_is_documented() -> None:
    documented = set(re.findall(r"`([a-z_]+)`", README))
    assert {code.value for code in ErrorCode} - documented == set(), "error codes missing from the README"
