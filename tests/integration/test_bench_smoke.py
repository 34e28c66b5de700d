"""Smoke test of every benchmark in bench/: each script runs to the end at its smallest size.

The benchmarks are not timed tests and their numbers are not checked against anything (the machine
is noisy): this only catches a bench that no longer runs, e.g. after an API change in the product
(bench_ledger_overhead.py once failed at start because its sequencer was given a dead-letter topic
that was never created). Each script runs as its own process, the way it is documented
(`python bench/<script>.py ...` from the repository root), against the test broker when it takes
`--bootstrap`, with sizes just large enough to go through all of its code (every variant, two rounds
where the order alternates per round, every `--writer` of the ledger bench). Checked: exit code 0,
its headline ratio line(s) `name=<float>` present with a positive number, and the last one is the
last line of its output (the documented contract).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TIMEOUT_S = 240.0
TAIL_CHARS = 3000


@dataclass(frozen=True)
class Bench:
    script: str
    args: tuple[str, ...]
    ratios: tuple[str, ...]
    """Ratio lines the script prints, `name=<float>`; the last one is its last line."""


BROKER_BENCHES = [
    pytest.param(
        Bench(
            "bench_headers.py",
            ("--messages", "2000", "--rounds", "2", "--breakdown", "--naive"),  # 2000: its minimum
            ("produce_ratio", "consume_ratio"),
        ),
        id="headers",
    ),
    pytest.param(
        Bench(
            "bench_validator.py",
            ("--messages", "2000", "--rounds", "2", "--breakdown"),  # 2000: its minimum
            ("validator_ratio",),
        ),
        id="validator",
    ),
    pytest.param(
        Bench(
            "bench_tracing.py",
            ("--records", "1000", "--rounds", "1"),  # one round runs all four variants
            ("tracing_carried_ratio", "tracing_overhead_ratio_100pct", "tracing_overhead_ratio"),
        ),
        id="tracing",
    ),
    pytest.param(
        Bench(
            "bench_ledger_overhead.py",
            ("--records", "1000", "--rounds", "2"),  # the default --writer client
            ("ledger_overhead_ratio",),
        ),
        id="ledger_overhead-client",
    ),
    *(
        pytest.param(
            Bench(
                "bench_ledger_overhead.py",
                ("--records", "1000", "--rounds", "1", "--writer", writer),
                ("ledger_overhead_ratio",),
            ),
            id=f"ledger_overhead-{writer}",
        )
        for writer in ("process", "thread")
    ),
]

LOCAL_BENCHES = [
    pytest.param(
        Bench(
            "bench_ledger_queries.py",
            ("--entries", "700", "--small", "350", "--rounds", "2", "--queries", "5"),
            ("ledger_size_ratio", "upstream_scaling_ratio", "query_scaling_ratio"),
        ),
        id="ledger_queries",
    ),
    pytest.param(
        Bench("bench_batch_planning.py", ("--n", "1000"), ("batch_planning_ratio",)),  # 10/100/500 events
        id="batch_planning",
    ),
    pytest.param(
        Bench("bench_recompute.py", ("--n", "1000"), ("recompute_time_ratio",)),
        id="recompute",
    ),
    pytest.param(
        Bench("bench_recompute.py", ("--n", "1000", "--no-inverse"), ("recompute_time_ratio",)),
        id="recompute-no-inverse",
    ),
]


def _tail(text: str) -> str:
    return text[-TAIL_CHARS:] if len(text) > TAIL_CHARS else text


def _report(bench: Bench, what: str, stdout: str, stderr: str) -> str:
    return (
        f"{bench.script} {' '.join(bench.args)}: {what}\n"
        f"--- stdout (tail) ---\n{_tail(stdout)}\n--- stderr (tail) ---\n{_tail(stderr)}"
    )


def _run_bench(bench: Bench, *extra: str) -> None:
    command = [sys.executable, str(REPO / "bench" / bench.script), *bench.args, *extra]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # what it printed is there even if it is killed
    # its own process group: on a timeout the bench and any child it started (the process writer)
    # are killed together, so no orphan keeps the pipes open
    proc = subprocess.Popen(
        command,
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(_report(bench, f"still running after {TIMEOUT_S:.0f} s (killed)", stdout, stderr))
    if proc.returncode != 0:
        pytest.fail(_report(bench, f"exit code {proc.returncode}", stdout, stderr))
    for name in bench.ratios:
        found = re.findall(rf"^{re.escape(name)}=(\S+)$", stdout, re.MULTILINE)
        if not found:
            pytest.fail(_report(bench, f"no line {name}=<number>", stdout, stderr))
        try:
            value = float(found[-1])
        except ValueError:
            pytest.fail(_report(bench, f"{name}={found[-1]} is not a number", stdout, stderr))
        if not value > 0:  # also catches nan
            pytest.fail(_report(bench, f"{name}={found[-1]} is not positive", stdout, stderr))
    lines = stdout.strip().splitlines()
    last = lines[-1] if lines else ""
    if not last.startswith(f"{bench.ratios[-1]}="):
        pytest.fail(_report(bench, f"the last line is not {bench.ratios[-1]}=...", stdout, stderr))


@pytest.mark.kafka
@pytest.mark.parametrize("bench", BROKER_BENCHES)
def test_bench_runs_on_kafka(bench: Bench, kafka_bootstrap: str) -> None:
    _run_bench(bench, "--bootstrap", kafka_bootstrap)


@pytest.mark.parametrize("bench", LOCAL_BENCHES)
def test_bench_runs_without_broker(bench: Bench) -> None:
    _run_bench(bench)


def test_every_bench_has_a_case() -> None:
    """A new bench/bench_*.py gets a case above; otherwise it is never run."""
    scripts = {p.name for p in (REPO / "bench").glob("bench_*.py")}
    covered = {
        v.script for case in (*BROKER_BENCHES, *LOCAL_BENCHES) for v in case.values if isinstance(v, Bench)
    }
    assert scripts == covered, f"not run here: {sorted(scripts - covered)}; gone: {sorted(covered - scripts)}"
