"""`KAFKA_LOG` and its `RepeatFilter`: librdkafka's repeated lines (every reconnect attempt of every
client while a broker is away) are let through once per window, with a count of what was held back."""

from __future__ import annotations

import logging

import pytest

from streamprov.agents.kafka_io import KAFKA_LOG, RepeatFilter


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _passed(f: RepeatFilter, text: str, *args: object) -> str | None:
    record = logging.LogRecord("streamprov.kafka", logging.WARNING, __file__, 1, text, args, None)
    return record.getMessage() if f.filter(record) else None


def test_a_repeated_line_passes_once_per_window_and_says_how_many_were_held() -> None:
    clock = Clock()
    f = RepeatFilter(window_s=30, clock=clock)
    line = "FAIL [rdkafka#consumer-1] 127.0.0.1:1/bootstrap: Connect failed (after %dms in state CONNECT)"
    assert _passed(f, line, 0) == line % 0
    for ms in range(1, 50):  # the same line with other numbers: held back
        clock.now += 0.1
        assert _passed(f, line, ms) is None
    assert _passed(f, "another line") == "another line"  # other lines are not held back by it
    clock.now = 30.5
    assert _passed(f, line, 7) == f"{line % 7} (49 more like it in the last 30 s)"
    clock.now = 61
    assert _passed(f, line, 8) == line % 8  # nothing held back since


def test_librdkafka_lines_go_through_the_filter(caplog: pytest.LogCaptureFixture) -> None:
    unique = "test-" + "".join(chr(ord("a") + int(d)) for d in str(id(caplog)))  # no digits
    with caplog.at_level(logging.INFO, logger="streamprov.kafka"):
        for _ in range(100):
            KAFKA_LOG.warning("Kafka: %s: Connect to ipv4#127.0.0.1:1 failed", unique)
    assert len([r for r in caplog.records if unique in r.getMessage()]) == 1


def test_the_gapless_warning_is_not_shown(caplog: pytest.LogCaptureFixture) -> None:
    """The ledger sink sets `enable.gapless.guarantee` on purpose; librdkafka's 'experimental'
    warning about it was in every demo run."""
    with caplog.at_level(logging.INFO, logger="streamprov.kafka"):
        KAFKA_LOG.warning(
            "CONFWARN [rdkafka#producer-5] [thrd:app]: Configuration property "
            "enable.gapless.guarantee is experimental: When set to `true`, ..."
        )
    assert not [r for r in caplog.records if "gapless" in r.getMessage()]
