"""The job store against a real Redis: atomic transitions, indexes, events."""

from __future__ import annotations

import threading
import uuid

import pytest

from h2k.errors import NotFound, StateError
from h2k.schemas import JobSpecSchema
from h2k.states import JobState
from h2k.store import EventLog, JobStore


@pytest.fixture
def store(redis_client) -> JobStore:
    return JobStore(redis_client, events_maxlen=50)


def make_job(store: JobStore) -> str:
    spec = JobSpecSchema().load(
        {
            "job_id": f"store-{uuid.uuid4().hex[:10]}",
            "operation": "convert",
            "image": {"path": "/data/a.vmdk", "format": "vmdk"},
        }
    )
    store.create(spec, "qemu_img")
    return str(spec["job_id"])


def run_to(store: JobStore, job_id: str, *states: JobState) -> None:
    for state in states:
        store.transition(job_id, state, f"to {state}")


def test_refused_transition_changes_nothing(store: JobStore) -> None:
    job_id = make_job(store)
    with pytest.raises(StateError):
        store.transition(job_id, JobState.COMPLETED, "too early")
    assert store.state(job_id) == JobState.VALIDATED
    assert len(store.history(job_id)) == 2
    with pytest.raises(NotFound):
        store.transition("nope", JobState.QUEUED, "x")


def test_cancel_and_complete_race_has_one_winner(store: JobStore) -> None:
    for _ in range(20):
        job_id = make_job(store)
        run_to(store, job_id, JobState.QUEUED, JobState.ASSIGNED, JobState.RUNNING)
        outcomes: list[str] = []
        barrier = threading.Barrier(2)

        def attempt(
            target: JobState,
            job_id: str = job_id,
            barrier: threading.Barrier = barrier,
            outcomes: list[str] = outcomes,
        ) -> None:
            barrier.wait()
            try:
                store.transition(job_id, target, "race")
                outcomes.append(target)
            except StateError:
                outcomes.append("refused")

        threads = [
            threading.Thread(target=attempt, args=(t,))
            for t in (JobState.CANCELLED, JobState.COMPLETED)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

        assert outcomes.count("refused") == 1
        final = store.state(job_id)
        assert final in outcomes
        assert [h["state"] for h in store.history(job_id)][-1] == final


def test_state_indexes_follow_transitions(store: JobStore, redis_client) -> None:
    job_id = make_job(store)
    run_to(store, job_id, JobState.QUEUED)
    assert redis_client.zscore("h2k:jobs:state:QUEUED", job_id) is not None
    assert redis_client.zscore("h2k:jobs:state:VALIDATED", job_id) is None
    assert redis_client.zscore("h2k:queued:qemu_img", job_id) is not None
    run_to(store, job_id, JobState.ASSIGNED)
    assert redis_client.zscore("h2k:queued:qemu_img", job_id) is None
    assert redis_client.zscore("h2k:jobs:state:ASSIGNED", job_id) is not None


def test_events_after_terminal_are_dropped(store: JobStore, redis_client) -> None:
    job_id = make_job(store)
    run_to(store, job_id, JobState.QUEUED, JobState.ASSIGNED, JobState.RUNNING)
    event = {
        "job_id": job_id,
        "timestamp": "2026-01-01T00:00:00Z",
        "phase": "conversion",
        "percentage": 5,
        "message": "m",
        "details": {},
    }
    assert store.record_event(job_id, event)
    run_to(store, job_id, JobState.COMPLETED)
    assert store.record_event(job_id, event) is None
    log = EventLog(redis_client)
    kinds = [e.type for e in log.after(job_id)]
    assert kinds.count("progress") == 1
    assert kinds[-1] == "state"


def test_event_stream_is_capped(store: JobStore, redis_client) -> None:
    job_id = make_job(store)
    run_to(store, job_id, JobState.QUEUED, JobState.ASSIGNED, JobState.RUNNING)
    for percent in range(500):
        store.record_event(
            job_id,
            {
                "job_id": job_id,
                "timestamp": "2026-01-01T00:00:00Z",
                "phase": "conversion",
                "percentage": percent % 101,
                "message": "m",
                "details": {},
            },
        )
    # MAXLEN ~ trims whole nodes, so a little over the cap may remain.
    assert redis_client.xlen(f"h2k:job:{job_id}:events") < 200


def test_terminal_transition_counts_metrics(store: JobStore, redis_client) -> None:
    before = int(redis_client.hget("h2k:metrics:total", "failed|convert") or 0)
    job_id = make_job(store)
    run_to(
        store,
        job_id,
        JobState.QUEUED,
        JobState.ASSIGNED,
        JobState.RUNNING,
        JobState.FAILED,
    )
    assert int(redis_client.hget("h2k:metrics:total", "failed|convert")) == before + 1
    hist = redis_client.hgetall("h2k:metrics:duration:convert")
    assert int(hist["+Inf"]) >= 1
