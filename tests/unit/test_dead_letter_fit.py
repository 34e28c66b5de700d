"""`dead_letter.fit`: a dead letter can always be stored, whatever the size of the record."""

from __future__ import annotations

from streamprov.agents.dead_letter import (
    CUT_HEADER,
    ERROR_HEADER,
    MAX_DEAD_LETTER_BYTES,
    MAX_KEY_BYTES,
    REASON_HEADER,
    SOURCE_HEADER,
    dead_letter_headers,
    fit,
)


def _size(key: bytes | None, value: bytes | None, headers: list[tuple[str, bytes | None]]) -> int:
    return len(key or b"") + len(value or b"") + sum(len(k) + len(v or b"") for k, v in headers)


def test_a_record_that_fits_is_kept_exactly() -> None:
    headers = dead_letter_headers(
        [("streamprov", b"h"), ("other", None)], "malformed_request", "bad", "t/0/1"
    )
    assert fit(b"k", b"v" * 100, headers, limit=1000) == (b"k", b"v" * 100, headers)
    assert fit(None, None, headers, limit=1000) == (None, None, headers)


def test_a_record_too_large_keeps_why_and_where_and_says_what_was_cut() -> None:
    headers = dead_letter_headers(
        [("big", b"x" * 500), ("streamprov", b"h")], "malformed_request", "bad", "t/0/7"
    )
    key, value, kept = fit(b"k", b"v" * 5000, headers, limit=1000)
    assert key == b"k" and _size(key, value, kept) <= 1000 and value == b"v" * len(value or b"") and value
    names = [k for k, _ in kept]
    assert names == [REASON_HEADER, ERROR_HEADER, SOURCE_HEADER, CUT_HEADER]
    note = dict(kept)[CUT_HEADER] or b""
    assert b"5000 value bytes and 2 other headers" in note and dict(kept)[SOURCE_HEADER] == b"t/0/7"
    # cut again (a dead letter dead-lettered once more): one cut header, still under the limit
    _, again, twice = fit(
        key, value, dead_letter_headers(kept, "processing_error", "again", "dlq/0/3"), limit=600
    )
    assert [k for k, _ in twice].count(CUT_HEADER) == 1 and _size(key, again, twice) <= 600


def test_a_huge_key_is_cut_too() -> None:
    """The key counts: a 600 KB key with a small value made a dead letter the broker refused, and the
    validator retried it until it gave up (found by probing)."""
    headers = dead_letter_headers([("streamprov", b"h" * 600_000)], "malformed_header", "bad", "t/0/9")
    key, value, kept = fit(b"K" * 600_000, b"v", headers)
    assert key == b"K" * MAX_KEY_BYTES and value == b"v"
    assert _size(key, value, kept) <= MAX_DEAD_LETTER_BYTES
    assert b"a key of 600000 bytes" in (dict(kept)[CUT_HEADER] or b"")
