"""Confidence/age keys of the priority sub-stream."""

from __future__ import annotations

import pytest

from recompute_manager.priority import Confidence, PriorityKey


def test_age_buckets_and_partitions() -> None:
    assert PriorityKey.of(Confidence.LOW, 0).age_bucket == 0
    assert PriorityKey.of(Confidence.LOW, 60_000).age_bucket == 1
    assert PriorityKey.of(Confidence.HIGH, 10**12).age_bucket == 3
    assert PriorityKey.of(Confidence.LOW, 0).partition(8) == 0  # most urgent on partition 0
    assert PriorityKey.of(Confidence.MEDIUM, 0).partition(8) == 4
    assert PriorityKey.of(Confidence.HIGH, 0).partition(8) == 0  # rank 8 wraps
    assert PriorityKey.of(Confidence.LOW, 5, (10, 20)).rank(3) == 0
    assert PriorityKey.of(Confidence.MEDIUM, 15, (10, 20)).text() == "confidence=medium;age_bucket=1"
    with pytest.raises(ValueError):
        PriorityKey.of(Confidence.LOW, 0).partition(0)
