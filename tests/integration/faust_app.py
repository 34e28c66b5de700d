"""A small faust app for the integration tests: map (scale) then windowed reduce (sum).

Run as a script in a subprocess (``python faust_app.py worker --without-web``); everything comes from
environment variables so each test gets its own app id, topics and data directory. The process kills
itself after ``STREAMPROV_FAUST_LIFETIME_S`` seconds whatever happens, so no test can leave a
worker behind. The web server is off (``--without-web``: the worker command overrides the
``web_enabled`` setting) and would bind loopback only if a caller turned it on.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import threading
import time
from typing import Any

import faust

from streamprov.agents.faust_agents import ProvenanceAgents
from streamprov.checksum import ChecksumAlgorithm
from streamprov.registry import FunctionRegistry

ENV = os.environ


def _watchdog(lifetime_s: float) -> None:
    """SIGTERM ourselves after the lifetime (a clean faust shutdown), SIGKILL 15 s later."""

    def fire() -> None:
        os.kill(os.getpid(), signal.SIGTERM)
        threading.Timer(15.0, lambda: os.kill(os.getpid(), signal.SIGKILL)).start()

    timer = threading.Timer(lifetime_s, fire)
    timer.daemon = True
    timer.start()


app = faust.App(
    ENV["STREAMPROV_FAUST_APP_ID"],
    broker=f"kafka://{ENV['STREAMPROV_FAUST_BOOTSTRAP']}",
    store="memory://",
    datadir=ENV["STREAMPROV_FAUST_DATADIR"],
    topic_partitions=1,
    topic_replication_factor=1,
    web_enabled=False,
    web_bind="127.0.0.1",
    web_host="127.0.0.1",
    web_port=int(ENV.get("STREAMPROV_FAUST_WEB_PORT", "6066")),
    consumer_auto_offset_reset="earliest",
    # a killed worker stays in the group until its session times out: keep that short (the broker's
    # minimum), or the next worker's join waits the 60 s default
    broker_session_timeout=6.0,
    broker_heartbeat_interval=1.0,
    # a test that kills the worker sets a long interval, so nothing is committed and all is replayed
    broker_commit_interval=float(ENV.get("STREAMPROV_FAUST_COMMIT_INTERVAL", "0.5")),
)

registry = FunctionRegistry()
prov = ProvenanceAgents(
    app,
    registry=registry,
    dead_letter_topic=ENV["STREAMPROV_FAUST_DLQ"],
    algorithm=ChecksumAlgorithm.CRC32C,
    state="table" if ENV.get("STREAMPROV_FAUST_STATE", "table") == "table" else "memory",
)


@prov.map(
    source=ENV["STREAMPROV_FAUST_SOURCE"],
    sink=ENV["STREAMPROV_FAUST_MAPPED"],
    function_id="scale",
    version="1",
    params={"factor": 2},
)
def scale(value: dict[str, Any], factor: int) -> dict[str, Any]:
    return {"v": value["v"] * factor}


@prov.reduce(
    source=ENV["STREAMPROV_FAUST_MAPPED"],
    sink=ENV["STREAMPROV_FAUST_TOTALS"],
    function_id="sum",
    version="1",
    initial=lambda: 0,
    window_ms=int(ENV.get("STREAMPROV_FAUST_WINDOW_MS", "1000")),
    grace_ms=0,
)
def total(acc: int, value: dict[str, Any]) -> int:
    return acc + int(value["v"])


MID_BATCH_DROPS = 2


def _clear_during_seek(source: str, within_s: float, quiet_s: float) -> None:
    """Fault injection: make faust's end-of-recovery race happen every time.

    faust resumes the stream partitions, seeks them (`Consumer.perform_seek`), then clears the
    agents' queues (`flow_control.resume()`), so records fetched during the seek can be dropped
    (`streamprov.agents.faust_delivery`). Here the records of `source` delivered while `perform_seek`
    runs are dropped, as that clear drops them, and faust's own seek waits (at most `within_s`) until
    one has been and no more arrived for `quiet_s`; `SeekAgain`'s seeks, after faust's and without
    a pause, are not delayed. The worker's log says how many were dropped.

    `quiet_s` 0: the seek ends right after the first drop; after `MID_BATCH_DROPS` drops the rest
    of the batch is held until the seek has ended and then delivered, as when the fetcher is still
    delivering a batch when faust clears the queues: faust's read offset moves past the dropped
    records, and faust drops them again when they are fetched again (see `faust_delivery`).
    """
    dropping = False
    dropped: list[int] = []
    last_drop = 0.0
    first_drop = asyncio.Event()
    seek_ended = asyncio.Event()

    @app.on_partitions_assigned.connect
    async def wrap(sender: Any, *_: Any, **__: Any) -> None:
        consumer = app.consumer
        if getattr(consumer, "_clear_during_seek", False):
            return
        consumer._clear_during_seek = True
        deliver = consumer.callback  # the fetcher reads it when it starts, after the assignment
        perform_seek = consumer.perform_seek
        seek_to_committed = consumer.seek_to_committed  # faust's: wrapped before SeekAgain wraps it

        async def callback(message: Any) -> Any:
            nonlocal last_drop
            if dropping and message.topic == source and not quiet_s and len(dropped) >= MID_BATCH_DROPS:
                await seek_ended.wait()  # the rest of the batch: delivered as the seek ends, and after
            if dropping and message.topic == source:
                dropped.append(message.offset)
                last_drop = time.monotonic()
                first_drop.set()
                return None
            return await deliver(message)

        async def seeking() -> None:
            nonlocal dropping
            dropping = True
            try:
                await perform_seek()
            finally:
                dropping = False
                seek_ended.set()
            print(f"fault injection: dropped {len(dropped)} record(s) of {source} {dropped}", flush=True)

        async def slow_seek_to_committed() -> Any:
            committed = await seek_to_committed()
            if not quiet_s:  # back on the first drop: the rest of its batch is still to come
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(first_drop.wait(), within_s)
                return committed
            deadline = time.monotonic() + within_s
            # until a fetched batch was dropped whole: the fetcher is then between batches, as it
            # is when faust's own seek takes longer than delivering one
            while time.monotonic() < deadline and (not dropped or time.monotonic() - last_drop < quiet_s):
                await asyncio.sleep(0.01)
            return committed

        consumer.callback = callback
        consumer.perform_seek = seeking
        consumer.seek_to_committed = slow_seek_to_committed


if ENV.get("STREAMPROV_FAUST_CLEAR_DURING_SEEK"):
    _clear_during_seek(
        ENV["STREAMPROV_FAUST_SOURCE"],
        float(ENV["STREAMPROV_FAUST_CLEAR_DURING_SEEK"]),
        float(ENV.get("STREAMPROV_FAUST_CLEAR_QUIET_S", "0.3")),
    )


if __name__ == "__main__":
    _watchdog(float(ENV.get("STREAMPROV_FAUST_LIFETIME_S", "90")))
    app.main()
