"""Shared fixtures: real brokers for integration tests (no mocked Kafka anywhere).

* ``kafka_bootstrap``: Apache Kafka. ``STREAMPROV_TEST_BOOTSTRAP=host:port`` names an existing
  cluster; otherwise ``scripts/kafka.sh up`` starts the project's single-node KRaft broker once per
  session (and stops it at the end only if this session started it).
* ``embedded_bootstrap``: the embedded Tansu broker from ``streamprov.embedded``, once per session.
* ``new_topic`` / ``new_embedded_topic``: factories for uniquely named, ready topics, deleted
  after the test (best effort).
* ``unique_group``: factory for unique consumer group ids.

Tests using ``kafka_bootstrap`` are marked ``kafka`` and tests using ``embedded_bootstrap`` are
marked ``embedded`` automatically, so ``-m "not kafka"`` runs without Java.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Mapping

import pytest
from kafka_support import (
    create_topic,
    delete_topics,
    kafka_script,
    kafka_script_port,
    unique_name,
    wait_for_broker,
)

from streamprov.embedded import EmbeddedBroker, EmbeddedBrokerError

TopicFactory = Callable[..., str]
GroupFactory = Callable[..., str]

_KAFKA_START_TIMEOUT_S = 900.0  # a cold start downloads the broker jars from Maven Central


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "embedded: needs the embedded Tansu broker (pip install 'streamprov[embedded]')"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        fixtures = getattr(item, "fixturenames", ())
        if "kafka_bootstrap" in fixtures or "new_topic" in fixtures:
            item.add_marker(pytest.mark.kafka)
        if "embedded_bootstrap" in fixtures or "new_embedded_topic" in fixtures:
            item.add_marker(pytest.mark.embedded)


@pytest.fixture(autouse=True)
def _root_log_handlers() -> Iterator[None]:
    """Each test leaves the root logger's handlers as it found them: a CLI run with --verbose or
    --log-level adds one writing to the CliRunner's captured stream, which is closed when the run
    ends, and every later log line then prints a "--- Logging error ---" traceback into whatever a
    later test captures."""
    handlers, level = logging.root.handlers[:], logging.root.level
    yield
    logging.root.handlers[:] = handlers
    logging.root.setLevel(level)


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    """Bootstrap servers of a real Apache Kafka broker."""
    external = os.environ.get("STREAMPROV_TEST_BOOTSTRAP", "").strip()
    if external:
        try:
            wait_for_broker(external, timeout_s=30.0)
        except RuntimeError as exc:
            pytest.fail(f"STREAMPROV_TEST_BOOTSTRAP={external}: {exc}", pytrace=False)
        yield external
        return

    was_running = kafka_script("status", timeout_s=30.0).returncode == 0
    up = kafka_script("up", timeout_s=_KAFKA_START_TIMEOUT_S)
    if up.returncode != 0:
        pytest.fail(
            "scripts/kafka.sh up failed (needs Java >= 17 and Maven; or set "
            "STREAMPROV_TEST_BOOTSTRAP=host:port, or deselect with -m 'not kafka'):\n"
            f"{up.stderr[-4000:]}",
            pytrace=False,
        )
    lines = up.stdout.strip().splitlines()
    bootstrap = lines[-1] if lines else f"127.0.0.1:{kafka_script_port()}"
    try:
        yield bootstrap
    finally:
        if not was_running:
            kafka_script("down", timeout_s=120.0)


@pytest.fixture(scope="session")
def embedded_bootstrap() -> Iterator[str]:
    """Bootstrap servers of the embedded Tansu broker (in-memory, stopped after the session)."""
    broker = EmbeddedBroker()
    try:
        bootstrap = broker.start(timeout_s=30.0)
    except EmbeddedBrokerError as exc:
        pytest.fail(str(exc), pytrace=False)
    try:
        yield bootstrap
    finally:
        broker.stop()


def _topic_factory(bootstrap: str) -> Iterator[TopicFactory]:
    created: list[str] = []

    def new_topic(partitions: int = 1, config: Mapping[str, str] | None = None, *, prefix: str = "t") -> str:
        name = create_topic(bootstrap, unique_name(f"sp-{prefix}"), partitions=partitions, config=config)
        created.append(name)
        return name

    yield new_topic
    delete_topics(bootstrap, created)


@pytest.fixture
def new_topic(kafka_bootstrap: str) -> Iterator[TopicFactory]:
    """``new_topic(partitions=1, config=None, *, prefix="t") -> str`` on Apache Kafka."""
    yield from _topic_factory(kafka_bootstrap)


@pytest.fixture
def new_embedded_topic(embedded_bootstrap: str) -> Iterator[TopicFactory]:
    """``new_embedded_topic(partitions=1, config=None, *, prefix="t") -> str`` on Tansu."""
    yield from _topic_factory(embedded_bootstrap)


@pytest.fixture
def unique_group() -> GroupFactory:
    """``unique_group(prefix="g") -> str``: a consumer group id no other test uses."""

    def make(prefix: str = "g") -> str:
        return unique_name(f"sp-{prefix}")

    return make
