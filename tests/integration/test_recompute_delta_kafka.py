"""The delta reduce on Kafka, through the Recompute Manager service: a pipeline's reduce over 20
inputs, one source changed. The manager's views keep the summary of the pipeline's reduce output
(`SummaryKeeper`, from the output topics and the ledger), so the reduce task lists only the changed
input and runs against it: no other input is read. What it publishes is checked against the ledger
entry it records (every input, and the input digest the header commits to) and the sum by hand."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import processor_fns
from kafka_support import FAST_GROUP_CONFIG, consume_all, create_topic
from ledger_support import LEDGER
from recompute_pipeline import build_pipeline, change_source, priority_topics  # noqa: F401 - fixture

from recompute_manager.service import ManagerSettings, RecomputeManager
from streamprov.header import ProvenanceHeader
from streamprov.ledger import DataRef
from streamprov.ledger.requests import decode_request
from streamprov.lineage import StepKind

N, GROUPS = 40, 2  # 20 inputs per sum: over the index's HEAD_MIN_INPUTS


def test_a_reduce_over_many_inputs_is_recomputed_as_a_delta(
    kafka_bootstrap: str,
    new_topic: Any,
    unique_group: Any,
    tmp_path: Path,
    priority_topics: list[str],  # noqa: F811
) -> None:
    bootstrap = kafka_bootstrap
    detector_group = unique_group()
    p = build_pipeline(
        bootstrap,
        new_topic,
        unique_group,
        tmp_path,
        detector_group,
        n=N,
        groups=GROUPS,
        reduce=processor_fns.sum_inv,
    )
    for t in p.outputs:
        priority_topics.append(create_topic(bootstrap, p.priority(t), partitions=2))
    [old_sum] = [m for m in consume_all(bootstrap, p.sums, expected=GROUPS, timeout_s=30) if m.key() == b"g1"]
    change_source(bootstrap, p, detector_group, tmp_path, "id-011", b'{"n":2011}')
    requests = new_topic(1, prefix="ledger-req")
    settings = ManagerSettings(
        kafka={"bootstrap.servers": bootstrap},
        group_id=unique_group("rm"),
        changes_topic=p.changes,
        alerts_topic=new_topic(prefix="alerts"),
        tasks_topic=new_topic(2, prefix="tasks"),
        progress_topic=new_topic(prefix="progress"),
        dead_letter_topic=new_topic(),
        ledger_topic=p.ledger,
        ledger_requests_topic=requests,
        ledger_id=LEDGER,
        sources=(p.src,),
        outputs=tuple(p.outputs),
        state_dir=tmp_path / "rm",
        consumer_config=FAST_GROUP_CONFIG,
    )
    with RecomputeManager(settings, processor_fns.registry) as manager:
        assert manager.views.summaries is not None
        stats = manager.run(max_causes=1, idle_timeout_s=60)
        kept = manager.views.summaries.kept
        deltas = sum(w.executor.deltas for w in manager.workers)
        expanded = sum(w.executor.expanded for w in manager.workers)
    assert (stats.causes, stats.tasks_recomputed, stats.published, stats.dead_letters) == (1, 3, 3, 0)
    assert kept == GROUPS and (deltas, expanded) == (1, 0)  # the views' summary served the delta

    [new_sum] = consume_all(bootstrap, p.priority(p.sums), expected=1, timeout_s=30, grace_s=0.5)
    assert new_sum.key() == b"g1" and json.loads(new_sum.value()) == json.loads(old_sum.value()) - 11 + 2011
    header = ProvenanceHeader.from_headers(new_sum.headers() or [])
    assert header is not None
    digest = header.lineage[-1].inputs
    assert header.lineage[-1].kind is StepKind.REDUCE and digest is not None and digest.count == N // GROUPS
    # its ledger entry lists all 20 inputs (the changed one at its new version), and the header's
    # input digest is over exactly those: as a fold over every input would have stamped it
    [request] = consume_all(bootstrap, requests, expected=1, timeout_s=10, grace_s=0.5)
    [reduce_app] = [a for a in decode_request(request.value()).expanded() if a.function_id == "sum_inv"]
    assert reduce_app.output == DataRef(header.data_id, header.checksum)
    assert reduce_app.check_input_digest(digest) and len(reduce_app.inputs) == N // GROUPS
    [mid] = [m for m in consume_all(bootstrap, p.priority(p.mid), expected=1, timeout_s=10)]
    mid_header = ProvenanceHeader.from_headers(mid.headers() or [])
    assert mid_header is not None and DataRef(mid_header.data_id, mid_header.checksum) in reduce_app.inputs
