"""`OutputIndex.add`: what the Recompute Manager learns from the output topics, without a broker."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fake_messages import Msg

from recompute_manager.cache import ResultCache
from recompute_manager.outputs import OutputIndex
from recompute_manager.planner import Coordinates
from streamprov.header import HEADER_KEY, ProvenanceHeader
from streamprov.ledger import DataRef


def _index(cache: ResultCache) -> Any:
    """An OutputIndex without its topic reader (`add` is what is tested)."""
    index: Any = OutputIndex.__new__(OutputIndex)
    index.cache, index.locations, index.headers, index.trace_headers = cache, {}, {}, {}
    index.mismatched, index.summaries = 0, None
    return index


def test_a_corrupted_copy_does_not_replace_the_record_its_header_names(tmp_path: Path) -> None:
    """A record whose value does not match its own header (corrupted in flight, or a copy re-produced
    with another value: the Validator's checksum_mismatch) is not indexed: the node keeps the real
    record's coordinates and value, which recomputes read as a stored input."""
    value = b'{"fahrenheit":70.7}'
    header = ProvenanceHeader.for_source("reading-0002", value)
    node = DataRef(header.data_id, header.checksum)
    with ResultCache(tmp_path / "cache") as cache:
        index = _index(cache)
        index.add(Msg(value, h=[(HEADER_KEY, header.encode())], t="out", o=5))
        index.add(Msg(b'{"fahrenheit":170.7}', h=[(HEADER_KEY, header.encode())], t="out", o=12))
        assert index.locations == {node: Coordinates("out", 0, 5)}
        assert cache.value(node) == value and index.mismatched == 1
        assert index.headers == {node: header.encode()}
