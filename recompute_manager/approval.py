"""`streamprov recompute approve <plan>`: run a plan the policy held back (`needs_approval`).

The planner left the plan's units on the progress topic (`pending-unit` records). Approving publishes
them to the tasks topic (each with an `approved` node on top of its cause tree) together with an
`approved` progress record for the plan, in ONE transaction. Idempotent and safe against a second
approver: the transactional producer (one `transactional.id` per manager group) is initialised
BEFORE the progress topic is read, so of two concurrent approvals the older producer is fenced and
cannot commit, and any approval that reads after another committed sees `approved` and publishes
nothing.

The running managers' policies do not see the approval: the units do not count against their
in-memory hourly budget or rate limit (an operator decided to spend it).
"""

from __future__ import annotations

import getpass
import logging
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from recompute_manager.priority import PlainRecord, PriorityPublisher
from recompute_manager.progress import KIND_PROGRESS, RECORD_HEADER, PlanStatus, read_progress
from recompute_manager.units import RecomputeUnit
from streamprov.errors import StreamprovError
from streamprov.header import now_ms

__all__ = ["Approval", "ApprovalError", "approve"]

log = logging.getLogger(__name__)


class ApprovalError(StreamprovError):
    """The plan cannot be approved: unknown, ambiguous prefix, refused for another reason, or its
    pending units are not (all) on the progress topic."""


@dataclass(frozen=True, slots=True)
class Approval:
    plan_id: str
    units: int
    tasks: int
    already: bool
    """The plan was approved (or planned to run) before: nothing was published."""


def _find(statuses: Mapping[str, PlanStatus], prefix: str) -> PlanStatus:
    found = [st for pid, st in statuses.items() if pid.startswith(prefix) and st.plan is not None]
    if not found:
        raise ApprovalError(f"no plan {prefix!r} on the progress topic")
    if len(found) > 1:
        ids = ", ".join(sorted(st.plan_id[:16] for st in found))
        raise ApprovalError(f"{prefix!r} names {len(found)} plans ({ids}): give more of the id")
    return found[0]


def approve(
    kafka: Mapping[str, Any],
    *,
    group_id: str,
    tasks_topic: str,
    progress_topic: str,
    prefix: str,
    by: str | None = None,
    timeout_s: float = 30.0,
) -> Approval:
    """Publish the pending units of the plan whose id starts with `prefix` (see the module docs)."""
    if not prefix:
        raise ApprovalError("name the plan to approve (its id or a prefix of it)")
    who = by or _user()
    publisher = PriorityPublisher(kafka, f"{group_id}.approver", timeout_s=timeout_s)
    try:
        log_ = read_progress(kafka, progress_topic, timeout_s=timeout_s)
        if not log_.complete:
            raise ApprovalError(f"could not read the progress topic {progress_topic!r} to its end")
        status = _find(log_.statuses(), prefix)
        plan = status.plan
        assert plan is not None
        if plan.state in ("approved", "planned", "done"):
            return Approval(plan.plan_id, plan.units, plan.total, True)
        if plan.state != "needs_approval":
            raise ApprovalError(f"plan {plan.plan_id[:16]} is {plan.state} ({plan.reason}), not waiting")
        pending = log_.pending.get(plan.plan_id, {})
        missing = [i for i in range(plan.units) if i not in pending]
        if missing or not plan.units:
            raise ApprovalError(
                f"plan {plan.plan_id[:16]}: {len(missing)} of its {plan.units} units are not on "
                f"{progress_topic!r} (retention?); it cannot be approved, only planned again"
            )
        units: list[RecomputeUnit] = [pending[i].approved(who) for i in range(plan.units)]
        approved = replace(
            plan,
            state="approved",
            reason=f"approved by {who}; was: {plan.reason}",
            at_ms=now_ms(),
        )
        records = [PlainRecord(tasks_topic, u.key, u.encode()) for u in units]
        records.append(
            PlainRecord(progress_topic, approved.key, approved.encode(), ((RECORD_HEADER, KIND_PROGRESS),))
        )
        publisher.publish_all([], plain=records)
        log.debug("plan %s approved by %s: %d units", plan.plan_id[:16], who, len(units))
        return Approval(plan.plan_id, len(units), plan.total, False)
    finally:
        publisher.close()


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (containers)
        return "an operator"
