"""The lifecycle every streamprov service shares: stop on request, liveness, readiness, probes, signals.

A service is one loop in one thread (the Kafka clients belong to it); everything else only reads
what the loop publishes or asks it to stop:

* `ServiceState`: the stop flag (set from a signal handler or another thread, checked by the loop
  between batches), the heartbeat the loop beats every turn (liveness: a loop stuck for longer than
  `stall_limit_s` is not alive), and readiness with the reason it is not ready yet;
* `serve_probes`: `/healthz`, `/readyz` (and `/metrics`) answering from that state
  (`streamprov.agents.health`);
* `install_stop_signals`: SIGTERM/SIGINT -> `stop()`, so the loop finishes its batch, commits and
  returns, and the process exits 0;
* `beating`: keeps the heartbeat going through one long start-up step (catching a view up).

The Validator and the change detector service use it; the processor has a stop flag only.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from types import FrameType
from typing import TypeVar

from streamprov.agents.health import HttpEndpoints, Route, metrics_route, probe_route

log = logging.getLogger(__name__)

T = TypeVar("T")


def stall_limit(operation_timeout_s: float) -> float:
    """How long a loop may go without a turn before it counts as stuck: a turn can legitimately
    wait on a few broker operations (each bounded by `operation_timeout_s`)."""
    return 4 * operation_timeout_s + 10


class ServiceState:
    """Stop flag, heartbeat and readiness of one service loop; safe to read from any thread."""

    def __init__(self, stall_limit_s: float, *, not_ready: str = "starting") -> None:
        self.stall_limit_s = stall_limit_s
        self._stop = threading.Event()
        self._heartbeat = time.monotonic()
        self._why_not_ready: str | None = not_ready
        self._ready_reason = "ready"
        self.started = False
        self.closed = False

    # -- stopping ---------------------------------------------------------------------------------
    def stop(self) -> None:
        """Ask the loop to return after the current batch; safe from signal handlers and threads."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def pause(self, seconds: float) -> bool:
        """Sleep up to `seconds`, waking at once on `stop()`; False when stopping."""
        return not self._stop.wait(seconds)

    def clear_stop(self) -> None:
        """Forget a stop request (a loop that returned may be run again)."""
        self._stop.clear()

    # -- liveness ---------------------------------------------------------------------------------
    def beat(self) -> bool:
        """The loop turned; returns False once a stop was requested (for long steps that poll it)."""
        self._heartbeat = time.monotonic()
        return not self._stop.is_set()

    def idle_s(self) -> float:
        return time.monotonic() - self._heartbeat

    def alive(self) -> tuple[bool, str]:
        """Liveness: the loop turned within `stall_limit_s` (always alive before start and after close)."""
        idle = self.idle_s()
        if self.started and not self.closed and idle > self.stall_limit_s:
            return False, f"the loop has not turned for {idle:.0f} s"
        return True, "alive"

    # -- readiness --------------------------------------------------------------------------------
    def set_ready(self, reason: str) -> None:
        self._why_not_ready = None
        self._ready_reason = reason

    def set_not_ready(self, reason: str) -> None:
        self._why_not_ready = reason

    def ready(self) -> tuple[bool, str]:
        why = self._why_not_ready
        if why is not None:
            return False, why
        if self.closed:
            return False, "stopped"
        return True, self._ready_reason


def serve_probes(
    state: ServiceState,
    host: str,
    http_port: int | None,
    *,
    metrics_port: int | None = None,
    render_metrics: Callable[[], str] | None = None,
    ready: Callable[[], tuple[bool, str]] | None = None,
) -> list[HttpEndpoints]:
    """Start `/healthz` and `/readyz` (and `/metrics` when `render_metrics` is given) on `http_port`,
    and `/metrics` alone on `metrics_port` when that is another port. None: not served; 0: any free
    port (see `HttpEndpoints.port`). `ready` overrides `state.ready` (a service with more to say)."""
    servers: list[HttpEndpoints] = []
    if http_port is not None:
        routes: dict[str, Route] = {
            "/healthz": probe_route(state.alive),
            "/readyz": probe_route(ready or state.ready),
        }
        if render_metrics is not None:
            routes["/metrics"] = metrics_route(render_metrics)
        servers.append(HttpEndpoints(host, http_port, routes).start())
    if render_metrics is not None and metrics_port is not None and metrics_port != http_port:
        try:
            servers.append(
                HttpEndpoints(host, metrics_port, {"/metrics": metrics_route(render_metrics)}).start()
            )
        except OSError:
            close_probes(servers)
            raise
    return servers


def close_probes(servers: Iterable[HttpEndpoints]) -> None:
    for server in servers:
        server.close()


def install_stop_signals(stop: Callable[[], None], *, what: str = "stopping after the current batch") -> None:
    """SIGTERM and SIGINT call `stop` (and log `what`); the main thread only, as Python requires."""

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("%s: %s", signal.Signals(signum).name, what)
        stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)


def beating(items: Iterable[T], beat: Callable[[], bool], every: int = 10_000) -> Iterator[T]:
    """`items`, beating the heartbeat every `every` items; ends early once `beat` returns False."""
    for n, item in enumerate(items, 1):
        yield item
        if n % every == 0 and not beat():
            return
