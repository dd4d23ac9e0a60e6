"""The private places the guest-operation tests run in, checked afterwards.

``env`` (tests/guestdisks.py) serves inspect, offline_fix, boot_repair and
selinux_prep; ``space`` (tests/repairdisks.py) serves fs_repair and
lvm_repair. Either fails the test when a session left anything behind.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import guestdisks, repairdisks


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[guestdisks.OpsEnv]:
    with guestdisks.ops_environment(tmp_path, monkeypatch) as environment:
        yield environment


@pytest.fixture
def space(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[repairdisks.Workspace]:
    with repairdisks.workspace(tmp_path, monkeypatch) as found:
        yield found
