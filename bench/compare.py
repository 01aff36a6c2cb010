"""This orchestrator next to Celery 5.7, on the same RabbitMQ, with the same worker slots.

    python -m bench.compare [--single 1000] [--chain 100] [--skip-celery] [--quick]

Everything runs in one isolated vhost (bench.common.isolated_settings), one system at a time:
* orchestrator: the processes bench.engine runs (`engine`, `dispatcher`,
  `worker --concurrency 4`), driven by bench.engine's Harness; "done" is when the bench
  receives the execution.succeeded status event;
* Celery: `celery worker --pool prefork --concurrency 4`, task_acks_late, prefetch 1, in four
  configurations: classic or quorum queue, without or with the Redis result backend. Without
  a backend each task stores its finish time and INCRs a Redis counter as its last act (the
  bench polls the counter): "done" is the task's own clock, which favours Celery slightly.
  With the backend "done" is when the client's ResultSet.join_native hands over the result.
  Celery's client publishes one task after the other (for quorum queues waiting for each
  publisher confirm) and join_native drains results only once the burst is out, so with
  results the publish loop is part of the latency; "client publish s" shows how long it took.
  Ours publishes the burst concurrently (bench.engine's Harness).

Workloads, the same for both: (a) N single-step executions / tasks published at once
(executions per second, latency publish -> done); (b) N 3-step chains published at once
(Celery `chain(echo.s(x), echo.s(), echo.s())`, ours the "chain" flow of bench.engine).
Each system is warmed up first. The raw broker ceiling (bench.engine.raw_ceiling) is printed
for context.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, TypeVar

import redis

from bench.common import isolated_settings, percentile, print_table
from bench.engine import Harness, raw_ceiling
from orchestrator.config import Settings
from orchestrator.testing import spawn, stop_all

ROOT = Path(__file__).resolve().parent.parent
OURS = "orchestrator"
# (label, queue type, result backend), in the order the rows are printed.
CELERY_CONFIGS = (
    ("celery classic", "classic", False),
    ("celery classic + redis results", "classic", True),
    ("celery quorum", "quorum", False),
    ("celery quorum + redis results", "quorum", True),
)
BASELINES = {label: label for label, _, _ in CELERY_CONFIGS}
DEFAULT_BASELINE = "celery quorum + redis results"
BASELINE_COLUMN = {
    "celery classic": "x celery (classic)",
    "celery classic + redis results": "x celery+results (classic)",
    "celery quorum": "x celery (quorum)",
    "celery quorum + redis results": "x celery+results (quorum)",
}
READY_TIMEOUT = 90.0
POLL_S = 0.002
T = TypeVar("T")


class BenchError(RuntimeError):
    """A system did not come up or did not finish a workload in time."""


@dataclass
class Measured:
    """One workload on one system: how many, how long in all, and each latency (seconds)."""

    count: int
    elapsed: float
    latencies: list[float]
    publish_s: float | None = None  # how long the client took to publish the burst

    @property
    def rate(self) -> float:
        return self.count / self.elapsed if self.elapsed > 0 else float("nan")

    @property
    def p50(self) -> float:
        return percentile(self.latencies, 50) * 1000

    @property
    def p99(self) -> float:
        return percentile(self.latencies, 99) * 1000


@dataclass
class Outcome:
    single: Measured
    chain: Measured


# ------------------------------------------------------------------ orchestrator


async def _watched(
    awaitable: Awaitable[T],
    processes: dict[str, subprocess.Popen[bytes]],
    budget_s: float,
    what: str,
    progress: Callable[[], str],
) -> T:
    """Await `awaitable`, failing clearly on a timeout or on one of `processes` exiting."""
    task = asyncio.ensure_future(awaitable)
    deadline = time.monotonic() + budget_s
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.5)
            if done:
                return task.result()
            for name, process in processes.items():
                if process.poll() is not None:
                    raise BenchError(
                        f"orchestrator: `{name}` exited with code {process.returncode} during "
                        f"{what} ({progress()}); rerun with ORCH_TEST_PROCESS_LOG=/tmp/x.log"
                    )
            if time.monotonic() > deadline:
                raise BenchError(
                    f"orchestrator: {what} not done within {budget_s:g}s ({progress()})"
                )
    finally:
        if not task.done():
            task.cancel()
            with suppress(asyncio.CancelledError, Exception):
                await task


async def run_ours(settings: Settings, args: argparse.Namespace) -> Outcome:
    harness = Harness(settings)
    await harness.setup()
    processes = {
        "engine": spawn(settings, "engine"),
        "dispatcher": spawn(settings, "dispatcher"),
        "worker --concurrency 4": spawn(settings, "worker", "--concurrency", "4"),
    }

    async def measure(flow_id: str, count: int, what: str) -> Measured:
        def progress() -> str:
            return f"{len(harness.done)}/{harness.expect} done"

        ids, elapsed = await _watched(
            harness.batch(flow_id, count, sequential=False),
            processes,
            args.timeout,
            what,
            progress,
        )
        _, total = harness.latencies(ids)
        return Measured(count, elapsed, total)

    try:
        print("orchestrator: warming up ...", file=sys.stderr)
        # The first warm-up also waits for the processes to be up: it has the ready budget.
        await _watched(
            harness.batch("single", args.warmup, sequential=False),
            processes,
            READY_TIMEOUT,
            "the warm-up",
            lambda: f"{len(harness.done)}/{harness.expect} done",
        )
        await measure("chain", max(1, args.warmup // 4), "the chain warm-up")
        print(f"orchestrator: {args.single} single-step executions ...", file=sys.stderr)
        single = await measure("single", args.single, "the single-step burst")
        print(f"orchestrator: {args.chain} 3-step chains ...", file=sys.stderr)
        chain = await measure("chain", args.chain, "the chain burst")
        return Outcome(single, chain)
    finally:
        stop_all(list(processes.values()))
        await harness.connection.close()


# ------------------------------------------------------------------ Celery


@dataclass
class CeleryRun:
    label: str
    queue: str
    queue_type: str
    results: bool
    broker_url: str
    redis_url: str
    key_prefix: str

    @property
    def counter_key(self) -> str | None:
        return None if self.results else f"{self.key_prefix}count"

    @property
    def nodename(self) -> str:
        return f"{self.queue}@{socket.gethostname()}"

    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "BENCH_CELERY_BROKER": self.broker_url,
            "BENCH_CELERY_QUEUE": self.queue,
            "BENCH_CELERY_QUEUE_TYPE": self.queue_type,
            "BENCH_CELERY_BACKEND": self.redis_url if self.results else "",
            "BENCH_CELERY_REDIS": self.redis_url,
            "BENCH_CELERY_COUNTER": self.counter_key or "",
            "BENCH_CELERY_KEY_PREFIX": self.key_prefix,
        }


def _tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(text[-lines:]) or "(empty log)"


class CeleryBench:
    """One Celery configuration: its worker subprocess, a client app, and the workloads."""

    def __init__(self, run: CeleryRun, timeout: float, log: IO[bytes], log_path: Path) -> None:
        from bench.celery_app import make_app

        self.run = run
        self.timeout = timeout
        self.log_path = log_path
        self.app = make_app(
            broker_url=run.broker_url,
            queue=run.queue,
            queue_type=run.queue_type,
            result_backend=run.redis_url if run.results else None,
            redis_url=run.redis_url,
            key_prefix=run.key_prefix,
        )
        self.redis = redis.Redis.from_url(run.redis_url)
        self.worker = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "bench.celery_app",
                "worker",
                "--pool",
                "prefork",
                "--concurrency",
                "4",
                "-Q",
                run.queue,
                "-n",
                f"{run.queue}@%h",
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
                "-l",
                "WARNING",
            ],
            cwd=ROOT,
            env=run.env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: the pool children go with it
        )

    def _check_worker(self, what: str) -> None:
        if self.worker.poll() is not None:
            raise BenchError(
                f"{self.run.label}: the Celery worker exited with code {self.worker.returncode}"
                f" during {what}; its log ends:\n{_tail(self.log_path)}"
            )

    def wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            self._check_worker("start-up")
            replies = self.app.control.ping(destination=[self.run.nodename], timeout=1.0)
            if any(self.run.nodename in reply for reply in replies or []):
                return
            if time.monotonic() > deadline:
                raise BenchError(
                    f"{self.run.label}: the Celery worker did not answer a ping within "
                    f"{READY_TIMEOUT:.0f}s; its log ends:\n{_tail(self.log_path)}"
                )

    def _reset_counter(self) -> None:
        if self.run.counter_key:
            self.redis.delete(self.run.counter_key, f"{self.run.counter_key}:done")

    def _publish(self, count: int, chain: bool) -> tuple[dict[str, float], list[Any]]:
        """Publishes `count` tasks or chains; their publish times and their results."""
        from celery import chain as celery_chain  # type: ignore[import-untyped]

        published: dict[str, float] = {}
        results = []
        for i in range(count):
            before = time.time()
            if chain:
                result = celery_chain(
                    self.app.signature("bench.echo", args=({"i": i},)),
                    self.app.signature("bench.echo"),
                    self.app.signature("bench.echo"),
                ).apply_async()
            else:
                result = self.app.send_task("bench.noop", task_id=str(uuid.uuid4()))
            published[result.id] = before
            results.append(result)
        return published, results

    def measure(self, count: int, chain: bool, what: str) -> Measured:
        self._check_worker(what)
        self._reset_counter()
        began = time.time()
        published, results = self._publish(count, chain)
        publish_s = time.time() - began
        if self.run.results:
            done = self._wait_results(results, what)
        else:
            done = self._wait_counter(count * (3 if chain else 1), what)
        finished = max(done.values(), default=time.time())
        missing = [i for i in published if i not in done]
        if missing:
            raise BenchError(f"{self.run.label}: {what}: no finish time for {len(missing)} tasks")
        latencies = [done[i] - published[i] for i in published]
        return Measured(count, finished - began, latencies, publish_s)

    def _wait_results(self, results: list[Any], what: str) -> dict[str, float]:
        from celery.exceptions import (  # type: ignore[import-untyped]
            TimeoutError as CeleryTimeout,
        )
        from celery.result import ResultSet  # type: ignore[import-untyped]

        done: dict[str, float] = {}

        def arrived(task_id: str, _value: Any) -> None:
            done.setdefault(task_id, time.time())

        try:
            ResultSet(results, app=self.app).join_native(
                timeout=self.timeout, callback=arrived, interval=0.05
            )
        except CeleryTimeout as error:
            self._check_worker(what)
            raise BenchError(
                f"{self.run.label}: {what} not done within {self.timeout:g}s "
                f"({len(done)}/{len(results)} results)"
            ) from error
        return done

    def _wait_counter(self, expect: int, what: str) -> dict[str, float]:
        key = self.run.counter_key
        assert key is not None
        deadline = time.monotonic() + self.timeout
        polls = 0
        while int(self.redis.get(key) or 0) < expect:
            polls += 1
            if polls % 250 == 0:
                self._check_worker(what)
            if time.monotonic() > deadline:
                raise BenchError(
                    f"{self.run.label}: {what} not done within {self.timeout:g}s "
                    f"({int(self.redis.get(key) or 0)}/{expect} task runs counted)"
                )
            time.sleep(POLL_S)
        raw = self.redis.hgetall(f"{key}:done")
        return {_text(k): float(v) for k, v in raw.items()}

    def close(self) -> None:
        """Stops the worker (terminate, then kill), deletes the queue and the Redis keys."""
        if self.worker.poll() is None:
            self.worker.terminate()
        try:
            self.worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.worker.kill()
            self.worker.wait(timeout=10)
        # Pool children left behind (the main process killed): the group is the worker's pid.
        with suppress(ProcessLookupError, PermissionError):
            os.killpg(self.worker.pid, signal.SIGKILL)
        try:
            with self.app.connection_for_write() as connection:
                channel = connection.default_channel
                channel.queue_delete(self.run.queue)
                channel.exchange_delete(self.run.queue)
        except Exception as error:  # cleanup is best effort; the vhost goes too
            print(f"{self.run.label}: could not delete queue: {error}", file=sys.stderr)
        finally:
            _delete_prefix(self.redis, self.run.key_prefix)
            self.redis.close()
            self.app.close()


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _delete_prefix(client: redis.Redis, prefix: str) -> None:
    batch = []
    for key in client.scan_iter(match=f"{prefix}*", count=1000):
        batch.append(key)
        if len(batch) >= 500:
            client.delete(*batch)
            batch.clear()
    if batch:
        client.delete(*batch)


@contextmanager
def _worker_log(label: str) -> Iterator[tuple[IO[bytes], Path]]:
    handle = tempfile.NamedTemporaryFile(  # noqa: SIM115 - closed below, kept on failure
        prefix=f"bench-{label.replace(' ', '-').replace('+', '')}-", suffix=".log", delete=False
    )
    path = Path(handle.name)
    ok = False
    try:
        yield handle, path
        ok = True
    finally:
        handle.close()
        if ok:
            path.unlink(missing_ok=True)
        else:
            print(f"the Celery worker's log is kept at {path}", file=sys.stderr)


def run_celery(settings: Settings, args: argparse.Namespace) -> dict[str, Outcome]:
    outcomes: dict[str, Outcome] = {}
    for label, queue_type, results in CELERY_CONFIGS:
        slug = f"{queue_type}{'-results' if results else ''}"
        run = CeleryRun(
            label=label,
            queue=f"bench.celery.{slug}",
            queue_type=queue_type,
            results=results,
            broker_url=str(settings.rabbitmq_url),
            redis_url=str(settings.redis_url),
            key_prefix=f"{settings.redis_prefix}celery:{slug}:",
        )
        with _worker_log(label) as (log, log_path):
            bench = CeleryBench(run, args.timeout, log, log_path)
            try:
                print(f"{label}: starting the worker ...", file=sys.stderr)
                bench.wait_ready()
                bench.measure(args.warmup, chain=False, what="the warm-up")
                bench.measure(max(1, args.warmup // 4), chain=True, what="the chain warm-up")
                print(f"{label}: {args.single} single tasks ...", file=sys.stderr)
                single = bench.measure(args.single, chain=False, what="the single-task burst")
                print(f"{label}: {args.chain} 3-step chains ...", file=sys.stderr)
                chain = bench.measure(args.chain, chain=True, what="the chain burst")
                outcomes[label] = Outcome(single, chain)
            finally:
                bench.close()
    return outcomes


# ------------------------------------------------------------------ output


def _ratio(value: float, base: float) -> str:
    if not base or math.isnan(base) or math.isnan(value):
        return "-"
    return f"{value / base:.2f}"


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def report(
    args: argparse.Namespace, ceiling: float, ours: Outcome, celery: dict[str, Outcome]
) -> None:
    rows: list[tuple[str, Outcome]] = [(OURS, ours), *celery.items()]
    base = celery.get(args.baseline)
    column = BASELINE_COLUMN[args.baseline]
    slots = "4 worker slots each, same RabbitMQ"

    headers = ["system", "per second", "p50 ms", "p99 ms"]
    if base:
        headers += [f"{column}: per s", "p50", "p99"]
    if celery:
        headers.append("client publish s")
    table = []
    for label, outcome in rows:
        m = outcome.single
        row = [label, f"{m.rate:.0f}", f"{m.p50:.0f}", f"{m.p99:.0f}"]
        if base:
            b = base.single
            row += [_ratio(m.rate, b.rate), _ratio(m.p50, b.p50), _ratio(m.p99, b.p99)]
        if celery:
            row.append(_seconds(m.publish_s))
        table.append(row)
    print_table(
        f"single-step: {args.single} published at once ({slots}; latency publish -> done)",
        headers,
        table,
    )

    headers = ["system", "p50 ms", "p99 ms"]
    if base:
        headers += [f"{column}: p50", "p99"]
    if celery:
        headers.append("client publish s")
    table = []
    for label, outcome in rows:
        m = outcome.chain
        row = [label, f"{m.p50:.0f}", f"{m.p99:.0f}"]
        if base:
            b = base.chain
            row += [_ratio(m.p50, b.p50), _ratio(m.p99, b.p99)]
        if celery:
            row.append(_seconds(m.publish_s))
        table.append(row)
    print_table(
        f"3-step chain: {args.chain} published at once ({slots}; latency publish -> done)",
        headers,
        table,
    )

    if celery:
        table = [
            [
                label,
                _ratio(ours.single.rate, o.single.rate),
                _ratio(ours.single.p50, o.single.p50),
                _ratio(ours.single.p99, o.single.p99),
                _ratio(ours.chain.p50, o.chain.p50),
                _ratio(ours.chain.p99, o.chain.p99),
            ]
            for label, o in celery.items()
        ]
        print_table(
            "orchestrator / celery (per second: >1 is faster; latency: <1 is faster)",
            ["vs", "single per s", "single p50", "single p99", "chain p50", "chain p99"],
            table,
        )

    print_table(
        "context: raw broker ceiling (aio-pika publish -> consume -> ack, one quorum queue)",
        ["what", "per second", "x ceiling"],
        [
            ["raw ceiling, messages", f"{ceiling:.0f}", "1.000"],
            *[
                [f"{label}, single-step", f"{o.single.rate:.0f}", _ratio(o.single.rate, ceiling)]
                for label, o in rows
            ],
        ],
    )


# ------------------------------------------------------------------ main


def run(args: argparse.Namespace) -> None:
    with isolated_settings("compare") as settings:
        try:
            print("measuring the raw ceiling ...", file=sys.stderr)
            ceiling = asyncio.run(raw_ceiling(settings, args.single * 3))
            ours = asyncio.run(run_ours(settings, args))
            celery = {} if args.skip_celery else run_celery(settings, args)
        finally:
            client = redis.Redis.from_url(str(settings.redis_url))
            _delete_prefix(client, settings.redis_prefix)
            client.close()
        report(args, ceiling, ours, celery)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--single", type=int, help="single-step burst size (default 1000)")
    parser.add_argument("--chain", type=int, help="3-step chain burst size (default 100)")
    parser.add_argument("--warmup", type=int, help="warm-up burst size (default 50)")
    parser.add_argument("--skip-celery", action="store_true", help="run the orchestrator only")
    parser.add_argument("--quick", action="store_true", help="small counts, for a smoke run")
    parser.add_argument(
        "--baseline",
        choices=sorted(BASELINES),
        default=DEFAULT_BASELINE,
        help=f"the Celery row the ratios are to (default: {DEFAULT_BASELINE})",
    )
    parser.add_argument(
        "--timeout", type=float, default=300.0, help="seconds one burst may take (default 300)"
    )
    args = parser.parse_args()
    for name, full, quick in (("single", 1000, 100), ("chain", 100, 20), ("warmup", 50, 10)):
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    try:
        run(args)
    except BenchError as error:
        sys.exit(f"bench.compare: {error}")


if __name__ == "__main__":
    main()
