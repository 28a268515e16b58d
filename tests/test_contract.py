import pytest

from latentd.contract import MAX_SEED, JobPayload, JobStatus


@pytest.mark.parametrize(
    ("status", "terminal"),
    [("queued", False), ("running", False), ("succeeded", True), ("failed", True), ("canceled", True)],
)
def test_terminal_statuses(status: str, terminal: bool) -> None:
    assert JobStatus(status).is_terminal() is terminal


@pytest.mark.parametrize(
    ("rq", "ours"),
    [
        ("queued", "queued"),
        ("started", "running"),
        ("finished", "succeeded"),
        ("failed", "failed"),
        ("stopped", "canceled"),
        ("canceled", "canceled"),
    ],
)
def test_rq_status_mapping(rq: str, ours: str) -> None:
    assert JobStatus.from_rq(rq) is JobStatus(ours)


def test_image_seeds_wrap_around() -> None:
    payload = JobPayload(
        job_id="j",
        model="m",
        prompt="p",
        width=64,
        height=64,
        steps=1,
        guidance_scale=1,
        seed=MAX_SEED,
        num_images=2,
    )
    assert [payload.image_seed(i) for i in range(2)] == [MAX_SEED, 0]


def test_payload_round_trips_as_json() -> None:
    payload = JobPayload(
        job_id="j",
        model="m",
        prompt="p",
        width=64,
        height=64,
        steps=1,
        guidance_scale=1,
        seed=1,
        num_images=1,
    )
    assert JobPayload.model_validate_json(payload.model_dump_json()) == payload
    assert payload.schema_version == 1


def test_a_job_status_is_one_of_the_five_a_job_can_have() -> None:
    # Error codes once leaked into this enum, and so into the OpenAPI schema's status values.
    assert [s.value for s in JobStatus] == ["queued", "running", "succeeded", "failed", "canceled"]
