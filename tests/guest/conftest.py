"""Fixtures: guest disks built once per run, and a private work/state dir."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest

from tests.guest import builders
from tests.guest.leaks import assert_clean

needs_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="needs root: loop devices, mounts and FUSE"
)


@pytest.fixture(scope="session")
def gpt_disk(tmp_path_factory: pytest.TempPathFactory) -> builders.BuiltDisk:
    return builders.gpt_ext4_disk(str(tmp_path_factory.mktemp("gpt")))


@pytest.fixture(scope="session")
def mbr_disk(tmp_path_factory: pytest.TempPathFactory) -> builders.BuiltDisk:
    return builders.mbr_xfs_disk(str(tmp_path_factory.mktemp("mbr")))


@pytest.fixture(scope="session")
def whole_disk(tmp_path_factory: pytest.TempPathFactory) -> builders.BuiltDisk:
    return builders.whole_disk_ext4(str(tmp_path_factory.mktemp("whole")))


@pytest.fixture(scope="session")
def lvm_disk(tmp_path_factory: pytest.TempPathFactory) -> builders.BuiltDisk:
    return builders.lvm_disk(str(tmp_path_factory.mktemp("lvm")))


@pytest.fixture
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Where sessions put their private directories; must be empty after."""
    path = str(tmp_path_factory.mktemp("work", numbered=True))
    yield path
    assert_clean(path, path)
    shutil.rmtree(path)


@pytest.fixture
def state_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("state", numbered=True))
