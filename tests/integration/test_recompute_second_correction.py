"""A record corrected twice, on Kafka: a source changes, the Recompute Manager publishes corrections
and records them in the ledger (sealed by the sequencer); the source changes again. The second plan
reaches the corrected records (through the recompute's ledger entries), whose coordinates the manager
knows only from the priority topics (`SupersededIndex.locations`): they are published to the same
priority topics, replacing the same original records. Before, they had no topic and went to a topic
named `.priority`, which the broker auto-created (found by probing)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import processor_fns
from kafka_support import FAST_GROUP_CONFIG, admin_client, consume_all, create_topic, delete_topics
from ledger_pipeline import ledger_writer
from ledger_support import LEDGER, signer
from recompute_pipeline import build_pipeline, change_source, detector, priority_topics  # noqa: F401 - fixture

from recompute_manager.executor import SUPERSEDES_HEADER
from recompute_manager.service import ManagerSettings, RecomputeManager
from streamprov.header import ProvenanceHeader
from streamprov.ledger.sequencer import LedgerSequencer
from streamprov.producer import ProvenanceProducer


def test_a_record_corrected_twice_goes_to_its_priority_topic_both_times(
    kafka_bootstrap: str,
    new_topic: Any,
    unique_group: Any,
    tmp_path: Path,
    priority_topics: list[str],  # noqa: F811
) -> None:
    bootstrap = kafka_bootstrap
    delete_topics(bootstrap, [".priority"])  # what the bug made, if an earlier run left it
    detector_group = unique_group()
    p = build_pipeline(bootstrap, new_topic, unique_group, tmp_path, detector_group)
    for t in p.outputs:
        priority_topics.append(create_topic(bootstrap, p.priority(t), partitions=2))
    requests, dead = new_topic(1, prefix="ledger-req"), new_topic()
    settings = ManagerSettings(
        kafka={"bootstrap.servers": bootstrap},
        group_id=unique_group("rm"),
        changes_topic=p.changes,
        alerts_topic=new_topic(prefix="alerts"),
        tasks_topic=new_topic(2, prefix="tasks"),
        progress_topic=new_topic(prefix="progress"),
        dead_letter_topic=dead,
        ledger_topic=p.ledger,
        ledger_requests_topic=requests,
        ledger_id=LEDGER,
        sources=(p.src,),
        outputs=tuple(p.outputs),
        state_dir=tmp_path / "rm",
        consumer_config=FAST_GROUP_CONFIG,
    )

    change_source(bootstrap, p, detector_group, tmp_path, "id-011", b'{"n":2011}')
    with RecomputeManager(settings, processor_fns.registry) as manager:
        first = manager.run(max_causes=1, idle_timeout_s=60)
    assert (first.published, first.dead_letters) == (3, 0)
    with LedgerSequencer(
        bootstrap,
        requests_topic=requests,
        ledger_topic=p.ledger,
        ledger_id=LEDGER,
        signer=signer(),
        dead_letter_topic=dead,
    ) as seq:
        seq.run(idle_timeout_s=3.0)
    assert seq.stats.entries == 3  # the first recompute is in the ledger: the next plan starts there

    producer = ProvenanceProducer({"bootstrap.servers": bootstrap})
    producer.produce(p.src, b'{"n":3011}', "id-011")
    assert producer.flush(30) == 0
    with (
        ledger_writer(bootstrap, p.ledger) as writer,
        detector(bootstrap, p, detector_group, tmp_path, writer) as d,
    ):
        assert d.run(max_records=1, idle_timeout_s=20).events == 1
    with RecomputeManager(settings, processor_fns.registry) as manager:
        second = manager.run(max_causes=1, idle_timeout_s=60)
    assert (second.causes, second.published, second.dead_letters) == (1, 3, 0)

    assert ".priority" not in admin_client(bootstrap).list_topics(timeout=10).topics
    for t in p.outputs:
        got = consume_all(bootstrap, p.priority(t), expected=2, timeout_s=30, grace_s=0.5)
        assert len(got) == 2, t
        originals = {dict(m.headers() or [])[SUPERSEDES_HEADER] for m in got}
        assert len(originals) == 1 and originals.pop().startswith(f"{t}/".encode())  # the same original
        header = ProvenanceHeader.from_headers(got[-1].headers() or [])
        assert header is not None
    [mid_second] = [
        m for m in consume_all(bootstrap, p.priority(p.mid), expected=2, timeout_s=10) if b"3011" in m.value()
    ]
    assert json.loads(mid_second.value())["n"] == 3011
