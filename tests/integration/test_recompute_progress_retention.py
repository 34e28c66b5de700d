"""`streamprov recompute status` and `approve` on a progress topic whose log start offset is past 0
(retention deleted its oldest records; here AdminClient.delete_records does what retention would).

Both read from the log start of every partition: they answer promptly, read the topic to its end and
see every record that is left, also on a partition whose records are all gone (log start = end > 0).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import OFFSET_END, Consumer, Producer, TopicPartition
from kafka_support import admin_client, consume_all, unique_name
from ledger_support import CTX, LEDGER, build, node, pipeline
from typer.testing import CliRunner

from recompute_manager.planner import plan_for_change
from recompute_manager.policy import Cause
from recompute_manager.progress import KIND_PENDING, KIND_PROGRESS, RECORD_HEADER, Progress, pending_key
from recompute_manager.units import RecomputeUnit, split_units
from streamprov.changes.event import EMPTY_IMPACT, ChangeEvent, FunctionChange
from streamprov.cli import app
from streamprov.ledger import Application, LedgerIndex

pytestmark = pytest.mark.kafka

PROMPT_S = 5.0
"""Well under the commands' --timeout (10 s): before the fix status used all of it, approve failed."""


def _units(tmp_path: Path) -> list[RecomputeUnit]:
    """Two units of a plan (map1 changed in two reduce groups)."""
    apps = pipeline(2, chain_len=2, fan_in=3)
    apps.append(Application.of_source(node("g0-s1", "v1"), timestamp_ms=2, device_id="src", context=CTX))
    with LedgerIndex(tmp_path / "idx", LEDGER) as idx:
        idx.catch_up(build(apps))
        fc = FunctionChange("map1", "1", b"map1".ljust(16, b"."), "2", b"new-code")
        plan = plan_for_change(idx, ChangeEvent.for_function(fc, EMPTY_IMPACT, 3))
    why = Cause("policy", "function:map1", "over max_fanout")
    return list(split_units(plan, subject="function:map1", cause=why, created_at_ms=7))


def _plan_record(plan_id: str, state: str, total: int, units: int) -> Progress:
    return Progress(plan_id, "change", "function:map1", state, "test", total, 0, 0, 0, 0, 0, 1, units=units)


def _transaction(
    producer: Producer, topic: str, partition: int, records: list[tuple[bytes, bytes, bytes]]
) -> None:
    producer.begin_transaction()
    for key, value, kind in records:
        producer.produce(topic, value, key, partition=partition, headers=[(RECORD_HEADER, kind)])
    producer.commit_transaction(30)


def _delete_before(bootstrap: str, topic: str, offsets: dict[int, int]) -> None:
    admin = admin_client(bootstrap)  # kept until the futures are done
    futures = admin.delete_records([TopicPartition(topic, p, o) for p, o in offsets.items()])
    for future in futures.values():
        future.result(timeout=30)


def _watermarks(bootstrap: str, topic: str, partition: int) -> tuple[int, int]:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": unique_name("wm")})
    try:
        low, high = consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=10)
        return int(low), int(high)
    finally:
        consumer.close()


def _invoke(args: list[str]) -> tuple[Any, float]:
    started = time.monotonic()
    result = CliRunner().invoke(app, args)
    return result, time.monotonic() - started


def test_status_and_approve_read_a_progress_topic_whose_log_start_is_past_0(
    kafka_bootstrap: str, new_topic: Any, unique_group: Any, tmp_path: Path
) -> None:
    progress = new_topic(2, prefix="progress")
    tasks = new_topic(1, prefix="tasks")
    units = _units(tmp_path)
    plan_id, total = units[0].plan_id, units[0].plan_tasks
    producer = Producer({"bootstrap.servers": kafka_bootstrap, "transactional.id": unique_name("tx")})
    producer.init_transactions(30)
    # partition 0: an old plan (offset 0, its commit marker at 1), then the held plan and its units
    old = _plan_record("0ld" + "0" * 61, "done", 0, 0)
    _transaction(producer, progress, 0, [(old.key, old.encode(), KIND_PROGRESS)])
    held = _plan_record(plan_id, "needs_approval", total, len(units))
    _transaction(
        producer,
        progress,
        0,
        [(held.key, held.encode(), KIND_PROGRESS)]
        + [(pending_key(plan_id, u.index), u.encode(), KIND_PENDING) for u in units],
    )
    # partition 1: one plan, then every record of it gone (log start = end = 2)
    gone = _plan_record("90e" + "0" * 61, "done", 0, 0)
    _transaction(producer, progress, 1, [(gone.key, gone.encode(), KIND_PROGRESS)])
    producer.flush(10)
    _delete_before(kafka_bootstrap, progress, {0: 2, 1: 2})
    assert _watermarks(kafka_bootstrap, progress, 0) == (2, 6)
    assert _watermarks(kafka_bootstrap, progress, 1) == (2, 2)

    config = tmp_path / "streamprov.yaml"
    config.write_text(
        f"kafka:\n  bootstrap_servers: {kafka_bootstrap}\n"
        f"streams:\n  recompute_progress: {progress}\n  recompute_tasks: {tasks}\n"
        f"recompute_manager:\n  group_id: {unique_group('rm')}\n"
    )
    status = ["recompute", "status", "--config", str(config), "--timeout", "10"]
    result, took = _invoke(status)
    assert result.exit_code == 0, result.output
    assert "warning" not in result.output and "no plans" not in result.output, result.output
    assert f"needs_approval {'[' + '-' * 20 + ']'}   0% 0/{total} tasks, 0/2 units" in result.output
    assert "0ld" not in result.output and "90e" not in result.output  # deleted
    assert took < PROMPT_S, f"status took {took:.1f} s"

    approve = ["recompute", "approve", plan_id[:10], "--config", str(config), "--by", "test"]
    approve += ["--timeout", "10"]
    result, took = _invoke(approve)
    assert result.exit_code == 0, result.output
    assert f"approved: {total} tasks in 2 units" in result.output
    assert took < PROMPT_S, f"approve took {took:.1f} s"
    queued = consume_all(kafka_bootstrap, tasks, expected=2, timeout_s=10)
    assert sorted(RecomputeUnit.decode(m.value()).index for m in queued) == [0, 1]

    result, took = _invoke([*status[:2], plan_id[:10], *status[2:]])
    assert result.exit_code == 0, result.output
    assert "approved by test" in result.output and "warning" not in result.output, result.output
    assert took < PROMPT_S, f"status took {took:.1f} s"

    # every record gone (retention caught up with the end): no plans, read to the end, promptly
    _delete_before(kafka_bootstrap, progress, {0: OFFSET_END})
    assert _watermarks(kafka_bootstrap, progress, 0)[0] > 2
    result, took = _invoke(status)
    assert result.exit_code == 0, result.output
    assert result.output.strip() == f"no plans on {progress}", result.output
    assert took < PROMPT_S, f"status took {took:.1f} s"
