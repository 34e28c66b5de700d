"""A `LedgerWriter` in a child process, so sealing, hashing, encoding and storing entries never take the
agent's interpreter lock.

In CPython a writer *thread* still competes with the data path for the GIL: every entry costs tens of
microseconds of Python on the writer's side (identity and chain hashes, the Merkle tree, the Avro
body, the Kafka produce), and a map step spends about as much per record. A child process runs on
another core instead. The agent's side only turns each application into a tuple of plain values
(`Row`), pickles a batch of them and writes it to a pipe: a few microseconds per record.

Same contract as `LedgerWriter` (it runs one, in the child):

- `append_rows` / `append` hand applications over (one pipe write per batch). A pipe write blocks
  only while the child is not reading, and the child always reads: its own appends fail fast
  (backpressure after `put_timeout_s`, or the writer failed) and are reported, never waited on.
- `begin_flush()` / `flush()` return when everything handed over before is durable; an append that
  failed in the child since the previous flush fails this flush (`LedgerBackpressureError` /
  `LedgerWriteFailedError`), so the agent redoes the batch and no entry is lost (at-least-once).
- `close()` drains, signs a final checkpoint, flushes and stops the child.
- If the child dies, every later call raises `LedgerWriteFailedError`.

The child is a fresh interpreter (`python -c`, not a fork: librdkafka's threads do not survive one,
and unlike multiprocessing's `spawn` it never re-imports the agent's main module), so the sink is
given as a picklable factory (e.g. `functools.partial(KafkaLedgerSink, config, topic)`) and the
signer as its Ed25519 seed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import queue
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from streamprov.ledger.errors import (
    LedgerBackpressureError,
    LedgerClosedError,
    LedgerError,
    LedgerTimeoutError,
    LedgerWriteFailedError,
)
from streamprov.ledger.model import AnyRow, Application, AppTemplate, ref_row
from streamprov.ledger.signing import CheckpointSigner
from streamprov.ledger.store import LedgerSink
from streamprov.ledger.writer import LedgerWriter, WriterStats

logger = logging.getLogger(__name__)

_PICKLE = pickle.HIGHEST_PROTOCOL
_ERRORS: dict[str, type[LedgerError]] = {
    "backpressure": LedgerBackpressureError,
    "timeout": LedgerTimeoutError,
    "failed": LedgerWriteFailedError,
    "closed": LedgerClosedError,
}


def _kind(exc: BaseException) -> str:
    if isinstance(exc, LedgerBackpressureError):
        return "backpressure"
    if isinstance(exc, LedgerTimeoutError):
        return "timeout"
    if isinstance(exc, LedgerClosedError):
        return "closed"
    return "failed"


# -- the child ------------------------------------------------------------------------------------------
def _child_entry(fd: int, nice: int = 0) -> None:
    """Entry point of the child (`python -c`): no parent module is re-imported, unlike `spawn`."""
    if nice:
        os.nice(nice)  # the data path first: the writer catches up in the gaps, before each flush
    conn = Connection(fd)
    try:
        sys.path[:] = pickle.loads(conn.recv_bytes())  # noqa: S301 - our own parent
        sink_factory, ledger_id, seed, options = pickle.loads(conn.recv_bytes())  # noqa: S301
    except BaseException as exc:
        conn.send_bytes(pickle.dumps(("E", "failed", f"cannot load the writer's settings: {exc!r}"), _PICKLE))
        return
    _child_main(conn, sink_factory, ledger_id, seed, options)


def _stop(process: subprocess.Popen[bytes], conn: Connection | None, wait_s: float = 5.0) -> None:
    """Wait for the child to exit (kill it after `wait_s`), then close our end of the pipe."""
    try:
        process.wait(wait_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(5)
    if conn is not None:
        conn.close()


def _child_main(
    conn: Connection,
    sink_factory: Callable[[], LedgerSink],
    ledger_id: str,
    signer_seed: bytes | None,
    options: dict[str, Any],
) -> None:
    """The child: start the writer, then apply what the parent sends until it says close."""
    try:
        signer = None
        if signer_seed is not None:
            signer = CheckpointSigner(Ed25519PrivateKey.from_private_bytes(signer_seed))
        writer = LedgerWriter(sink_factory(), ledger_id, signer, **options).start()
    except BaseException as exc:  # reported to the parent's start()
        conn.send_bytes(pickle.dumps(("E", _kind(exc), repr(exc)), _PICKLE))
        return
    _Child(conn, writer).run()


class _Child:
    """The child's loop. Flushes are answered the moment they complete, by a thread of their own (in
    order: the writer completes them in order), so the loop only ever blocks reading the pipe."""

    def __init__(self, conn: Connection, writer: LedgerWriter) -> None:
        self.conn = conn
        self.writer = writer
        self.send_lock = threading.Lock()
        self.replies: queue.Queue[tuple[int, Any] | None] = queue.Queue()
        self.pending_error: BaseException | None = None

    def send(self, msg: tuple[Any, ...]) -> None:
        data = pickle.dumps(msg, _PICKLE)
        with self.send_lock:
            self.conn.send_bytes(data)

    def answer(self, fid: int, exc: BaseException | None) -> None:
        if exc is None:
            self.send(("F", fid, None, "", _stats(self.writer)))
        else:
            self.send(("F", fid, _kind(exc), repr(exc), _stats(self.writer)))

    def replier(self) -> None:
        while (item := self.replies.get()) is not None:  # until run() says stop
            fid, ticket = item
            try:
                ticket.wait()
            except BaseException as exc:
                self.answer(fid, exc)
            else:
                self.answer(fid, None)

    def run(self) -> None:
        thread = threading.Thread(target=self.replier, name="ledger-flush-replies", daemon=True)
        thread.start()
        self.send(("R", self.writer.next_seq))
        while True:  # until the parent says close, or the pipe breaks
            try:
                msg = pickle.loads(self.conn.recv_bytes())  # noqa: S301 - our own parent
            except (EOFError, OSError):
                logger.warning("ledger writer process: the parent went away; closing")
                self.replies.put(None)
                _close(self.writer)
                return
            if msg[0] == "C":
                self.replies.put(None)
                thread.join(msg[1])
                error = _close(self.writer, msg[1])
                self.send(("C", error, _stats(self.writer)))
                return
            self.apply(msg)

    def apply(self, msg: tuple[Any, ...]) -> None:
        tag = msg[0]
        try:
            if tag == "A":
                self.writer.append_rows(msg[1])
            elif tag == "S":
                self.writer.register_template(msg[1], msg[2])
            elif tag == "F":
                if self.pending_error is not None:
                    err, self.pending_error = self.pending_error, None
                    self.answer(msg[1], err)
                    return
                try:
                    self.replies.put((msg[1], self.writer.begin_flush(msg[2])))
                except BaseException as exc:
                    self.answer(msg[1], exc)
        except BaseException as exc:  # an append or a template: the next flush fails, the batch is redone
            self.pending_error = exc


def _close(writer: LedgerWriter, timeout_s: float = 30.0) -> str | None:
    try:
        writer.close(timeout_s)
    except BaseException as exc:
        return repr(exc)
    return None


def _stats(writer: LedgerWriter) -> tuple[int, ...]:
    s = writer.stats
    return s.appended, s.entries, s.duplicates, s.checkpoints, s.batches, s.durable_seq


# -- the parent ------------------------------------------------------------------------------------------
@dataclass
class _Pending:
    done: threading.Event = field(default_factory=threading.Event)
    error: LedgerError | None = None


class ProcessFlush:
    """A flush in progress in the child (`ProcessLedgerWriter.begin_flush`)."""

    def __init__(self, pending: _Pending, deadline: float, timeout_s: float) -> None:
        self._pending = pending
        self._deadline = deadline
        self._timeout_s = timeout_s

    def done(self) -> bool:
        return self._pending.done.is_set()

    def wait(self) -> None:
        if not self._pending.done.wait(max(0.0, self._deadline - time.monotonic())):
            raise LedgerTimeoutError(f"ledger flush did not finish within {self._timeout_s}s")
        if self._pending.error is not None:
            raise self._pending.error


class ProcessLedgerWriter:
    """`LedgerWriter` semantics with the work in a child process; see the module docstring.

    `sink_factory` builds the storage in the child (picklable: a module-level callable or a
    `functools.partial`); `signer_seed` is the raw 32-byte Ed25519 private key (None: no checkpoints).
    Other keyword arguments go to the child's `LedgerWriter`.
    """

    def __init__(
        self,
        sink_factory: Callable[[], LedgerSink],
        ledger_id: str,
        signer_seed: bytes | None,
        *,
        start_timeout_s: float = 60.0,
        nice: int = 0,
        **writer_options: Any,
    ) -> None:
        self.sink_factory = sink_factory
        self.ledger_id = ledger_id
        self.signer_seed = signer_seed
        self.start_timeout_s = start_timeout_s
        self.nice = nice
        self.writer_options = writer_options
        self.stats = WriterStats()
        self._templates: dict[AppTemplate, int] = {}
        self._conn: Connection | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._reader: threading.Thread | None = None
        self._send_lock = threading.Lock()
        self._pending: dict[int, _Pending] = {}
        self._closing: _Pending | None = None
        self._next_flush = 0
        self._failure: str | None = None
        self._closed = False
        self.next_seq = 0

    # -- lifecycle ---------------------------------------------------------------------------------------
    def start(self) -> ProcessLedgerWriter:
        if self._process is not None:
            return self
        parent_sock, child_sock = socket.socketpair()
        fd = child_sock.fileno()
        code = (
            f"from streamprov.ledger.process_writer import _child_entry; _child_entry({fd}, {int(self.nice)})"
        )
        process = subprocess.Popen([sys.executable, "-c", code], pass_fds=(fd,), close_fds=True)
        child_sock.close()
        parent = Connection(parent_sock.detach())
        try:  # the child's import path first (so it can unpickle the factories), then the rest
            parent.send_bytes(pickle.dumps(list(sys.path), _PICKLE))
            init = (self.sink_factory, self.ledger_id, self.signer_seed, self.writer_options)
            parent.send_bytes(pickle.dumps(init, _PICKLE))
            if not parent.poll(self.start_timeout_s):
                raise LedgerWriteFailedError(
                    f"the ledger writer process did not start in {self.start_timeout_s}s"
                )
            msg = pickle.loads(parent.recv_bytes())  # noqa: S301 - our own child
        except (EOFError, OSError, pickle.PicklingError, AttributeError, TypeError) as exc:
            _stop(process, parent)
            raise LedgerWriteFailedError(f"the ledger writer process did not start: {exc!r}") from exc
        except BaseException:
            _stop(process, parent)
            raise
        if msg[0] != "R":
            _stop(process, parent)
            raise _ERRORS.get(msg[1], LedgerWriteFailedError)(f"the ledger writer process failed: {msg[2]}")
        self.next_seq = msg[1]
        self._conn, self._process = parent, process
        self._reader = threading.Thread(
            target=self._read, name=f"ledger-replies-{self.ledger_id}", daemon=True
        )
        self._reader.start()
        return self

    def __enter__(self) -> ProcessLedgerWriter:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self, timeout_s: float = 30.0) -> None:
        """Drain, sign a final checkpoint, flush and stop the child. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._conn is None or self._process is None:
            return
        closing = self._closing = _Pending()
        if self._failure is not None:
            closing.error = LedgerWriteFailedError(f"the ledger writer process failed: {self._failure}")
            closing.done.set()
        with contextlib.suppress(LedgerWriteFailedError):  # a broken pipe also answers `closing`
            self._send(("C", timeout_s))
        finished = closing.done.wait(timeout_s + 5)
        _stop(self._process, None, 5 if finished else 0.1)
        self._conn.close()
        if not finished:
            raise LedgerTimeoutError(f"the ledger writer process did not stop within {timeout_s}s")
        if closing.error is not None:
            raise closing.error

    # -- the data path ----------------------------------------------------------------------------------
    def template(self, template: AppTemplate) -> int:
        key = self._templates.get(template)
        if key is None:
            key = len(self._templates)
            self._send(("S", key, template))
            self._templates[template] = key
        return key

    def append_rows(self, rows: list[AnyRow], timeout_s: float | None = None) -> None:
        if rows:
            self._send(("A", rows))
            self.stats.appended += len(rows)

    def append_many(self, apps: list[Application], timeout_s: float | None = None) -> None:
        self.append_rows(
            [
                (
                    self.template(AppTemplate.of(a)),
                    tuple(ref_row(r) for r in a.inputs),
                    ref_row(a.output),
                    a.timestamp_ms,
                    a.window_start,
                    a.window_end,
                )
                for a in apps
            ]
        )

    def append(self, app: Application, timeout_s: float | None = None) -> None:
        self.append_many([app], timeout_s)

    def begin_flush(self, timeout_s: float = 30.0) -> ProcessFlush:
        pending = _Pending()
        with self._send_lock:
            fid = self._next_flush
            self._next_flush += 1
            self._pending[fid] = pending
        self._send(("F", fid, timeout_s))
        return ProcessFlush(pending, time.monotonic() + timeout_s + 1.0, timeout_s)

    def flush(self, timeout_s: float = 30.0) -> None:
        self.begin_flush(timeout_s).wait()

    def _send(self, msg: tuple[Any, ...]) -> None:
        if self._failure is not None:
            raise LedgerWriteFailedError(f"the ledger writer process failed: {self._failure}")
        if self._conn is None:
            raise LedgerClosedError("start() the writer first")
        if self._closed and msg[0] != "C":
            raise LedgerClosedError("the ledger writer is closed")
        data = pickle.dumps(msg, _PICKLE)
        try:
            with self._send_lock:
                self._conn.send_bytes(data)
        except (OSError, ValueError) as exc:
            self._fail(f"the pipe to the writer process broke: {exc!r}")
            raise LedgerWriteFailedError(f"the ledger writer process is gone: {exc!r}") from exc

    # -- replies, on the reader thread ------------------------------------------------------------------
    def _read(self) -> None:
        conn = self._conn
        assert conn is not None
        while True:  # until the child answers close, or the pipe breaks
            try:
                msg = pickle.loads(conn.recv_bytes())  # noqa: S301 - our own child
            except (EOFError, OSError):
                if self._closing is None or not self._closing.done.is_set():
                    self._fail("the ledger writer process exited")
                return
            if msg[0] == "F":
                _, fid, kind, text, stats = msg
                self._update(stats)
                with self._send_lock:
                    pending = self._pending.pop(fid, None)
                if pending is not None:
                    if kind is not None:
                        pending.error = _ERRORS.get(kind, LedgerWriteFailedError)(
                            f"ledger flush failed: {text}"
                        )
                    pending.done.set()
            elif msg[0] == "C":
                self._update(msg[2])
                if self._closing is not None:
                    if msg[1] is not None:
                        self._closing.error = LedgerWriteFailedError(f"closing the ledger failed: {msg[1]}")
                    self._closing.done.set()
                return

    def _update(self, stats: tuple[int, ...]) -> None:
        s = self.stats
        _, s.entries, s.duplicates, s.checkpoints, s.batches, s.durable_seq = stats

    def _fail(self, reason: str) -> None:
        self._failure = reason
        error = LedgerWriteFailedError(f"the ledger writer process failed: {reason}")
        with self._send_lock:
            pending, self._pending = list(self._pending.values()), {}
        for p in pending:
            p.error = error
            p.done.set()
        if self._closing is not None and not self._closing.done.is_set():
            self._closing.error = error
            self._closing.done.set()
