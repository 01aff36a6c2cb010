"""The fair queue's dispatch decision, alone: microseconds per pick at many active tenants.

    python -m bench.fairqueue [--tenants 10,100,1000,10000] [--picks 20000]

Every tenant is backlogged (one flow each, a few items queued), weights 1-5, and each pick is
followed by a push of the same tenant (a steady state: the queue stays as full as it was) and
the completion of an earlier item. The eligibility filter the dispatcher uses is applied (all
eligible here). The baseline, measured in the same run: a Python heap push+pop per pick over
the same number of entries, the floor any priority structure in Python pays. Target for the
throughput issue: <= 50 us per pick at 1,000 tenants.
"""

from __future__ import annotations

import argparse
import heapq
import random
import time

from bench.common import print_table
from orchestrator.dispatcher.fairness import FairQueue, Item


def _filled(tenants: int, depth: int = 3) -> FairQueue:
    queue = FairQueue()
    for t in range(tenants):
        queue.set_weight(f"t{t}", 1 + t % 5)
        for i in range(depth):
            queue.push(Item(f"t{t}-{i}", f"t{t}", "f", 1.0))
    return queue


def fair_queue_us(tenants: int, picks: int) -> float:
    queue = _filled(tenants)
    rng = random.Random(7)
    served: list[Item] = []
    began = time.perf_counter()
    for n in range(picks):
        item = queue.pick(lambda _tenant, _flow: True, lambda it: it.cost)
        assert item is not None
        queue.push(Item(f"n{n}", item.tenant, item.flow, 1.0))
        served.append(item)
        if len(served) > 64:
            done = served.pop(0)
            queue.complete(done, rng.uniform(0.5, 1.5))
    return (time.perf_counter() - began) / picks * 1e6


def heap_us(tenants: int, picks: int) -> float:
    heap = [(float(t), t) for t in range(tenants)]
    heapq.heapify(heap)
    began = time.perf_counter()
    for _ in range(picks):
        start, t = heapq.heappop(heap)
        heapq.heappush(heap, (start + 1.0 / (1 + t % 5), t))
    return (time.perf_counter() - began) / picks * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tenants", default="10,100,1000,10000")
    parser.add_argument("--picks", type=int, default=20_000)
    args = parser.parse_args()
    rows = []
    for tenants in (int(x) for x in args.tenants.split(",")):
        picks = max(200, min(args.picks, args.picks * 100 // max(tenants, 1)))
        ours = fair_queue_us(tenants, picks)
        floor = heap_us(tenants, picks)
        rows.append(
            [f"{tenants:,}", f"{picks:,}", f"{ours:.1f}", f"{floor:.2f}", f"{ours / floor:.0f}"]
        )
    print_table(
        "fair queue: one dispatch decision (pick + push + complete)",
        ["active tenants", "picks", "us per pick", "heap floor us", "x floor"],
        rows,
    )


if __name__ == "__main__":
    main()
