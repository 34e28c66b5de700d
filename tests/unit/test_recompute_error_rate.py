"""`acceptable_error_rate` is fed: the manager counts the output records it reads (`OutputIndex`, by
record timestamp, those within the error window) and reports them to each topic's policy as messages
checked (`TopicPolicy.messages_checked(n, now_s, at_s=)`), in the second they were written. Before,
`messages_checked` was never called, so every alert counted as an error rate of 1.0 and
`acceptable_error_rate: 0.99` still recomputed. Without a broker: the policy's window, the index's
counts and the planner stage on stand-ins (tests/unit/test_recompute_batch_planning.py)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fake_messages import Msg
from ledger_support import LEDGER

from recompute_manager.outputs import OutputIndex
from recompute_manager.policy import DEFAULT_ERROR_WINDOW_S, Action, ErrorRateWindow, TopicPolicy
from recompute_manager.progress import KIND_PROGRESS, RECORD_HEADER, Progress
from recompute_manager.service import ManagerSettings, ManagerStats, RecomputeManager
from streamprov.config.models import Criticality, RecomputeSettings, TopicSettings
from streamprov.ledger import LedgerIndex
from streamprov.registry import FunctionRegistry
from validator.alerts import Alert, AlertKind, Evidence


def _alert(data_id: str, offset: int, topic: str = "out") -> Alert:
    return Alert.create(
        AlertKind.CHECKSUM_MISMATCH,
        data_id=data_id,
        topic=topic,
        partition=0,
        offset=offset,
        header=b"\x01\x02junk",  # a plan for it cannot be made: only a refusal avoids a dead letter
        evidence=Evidence("aa", "bb", "probe"),
        criticality=Criticality.HIGH,
        detected_at_ms=1,
    )


# ------------------------------------------------------------------------------------------ policy


def test_checked_messages_count_in_the_second_they_were_checked() -> None:
    w = ErrorRateWindow(300.0)
    w.checked(10, 1000.0, at_s=900.0)  # 100 s ago: in the window until 1200
    w.checked(50, 1000.0, at_s=600.0)  # 400 s ago: already out of it
    w.checked(5, 1000.0)  # now
    w.alert(1000.0)
    assert w.rate(1000.0) == (1 / 15, 1, 15)
    assert w.rate(1199.0)[2] == 15
    assert w.rate(1201.0)[2] == 5  # the 10 of second 900 expired with their second, not 300 s after now


def test_a_policy_with_messages_checked_tolerates_alerts_within_the_rate() -> None:
    p = TopicPolicy("out", RecomputeSettings(acceptable_error_rate=0.5, dedup_window=0))
    p.messages_checked(4, 10.0, at_s=8.0)
    assert p.on_alert(_alert("d1", 1), 10.0).action is Action.ALERT_ONLY  # 1 / 4
    assert p.on_alert(_alert("d2", 2), 10.0).action is Action.ALERT_ONLY  # 2 / 4
    assert p.on_alert(_alert("d3", 3), 10.0, tasks=1).action is Action.RECOMPUTE  # 3 / 4


# ------------------------------------------------------------------------------------- OutputIndex


class _Reader:
    def __init__(self, batches: list[list[Msg]]) -> None:
        self.batches = batches

    def catch_up(self, *, max_wait_s: float = 30.0) -> list[Msg]:
        return self.batches.pop(0) if self.batches else []


def _index(batches: list[list[Msg]]) -> Any:
    """An OutputIndex reading `batches` instead of the topics (no cache)."""
    index: Any = OutputIndex.__new__(OutputIndex)
    index.cache, index.summaries, index.locations, index.headers, index.trace_headers = None, None, {}, {}, {}
    index.mismatched = 0
    index.checked_window_s = DEFAULT_ERROR_WINDOW_S
    index._checked = {}
    index._reader = _Reader(batches)
    return index


def _record(topic: str, at_ms: int, offset: int = 0) -> Msg:
    return Msg(b"v", t=topic, o=offset, ts=(1, at_ms))  # no provenance header: counted, not indexed


def test_the_output_index_counts_every_record_it_reads_per_topic_and_second() -> None:
    now_ms = int(time.time() * 1000)
    index = _index(
        [
            [_record("a", now_ms - 2_000), _record("a", now_ms - 2_000), _record("b", now_ms - 1_000)],
            [_record("a", now_ms - 3_600_000), _record("a", now_ms)],  # an hour old: not counted
        ]
    )
    assert index.catch_up() == 3 and index.catch_up() == 2
    checked = index.take_checked()
    assert {t: sum(c.values()) for t, c in checked.items()} == {"a": 3, "b": 1}
    assert sorted(checked["a"].items()) == [((now_ms - 2_000) // 1000, 2), (now_ms // 1000, 1)]
    assert index.take_checked() == {}  # taken


# ----------------------------------------------------------------------------- the planner stage


class _Outputs:
    def __init__(self, checked: dict[str, dict[int, int]]) -> None:
        self.locations: dict[Any, Any] = {}
        self.checked = checked

    def take_checked(self) -> dict[str, dict[int, int]]:
        out, self.checked = self.checked, {}
        return out


class _Views:
    def __init__(self, index: LedgerIndex, checked: dict[str, dict[int, int]]) -> None:
        self.index, self.lock, self.outputs = index, threading.RLock(), _Outputs(checked)

    def for_planning(self, beat: Callable[[], None] | None = None) -> None:
        pass

    def mark_fresh(self, _plan_id: str) -> None:
        pass


class _Publisher:
    def __init__(self) -> None:
        self.plain: list[Any] = []

    def publish_all(self, _records: Any, *, consumer: Any, offsets: Any, plain: Any) -> None:
        self.plain += plain


def test_the_manager_reports_the_output_records_it_read_as_messages_checked(tmp_path: Path) -> None:
    """4 records of `out` written a second ago, then 3 alerts on it with acceptable_error_rate 0.5:
    1/4 and 2/4 are within the rate (`alert_only`, not planned), 3/4 is above (planned; its header
    names no output: dead-lettered). Before: 1.0 for each, all three planned and dead-lettered."""
    second = int(time.time()) - 1
    with LedgerIndex(tmp_path / "idx", LEDGER) as index:
        m: Any = RecomputeManager.__new__(RecomputeManager)
        m.settings = ManagerSettings(
            kafka={},
            group_id="g",
            alerts_topic="alerts",
            changes_topic="changes",
            tasks_topic="tasks",
            progress_topic="progress",
            dead_letter_topic="dlq",
            ledger_topic="ledger",
            sources=(),
            outputs=("out",),
            state_dir=Path("/nonexistent"),
            topic_settings=lambda _t: TopicSettings(
                recompute=RecomputeSettings(acceptable_error_rate=0.5, dedup_window=0)
            ),
        )
        m.views, m._stats, m._policies = _Views(index, {"out": {second: 4}}), ManagerStats(), {}
        m._stop = threading.Event()
        m.registry = FunctionRegistry()
        m._pending_lock, m._pending, m._publisher, m._consumer = threading.Lock(), set(), _Publisher(), None
        m._held = {}
        m._batch([Msg(_alert(f"d{i}", i).encode(), t="alerts", o=i) for i in range(3)])
    states = [
        Progress.decode(r.value).state
        for r in m._publisher.plain
        if r.topic == "progress" and (RECORD_HEADER, KIND_PROGRESS) in r.headers
    ]
    assert states == ["alert_only", "alert_only"]
    assert [r.topic for r in m._publisher.plain].count("dlq") == 1
    assert m.policy("out").errors.rate(time.monotonic())[1:] == (3, 4)
