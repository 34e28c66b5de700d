"""The asynchronous ledger writer: the data path hands over applications, a background thread stores them.

Recording provenance must not slow the pipeline (OpenLineage #4883 is what happens otherwise). So
`append` only checks the size and puts the application on a bounded queue; one background thread
takes batches off it, seals them into chained entries (`LedgerChain`: the single sequencer), adds
signed checkpoints, and writes them to the sink (Kafka: an idempotent, acks=all producer).

Contract, for agents:

- `append` never blocks longer than `put_timeout_s`. When the queue is full for that long the
  ledger cannot keep up, and it raises `LedgerBackpressureError` with nothing queued: the caller
  retries, slows down or stops. Entries are never dropped silently.
- `flush()` returns when everything appended before it is durable. At-least-once end to end: an
  agent calls `flush()` before committing its consumer offsets, so a crash can only replay
  applications, never lose their entries; replays keep their entry_id and are dropped as
  duplicates (by the chain's window, and in any case by the index), so the graph is not duplicated.
- `close()` drains the queue, signs a final checkpoint (a cleanly stopped ledger is covered to its
  last entry), flushes and closes the sink. Nothing appended before `close()` is lost.
- When storage fails the writer stops: later `append`/`flush` calls raise `LedgerWriteFailedError`.
  A new writer resumes from what storage holds.

Memory is bounded by `max_queue` items (an application, or a list from `append_many`), one
batch of `max_batch` records, and the chain's dedup window.
"""

from __future__ import annotations

import functools
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Protocol

from streamprov.checksum import Checksum, ChecksumAlgorithm
from streamprov.ledger.chain import DEFAULT_CHECKPOINT_EVERY, DEFAULT_DEDUP_WINDOW, LedgerChain
from streamprov.ledger.codec import encode_record, record_key
from streamprov.ledger.errors import (
    EntryTooLargeError,
    LedgerBackpressureError,
    LedgerClosedError,
    LedgerTimeoutError,
    LedgerWriteFailedError,
    LedgerWriterError,
)
from streamprov.ledger.model import (
    AnyRow,
    Application,
    AppTemplate,
    Checkpoint,
    DataRef,
    LedgerRecord,
    MapRow,
    application_of,
)
from streamprov.ledger.rows import RowSealer, expand
from streamprov.ledger.signing import CheckpointSigner
from streamprov.ledger.store import LedgerSink

logger = logging.getLogger(__name__)

DEFAULT_MAX_ENTRY_BYTES = 900_000  # under Kafka's default 1 MiB message limit, with room for framing
_IDLE_POLL_S = 0.1


def text_bytes(text: str) -> int:
    """`text`'s UTF-8 length; an ASCII string (`isascii` is a flag check) is not encoded to count it."""
    return len(text) if text.isascii() else len(text.encode("utf-8"))


def approx_size(app: Application) -> int:
    """An upper bound of an application's encoded entry size, cheap enough for the data path: text in
    UTF-8 bytes, plus room for every length prefix and the entry's fixed fields."""
    refs = sum(text_bytes(r.data_id) + len(r.checksum.value) + 24 for r in (*app.inputs, app.output))
    params = sum(text_bytes(k) + text_bytes(v) + 16 for k, v in app.parameters)
    ctx = app.context
    texts = (
        app.function_id,
        app.function_version,
        app.device_id,
        ctx.source,
        ctx.location,
        app.task_id or "",
    )
    return (
        256
        + refs
        + params
        + sum(text_bytes(t) + 8 for t in texts)
        + sum(text_bytes(r) + 8 for r in ctx.access_rights)
    )


@functools.lru_cache(maxsize=256)
def template_size(t: AppTemplate) -> int:
    """`approx_size` of an application of `t` without its data nodes (see `approx_map_row_size`)."""
    no_node = DataRef("", Checksum(ChecksumAlgorithm.CRC32C, b""))
    app = Application(
        t.kind,
        t.function_id,
        t.function_version,
        t.code_hash,
        t.parameters,
        (),
        no_node,
        0,
        t.device_id,
        t.context,
        t.origin,
        t.task_id,
    )
    return approx_size(app) - 24


def approx_map_row_size(static: int, row: MapRow, limit: int) -> int:
    """An upper bound of the size of the entry a `MapRow` seals into under a template of
    `template_size` `static`, counted as `approx_size` counts an application's except that the data
    nodes are counted in bytes (the headers hold them as bytes). A map entry holds its DataID twice
    (input and output node).

    Cheap on the data path: while the bound from the header lengths alone (the DataID is at most the
    output header's length) is within `limit`, that bound is returned; only a row that may not fit
    is read (`expand`, which raises `MalformedRecordError` for a row whose headers do not decode)."""
    bound = static + 2 * len(row[3]) + len(row[1] or b"") + 2 * (32 + 24)
    if bound <= limit:
        return bound
    _, inputs, output, *_ = expand(row)
    return static + sum(text_bytes(r[0]) + len(r[2]) + 24 for r in (*inputs, output))


Pending = LedgerRecord | tuple[bytes, bytes]
"""What a batch holds until written: records, or (key, value) already encoded by the row fast path."""


class FlushWaiter(Protocol):
    def done(self) -> bool: ...

    def wait(self) -> None: ...


class LedgerAppender(Protocol):
    """What agents need of a ledger writer: `LedgerWriter` (a thread) or `ProcessLedgerWriter`."""

    def template(self, template: AppTemplate) -> int: ...

    def append_rows(self, rows: list[AnyRow], timeout_s: float | None = None) -> None: ...

    def append(self, app: Application, timeout_s: float | None = None) -> None: ...

    def begin_flush(self, timeout_s: float = 30.0) -> FlushWaiter: ...

    def flush(self, timeout_s: float = 30.0) -> None: ...


@dataclass(frozen=True, slots=True)
class _Rows:
    rows: list[AnyRow]


def takes_encoded(sink: object) -> bool:
    """Does the sink take records already encoded (`write_encoded(items)`, items = (key, value))?

    Only when the most derived class that defines `write` or `write_encoded` defines the latter: a
    subclass that changed `write` alone (to watch, delay or fail writes) expects every record there.
    """
    for klass in type(sink).__mro__:
        own = vars(klass)
        if "write" in own or "write_encoded" in own:
            return "write_encoded" in own
    return False


@dataclass
class _Barrier:
    """A flush request travelling through the queue behind everything appended before it."""

    timeout_s: float
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None


class FlushTicket:
    """A flush in progress (`LedgerWriter.begin_flush`): `wait()` until it is durable."""

    __slots__ = ("_barrier", "_deadline")

    def __init__(self, barrier: _Barrier, deadline: float) -> None:
        self._barrier = barrier
        self._deadline = deadline

    def done(self) -> bool:
        return self._barrier.done.is_set()

    def wait(self) -> None:
        """Return when everything appended before the flush began is durable; else raise
        `LedgerTimeoutError` (not done in time: may be retried) or `LedgerWriteFailedError`."""
        barrier = self._barrier
        if not barrier.done.wait(max(0.0, self._deadline - time.monotonic())):
            raise LedgerTimeoutError(f"ledger flush did not finish within {barrier.timeout_s}s")
        if barrier.error is not None:
            if isinstance(barrier.error, LedgerTimeoutError):
                raise barrier.error
            raise LedgerWriteFailedError(f"the ledger writer failed: {barrier.error!r}") from barrier.error


class _Stop:
    pass


_STOP = _Stop()


@dataclass
class WriterStats:
    """Counters since the writer started (read without locking: approximate while running)."""

    appended: int = 0
    entries: int = 0
    duplicates: int = 0
    checkpoints: int = 0
    batches: int = 0
    durable_seq: int = -1
    """Highest seq known durable (after the last successful flush)."""


class LedgerWriter:
    """Bounded, batched, asynchronous appends to one ledger; see the module docstring.

    Use as a context manager, or `start()` then `close()`. Starting reads the sink's state (the
    Kafka sink reads the ledger's tail) and may raise; after that, the data path only calls `append`.
    """

    def __init__(
        self,
        sink: LedgerSink,
        ledger_id: str,
        signer: CheckpointSigner | None,
        *,
        checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY,
        dedup_window: int = DEFAULT_DEDUP_WINDOW,
        max_queue: int = 10_000,
        max_batch: int = 1_000,
        put_timeout_s: float = 1.0,
        max_entry_bytes: int = DEFAULT_MAX_ENTRY_BYTES,
        checkpoint_on_close: bool = True,
    ) -> None:
        if max_queue < 1 or max_batch < 1 or put_timeout_s < 0:
            raise ValueError("max_queue and max_batch must be >= 1, put_timeout_s >= 0")
        self.sink = sink
        self.ledger_id = ledger_id
        self.signer = signer
        self.checkpoint_every = checkpoint_every
        self.dedup_window = dedup_window
        self.max_batch = max_batch
        self.put_timeout_s = put_timeout_s
        self.max_entry_bytes = max_entry_bytes
        self.checkpoint_on_close = checkpoint_on_close
        self.stats = WriterStats()
        self._queue: queue.Queue[Application | list[Application] | _Rows | _Barrier | _Stop] = queue.Queue(
            max_queue
        )
        self._chain: LedgerChain | None = None
        self._batch: list[Application | list[Application] | _Rows | _Barrier | _Stop] = []
        self._thread: threading.Thread | None = None
        self._failure: BaseException | None = None
        self._closed = False
        self._inflight = 0
        self._state_lock = threading.Condition()
        self._sealer: RowSealer | None = None
        self._templates: dict[int, AppTemplate] = {}
        self._map_static: dict[int, int] = {}
        """Each template's `template_size`, for the size bound of its map rows."""
        self._template_keys: dict[AppTemplate, int] = {}

    # -- lifecycle ----------------------------------------------------------------------------------
    def start(self) -> LedgerWriter:
        if self._thread is not None:
            return self
        state = self.sink.load_state(self.ledger_id, dedup_window=self.dedup_window)
        self._chain = LedgerChain(
            self.ledger_id,
            self.signer,
            checkpoint_every=self.checkpoint_every,
            dedup_window=self.dedup_window,
            state=state,
        )
        if takes_encoded(self.sink):  # the sink stores bytes: seal rows straight into them
            self._sealer = RowSealer(self._chain)
        logger.info("ledger %s: resuming at seq %s", self.ledger_id, state.next_seq)
        self._thread = threading.Thread(target=self._run, name=f"ledger-writer-{self.ledger_id}", daemon=True)
        self._thread.start()
        return self

    def __enter__(self) -> LedgerWriter:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def next_seq(self) -> int:
        """The seq the next new entry will get (read from the writer thread's chain)."""
        return self._chain.next_seq if self._chain is not None else 0

    # -- the data path ------------------------------------------------------------------------------
    def append(self, app: Application, timeout_s: float | None = None) -> None:
        """Queue `app` for the ledger; blocks at most `timeout_s` (default `put_timeout_s`)."""
        if self._failure is not None:
            raise LedgerWriteFailedError(f"the ledger writer failed: {self._failure!r}") from self._failure
        size = approx_size(app)
        if size > self.max_entry_bytes:
            raise EntryTooLargeError(
                f"application of {app.function_id}@{app.function_version} with {len(app.inputs)} inputs "
                f"needs about {size} bytes, above max_entry_bytes={self.max_entry_bytes}"
            )
        self._put(app, timeout_s)
        self.stats.appended += 1

    def append_many(self, apps: list[Application], timeout_s: float | None = None) -> None:
        """Queue several applications as one item (one lock, one wake-up); all or none are queued.

        The list is handed over: the caller must not change it afterwards.
        """
        if not apps:
            return
        if self._failure is not None:
            raise LedgerWriteFailedError(f"the ledger writer failed: {self._failure!r}") from self._failure
        limit = self.max_entry_bytes
        for app in apps:
            size = approx_size(app)
            if size > limit:
                raise EntryTooLargeError(
                    f"application of {app.function_id}@{app.function_version} with {len(app.inputs)} "
                    f"inputs needs about {size} bytes, above max_entry_bytes={limit}"
                )
        self._put(apps, timeout_s)
        self.stats.appended += len(apps)

    def template(self, template: AppTemplate) -> int:
        """The key rows use for `template` (registered on first use)."""
        key = self._template_keys.get(template)
        if key is None:
            key = len(self._template_keys)
            self.register_template(key, template)
        return key

    def register_template(self, key: int, template: AppTemplate) -> None:
        """Register `template` under a key chosen elsewhere (a `ProcessLedgerWriter` parent)."""
        static = approx_size(
            Application(
                template.kind,
                template.function_id,
                template.function_version,
                template.code_hash,
                template.parameters,
                (),
                DataRef("", Checksum(ChecksumAlgorithm.CRC32C, b"")),
                0,
                template.device_id,
                template.context,
                template.origin,
                template.task_id,
            )
        )
        if static > self.max_entry_bytes:
            raise EntryTooLargeError(
                f"applications of {template.function_id}@{template.function_version} need about {static} "
                f"bytes before any input, above max_entry_bytes={self.max_entry_bytes}"
            )
        self._map_static[key] = template_size(template)  # per row on the data path: no hashing there
        self._templates[key] = template  # before the key is handed out: the writer thread reads it
        self._template_keys[template] = key

    def append_rows(self, rows: list[AnyRow], timeout_s: float | None = None) -> None:
        """Queue applications given as rows (see `Row`) as one item; all or none are queued.

        Applications are built on the writer's thread: the data path only makes tuples. The list is
        handed over: the caller must not change it afterwards.
        """
        if not rows:
            return
        if self._failure is not None:
            raise LedgerWriteFailedError(f"the ledger writer failed: {self._failure!r}") from self._failure
        budget = self.max_entry_bytes - 1024
        for row in rows:
            template = self._templates.get(row[0])
            if template is None:
                raise LedgerWriterError(f"no template {row[0]} registered with this writer")
            if len(row) != 6:  # a MapRow: bounded by its headers' lengths unless they are long
                size = approx_map_row_size(self._map_static[row[0]], row, budget)
                if size > budget:
                    raise EntryTooLargeError(
                        f"map application needs about {size} bytes, above max_entry_bytes="
                        f"{self.max_entry_bytes} (its DataID or headers are too long)"
                    )
                continue
            inputs = row[1]
            if len(inputs) > 1 or len(row[2][0]) > 4096:
                size = sum(text_bytes(r[0]) + len(r[2]) + 24 for r in (*inputs, row[2]))
                if size > budget:
                    raise EntryTooLargeError(
                        f"application with {len(inputs)} inputs needs about {size} bytes of data nodes, "
                        f"above max_entry_bytes={self.max_entry_bytes}"
                    )
        self._put(_Rows(rows), timeout_s)
        self.stats.appended += len(rows)

    def _put(self, item: Application | list[Application] | _Rows, timeout_s: float | None) -> None:
        with self._state_lock:
            if self._closed or self._thread is None:
                raise LedgerClosedError(
                    "the ledger writer is closed" if self._closed else "start() the writer first"
                )
            self._inflight += 1
        timeout = self.put_timeout_s if timeout_s is None else timeout_s
        try:
            self._queue.put(item, timeout=timeout)
        except queue.Full:
            raise LedgerBackpressureError(
                f"ledger queue full ({self._queue.maxsize} items) for {timeout}s: the ledger cannot keep up"
            ) from None
        finally:
            with self._state_lock:
                self._inflight -= 1
                if not self._inflight:
                    self._state_lock.notify_all()

    def flush(self, timeout_s: float = 30.0) -> None:
        """Block until everything appended before this call is durable (or raise)."""
        self.begin_flush(timeout_s).wait()

    def begin_flush(self, timeout_s: float = 30.0) -> FlushTicket:
        """Start a flush and return at once; `FlushTicket.wait()` blocks until it is done (or raises).

        Lets an agent overlap the ledger's flush with its own (the producer's delivery reports, a
        transaction's offsets) and wait for both before committing.
        """
        if self._failure is not None:
            raise LedgerWriteFailedError(f"the ledger writer failed: {self._failure!r}") from self._failure
        if self._thread is None:
            raise LedgerClosedError("start() the writer first")
        barrier = _Barrier(timeout_s)
        deadline = time.monotonic() + timeout_s
        self._put_control(barrier, deadline)
        return FlushTicket(barrier, deadline)

    def close(self, timeout_s: float = 30.0) -> None:
        """Drain, sign a final checkpoint, flush and stop. Idempotent."""
        with self._state_lock:
            if self._closed:
                return
            self._closed = True
        thread = self._thread
        if thread is None:
            self.sink.close()
            return
        deadline = time.monotonic() + timeout_s
        self._put_control(_STOP, deadline)
        thread.join(max(0.0, deadline - time.monotonic()))
        if thread.is_alive():
            raise LedgerTimeoutError(f"the ledger writer did not stop within {timeout_s}s")
        if self._failure is not None:
            raise LedgerWriteFailedError(f"the ledger writer failed: {self._failure!r}") from self._failure

    def _put_control(self, item: _Barrier | _Stop, deadline: float) -> None:
        try:
            self._queue.put(item, timeout=max(0.0, deadline - time.monotonic()))
        except queue.Full:
            raise LedgerTimeoutError("the ledger queue stayed full; the writer is not keeping up") from None

    # -- the writer thread ----------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # any failure stops the writer; callers see it on their next call
            logger.exception("ledger %s: writer failed", self.ledger_id)
            self._failure = exc
            if not self._release(self._batch, exc):
                self._drain_after_failure(exc)
        finally:
            try:
                self.sink.close()
            except Exception:
                logger.exception("ledger %s: closing the sink failed", self.ledger_id)

    def _take_batch(self) -> list[Application | list[Application] | _Rows | _Barrier | _Stop] | None:
        try:
            first = self._queue.get(timeout=_IDLE_POLL_S)
        except queue.Empty:
            return None
        batch = [first]
        while len(batch) < self.max_batch:
            try:
                batch.append(self._queue.get_nowait())
            except queue.Empty:
                break
        return batch

    def _loop(self) -> None:
        chain = self._chain
        assert chain is not None
        while True:  # ends at the stop marker (close) or on a failure
            batch = self._take_batch()
            if batch is None:
                self.sink.service()
                continue
            self._batch = batch  # on a failure, its flushers and closer must still hear back
            pending: list[Pending] = []
            for item in batch:
                if isinstance(item, Application):
                    self._seal(chain, item, pending)
                elif isinstance(item, list):
                    for app in item:
                        self._seal(chain, app, pending)
                elif isinstance(item, _Rows):
                    self._seal_rows(chain, item, pending)
                elif isinstance(item, _Barrier):
                    self._write(pending)
                    pending = []
                    self._flush(item)
                else:
                    self._write(pending)
                    self._finish(chain)
                    return
            self._write(pending)

    def _seal(self, chain: LedgerChain, app: Application, pending: list[Pending]) -> None:
        records = chain.append(app)
        if not records:
            self.stats.duplicates += 1
            return
        self.stats.entries += 1
        if len(records) > 1:
            self.stats.checkpoints += 1
        pending.extend(records)

    def _seal_rows(self, chain: LedgerChain, item: _Rows, pending: list[Pending]) -> None:
        templates = self._templates
        sealer = self._sealer
        if sealer is None:  # a sink that only takes objects
            for row in item.rows:
                self._seal(chain, application_of(templates[row[0]], expand(row)), pending)
            return
        stats = self.stats
        for row in item.rows:
            before = len(pending)
            if not sealer.seal(templates[row[0]], row, pending):
                stats.duplicates += 1
                continue
            stats.entries += 1
            if len(pending) - before > 1:
                stats.checkpoints += 1

    def _write(self, records: list[Pending]) -> None:
        if not records:
            return
        if self._sealer is not None:
            self.sink.write_encoded(  # type: ignore[attr-defined]
                [r if isinstance(r, tuple) else (record_key(r), encode_record(r)) for r in records]
            )
        else:
            self.sink.write([r for r in records if not isinstance(r, tuple)])
        self.stats.batches += 1

    def _flush(self, barrier: _Barrier) -> None:
        try:
            self.sink.flush(barrier.timeout_s)
        except LedgerTimeoutError as exc:  # not a failure of storage: the caller may try again
            barrier.error = exc
        except BaseException as exc:
            barrier.error = exc
            raise
        else:
            assert self._chain is not None
            self.stats.durable_seq = self._chain.next_seq - 1
        finally:
            barrier.done.set()

    def _finish(self, chain: LedgerChain) -> None:
        """At the stop marker: take what in-flight appends still put, then checkpoint and flush."""
        pending: list[Pending] = []
        barriers: list[_Barrier] = []
        deadline = time.monotonic() + self.put_timeout_s + 1.0
        while True:  # until no append is in flight (none can start: closed), or the deadline
            self._drain_into(chain, pending, barriers)
            with self._state_lock:
                if not self._inflight or time.monotonic() > deadline:
                    break
                self._state_lock.wait(0.01)
        self._drain_into(chain, pending, barriers)
        if self.checkpoint_on_close:
            cp: Checkpoint | None = chain.checkpoint()
            if cp is not None:
                pending.append(cp)
                self.stats.checkpoints += 1
        try:
            self._write(pending)
            self.sink.flush(max(1.0, self.put_timeout_s * 10))
            self.stats.durable_seq = chain.next_seq - 1
        except BaseException as exc:
            for barrier in barriers:
                barrier.error = exc
            raise
        finally:
            for barrier in barriers:
                barrier.done.set()

    def _drain_into(self, chain: LedgerChain, pending: list[Pending], barriers: list[_Barrier]) -> None:
        while True:  # the queue is finite and nothing new can start
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if isinstance(item, Application):
                self._seal(chain, item, pending)
            elif isinstance(item, list):
                for app in item:
                    self._seal(chain, app, pending)
            elif isinstance(item, _Rows):
                self._seal_rows(chain, item, pending)
            elif isinstance(item, _Barrier):
                barriers.append(item)  # answered by close's own final flush

    def _release(
        self, batch: list[Application | list[Application] | _Rows | _Barrier | _Stop], exc: BaseException
    ) -> bool:
        """Answer the flushers in the batch that failed; True when it held the stop marker."""
        stop = False
        for item in batch:
            if isinstance(item, _Barrier) and not item.done.is_set():
                item.error = exc
                item.done.set()
            stop = stop or isinstance(item, _Stop)
        return stop

    def _drain_after_failure(self, exc: BaseException) -> None:
        """Release flushers and the closer; what is still queued is not stored (see the docstring)."""
        lost = 0
        while True:
            try:
                item = self._queue.get(timeout=_IDLE_POLL_S)
            except queue.Empty:
                if self._closed:
                    break
                continue
            if isinstance(item, Application):
                lost += 1
            elif isinstance(item, list):
                lost += len(item)
            elif isinstance(item, _Rows):
                lost += len(item.rows)
            elif isinstance(item, _Barrier):
                item.error = exc
                item.done.set()
            else:
                break
        if lost:
            logger.error("ledger %s: %d queued applications were not stored", self.ledger_id, lost)
