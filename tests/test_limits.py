"""`Limits` directly: validation, the read chunk in effect, and the throughput preset."""

from __future__ import annotations

import pytest

import asyncweights as aw

MiB = 1 << 20


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"group_bytes": 0}, "Limits.group_bytes must be at least 1"),
        ({"workers": 0}, "Limits.workers must be at least 1"),
        ({"buffered_groups": -1}, "Limits.buffered_groups must not be negative"),
        ({"max_bytes": -1}, "Limits.max_bytes must not be negative"),
        ({"read_chunk": 0}, "Limits.read_chunk must be at least 1"),
        ({"progress_interval": -0.5}, "Limits.progress_interval must not be negative"),
    ],
)
def test_bad_values_are_refused(changes: dict[str, int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        aw.Limits(**changes)  # type: ignore[arg-type]


def test_read_chunk_in_effect() -> None:
    assert aw.Limits().chunk_bytes == MiB
    assert aw.Limits(priority="throughput").chunk_bytes == 32 * MiB
    assert aw.Limits(read_chunk=4096).chunk_bytes == 4096


def test_throughput_preset() -> None:
    limits = aw.Limits.throughput(max_bytes=10)
    assert (limits.priority, limits.workers, limits.group_bytes) == ("throughput", 4, 64 * MiB)
    # 12 blob files a group: with the process's own descriptors, at most 64 open in a load.
    assert limits.max_open_files == 48
    assert limits.max_bytes == 10
    assert aw.Limits().priority == "responsive"
