"""Kafka set-up the broker benchmarks share: a broker (given, or started by scripts/kafka.sh), and
their topics, created and deleted (waiting for the broker each time)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic

REPO = Path(__file__).resolve().parent.parent


def bootstrap(given: str | None) -> str:
    """`given`, or the address of the broker `scripts/kafka.sh up` starts (or finds running)."""
    if given:
        return given
    script = REPO / "scripts" / "kafka.sh"
    if not script.exists():
        sys.exit("no --bootstrap and no scripts/kafka.sh to start Apache Kafka")
    env = {"STREAMPROV_PYTHON": sys.executable, **os.environ}
    up = subprocess.run(["bash", str(script), "up"], capture_output=True, text=True, env=env, check=False)
    if up.returncode != 0:
        sys.exit(f"scripts/kafka.sh up failed:\n{up.stderr[-2000:]}")
    lines = up.stdout.strip().splitlines()
    return lines[-1] if lines else f"127.0.0.1:{os.environ.get('STREAMPROV_KAFKA_PORT', '39092')}"


def create_topic(admin: AdminClient, name: str, partitions: int) -> str:
    futures = admin.create_topics([NewTopic(name, num_partitions=partitions, replication_factor=1)])
    futures[name].result(timeout=30)
    return name


def delete_topics(admin: AdminClient, names: list[str]) -> None:
    """Delete the bench's topics and wait until the broker has: `delete_topics` only queues the
    request, and one still queued when the process exits is never sent (the topics stay)."""
    for name, future in admin.delete_topics(names, operation_timeout=30).items():
        try:
            future.result(timeout=60)
        except Exception as exc:  # best effort: the run's numbers are printed already
            print(f"could not delete topic {name}: {exc}", file=sys.stderr)
