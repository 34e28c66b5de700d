"""Every recompute is a ledger entry: the applications a unit's tasks performed, as requests to the
ledger sequencer, published in the worker's own transaction.

So a corrected record and its ledger entries commit together or not at all (a killed worker's replay
sends them again; same task id, same entry ids, dropped as duplicates by the sequencer). Entries have
`origin = RECOMPUTE`, the task id, the inputs the task actually read (current source versions, earlier
tasks' outputs, stored intermediates) and the step it stamped (new function version and code hash
after a function change).
"""

from __future__ import annotations

from collections.abc import Iterable

from recompute_manager.executor import Recomputed
from streamprov.header import ProvenanceHeader
from streamprov.ledger.model import Application, Context, Origin
from streamprov.ledger.requests import encode_request
from streamprov.ledger.writer import DEFAULT_MAX_ENTRY_BYTES, approx_size

__all__ = ["applications_of", "ledger_requests"]


def applications_of(result: Recomputed, *, device_id: str) -> list[Application]:
    """One application per step the task ran, in order."""
    apps = []
    for header, inputs, output in result.applied:
        step = ProvenanceHeader.decode(header).lineage[-1]
        apps.append(
            Application.of_step(
                step,
                inputs,
                output,
                device_id=device_id,
                context=Context(source=result.task.topic),
                origin=Origin.RECOMPUTE,
                task_id=result.task.task_id,
            )
        )
    return apps


def ledger_requests(
    results: Iterable[Recomputed],
    ledger_id: str,
    *,
    device_id: str,
    max_bytes: int = DEFAULT_MAX_ENTRY_BYTES,
) -> list[bytes]:
    """Request records for every recomputed task (changed or not: an unchanged output was still
    re-derived and checked), each under `max_bytes`."""
    requests: list[bytes] = []
    batch: list[Application] = []
    size = 0
    for result in results:
        for app in applications_of(result, device_id=device_id):
            need = approx_size(app)
            if batch and size + need > max_bytes:
                requests.append(encode_request(ledger_id, batch))
                batch, size = [], 0
            batch.append(app)
            size += need
    if batch:
        requests.append(encode_request(ledger_id, batch))
    return requests
