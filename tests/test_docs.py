"""The README names every setting the processes read and every error code a client can get."""

import re
from pathlib import Path

from app.config import ApiSettings
from app.main import create_app
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


def readme_errors() -> set[tuple[str, str]]:
    """(status, code) as README's error table pairs them, and its paragraph on the OpenAI route."""
    pairs = set()
    for status, codes in re.findall(r"^\| (\d{3}) \| (`[^|]+)\|", README, flags=re.M):
        pairs |= {(status, code) for code in re.findall(r"`([a-z_]+)`", codes)}
    openai = README[README.index("`POST /v1/images/generations` answers") :].split("\n\n")[0]
    pairs |= {(status, code) for status, code in re.findall(r"`(\d{3}) ([a-z_]+)`", openai)}
    for *codes, status in re.findall(r"`([a-z_]+)`(?: and `([a-z_]+)`)? `(\d{3})`", openai):
        pairs |= {(status, code) for code in codes if code}
    return pairs


def codes_in(description: str) -> set[str]:
    return {code for code in re.findall(r"`([a-z_]+)`", description) if code in set(ErrorCode)}


# What each submit route answers besides its success.
SUBMIT_ERRORS = {
    "400": {"model_unavailable"},
    "401": {"unauthorized"},
    "409": {"idempotency_conflict"},
    "413": {"payload_too_large"},
    "422": {"invalid_request"},
    "429": {"rate_limited", "too_many_jobs", "queue_full"},
    "500": {"internal_error"},
    "503": {"service_unavailable", "model_unavailable"},
}
OPENAI_ERRORS = {
    **SUBMIT_ERRORS,
    "400": {"model_unavailable", "content_policy_violation"},
    "409": {"idempotency_conflict", "canceled"},
    "422": {"invalid_request", "invalid_parameters"},  # the job failed
    "500": {"internal_error", "generation_failed", "worker_lost"},
    "504": {"wait_timeout", "timeout"},
    "507": {"out_of_memory"},
}


def test_each_submit_route_documents_every_error_the_readme_gives_it() -> None:
    readme = readme_errors()
    paths = create_app(ApiSettings()).openapi()["paths"]
    undocumented = []
    for path, errors in (("/v1/generations", SUBMIT_ERRORS), ("/v1/images/generations", OPENAI_ERRORS)):
        responses = paths[path]["post"]["responses"]
        for status, codes in errors.items():
            assert {(status, code) for code in codes} <= readme, f"README does not pair {status} with {codes}"
            documented = codes_in(responses[status]["description"]) if status in responses else set()
            undocumented += [f"{path} {status} {code}" for code in sorted(codes - documented)]
    assert not undocumented, "undocumented: " + ", ".join(undocumented)


def test_each_code_a_route_documents_is_the_readmes_for_that_status() -> None:
    readme = readme_errors()
    for path, operations in create_app(ApiSettings()).openapi()["paths"].items():
        for method, operation in operations.items():
            for status, response in operation["responses"].items():
                stray = {code for code in codes_in(response["description"]) if (status, code) not in readme}
                assert not stray, f"{method.upper()} {path} documents {status} with {stray}"
