"""SIGTERM/SIGINT of a service command (`validator run`, `changes run`, `recompute-manager run`),
during its start-up and after.

The handlers are installed before anything slow (loading the config and the functions, building and
starting the service), so a stop request during start-up is honoured too: the command exits 0
without running the service. The start-up runs in another thread (`BackgroundCall`), because a step
of it can block in a librdkafka call that does not look at the stop request (a producer's
`init_transactions`, a metadata or offsets request: up to 30 s), and Python runs signal handlers in
the main thread only, between bytecodes: the main thread polls (`StopRequests.wait`) instead.

* `start_up(service, stops)`: a built service whose `start()` does the start-up (the Validator,
  the change detector service);
* `start_up_by_building(build, stops)`: a service whose construction does the start-up (the
  Recompute Manager, given `stops.event` as its stop event).

A stop request during start-up waits `STOP_GRACE_S` (a second signal: not at all) for the start-up
to return, so that what it opened is closed, then goes on without it: the start-up's thread closes
what it produces later. (`streamprov.agents.lifecycle.install_stop_signals` is the plain variant,
for services without a start-up to abandon.)
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import Generic, Protocol, TypeVar, cast

log = logging.getLogger(__name__)

STOP_GRACE_S = 3.0
"""How long a stop request during start-up waits for the start-up to return, so that what it opened
is closed (about a second against brokers that do not answer: the start-ups look at the stop request
between their attempts), before the command exits without it (a second signal: at once)."""


class Stoppable(Protocol):
    """A service once built: `stop()` (safe from a signal handler) ends its run after the current
    batch; `close()` releases what it opened."""

    def stop(self) -> None: ...

    def close(self) -> None: ...


class Startable(Stoppable, Protocol):
    """A service as `start_up` drives it (the Validator, the change detector service)."""

    def start(self) -> None: ...


S = TypeVar("S", bound=Stoppable)
T = TypeVar("T")


class StopRequests:
    """The command's SIGTERM/SIGINT handler. A signal sets `event` (which a start-up may watch, e.g.
    `RecomputeManager(stop=event)`) and calls the stop of what `watch` was given; its log line says
    what happens: during start-up, `<SIG>: stopping during start-up` (a second one: `<SIG> again: not
    waiting for the start-up`), once `running`, `<SIG>: stopping after the current batch`.
    `signal_name` is the first signal's. `logger`: the command's (default: this module's)."""

    def __init__(self, logger: logging.Logger | None = None) -> None:
        self.log = logger or log
        self.event = threading.Event()
        self.signal_name = ""
        self.count = 0
        self.running = False
        self._stop: Callable[[], None] | None = None  # the service's, once it is built

    @property
    def requested(self) -> bool:
        return self.event.is_set()

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self.on_signal)
        signal.signal(signal.SIGINT, self.on_signal)

    def on_signal(self, signum: int, _frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        self.count += 1
        if self.running:
            self.log.info("%s: stopping after the current batch", name)
        elif self.count == 1:
            self.log.info("%s: stopping during start-up", name)
        else:
            self.log.info("%s again: not waiting for the start-up", name)
        self.signal_name = self.signal_name or name
        self.event.set()
        stop = self._stop
        if stop is not None:
            stop()

    def watch(self, target: Stoppable | Callable[[], None]) -> None:
        """From now on a signal also calls `target.stop()` (or `target()`), at once when one came
        before."""
        stop = target if callable(target) else target.stop
        self._stop = stop
        if self.requested:
            stop()

    def wait(self, done: threading.Event, seconds: float | None) -> None:
        """Until `done`, `seconds` (None: no limit) or a stop request (with `seconds`: a second one).
        Polls, so that the signal handlers run in this thread while another one waits on Kafka."""
        deadline = None if seconds is None else time.monotonic() + seconds
        count = self.count
        while not done.wait(0.05):
            if deadline is None and self.requested:
                return
            if deadline is not None and (time.monotonic() >= deadline or self.count > count):
                return


class BackgroundCall(Generic[T]):
    """`call()` in a daemon thread, so that the main thread keeps running the signal handlers while
    it blocks. Once `done`: its `result` or `error`. Once abandoned (the command goes on without it),
    what it returns later is given to `cleanup` (None when it raised) by its own thread: nobody else
    holds it any more."""

    def __init__(
        self,
        call: Callable[[], T],
        cleanup: Callable[[T | None], None],
        *,
        name: str,
        logger: logging.Logger | None = None,
    ) -> None:
        self.done = threading.Event()
        self.result: T | None = None
        self.error: BaseException | None = None
        self._call = call
        self._cleanup = cleanup
        self._log = logger or log
        self._lock = threading.Lock()
        self._abandoned = False
        threading.Thread(target=self._run, name=name, daemon=True).start()

    def _run(self) -> None:
        result: T | None = None
        error: BaseException | None = None
        try:
            result = self._call()
        except BaseException as exc:  # handed to the main thread
            error = exc
        with self._lock:
            if not self._abandoned:
                self.result, self.error = result, error
                self.done.set()
                return
        try:
            self._cleanup(result)
        except Exception as exc:  # the process is on its way out
            self._log.debug("closing after the stop request: %s", exc)
        if error is not None:
            self._log.debug("start-up after the stop request: %s", error)

    def abandon(self) -> bool:
        """Give up on the call; True when it has returned (the caller cleans up `result`)."""
        with self._lock:
            self._abandoned = True
            return self.done.is_set()


def start_up(service: Startable, stops: StopRequests) -> bool:
    """Start `service` unless a stop is requested first; True when it started: the caller runs it
    (`stops.running` is set) and closes it. False on a stop request: the service is closed, after
    waiting up to `STOP_GRACE_S` (a second signal: not at all) for its start-up to return (past that,
    the start-up's thread closes it when it returns). What `start()` raised is raised here, the
    service closed."""
    stops.watch(service)
    if stops.requested:
        service.close()
        return False
    starting = BackgroundCall(
        service.start, lambda _: service.close(), name="service-start", logger=stops.log
    )
    stops.wait(starting.done, None)
    if stops.requested:
        stops.wait(starting.done, STOP_GRACE_S)
        if starting.abandon():
            service.close()
        return False
    if starting.error is not None:
        service.close()
        raise starting.error
    stops.running = True
    return True


def _close(built: Stoppable | None) -> None:
    if built is not None:
        built.close()


def start_up_by_building(build: Callable[[], S], stops: StopRequests) -> S | None:
    """`build()`, whose construction does the start-up, unless a stop is requested first; the service
    when it was built: the caller runs and closes it (`stops` stops it, `stops.running` is set). None
    on a stop request, after waiting up to `STOP_GRACE_S` (a second signal: not at all) for the
    construction to return: what it built is closed (past that, by the construction's thread). What
    `build()` raised is raised here."""
    if stops.requested:
        return None
    construction = BackgroundCall(build, _close, name="service-start", logger=stops.log)
    stops.wait(construction.done, None)
    if stops.requested:
        stops.wait(construction.done, STOP_GRACE_S)
        if construction.abandon():
            _close(construction.result)
        return None
    if construction.error is not None:
        raise construction.error
    built = cast(S, construction.result)  # done without an error
    stops.watch(built)
    if stops.requested:  # the signal came as the construction returned: it does not run
        built.close()
        return None
    stops.running = True
    return built
