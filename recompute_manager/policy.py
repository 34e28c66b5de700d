"""Per-topic recompute policy: should this alert or change start a recompute, and why (or why not).

A `TopicPolicy` applies one topic's `RecomputeSettings` (streamprov.yaml `recompute:` block):

* `enabled` and `triggers`: which kinds of finding may start a recompute at all;
* `acceptable_error_rate`: alerts per message checked over a sliding window; at or below the rate an
  alert is only reported (ALERT_ONLY), above it the records are recomputed (the manager reports the
  topic's records as messages checked: `messages_checked`);
* `dedup_window`: many alerts for one DataID within the window give one recompute; change events are
  de-duplicated on the DataID and the version they change it to (a second, real change runs);
* `max_fanout`: a plan with more tasks than this waits for a person (NEEDS_APPROVAL);
* `budget_per_hour` (sliding hour): a plan that does not fit what is left waits for a person too
  (NEEDS_APPROVAL, the budget's evidence in its cause);
* `rate_limit_per_s` (token bucket): RATE_LIMITED with `retry_after_s`, a delay, not a refusal: the
  caller decides again then (the manager holds the cause back).

Every `Decision` carries its `Cause` tree (STYLE.md item 8): the alert or change that led to it, and
the evidence behind the verdict, so a person can follow why a record was (not) recomputed.
Time is passed in (`now_s`, seconds, monotonic or wall clock) so decisions are testable and replayable.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from streamprov.changes.event import ChangeEvent, ChangeKind
from streamprov.config.models import RecomputeSettings, RecomputeTrigger
from validator.alerts import Alert, AlertKind

__all__ = [
    "Action",
    "Cause",
    "Decision",
    "ErrorRateWindow",
    "HourlyBudget",
    "TokenBucket",
    "TopicPolicy",
    "cause_of_alert",
    "cause_of_change",
    "target_of_change",
    "trigger_of_alert",
    "trigger_of_change",
]

DEFAULT_ERROR_WINDOW_S = 300.0
"""Alerts and checked messages are compared over this many seconds."""


class Action(enum.StrEnum):
    RECOMPUTE = "recompute"
    """Plan and run the recompute."""
    ALERT_ONLY = "alert_only"
    """The error rate is acceptable: report, do not recompute."""
    DISABLED = "disabled"
    """Recompute is off for the topic, or not for this kind of finding."""
    DUPLICATE = "duplicate"
    """This DataID was recomputed within the de-duplication window."""
    NEEDS_APPROVAL = "needs_approval"
    """A person must approve the plan: it fans out wider than `max_fanout`, or it does not fit what
    is left of `budget_per_hour` (`retry_after_s`: when it would fit; 3600 when never)."""
    OVER_BUDGET = "over_budget"
    """No longer decided (over the budget is NEEDS_APPROVAL); kept for progress records of earlier
    versions, which were never run."""
    RATE_LIMITED = "rate_limited"
    """The token bucket is empty: decide again after `retry_after_s` (the manager holds the cause
    back, uncommitted; it never reports it as refused)."""

    @property
    def runs(self) -> bool:
        return self is Action.RECOMPUTE


@dataclass(frozen=True, slots=True)
class Cause:
    """Why: a node of a cause tree (what happened, about what, and the evidence), with sub-causes."""

    kind: str
    subject: str
    detail: str = ""
    causes: tuple[Cause, ...] = ()

    def describe(self, indent: int = 0) -> str:
        line = "  " * indent + f"{self.kind}: {self.subject}" + (f" ({self.detail})" if self.detail else "")
        return "\n".join([line, *(c.describe(indent + 1) for c in self.causes)])

    def to_dict(self) -> dict[str, object]:
        return {
            "kind": self.kind,
            "subject": self.subject,
            "detail": self.detail,
            "causes": [c.to_dict() for c in self.causes],
        }


@dataclass(frozen=True, slots=True)
class Decision:
    action: Action
    topic: str
    data_id: str
    reason: str
    cause: Cause
    retry_after_s: float = 0.0
    target: str = ""
    """The version a change event changes its DataID to (source checksum, `deleted`, or a function's
    version and code hash), with the DataID the key of the dedup window; empty for an alert."""

    @property
    def runs(self) -> bool:
        return self.action.runs


# ------------------------------------------------------------------------------- triggers, causes

_ALERT_TRIGGERS = {
    AlertKind.CHECKSUM_MISMATCH: RecomputeTrigger.CHECKSUM_MISMATCH,
    AlertKind.SOURCE_CHANGED: RecomputeTrigger.SOURCE_CHANGED,
    AlertKind.REDERIVATION_MISMATCH: RecomputeTrigger.REDERIVATION_MISMATCH,
    AlertKind.STALE: RecomputeTrigger.STALE,
}

_CHANGE_TRIGGERS = {
    ChangeKind.SOURCE_CHANGED: RecomputeTrigger.SOURCE_CHANGED,
    ChangeKind.SOURCE_DELETED: RecomputeTrigger.SOURCE_CHANGED,
    # A new function version derives other values from the same inputs: a re-derivation mismatch
    # known ahead of time.
    ChangeKind.FUNCTION_CHANGED: RecomputeTrigger.REDERIVATION_MISMATCH,
}


def trigger_of_alert(alert: Alert) -> RecomputeTrigger | None:
    """The recompute trigger an alert kind stands for; None for kinds recompute cannot fix
    (missing_source, malformed, missing_function)."""
    return _ALERT_TRIGGERS.get(alert.kind)


def trigger_of_change(event: ChangeEvent) -> RecomputeTrigger:
    return _CHANGE_TRIGGERS[event.kind]


def cause_of_alert(alert: Alert) -> Cause:
    ev = alert.evidence
    return Cause(
        f"alert:{alert.kind}",
        f"{alert.data_id} at {alert.topic}/{alert.partition}/{alert.offset}",
        f"alert_id={alert.alert_id}; expected {ev.expected}, actual {ev.actual}: {ev.reason}",
    )


def cause_of_change(event: ChangeEvent) -> Cause:
    if event.source is not None:
        s = event.source
        now = "deleted" if s.current is None else s.current.hex()
        subject = f"{s.data_id} at {s.topic}/{s.partition}/{s.offset}"
        detail = f"change_id={event.change_id}; checksum {s.previous.hex()} -> {now}"
    elif event.function is not None:
        f = event.function
        subject = f"function {f.function_id}"
        detail = (
            f"change_id={event.change_id}; {f.previous_version} ({f.previous_code_hash.hex()[:12]}) -> "
            f"{f.current_version} ({f.current_code_hash.hex()[:12]})"
        )
    else:
        subject, detail = "?", f"change_id={event.change_id}"
    return Cause(f"change:{event.kind}", subject, f"{detail}; {event.impact.total} outputs affected")


def target_of_change(event: ChangeEvent) -> str:
    """What a change event changes its subject to: the source's new checksum (`deleted`), or the
    function's new version and code hash; the second key of the dedup window (see `TopicPolicy`)."""
    if event.source is not None:
        return "deleted" if event.source.current is None else event.source.current.hex()
    if event.function is not None:
        return f"{event.function.current_version}@{event.function.current_code_hash.hex()}"
    return event.change_id


# ------------------------------------------------------------------------------------ primitives


@dataclass
class TokenBucket:
    """`rate` tokens per second, holding at most `capacity` (default: one second's worth, >= 1)."""

    rate: float
    capacity: float = 0.0
    tokens: float = field(default=-1.0)
    updated_s: float | None = None

    def __post_init__(self) -> None:
        if self.capacity <= 0:
            self.capacity = max(1.0, self.rate)
        if self.tokens < 0:
            self.tokens = self.capacity

    def _refill(self, now_s: float) -> None:
        if self.updated_s is not None and now_s > self.updated_s:
            self.tokens = min(self.capacity, self.tokens + (now_s - self.updated_s) * self.rate)
        if self.updated_s is None or now_s > self.updated_s:
            self.updated_s = now_s

    def wait_s(self, cost: float, now_s: float) -> float:
        """Seconds until `cost` may be taken (0: now). A cost above the capacity needs a full bucket."""
        self._refill(now_s)
        need = min(cost, self.capacity)
        return 0.0 if self.tokens >= need else (need - self.tokens) / self.rate

    def take(self, cost: float, now_s: float) -> None:
        """Take `cost` tokens (the balance may go negative: a big plan borrows from the future)."""
        self._refill(now_s)
        self.tokens -= cost


@dataclass
class HourlyBudget:
    """At most `limit` tasks started in any sliding hour."""

    limit: int
    window_s: float = 3600.0
    _spent: deque[tuple[float, int]] = field(default_factory=deque)
    _total: int = 0

    def _expire(self, now_s: float) -> None:
        while self._spent and self._spent[0][0] <= now_s - self.window_s:
            self._total -= self._spent.popleft()[1]

    def used(self, now_s: float) -> int:
        self._expire(now_s)
        return self._total

    def wait_s(self, cost: int, now_s: float) -> float | None:
        """Seconds until `cost` fits (0: now); None when it never fits (cost above the limit)."""
        self._expire(now_s)
        if cost > self.limit:
            return None
        free = self.limit - self._total
        for at, n in self._spent:
            if free >= cost:
                break
            free += n
            if free >= cost:
                return at + self.window_s - now_s
        return 0.0 if free >= cost else None

    def spend(self, cost: int, now_s: float) -> None:
        self._expire(now_s)
        self._spent.append((now_s, cost))
        self._total += cost


@dataclass
class ErrorRateWindow:
    """Alerts and messages checked in a sliding window, in one-second buckets (bounded memory)."""

    window_s: float = DEFAULT_ERROR_WINDOW_S
    _buckets: deque[list[int]] = field(default_factory=deque)  # [second, checked, alerts]
    _checked: int = 0
    _alerts: int = 0

    def _bucket(self, now_s: float) -> list[int]:
        second = int(now_s)
        while self._buckets and self._buckets[0][0] <= second - self.window_s:
            _, c, a = self._buckets.popleft()
            self._checked -= c
            self._alerts -= a
        if not self._buckets or self._buckets[-1][0] < second:
            self._buckets.append([second, 0, 0])
        return self._buckets[-1]

    def checked(self, count: int, now_s: float, *, at_s: float | None = None) -> None:
        """`count` messages checked at `at_s` (default `now_s`; same clock): counted in their own second,
        so they leave the window with it; older than the window, not counted."""
        last = self._bucket(now_s)
        second = last[0] if at_s is None else min(int(at_s), last[0])
        if second <= int(now_s) - self.window_s:
            return
        at = len(self._buckets) - 1
        while at > 0 and self._buckets[at - 1][0] >= second:  # mostly the last few seconds
            at -= 1
        if self._buckets[at][0] != second:
            self._buckets.insert(at, [second, 0, 0])
        self._buckets[at][1] += count
        self._checked += count

    def alert(self, now_s: float, count: int = 1) -> None:
        self._bucket(now_s)[2] += count
        self._alerts += count

    def rate(self, now_s: float) -> tuple[float, int, int]:
        """(alerts / checked, alerts, checked); with nothing checked, every alert counts as a full error."""
        self._bucket(now_s)
        if self._checked <= 0:
            return (1.0 if self._alerts else 0.0), self._alerts, self._checked
        return min(1.0, self._alerts / self._checked), self._alerts, self._checked


# ----------------------------------------------------------------------------------------- policy


class TopicPolicy:
    """One topic's recompute decisions. Not thread-safe: one owner (the manager's decision loop)."""

    def __init__(
        self,
        topic: str,
        settings: RecomputeSettings,
        *,
        error_window_s: float = DEFAULT_ERROR_WINDOW_S,
        max_dedup_entries: int = 1_000_000,
    ) -> None:
        self.topic = topic
        self.settings = settings
        self.errors = ErrorRateWindow(error_window_s)
        self.bucket = TokenBucket(settings.rate_limit_per_s)
        self.budget = HourlyBudget(settings.budget_per_hour)
        self._dedup_s = settings.dedup_window.total_seconds()
        # DataID -> (when last recomputed, to what: `Decision.target`); insertion order = time order
        self._recent: dict[str, tuple[float, str]] = {}
        self._max_dedup = max_dedup_entries

    # -- inputs ------------------------------------------------------------------------------------
    def messages_checked(self, count: int, now_s: float, *, at_s: float | None = None) -> None:
        """`count` messages of the topic were checked (the error rate's denominator) at `at_s` (default
        `now_s`, on its clock). The manager reports the topic's records it reads, in the second they were
        written (`OutputIndex.take_checked`)."""
        self.errors.checked(count, now_s, at_s=at_s)

    def _expire_dedup(self, now_s: float) -> None:
        while self._recent:
            data_id, (at, _target) = next(iter(self._recent.items()))
            if at > now_s - self._dedup_s and len(self._recent) <= self._max_dedup:
                break
            del self._recent[data_id]

    # -- decisions ---------------------------------------------------------------------------------
    def on_alert(self, alert: Alert, now_s: float, *, tasks: int | Callable[[], int] = 1) -> Decision:
        """Decide on an alert; `tasks` is the size of the plan it would start, or a callable that
        plans it and returns its size: called only once the alert passed the checks that need no plan
        (a kind recompute cannot fix, recompute disabled or the trigger not enabled, the error rate
        acceptable), so an alert that is refused for those is never planned. What it raises (e.g. a
        `PlanError`: the output cannot be located) propagates."""
        cause = cause_of_alert(alert)
        self.errors.alert(now_s)
        trigger = trigger_of_alert(alert)
        if trigger is None:
            return self._no(
                Action.DISABLED, alert.data_id, f"{alert.kind} is not fixed by recomputing", cause
            )
        rate, alerts, checked = self.errors.rate(now_s)
        limit = self.settings.acceptable_error_rate
        if self.settings.enabled and trigger in self.settings.triggers and rate <= limit:
            evidence = Cause(
                "error_rate",
                self.topic,
                f"{alerts} alerts / {checked} checked = {rate:.4g} <= acceptable {limit:.4g}",
            )
            return self._no(
                Action.ALERT_ONLY,
                alert.data_id,
                f"error rate {rate:.4g} is within the acceptable {limit:.4g}",
                Cause(cause.kind, cause.subject, cause.detail, (evidence,)),
            )
        if rate > limit:
            evidence = Cause(
                "error_rate",
                self.topic,
                f"{alerts} alerts / {checked} checked = {rate:.4g} > acceptable {limit:.4g}",
            )
            cause = Cause(cause.kind, cause.subject, cause.detail, (evidence,))
        return self._decide(trigger, alert.data_id, cause, tasks, now_s)

    def on_change(self, event: ChangeEvent, now_s: float, *, tasks: int | None = None) -> Decision:
        """Decide on a change event; the plan size defaults to the event's impact total. It is a
        `duplicate` only when the last recompute of its subject within the dedup window was to the
        same version (`target_of_change`): the same change again, not a second, real change."""
        cause = cause_of_change(event)
        subject = (
            event.source.data_id
            if event.source is not None
            else (f"function:{event.function.function_id}" if event.function is not None else event.change_id)
        )
        size = event.impact.total if tasks is None else tasks
        return self._decide(trigger_of_change(event), subject, cause, size, now_s, target_of_change(event))

    def decide(
        self,
        trigger: RecomputeTrigger,
        data_id: str,
        cause: Cause,
        now_s: float,
        *,
        tasks: int = 1,
        target: str = "",
    ) -> Decision:
        """The general form (error-rate gating is the caller's, as for change events; `target` as
        `Decision.target`)."""
        return self._decide(trigger, data_id, cause, tasks, now_s, target)

    def _no(
        self, action: Action, data_id: str, reason: str, cause: Cause, after: float = 0.0, target: str = ""
    ) -> Decision:
        return Decision(action, self.topic, data_id, reason, cause, after, target)

    def _decide(
        self,
        trigger: RecomputeTrigger,
        data_id: str,
        cause: Cause,
        size: int | Callable[[], int],
        now_s: float,
        target: str = "",
    ) -> Decision:
        """`target`: what a change event changes `data_id` to (empty for an alert: one recompute per
        DataID and window)."""
        s = self.settings
        if not s.enabled:
            return self._no(Action.DISABLED, data_id, f"recompute is disabled for {self.topic}", cause)
        if trigger not in s.triggers:
            allowed = ", ".join(t.value for t in s.triggers)
            return self._no(
                Action.DISABLED, data_id, f"trigger {trigger} is not enabled (triggers: {allowed})", cause
            )
        tasks = size() if callable(size) else size  # planned only now: it may run
        if tasks <= 0:  # charged nothing, and not in the dedup window: a later cause may have work
            return Decision(
                Action.RECOMPUTE, self.topic, data_id, f"{trigger}: nothing to recompute", cause, 0.0, target
            )
        self._expire_dedup(now_s)
        last = self._recent.get(data_id)
        if last is not None and now_s - last[0] < self._dedup_s and last[1] == target:
            to = f" to the same version ({target[:24]})" if target else ""
            return self._no(
                Action.DUPLICATE,
                data_id,
                f"{data_id} was recomputed{to} {now_s - last[0]:.3g}s ago (dedup window {self._dedup_s:g}s)",
                cause,
                target=target,
            )
        if tasks > s.max_fanout:
            return self._no(
                Action.NEEDS_APPROVAL,
                data_id,
                f"the plan has {tasks} tasks, more than max_fanout {s.max_fanout}: needs approval",
                cause,
                target=target,
            )
        budget_wait = self.budget.wait_s(tasks, now_s)
        if budget_wait is None or budget_wait > 0:  # a person decides whether to spend more
            used = self.budget.used(now_s)
            fits = (
                f"more than the whole budget of {s.budget_per_hour}"
                if budget_wait is None
                else f"they would fit in {budget_wait:.0f}s"
            )
            spent = f"{used} of {s.budget_per_hour} tasks used this hour; {tasks} more do not fit ({fits})"
            evidence = Cause("budget_per_hour", self.topic, spent)
            return self._no(
                Action.NEEDS_APPROVAL,
                data_id,
                f"over budget_per_hour: {spent}: needs approval",
                Cause(cause.kind, cause.subject, cause.detail, (*cause.causes, evidence)),
                3600.0 if budget_wait is None else budget_wait,
                target,
            )
        wait = self.bucket.wait_s(tasks, now_s)
        if wait > 0:
            return self._no(
                Action.RATE_LIMITED,
                data_id,
                f"rate limit {s.rate_limit_per_s:g} tasks/s: retry in {wait:.3g}s",
                cause,
                wait,
                target,
            )
        self.bucket.take(tasks, now_s)
        self.budget.spend(tasks, now_s)
        self._remember(data_id, target, now_s)
        return Decision(
            Action.RECOMPUTE, self.topic, data_id, f"{trigger}: recompute {tasks} task(s)", cause, 0.0, target
        )

    def _remember(self, data_id: str, target: str, now_s: float) -> None:
        self._recent.pop(data_id, None)
        self._recent[data_id] = (now_s, target)

    def approve(self, decision: Decision, tasks: int, now_s: float) -> Decision:
        """A person approved a NEEDS_APPROVAL plan: run it (the budget and dedup still count it)."""
        self.budget.spend(tasks, now_s)
        self.bucket.take(tasks, now_s)
        self._remember(decision.data_id, decision.target, now_s)
        approved = Cause("approved", decision.data_id, f"{tasks} tasks", (decision.cause,))
        return Decision(
            Action.RECOMPUTE,
            self.topic,
            decision.data_id,
            "approved by an operator",
            approved,
            0.0,
            decision.target,
        )


def policies(topics: Iterable[tuple[str, RecomputeSettings]]) -> dict[str, TopicPolicy]:
    """A policy per topic."""
    return {name: TopicPolicy(name, settings) for name, settings in topics}
