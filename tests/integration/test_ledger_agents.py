"""The processor with the provenance ledger on, against a real broker.

Every committed output has its ledger entry (map: one input node; reduce: the full input list, which
matches the header's digest); the ledger verifies; the index's impact of a source equals a brute-force
scan; and after kill -9 mid-stream plus a restart, every committed output still has its entry (the
ledger is flushed before offsets commit) and replays do not duplicate the graph.

Run as a script, this module is the processor the kill test spawns.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, TopicPartition

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]  # when run as a script by the kill test

import processor_fns  # noqa: E402
from kafka_support import consume_all, record_view  # noqa: E402
from ledger_pipeline import (  # noqa: E402
    CTX,
    brute_force_downstream,
    ledger_entries,
    ledger_writer,
    process_ledger_writer,
    produce_sources,
    run_step,
    value,
)
from ledger_support import LEDGER, verifier  # noqa: E402

from streamprov.agents.processor import AT_LEAST_ONCE, EXACTLY_ONCE  # noqa: E402
from streamprov.header import ProvenanceHeader  # noqa: E402
from streamprov.ledger import ApplicationKind, DataRef, LedgerIndex, verify_ledger  # noqa: E402
from streamprov.ledger.kafka import LEDGER_TOPIC_CONFIG, KafkaLedgerReader  # noqa: E402

REPO = HERE.parents[1]


def _nodes(bootstrap: str, topic: str, expected: int) -> dict[DataRef, ProvenanceHeader]:
    """Output node of every committed record of `topic`, with its header."""
    got = consume_all(bootstrap, topic, expected=expected, timeout_s=60, grace_s=0.5)
    nodes: dict[DataRef, ProvenanceHeader] = {}
    for msg in got:
        _, _, headers = record_view(msg)
        header = ProvenanceHeader.from_headers(headers)
        assert header is not None
        nodes[DataRef(header.data_id, header.checksum)] = header
    return nodes


@pytest.mark.kafka
@pytest.mark.parametrize("writer_kind", ["thread", "process"])
def test_map_then_reduce_record_every_output(
    kafka_bootstrap: str, new_topic: Any, unique_group: Any, tmp_path: Path, writer_kind: str
) -> None:
    n, groups = 200, 5
    src, mid, out, dlq = new_topic(2), new_topic(2), new_topic(), new_topic()
    ledger_topic = new_topic(1, LEDGER_TOPIC_CONFIG, prefix="ledger")
    sources = produce_sources(kafka_bootstrap, src, ((f"id-{i:04d}", value(i)) for i in range(n)))

    make = ledger_writer if writer_kind == "thread" else process_ledger_writer
    with make(kafka_bootstrap, ledger_topic) as writer:
        stats = run_step(
            kafka_bootstrap,
            processor_fns.enrich,
            src,
            mid,
            dlq,
            unique_group(),
            writer,
            records=n,
            batch_size=64,
            key_by=lambda v: f"g{v['n'] % groups}",
        )
        assert (stats.records_in, stats.records_out) == (n, n)
        stats = run_step(
            kafka_bootstrap,
            processor_fns.sum_n,
            mid,
            out,
            dlq,
            unique_group(),
            writer,
            records=n,
            guarantee=AT_LEAST_ONCE,
            window_ms=3_600_000,
            flush_windows_on_stop=True,
        )
        assert stats.records_in == n

    mids = _nodes(kafka_bootstrap, mid, n)
    outs = _nodes(kafka_bootstrap, out, groups)
    assert len(mids) == n and len(outs) >= 1
    entries = ledger_entries(kafka_bootstrap, ledger_topic)
    by_output = {e.application.output: e.application for e in entries}
    assert len(entries) == len(by_output) == n + len(outs)  # one entry per output, no duplicates
    for node in mids:
        app = by_output[node]
        assert app.kind is ApplicationKind.MAP and app.function_key == ("enrich", "1")
        assert app.inputs == (DataRef.of(node.data_id, sources[node.data_id]),)
        assert app.context == CTX and app.device_id == "test-pod"
    reduced: dict[str, int] = defaultdict(int)
    for node, header in outs.items():
        app = by_output[node]
        digest = header.lineage[-1].inputs
        assert app.kind is ApplicationKind.REDUCE and digest is not None and app.check_input_digest(digest)
        assert all(ref in mids for ref in app.inputs)
        reduced[node.data_id] += len(app.inputs)
    assert sum(reduced.values()) == n

    reader = KafkaLedgerReader(kafka_bootstrap, ledger_topic, idle_timeout_s=20.0)
    report = verify_ledger(reader.read(), LEDGER, verifier(), require_signed=True)
    assert report.ok and report.entries == len(entries), report.describe()
    with LedgerIndex(tmp_path / "idx", LEDGER, verifier=verifier()) as idx:
        idx.catch_up(reader)
        for i in (0, 7, 123):
            data_id = f"id-{i:04d}"
            root = DataRef.of(data_id, sources[data_id])
            down = idx.downstream(data_id)
            assert set(down.outputs) == brute_force_downstream(entries, [root])
            assert [a.entry.application.kind for a in down.applications] == [
                ApplicationKind.MAP,
                ApplicationKind.REDUCE,
            ]


# -- kill -9 ------------------------------------------------------------------------------------------------
def _committed_total(bootstrap: str, group: str, topic: str, partitions: int) -> int:
    probe = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})
    try:
        found = probe.committed([TopicPartition(topic, p) for p in range(partitions)], timeout=10)
        return sum(max(tp.offset, 0) for tp in found)
    finally:
        probe.close()


@pytest.mark.kafka
@pytest.mark.parametrize("guarantee", [EXACTLY_ONCE, AT_LEAST_ONCE])
def test_kill_9_loses_no_entry_of_a_committed_output(
    kafka_bootstrap: str, new_topic: Any, unique_group: Any, tmp_path: Path, guarantee: str
) -> None:
    partitions, n = 2, 1500
    src, out, dlq = new_topic(partitions), new_topic(partitions), new_topic()
    ledger_topic = new_topic(1, LEDGER_TOPIC_CONFIG, prefix="ledger")
    group = unique_group()
    produce_sources(kafka_bootstrap, src, ((f"k-{i:05d}", value(i)) for i in range(n)))
    log_path = tmp_path / "processor.log"
    cmd = [sys.executable, __file__, kafka_bootstrap, src, out, dlq, group, ledger_topic, guarantee]
    with log_path.open("a") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=log)
    deadline = time.monotonic() + 90
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if _committed_total(kafka_bootstrap, group, src, partitions) >= 400:
                break
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    done = _committed_total(kafka_bootstrap, group, src, partitions)
    assert 400 <= done < n, log_path.read_text()[-3000:]

    with ledger_writer(kafka_bootstrap, ledger_topic) as writer:  # resumes the chain the killed one left
        run_step(
            kafka_bootstrap,
            processor_fns.enrich,
            src,
            out,
            dlq,
            group,
            writer,
            records=n - done,
            guarantee=guarantee,  # type: ignore[arg-type]
            idle_timeout_s=10,
            batch_size=50,
            params={"delay_ms": 2},  # the same step as before the kill: replays get the same entry_id
        )
    assert _committed_total(kafka_bootstrap, group, src, partitions) == n

    outputs = _nodes(kafka_bootstrap, out, n)
    assert len(outputs) == n
    entries = ledger_entries(kafka_bootstrap, ledger_topic)
    recorded = {e.application.output for e in entries}
    missing = [node.describe() for node in outputs if node not in recorded]
    assert not missing, f"committed outputs without a ledger entry: {missing[:5]}"
    reader = KafkaLedgerReader(kafka_bootstrap, ledger_topic, idle_timeout_s=20.0)
    assert verify_ledger(reader.read(), LEDGER, verifier()).ok
    with LedgerIndex(tmp_path / "idx", LEDGER) as idx:
        idx.catch_up(reader)
        assert len(idx.applications_of("enrich", "1")) == n  # replays did not duplicate the graph


def _main() -> None:
    """The processor the kill test spawns: runs (slowly) until killed."""
    p = argparse.ArgumentParser()
    for name in ("bootstrap", "src", "out", "dlq", "group", "ledger_topic", "guarantee"):
        p.add_argument(name)
    a = p.parse_args()
    with ledger_writer(a.bootstrap, a.ledger_topic) as writer:
        run_step(
            a.bootstrap,
            processor_fns.enrich,
            a.src,
            a.out,
            a.dlq,
            a.group,
            writer,
            records=10**9,
            guarantee=a.guarantee,
            idle_timeout_s=60,
            batch_size=50,
            params={"delay_ms": 2},
        )
    print(json.dumps({"pid": os.getpid()}))


if __name__ == "__main__":
    _main()
