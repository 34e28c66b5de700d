"""The Recompute Manager's planner stage on one consumed batch of change events, without a broker: the
batch is traversed in the ledger ONCE (`ManagerStats.ledger_plans`) whatever the policy decides for
each event, every event is decided, planned or dead-lettered, and every offset is committed with the
records. The manager's Kafka side (consumer, transactional publisher, views) is replaced by stand-ins;
the ledger index, planner, policy and unit encoding are the real ones. Kafka tests:
tests/integration/test_recompute_service.py."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from fake_messages import Msg
from ledger_support import CTX, LEDGER, build, node, pipeline

from recompute_manager import service as service_module
from recompute_manager.planner import plan_for_changes
from recompute_manager.progress import KIND_PENDING, KIND_PROGRESS, RECORD_HEADER, Progress
from recompute_manager.service import ManagerSettings, ManagerStats, RecomputeManager
from recompute_manager.units import RecomputeUnit
from streamprov.agents.dead_letter import ERROR_HEADER
from streamprov.changes.event import EMPTY_IMPACT, ChangeEvent, ChangeKind, FunctionChange, SourceChange
from streamprov.config.models import Criticality, RecomputeSettings, TopicSettings
from streamprov.ledger import Application, LedgerIndex
from streamprov.registry import FunctionRegistry
from validator.alerts import Alert, AlertKind, Evidence


class _Outputs:
    def __init__(self) -> None:
        self.locations: dict[Any, Any] = {}

    def take_checked(self) -> dict[str, dict[int, int]]:
        return {}


class _Views:
    def __init__(self, index: LedgerIndex) -> None:
        self.index, self.lock, self.outputs = index, threading.RLock(), _Outputs()

    def for_planning(self, beat: Callable[[], None] | None = None) -> None:
        pass

    @property
    def locations(self) -> Any:
        return self.outputs.locations

    def mark_fresh(self, _plan_id: str) -> None:
        pass


class _Publisher:
    def __init__(self) -> None:
        self.calls: list[tuple[list[Any], list[Any]]] = []

    def publish_all(self, _records: Any, *, consumer: Any, offsets: Any, plain: Any) -> None:
        self.calls.append((list(offsets), list(plain)))


class _Consumer:
    """What the planner asks of its consumer besides consuming: holding a partition back."""

    def __init__(self) -> None:
        self.paused: list[tuple[str, int]] = []
        self.resumed: list[tuple[str, int]] = []
        self.seeks: list[tuple[str, int, int]] = []

    def pause(self, tps: list[Any]) -> None:
        self.paused += [(tp.topic, tp.partition) for tp in tps]

    def resume(self, tps: list[Any]) -> None:
        self.resumed += [(tp.topic, tp.partition) for tp in tps]

    def seek(self, tp: Any) -> None:
        self.seeks.append((tp.topic, tp.partition, tp.offset))


@pytest.fixture
def index(tmp_path: Path) -> Iterator[LedgerIndex]:
    apps = pipeline(2, chain_len=2, fan_in=3)
    apps.append(Application.of_source(node("g0-s1", "v1"), timestamp_ms=2, device_id="src", context=CTX))
    with LedgerIndex(tmp_path / "idx", LEDGER) as idx:
        idx.catch_up(build(apps))
        yield idx


def _manager(
    index: LedgerIndex,
    recompute: RecomputeSettings,
    *,
    stopping: bool = False,
    settings_of: Callable[[str], RecomputeSettings] | None = None,
) -> Any:
    """A RecomputeManager whose planner stage runs on stand-ins (no broker); `settings_of`: each
    topic's settings (default: `recompute` for all)."""
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
        outputs=(),
        state_dir=Path("/nonexistent"),
        topic_settings=lambda t: TopicSettings(recompute=settings_of(t) if settings_of else recompute),
    )
    m.views, m._stats, m._policies, m._stop = _Views(index), ManagerStats(), {}, threading.Event()
    m.registry = FunctionRegistry()  # no function registered: a function change cannot run here
    m._pending_lock, m._pending, m._publisher, m._consumer = (
        threading.Lock(),
        set(),
        _Publisher(),
        _Consumer(),
    )
    m._held = {}
    if stopping:
        m._stop.set()
    return m


def _change(data_id: str, old: str, new: str, offset: int, topic: str = "src") -> ChangeEvent:
    sc = SourceChange(topic, 0, offset, data_id, node(data_id, old).checksum, node(data_id, new).checksum)
    return ChangeEvent.for_source(ChangeKind.SOURCE_CHANGED, sc, EMPTY_IMPACT, 5)


def _consume(m: Any, values: list[bytes]) -> tuple[dict[str, int], list[Any], list[Any]]:
    """One batch through `_batch`: (committed offsets by topic, records published, units on the tasks
    topic)."""
    m._batch([Msg(v, t="changes", o=i) for i, v in enumerate(values)])
    [(offsets, plain)] = m._publisher.calls
    units = [RecomputeUnit.decode(r.value) for r in plain if r.topic == "tasks"]
    return {o.topic: o.offset for o in offsets}, plain, units


A, B = _change("g0-s0", "v0", "v9", 1), _change("g0-s2", "v0", "v8", 2)
C = _change("g0-s0", "v0", "v9", 3)  # A again (the same version): a duplicate within the dedup window


def test_all_run_one_traversal_and_the_batch_plan_is_published(index: LedgerIndex) -> None:
    m = _manager(index, RecomputeSettings())
    offsets, _plain, units = _consume(m, [A.encode(), B.encode()])
    assert m._stats.ledger_plans == 1 and m._stats.decisions == {"planned": 2}
    assert offsets == {"changes": 2}
    together = plan_for_changes(index, [A, B])
    assert {u.plan_id for u in units} == {together.plan_id}
    assert sorted(t.task_id for u in units for t in u.tasks) == sorted(t.task_id for t in together.tasks)


def test_each_unit_of_a_batch_plan_names_the_events_that_reach_it(index: LedgerIndex) -> None:
    """A and B meet in group g0's unit, D alone reaches g1's: each unit's cause (and its tasks') names
    only those events' decisions, not the batch's whole tree (written once per unit)."""
    d = _change("g1-s1", "v0", "v6", 4)
    m = _manager(index, RecomputeSettings())
    _offsets, _plain, units = _consume(m, [A.encode(), B.encode(), d.encode()])
    assert m._stats.ledger_plans == 1 and len({u.plan_id for u in units}) == 1
    by_key = {u.key: u for u in units}
    g0, g1 = by_key[b"g0"], by_key[b"g1"]
    assert g0.cause.kind == "changes" and len(g0.cause.causes) == 2
    assert ["g0-s0" in c.subject for c in g0.cause.causes] == [True, False]
    assert "g0-s2" in g0.cause.causes[1].subject
    assert (
        g1.cause.kind == "change:source_changed" and "g1-s1" in g1.cause.subject and not g1.cause.causes[1:]
    )
    assert all(t.cause == u.cause for u in units for t in u.tasks)


def test_a_duplicate_is_decided_without_its_own_traversal(index: LedgerIndex) -> None:
    """C repeats A's DataID: `duplicate`; A and B run as the plan of the two, from the batch's
    traversal (the same plan a traversal of A and B alone makes)."""
    m = _manager(index, RecomputeSettings())
    offsets, _plain, units = _consume(m, [A.encode(), C.encode(), B.encode()])
    assert m._stats.ledger_plans == 1
    assert m._stats.decisions == {"planned": 2, "duplicate": 1} and offsets == {"changes": 3}
    assert {u.plan_id for u in units} == {plan_for_changes(index, [A, B]).plan_id}


def test_a_second_real_change_of_a_source_within_the_dedup_window_runs(index: LedgerIndex) -> None:
    """Before, change events were de-duplicated on the source DataID alone: id-005 changed to 2005 and
    was recomputed, then to 3005 within the window, and the second change was refused as `duplicate`
    (the priority topic kept 2005's correction for good). A later change of A's DataID to another
    version runs; A's own event again (before it) does not."""
    m = _manager(index, RecomputeSettings())
    m._batch([Msg(A.encode(), t="changes", o=0)])
    later = _change("g0-s0", "v0", "v7", 4)  # to another version (the ledger still has v0 only)
    m._batch([Msg(A.encode(), t="changes", o=1), Msg(later.encode(), t="changes", o=2)])
    assert m._stats.decisions == {"planned": 2, "duplicate": 1}
    [_first, (_offsets, plain)] = m._publisher.calls
    units = [RecomputeUnit.decode(r.value) for r in plain if r.topic == "tasks"]
    assert {u.plan_id for u in units} == {plan_for_changes(index, [later]).plan_id}
    [refused] = [p for p in _progress(plain) if p.state == "duplicate"]
    assert "to the same version" in refused.reason


def test_events_waiting_for_approval_keep_their_own_plans(index: LedgerIndex) -> None:
    m = _manager(index, RecomputeSettings(max_fanout=1))
    offsets, plain, units = _consume(m, [A.encode(), B.encode()])
    assert m._stats.ledger_plans == 1 and m._stats.decisions == {"needs_approval": 2}
    assert units == [] and offsets == {"changes": 2}
    pending = {
        RecomputeUnit.decode(r.value).plan_id for r in plain if (RECORD_HEADER, KIND_PENDING) in r.headers
    }
    assert {plan_for_changes(index, [A]).plan_id, plan_for_changes(index, [B]).plan_id} <= pending


@pytest.mark.parametrize("stopping", [False, True])
def test_a_rate_limited_event_is_held_back_uncommitted_not_refused(
    index: LedgerIndex, stopping: bool
) -> None:
    """Before: B waited in the batch (up to 20 x 5 s, A's plan held back with it), then, or at once
    when a stop (SIGTERM) was requested, it was published as `rate_limited` with its offset committed:
    never recomputed, and `recompute approve` refused it. Now B is not decided at all: A's plan is
    published at once with A's offset only, and B's partition is rewound to B and paused until the
    bucket allows it (consumed again after a restart when stopped)."""
    m = _manager(index, RecomputeSettings(rate_limit_per_s=0.001), stopping=stopping)
    started = time.monotonic()
    offsets, plain, units = _consume(m, [A.encode(), B.encode()])
    assert time.monotonic() - started < 5.0  # nothing waits in the batch
    assert m._stats.ledger_plans == 1 and m._stats.decisions == {"planned": 1}
    assert (m._stats.causes, m._stats.deferred) == (1, 1)
    assert {u.plan_id for u in units} == {plan_for_changes(index, [A]).plan_id}
    assert offsets == {"changes": 1}  # B (offset 1) is not committed
    assert [p.state for p in _progress(plain)] == ["planned"]  # no `rate_limited` refusal
    assert m._consumer.paused == [("changes", 0)] and m._consumer.seeks == [("changes", 0, 1)]
    assert m._held[("changes", 0)] - time.monotonic() > 100  # A borrowed the bucket: B waits


def test_a_held_partition_resumes_when_its_time_comes_and_the_cause_is_decided_again(
    index: LedgerIndex,
) -> None:
    m = _manager(index, RecomputeSettings(rate_limit_per_s=0.001))
    _consume(m, [A.encode(), B.encode()])
    m._resume_held()
    assert m._consumer.resumed == [] and ("changes", 0) in m._held  # not yet
    m._held[("changes", 0)] = time.monotonic() - 1.0
    m._resume_held()
    assert m._consumer.resumed == [("changes", 0)] and m._held == {}
    m.policy("src").bucket.tokens = 1.0  # refilled meanwhile
    m.policy("src").bucket.updated_s = time.monotonic()
    m._batch([Msg(B.encode(), t="changes", o=1)])
    assert m._stats.decisions == {"planned": 2} and m._stats.causes == 2
    offsets, plain = m._publisher.calls[-1]
    assert [(o.topic, o.partition, o.offset) for o in offsets] == [("changes", 0, 2)]
    units = [RecomputeUnit.decode(r.value) for r in plain if r.topic == "tasks"]
    assert {u.plan_id for u in units} == {plan_for_changes(index, [B]).plan_id}


def test_the_other_partitions_are_decided_while_one_is_held(index: LedgerIndex) -> None:
    """A runs, B (same source topic, same partition) is rate-limited: B and E behind it are held; D,
    of another source topic on another partition, is decided in the same batch."""
    m = _manager(
        index,
        RecomputeSettings(),
        settings_of=lambda t: RecomputeSettings(rate_limit_per_s=0.001 if t == "src" else 50.0),
    )
    d = _change("g1-s1", "v0", "v6", 4, topic="src2")
    e = _change("g1-s0", "v0", "v5", 5)
    m._batch(
        [
            Msg(A.encode(), t="changes", p=0, o=0),
            Msg(B.encode(), t="changes", p=0, o=1),
            Msg(d.encode(), t="changes", p=1, o=7),
            Msg(e.encode(), t="changes", p=0, o=2),
        ]
    )
    [(offsets, plain)] = m._publisher.calls
    assert sorted((o.topic, o.partition, o.offset) for o in offsets) == [("changes", 0, 1), ("changes", 1, 8)]
    assert m._stats.decisions == {"planned": 2} and m._stats.deferred == 1
    units = [RecomputeUnit.decode(r.value) for r in plain if r.topic == "tasks"]
    assert {u.plan_id for u in units} == {plan_for_changes(index, [A, d]).plan_id}
    assert m._consumer.seeks == [("changes", 0, 1)]


def test_over_the_hourly_budget_a_plan_waits_for_approval(index: LedgerIndex) -> None:
    """Before: `over_budget`, committed, never decided again and refused by `recompute approve`. Now
    `needs_approval` with the budget as its reason, its units left on the progress topic."""
    m = _manager(index, RecomputeSettings(budget_per_hour=1))
    offsets, plain, units = _consume(m, [A.encode()])
    assert units == [] and offsets == {"changes": 1} and m._stats.decisions == {"needs_approval": 1}
    [report] = _progress(plain)
    assert report.state == "needs_approval" and "over budget_per_hour" in report.reason
    assert report.plan_id == plan_for_changes(index, [A]).plan_id
    pending = [RecomputeUnit.decode(r.value) for r in plain if (RECORD_HEADER, KIND_PENDING) in r.headers]
    assert {u.plan_id for u in pending} == {report.plan_id} and len(pending) == report.units


def test_garbage_among_change_events_is_dead_lettered_and_the_rest_planned(index: LedgerIndex) -> None:
    m = _manager(index, RecomputeSettings(dedup_window=timedelta(0)))
    offsets, plain, units = _consume(m, [A.encode(), b"\x00garbage", B.encode()])
    assert m._stats.ledger_plans == 1 and m._stats.malformed == 1
    assert [r.value for r in plain if r.topic == "dlq"] == [b"\x00garbage"]
    assert {u.plan_id for u in units} == {plan_for_changes(index, [A, B]).plan_id} and offsets == {
        "changes": 3
    }


def test_a_function_change_to_an_unregistered_version_is_dead_lettered_before_planning(
    index: LedgerIndex,
) -> None:
    """Every task of its plan would fail the same way (the function cannot be found): refused with
    what to do, the other event planned, still one traversal."""
    fc = FunctionChange("map1", "1", b"map1".ljust(16, b"."), "9", b"new-code")
    m = _manager(index, RecomputeSettings())
    offsets, plain, units = _consume(m, [ChangeEvent.for_function(fc, EMPTY_IMPACT, 3).encode(), A.encode()])
    [dead] = [r for r in plain if r.topic == "dlq"]
    assert b"register that version" in dict(dead.headers)[ERROR_HEADER]
    assert m._stats.ledger_plans == 1 and m._stats.malformed == 1 and offsets == {"changes": 2}
    assert {u.plan_id for u in units} == {plan_for_changes(index, [A]).plan_id}


def _alert(kind: AlertKind, data_id: str, offset: int, header: bytes | None = None) -> Alert:
    return Alert.create(
        kind,
        data_id=data_id,
        topic="out",
        partition=0,
        offset=offset,
        header=header,
        evidence=Evidence("aa", "bb", "probe"),
        criticality=Criticality.HIGH,
        detected_at_ms=1,
    )


def _progress(plain: list[Any]) -> list[Progress]:
    return [
        Progress.decode(r.value)
        for r in plain
        if r.topic == "progress" and (RECORD_HEADER, KIND_PROGRESS) in r.headers
    ]


def test_alerts_recompute_cannot_fix_are_decided_disabled_not_dead_lettered(index: LedgerIndex) -> None:
    """The Validator's `malformed` alerts and `missing_source` alerts carry no provenance header (or
    one that does not decode): before, the planner located the output first and dead-lettered them as
    a `processing_error` ("carries no provenance header: the output cannot be located"); the policy
    says these kinds are never recomputed, so they are decided `disabled`, with no ledger query. An
    alert within the acceptable error rate is `alert_only` without being planned either."""
    m = _manager(index, RecomputeSettings(acceptable_error_rate=1.0))
    alerts = [
        _alert(AlertKind.MALFORMED, "mal-1", 77),
        _alert(AlertKind.MALFORMED, "mal-2", 78, b"\x01\x02junk"),
        _alert(AlertKind.MISSING_SOURCE, "ms-1", 79),
        _alert(AlertKind.CHECKSUM_MISMATCH, "cm-1", 80, b"\x01\x02junk"),
    ]
    m._batch([Msg(a.encode(), t="alerts", o=i) for i, a in enumerate(alerts)])
    [(offsets, plain)] = m._publisher.calls
    assert [r for r in plain if r.topic == "dlq"] == []
    assert m._stats.malformed == 0 and m._stats.ledger_plans == 0
    assert m._stats.decisions == {"disabled": 3, "alert_only": 1}
    reports = _progress(plain)
    assert [(r.subject, r.state, r.total) for r in reports] == [
        ("mal-1", "disabled", 0),
        ("mal-2", "disabled", 0),
        ("ms-1", "disabled", 0),
        ("cm-1", "alert_only", 0),
    ]
    assert all("is not fixed by recomputing" in r.reason for r in reports[:3])
    assert {o.topic: o.offset for o in offsets} == {"alerts": 4}


def test_an_alert_that_may_run_but_names_no_output_is_still_dead_lettered(index: LedgerIndex) -> None:
    m = _manager(index, RecomputeSettings())
    m._batch([Msg(_alert(AlertKind.CHECKSUM_MISMATCH, "cm-1", 5).encode(), t="alerts", o=0)])
    [(_offsets, plain)] = m._publisher.calls
    [dead] = [r for r in plain if r.topic == "dlq"]
    assert b"carries no provenance header" in dict(dead.headers)[ERROR_HEADER]
    assert m._stats.malformed == 1


class _Polled(Msg):
    def error(self) -> None:
        return None


class _LoopConsumer(_Consumer):
    """`run()`'s consumer: the given batches, then nothing (after the poll timeout)."""

    def __init__(self, batches: list[list[_Polled]]) -> None:
        super().__init__()
        self.batches = batches

    def subscribe(self, _topics: list[str]) -> None:
        pass

    def consume(self, _n: int, timeout: float) -> list[_Polled]:
        if self.batches:
            return self.batches.pop(0)
        time.sleep(timeout)
        return []


def test_the_manager_stays_alive_while_a_cause_is_held_by_the_rate_limit(
    index: LedgerIndex, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: the rate-limited cause waited inside the batch (up to 20 x 5 s) and `_heartbeat` was
    only set at the top of the loop, so `/healthz` said `503 not ok: the planning loop has not turned
    for 120 s` and the Helm liveness probe restarted the pod (which lost the cause: bug 1). Now the
    cause is held back outside the batch and the loop keeps turning. The manager's clock is moved
    200 s on while B is held (B waits for a bucket borrowed by A's plan)."""
    ahead = [0.0]
    clock = type(
        "Clock",
        (),
        {
            "monotonic": staticmethod(lambda: time.monotonic() + ahead[0]),
            "time": staticmethod(lambda: time.time() + ahead[0]),
        },
    )
    monkeypatch.setattr(service_module, "time", clock)
    m = _manager(index, RecomputeSettings(rate_limit_per_s=0.001))
    m._consumer = _LoopConsumer(
        [[_Polled(A.encode(), t="changes", o=0), _Polled(B.encode(), t="changes", o=1)]]
    )
    m.settings = replace(m.settings, poll_timeout_s=0.05)
    m._http, m.workers, m._threads, m._ready, m._closed = None, [], [], False, False
    m._heartbeat = m._last_unit = clock.monotonic()
    thread = threading.Thread(target=m.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while m._stats.causes < 1:  # A decided; B held (before the fix: B waits inside the batch)
            assert time.monotonic() < deadline, m._stats
            time.sleep(0.02)
        time.sleep(0.2)
        ahead[0] = 200.0
        time.sleep(0.5)
        assert m.alive() == (True, "alive")
    finally:
        m.stop()
        thread.join(timeout=30)
    assert not thread.is_alive()
    assert m._stats.decisions == {"planned": 1} and m._stats.deferred == 1
    assert ("changes", 0) in m._held  # B still held when stopped: never committed


def test_a_long_ledger_catch_up_keeps_the_planner_alive(index: LedgerIndex) -> None:
    """The planner indexes the ledger up to now before each batch: on a first start or after a long
    pause that takes minutes, and /healthz said the planning loop had not turned for 120 s (a
    Kubernetes liveness probe restarts the pod, which starts the catch-up again). The views beat the
    loop's liveness after each indexed batch."""
    m = _manager(index, RecomputeSettings())
    m._heartbeat, m.workers, m._closed = time.monotonic(), [], False
    probes: list[bool] = []

    def slow_catch_up(beat: Callable[[], None] | None = None) -> None:
        m._heartbeat -= 300  # five minutes of indexing
        probes.append(m.alive()[0])
        assert beat is not None
        beat()  # after an indexed batch
        probes.append(m.alive()[0])

    m.views.for_planning = slow_catch_up
    m._batch([Msg(A.encode(), t="changes", o=0)])
    assert probes == [False, True]
