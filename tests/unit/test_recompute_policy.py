"""Recompute policy decisions: triggers, error rate, dedup, fan-out, budget, rate limit; each with a cause."""

from __future__ import annotations

from datetime import timedelta

from recompute_manager.policy import Action, HourlyBudget, TokenBucket, TopicPolicy
from streamprov.changes.event import EMPTY_IMPACT, ChangeEvent, ChangeKind, FunctionChange, SourceChange
from streamprov.checksum import ChecksumAlgorithm, compute
from streamprov.config.models import Criticality, RecomputeSettings, RecomputeTrigger
from validator.alerts import Alert, AlertKind, Evidence


def alert(data_id: str = "d1", kind: AlertKind = AlertKind.CHECKSUM_MISMATCH, offset: int = 0) -> Alert:
    return Alert.create(
        kind,
        data_id=data_id,
        topic="out",
        partition=0,
        offset=offset,
        header=None,
        evidence=Evidence("aa", "bb", "payload checksum differs"),
        criticality=Criticality.HIGH,
        detected_at_ms=1,
    )


def change(data_id: str = "s1") -> ChangeEvent:
    src = SourceChange(
        "src", 0, 5, data_id, compute(ChecksumAlgorithm.CRC32C, b"a"), compute(ChecksumAlgorithm.CRC32C, b"b")
    )
    return ChangeEvent.for_source(ChangeKind.SOURCE_CHANGED, src, EMPTY_IMPACT, 1)


def policy(**kw: object) -> TopicPolicy:
    return TopicPolicy("out", RecomputeSettings.model_validate(kw))


def test_recompute_with_cause_tree() -> None:
    d = policy().on_alert(alert(), 0.0)
    assert d.action is Action.RECOMPUTE and d.runs
    assert d.cause.kind == "alert:checksum_mismatch"
    assert "alert_id=" in d.cause.detail and "d1 at out/0/0" in d.cause.subject
    assert d.cause.causes[0].kind == "error_rate"
    assert "error_rate" in d.cause.describe()


def test_disabled_and_trigger_not_enabled() -> None:
    assert policy(enabled=False).on_alert(alert(), 0).action is Action.DISABLED
    d = policy(triggers=["stale"]).on_alert(alert(), 0)
    assert d.action is Action.DISABLED and "checksum_mismatch" in d.reason
    assert policy().on_alert(alert(kind=AlertKind.MALFORMED), 0).action is Action.DISABLED


def test_error_rate_below_threshold_alert_only_above_recompute() -> None:
    p = policy(acceptable_error_rate=0.1, dedup_window=0)
    p.messages_checked(100, 0.0)
    for i in range(10):
        d = p.on_alert(alert(f"d{i}", offset=i), 1.0)
        assert d.action is Action.ALERT_ONLY, d
    assert "<=" in d.cause.causes[0].detail
    d = p.on_alert(alert("d10", offset=10), 1.0)  # 11 / 100 > 0.1
    assert d.action is Action.RECOMPUTE
    assert ">" in d.cause.causes[0].detail
    # the window slides: old alerts and checks expire
    p.messages_checked(1000, 400.0)
    assert p.on_alert(alert("d11"), 400.0).action is Action.ALERT_ONLY


def test_dedup_window_one_recompute_per_data_id() -> None:
    p = policy(dedup_window="5m")
    actions = [p.on_alert(alert("x", offset=i), float(i)).action for i in range(5)]
    assert actions == [Action.RECOMPUTE] + [Action.DUPLICATE] * 4
    assert p.on_alert(alert("x"), 301.0).action is Action.RECOMPUTE
    assert p.on_alert(alert("y"), 2.0).action is Action.RECOMPUTE


def test_max_fanout_needs_approval() -> None:
    p = policy(max_fanout=3)
    d = p.on_change(change(), 0.0, tasks=4)
    assert d.action is Action.NEEDS_APPROVAL and "max_fanout 3" in d.reason
    assert d.cause.kind == "change:source_changed"
    ok = p.approve(d, 4, 0.0)
    assert ok.action is Action.RECOMPUTE and ok.cause.causes[0] == d.cause
    assert p.on_change(change("s2"), 0.0, tasks=3).action is Action.RECOMPUTE


def test_rate_limit_token_bucket() -> None:
    p = policy(rate_limit_per_s=2, dedup_window=0)
    got = [p.on_alert(alert(f"d{i}"), 0.0).action for i in range(3)]
    assert got == [Action.RECOMPUTE, Action.RECOMPUTE, Action.RATE_LIMITED]
    d = p.on_alert(alert("d9"), 0.0)
    assert d.retry_after_s == 0.5
    assert p.on_alert(alert("d9"), 0.5).action is Action.RECOMPUTE


def test_hourly_budget() -> None:
    """Over the budget a plan needs approval (before: `over_budget`, which nobody could approve and
    nothing decided again: the cause was lost)."""
    p = policy(budget_per_hour=3, rate_limit_per_s=1000, dedup_window=0)
    assert [p.on_alert(alert(f"d{i}"), float(i)).action for i in range(4)][-1] is Action.NEEDS_APPROVAL
    d = p.on_alert(alert("z"), 10.0)
    assert d.action is Action.NEEDS_APPROVAL and d.retry_after_s == 3590.0
    assert "over budget_per_hour: 3 of 3 tasks used this hour" in d.reason and "fit in 3590s" in d.reason
    assert d.cause.causes[-1].kind == "budget_per_hour"
    assert p.on_alert(alert("z"), 3600.0).action is Action.RECOMPUTE
    big = policy(budget_per_hour=2).on_change(change(), 0.0, tasks=3)
    assert big.action is Action.NEEDS_APPROVAL and "more than the whole budget of 2" in big.reason


def test_change_event_triggers() -> None:
    p = policy(triggers=[RecomputeTrigger.STALE])
    assert p.on_change(change(), 0.0).action is Action.DISABLED
    assert policy().on_change(change(), 0.0).data_id == "s1"


def test_primitives() -> None:
    b = TokenBucket(1.0)
    assert b.wait_s(1, 0.0) == 0.0
    b.take(5, 0.0)  # a big plan borrows
    assert b.wait_s(1, 0.0) == 5.0
    h = HourlyBudget(2, window_s=10)
    h.spend(2, 0.0)
    assert h.wait_s(1, 5.0) == 5.0 and h.wait_s(3, 5.0) is None
    assert h.used(10.0) == 0
    assert timedelta(0) == RecomputeSettings(dedup_window=0).dedup_window


def test_a_plan_with_nothing_to_do_is_not_charged_and_does_not_hold_back_the_next() -> None:
    """A change the ledger has nothing derived from yet (0 tasks) runs as nothing: no budget spent,
    no rate-limit token, and not in the dedup window, so the next change of that DataID (with work)
    is not refused as a duplicate."""
    p = policy(budget_per_hour=5, dedup_window=timedelta(minutes=5))
    empty = p.on_change(change(), 0.0, tasks=0)
    assert empty.action is Action.RECOMPUTE and "nothing to recompute" in empty.reason
    assert p.budget.used(0.0) == 0
    later = p.on_change(change(), 1.0, tasks=3)
    assert later.action is Action.RECOMPUTE and p.budget.used(1.0) == 3
    assert p.on_change(change(), 2.0, tasks=3).action is Action.DUPLICATE


def test_an_alert_is_planned_only_once_it_may_run() -> None:
    """`tasks` as a callable (the manager's `plan_for_alert`): not called for an alert refused before
    any plan is needed, so a `malformed` alert without a header is `disabled`, not a planning error."""
    planned: list[int] = []

    def plan() -> int:
        planned.append(1)
        return 3

    assert policy().on_alert(alert(kind=AlertKind.MALFORMED), 0.0, tasks=plan).action is Action.DISABLED
    assert policy().on_alert(alert(kind=AlertKind.MISSING_SOURCE), 0.0, tasks=plan).action is Action.DISABLED
    assert policy(enabled=False).on_alert(alert(), 0.0, tasks=plan).action is Action.DISABLED
    assert policy(triggers=["stale"]).on_alert(alert(), 0.0, tasks=plan).action is Action.DISABLED
    assert policy(acceptable_error_rate=1.0).on_alert(alert(), 0.0, tasks=plan).action is Action.ALERT_ONLY
    assert planned == []
    d = policy().on_alert(alert(), 0.0, tasks=plan)
    assert d.action is Action.RECOMPUTE and "3 task(s)" in d.reason and planned == [1]


def _source_change(data_id: str, old: bytes, new: bytes | None) -> ChangeEvent:
    src = SourceChange(
        "src",
        0,
        5,
        data_id,
        compute(ChecksumAlgorithm.CRC32C, old),
        None if new is None else compute(ChecksumAlgorithm.CRC32C, new),
    )
    kind = ChangeKind.SOURCE_CHANGED if new is not None else ChangeKind.SOURCE_DELETED
    return ChangeEvent.for_source(kind, src, EMPTY_IMPACT, 1)


def test_change_events_are_deduplicated_on_the_version_they_change_to() -> None:
    """Before, one recompute per source DataID per window: a second, real change of id-005 (2005 ->
    3005) within the window was dropped as a duplicate and the priority topic kept 2005's correction.
    Now a change is a duplicate only when the last recompute of that DataID within the window was to
    the same version (the same event again, or one that changes to the same bytes)."""
    p = policy(dedup_window="5m")
    assert p.on_change(_source_change("s1", b"1", b"2"), 0.0, tasks=3).action is Action.RECOMPUTE
    again = p.on_change(_source_change("s1", b"1", b"2"), 1.0, tasks=3)
    assert again.action is Action.DUPLICATE and "s1" in again.reason
    assert p.on_change(_source_change("s1", b"2", b"3"), 2.0, tasks=3).action is Action.RECOMPUTE
    back = p.on_change(_source_change("s1", b"3", b"2"), 3.0, tasks=3)  # back to 2: 3 was the last run
    assert back.action is Action.RECOMPUTE and back.data_id == "s1"
    assert p.on_change(_source_change("s1", b"2", None), 4.0, tasks=3).action is Action.RECOMPUTE
    assert p.on_change(_source_change("s1", b"2", None), 5.0, tasks=3).action is Action.DUPLICATE
    # function changes: on the version (and code) they change to
    f2 = FunctionChange("enrich", "1", b"a" * 16, "2", b"b" * 16)
    f3 = FunctionChange("enrich", "2", b"b" * 16, "3", b"c" * 16)
    assert p.on_change(ChangeEvent.for_function(f2, EMPTY_IMPACT, 1), 6.0, tasks=3).action is Action.RECOMPUTE
    assert p.on_change(ChangeEvent.for_function(f2, EMPTY_IMPACT, 1), 7.0, tasks=3).action is Action.DUPLICATE
    assert p.on_change(ChangeEvent.for_function(f3, EMPTY_IMPACT, 1), 8.0, tasks=3).action is Action.RECOMPUTE
    # alerts keep one recompute per DataID per window, whatever they say
    assert p.on_alert(alert("s1", offset=1), 9.0).action is Action.RECOMPUTE
    assert p.on_alert(alert("s1", offset=2), 10.0).action is Action.DUPLICATE


def test_an_approved_change_enters_the_dedup_window_with_its_version() -> None:
    p = policy(max_fanout=1)
    waiting = p.on_change(_source_change("s1", b"1", b"2"), 0.0, tasks=2)
    assert waiting.action is Action.NEEDS_APPROVAL
    assert p.approve(waiting, 2, 0.0).action is Action.RECOMPUTE
    assert p.on_change(_source_change("s1", b"1", b"2"), 1.0, tasks=1).action is Action.DUPLICATE
    assert p.on_change(_source_change("s1", b"2", b"3"), 1.0, tasks=1).action is Action.RECOMPUTE
