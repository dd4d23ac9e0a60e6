"""The state table, capability routing and priority mapping."""

from __future__ import annotations

import pytest

from h2k.capabilities import (
    ORDER,
    queue_for,
    queues_for_worker,
    required_capabilities,
)
from h2k.priority import broker_priority, level
from h2k.states import TERMINAL, TRANSITIONS, JobState, can_transition


def test_terminal_states_are_final() -> None:
    for state in TERMINAL:
        assert TRANSITIONS[state] == frozenset()
    assert TERMINAL == {JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED}


def test_every_non_terminal_state_can_be_cancelled_and_failed() -> None:
    for state in set(JobState) - TERMINAL:
        assert can_transition(state, JobState.CANCELLED)
        assert can_transition(state, JobState.FAILED)


def test_only_running_completes() -> None:
    assert [s for s in JobState if can_transition(s, JobState.COMPLETED)] == [
        JobState.RUNNING
    ]


def test_job_goes_to_queue_of_most_privileged_capability() -> None:
    assert queue_for("convert") == "qemu_img"
    assert queue_for("convert", ["nbd_access"]) == "nbd_access"
    assert queue_for("inspect") == "mount_operations"
    assert queue_for("lvm_repair") == "lvm_tools"
    assert required_capabilities("inspect") == [
        "qemu_img",
        "nbd_access",
        "mount_operations",
    ]


@pytest.mark.parametrize(
    ("held", "queues"),
    [
        (["qemu_img"], ["qemu_img"]),
        (["qemu_img", "mount_operations"], ["qemu_img"]),
        (["nbd_access", "mount_operations"], []),
        (list(ORDER), list(ORDER)),
        (["qemu_img", "nbd_access", "lvm_tools"], ["qemu_img", "nbd_access"]),
    ],
)
def test_worker_consumes_a_queue_only_with_every_lower_capability(
    held: list[str], queues: list[str]
) -> None:
    assert queues_for_worker(held) == queues


def test_priority_levels_keep_order() -> None:
    levels = [level(p) for p in range(101)]
    assert levels == sorted(levels)
    assert level(0) == 0 and level(100) == 9
    assert level(90) > level(50) > level(10)
    with pytest.raises(ValueError):
        level(101)


def test_redis_serves_lower_number_first_rabbitmq_higher() -> None:
    redis_url, amqp_url = "redis://localhost/0", "amqp://guest@localhost//"
    assert broker_priority(90, redis_url) < broker_priority(10, redis_url)
    assert broker_priority(90, amqp_url) > broker_priority(10, amqp_url)


def test_every_runnable_operation_has_a_parameter_schema_and_back() -> None:
    from h2k import operations
    from h2k.capabilities import OPERATION_CAPABILITY
    from h2k.schemas import PARAMETER_SCHEMAS

    assert set(PARAMETER_SCHEMAS) == set(operations.available())
    assert set(operations.available()) <= set(OPERATION_CAPABILITY)
    for name in operations.available():
        assert callable(operations.get(name))
