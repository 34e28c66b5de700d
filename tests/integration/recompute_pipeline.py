"""Shared by the Recompute Manager's Kafka tests: a processor pipeline with the ledger on, and a change.

Pipeline through `streamprov.agents.processor`: source (compacted) -> map `enrich` (re-keyed by
group, `g<n % groups>`) -> map `tag`, and -> reduce `sum_n` (per group), every application recorded
in the ledger. `change_source` gives one source record a new value and lets the ChangeDetector
(same group and state as the first look) emit its change event.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import processor_fns
import pytest
from kafka_support import FAST_GROUP_CONFIG, consume_all, delete_topics
from ledger_pipeline import CTX, ledger_writer, produce_sources, run_step, value
from ledger_support import LEDGER, verifier

from streamprov.agents.processor import AT_LEAST_ONCE
from streamprov.changes import ChangeDetector, ChangeEvent
from streamprov.config.models import TopicSettings
from streamprov.ledger import LedgerIndex
from streamprov.ledger.kafka import LEDGER_TOPIC_CONFIG, KafkaLedgerReader
from streamprov.producer import ProvenanceProducer

COMPACTED = {"cleanup.policy": "compact"}
N, GROUPS = 40, 4


@dataclass
class Pipeline:
    src: str
    mid: str
    tagged: str
    sums: str
    changes: str
    ledger: str
    sources: dict[str, bytes]

    @property
    def outputs(self) -> list[str]:
        return [self.mid, self.tagged, self.sums]

    def priority(self, topic: str) -> str:
        return TopicSettings().priority_topic_name(topic)


def build_pipeline(
    bootstrap: str,
    new_topic: Any,
    unique_group: Any,
    tmp: Path,
    detector_group: str,
    *,
    n: int = N,
    groups: int = GROUPS,
    reduce: Any = None,
) -> Pipeline:
    """Sources, the detector's first look, the three steps with the ledger on (detector closed).

    `new_topic(partitions, config, prefix=)` and `unique_group()` are the conftest factories (or
    anything that creates topics and names groups the same way). `reduce`: the reduce step's
    registered function (default `sum_n`)."""
    src = new_topic(2, COMPACTED, prefix="src")
    mid, tagged, sums, dlq = new_topic(2), new_topic(), new_topic(), new_topic()
    p = Pipeline(
        src,
        mid,
        tagged,
        sums,
        new_topic(1, prefix="changes"),
        new_topic(1, LEDGER_TOPIC_CONFIG, prefix="ledger"),
        {},
    )
    p.sources = produce_sources(bootstrap, src, ((f"id-{i:03d}", value(i)) for i in range(n)))
    with ledger_writer(bootstrap, p.ledger) as writer:
        with detector(bootstrap, p, detector_group, tmp, writer) as d:
            stats = d.run(max_records=n, idle_timeout_s=20)
            assert (stats.first_seen, stats.events) == (n, 0)
        run_step(
            bootstrap,
            processor_fns.enrich,
            src,
            mid,
            dlq,
            unique_group(),
            writer,
            records=n,
            key_by=lambda v: f"g{v['n'] % groups}",
        )
        run_step(bootstrap, processor_fns.tag, mid, tagged, dlq, unique_group(), writer, records=n)
        run_step(
            bootstrap,
            reduce or processor_fns.sum_n,
            mid,
            sums,
            dlq,
            unique_group(),
            writer,
            records=n,
            guarantee=AT_LEAST_ONCE,
            window_ms=3_600_000,
            flush_windows_on_stop=True,
        )
    return p


def detector(
    bootstrap: str, p: Pipeline, group: str, tmp: Path, writer: Any
) -> AbstractContextManager[ChangeDetector]:
    """`open_detector` on the pipeline's topics."""
    return open_detector(bootstrap, group, p.src, p.changes, p.ledger, tmp, writer)


@contextmanager
def open_detector(
    bootstrap: str, group: str, src: str, changes: str, ledger: str, tmp: Path, writer: Any
) -> Iterator[ChangeDetector]:
    """The detector and its ledger index (closed after the detector, so the next detector on `tmp`,
    same group and state, can open it: it remembers the versions it saw)."""
    with (
        LedgerIndex(tmp / "detector-index", LEDGER, verifier=verifier()) as index,
        ChangeDetector(
            {"bootstrap.servers": bootstrap, **FAST_GROUP_CONFIG},
            group_id=group,
            source_topics=src,
            changes_topic=changes,
            index=index,
            ledger=KafkaLedgerReader(bootstrap, ledger, idle_timeout_s=20.0),
            state_dir=tmp / "detector-state",
            writer=writer,
            context=CTX,
            device_id="detector-0",
        ) as d,
    ):
        yield d


def change_source(
    bootstrap: str, p: Pipeline, group: str, tmp: Path, data_id: str, new: bytes
) -> ChangeEvent:
    """Produce a new version of `data_id`; the detector (same group, state) emits its change event."""
    producer = ProvenanceProducer({"bootstrap.servers": bootstrap})
    producer.produce(p.src, new, data_id)
    assert producer.flush(30) == 0
    with ledger_writer(bootstrap, p.ledger) as writer, detector(bootstrap, p, group, tmp, writer) as d:
        stats = d.run(max_records=1, idle_timeout_s=20)
        assert (stats.changed, stats.events) == (1, 1)
    [msg] = consume_all(bootstrap, p.changes, expected=1, timeout_s=30, grace_s=0.3)
    return ChangeEvent.decode(msg.value())


@pytest.fixture
def priority_topics(kafka_bootstrap: str) -> Iterator[list[str]]:
    made: list[str] = []
    yield made
    delete_topics(kafka_bootstrap, made)
