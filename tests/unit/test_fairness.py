"""Properties of the pure fair queue: bounded lag, no idle-return burst, filters respected."""

from __future__ import annotations

import itertools
from collections import Counter, defaultdict

from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator.dispatcher.fairness import FairQueue, Item, step_cost

counter = itertools.count()


def item(tenant: str, cost: float = 1.0, flow: str = "f") -> Item:
    return Item(key=str(next(counter)), tenant=tenant, flow=flow, cost=cost)


def serve(queue: FairQueue, picks: int, eligible=None) -> list[Item]:  # type: ignore[no-untyped-def]
    out = []
    for _ in range(picks):
        picked = queue.pick(eligible)
        if picked is None:
            break
        out.append(picked)
    return out


@settings(max_examples=200, deadline=None)
@given(
    weights=st.lists(st.integers(min_value=1, max_value=10), min_size=2, max_size=5),
    costs=st.lists(st.floats(min_value=0.1, max_value=5.0), min_size=2, max_size=5),
    picks=st.integers(min_value=20, max_value=300),
)
def test_backlogged_tenants_stay_within_a_bounded_lag(
    weights: list[int], costs: list[float], picks: int
) -> None:
    queue = FairQueue()
    tenants = [f"t{i}" for i in range(len(weights))]
    cost_of = {t: costs[i % len(costs)] for i, t in enumerate(tenants)}
    for tenant, weight in zip(tenants, weights, strict=True):
        queue.set_weight(tenant, weight)
        for _ in range(picks + 1):  # always backlogged
            queue.push(item(tenant, cost_of[tenant]))
    served: dict[str, float] = defaultdict(float)
    for picked in serve(queue, picks):
        served[picked.tenant] += picked.cost
    normalised = {t: served[t] / w for t, w in zip(tenants, weights, strict=True)}
    weight_of = dict(zip(tenants, weights, strict=True))
    for a in tenants:
        for b in tenants:
            bound = cost_of[a] / weight_of[a] + cost_of[b] / weight_of[b]
            assert normalised[a] - normalised[b] <= bound + 1e-9


def test_weights_5_3_2_split_service_accordingly() -> None:
    queue = FairQueue()
    for tenant, weight in (("a", 5), ("b", 3), ("c", 2)):
        queue.set_weight(tenant, weight)
        for _ in range(1000):
            queue.push(item(tenant))
    share = Counter(p.tenant for p in serve(queue, 1000))
    assert share == {"a": 500, "b": 300, "c": 200}


def test_idle_returning_tenant_gets_no_burst() -> None:
    queue = FairQueue()
    for _ in range(200):
        queue.push(item("busy"))
    serve(queue, 100)  # quiet was idle meanwhile
    for _ in range(50):
        queue.push(item("quiet"))
    next_ten = Counter(p.tenant for p in serve(queue, 10))
    assert next_ten["quiet"] <= 6  # its fair half (+1), not 10 in a row to "catch up"


def test_newcomer_does_not_queue_behind_a_busy_tenants_refunds() -> None:
    """Estimates that ran high are refunded on completion, which can put a backlogged tenant's
    start tag below the virtual time; a tenant arriving then is served within one pick, not
    after the busy one has used up its refunds."""
    queue = FairQueue()
    for _ in range(100):
        queue.push(item("busy", cost=0.1))
    in_flight = serve(queue, 8)
    for done in in_flight:
        queue.complete(done, 0.02)  # five times cheaper than estimated
    queue.push(item("quiet", cost=0.02))
    assert "quiet" in [p.tenant for p in serve(queue, 2)]


def test_held_back_tenant_gets_no_burst_after_release() -> None:
    queue = FairQueue()
    for _ in range(200):
        queue.push(item("a"))
        queue.push(item("b"))
    serve(queue, 100, eligible=lambda tenant, flow: tenant != "b")  # b quarantined
    next_ten = Counter(p.tenant for p in serve(queue, 10))
    assert next_ten["b"] <= 6


@given(st.lists(st.sampled_from(["a", "b", "q"]), min_size=1, max_size=200))
def test_quarantined_tenant_is_never_picked(arrivals: list[str]) -> None:
    queue = FairQueue()
    for tenant in arrivals:
        queue.push(item(tenant))
    picked = serve(queue, len(arrivals), eligible=lambda tenant, flow: tenant != "q")
    assert all(p.tenant != "q" for p in picked)
    assert len(picked) == sum(1 for t in arrivals if t != "q")


def test_many_flows_earn_no_more_than_one_tenant() -> None:
    queue = FairQueue()
    for i in range(300):
        queue.push(item("sybil", flow=f"flow-{i % 30}"))
        queue.push(item("honest", flow="only"))
    share = Counter(p.tenant for p in serve(queue, 200))
    assert share == {"sybil": 100, "honest": 100}


def test_flows_within_a_tenant_share_equally() -> None:
    queue = FairQueue()
    for _ in range(100):
        queue.push(item("t", flow="x"))
        queue.push(item("t", flow="y"))
    share = Counter(p.flow for p in serve(queue, 50))
    assert abs(share["x"] - share["y"]) <= 1


def test_measured_cost_corrects_the_estimate() -> None:
    queue = FairQueue()
    for _ in range(200):
        queue.push(item("heavy", cost=1.0))  # estimated 1, really costs 10
        queue.push(item("light", cost=1.0))
    served: Counter[str] = Counter()
    for _ in range(110):
        picked = queue.pick()
        assert picked is not None
        queue.complete(picked, 10.0 if picked.tenant == "heavy" else 1.0)
        served[picked.tenant] += 1
    # Equal weights share *cost*: heavy gets about one pick for light's ten.
    assert 8 <= served["heavy"] <= 12


def test_ties_do_not_depend_on_tenant_names() -> None:
    first, second = FairQueue(), FairQueue()
    for queue, names in ((first, ("zzz", "aaa")), (second, ("aaa", "zzz"))):
        for name in names:
            queue.push(item(name))
    a = first.pick()
    b = second.pick()
    assert a is not None
    assert b is not None
    assert (a.tenant, b.tenant) == ("zzz", "aaa")  # first seen goes first


def test_overestimated_costs_keep_the_weighted_split() -> None:
    """Estimates 5x too high, corrected as steps complete (six in flight): still 5:3:2."""
    queue = FairQueue()
    for tenant, weight in (("a", 5), ("b", 3), ("c", 2)):
        queue.set_weight(tenant, weight)
        for _ in range(300):
            queue.push(item(tenant, cost=0.1))
    in_flight: list[Item] = []
    served: Counter[str] = Counter()
    for n in range(200):
        picked = queue.pick()
        assert picked is not None
        in_flight.append(picked)
        if len(in_flight) > 6:
            queue.complete(in_flight.pop(0), 0.02)
        if 10 <= n < 190:
            served[picked.tenant] += 1
    assert abs(served["a"] - 90) <= 3, served
    assert abs(served["b"] - 54) <= 3, served
    assert abs(served["c"] - 36) <= 3, served


@settings(max_examples=200, deadline=None)
@given(
    ops=st.lists(
        st.tuples(
            st.sampled_from(["push", "pick", "complete"]),
            st.sampled_from(["a", "b", "c"]),
            st.floats(min_value=0.1, max_value=3.0),
        ),
        max_size=120,
    ),
    blocked=st.sets(st.sampled_from(["a", "b", "c"])),
)
def test_peek_names_the_tenant_pick_serves_without_changing_anything(
    ops: list[tuple[str, str, float]], blocked: set[str]
) -> None:
    queue = FairQueue()
    queue.set_weight("a", 3)
    done: list[Item] = []

    def eligible(tenant: str, _flow: str) -> bool:
        return tenant not in blocked

    for op, tenant, cost in ops:
        if op == "push":
            queue.push(item(tenant, cost, flow=f"f{int(cost)}"))
        elif op == "pick":
            picked = queue.pick(eligible)
            if picked is not None:
                done.append(picked)
        elif done:
            queue.complete(done.pop(0), cost)
        expected = queue.peek(eligible)
        assert queue.peek(eligible) == expected  # no side effects
        picked = queue.pick(eligible)
        assert (picked.tenant if picked else None) == expected
        if picked is not None:
            done.append(picked)


def test_a_step_is_charged_its_dominant_resource() -> None:
    # Waiting on I/O: the slot it held. Burning CPU on a worker whose 4 slots share one CPU:
    # the CPU it took from the other three, even when its own slot time was shorter.
    assert step_cost(2.0, 0.01, slots_per_cpu=4) == 2.0
    assert step_cost(0.3, 0.1, slots_per_cpu=4) == 0.4
    assert step_cost(0.3, None, slots_per_cpu=4) == 0.3


class _Reference:
    """The fair queue's rules as plain scans over every tenant (no heap): the oracle the
    heap-based queue must agree with, pick for pick."""

    def __init__(self) -> None:
        self.vtime = 0.0
        self.tenants: dict[str, dict[str, float | int | bool]] = {}
        self.items: dict[str, list[Item]] = defaultdict(list)
        self.weight: dict[str, float] = {}

    def _state(self, name: str) -> dict[str, float | int | bool]:
        if name not in self.tenants:
            self.tenants[name] = {"index": len(self.tenants), "start": 0.0, "finish": 0.0}
            self.tenants[name]["held"] = False
        return self.tenants[name]

    def _live(self) -> list[tuple[float, int, str]]:
        return sorted(
            (float(t["start"]), int(t["index"]), n)
            for n, t in self.tenants.items()
            if self.items[n] and not t["held"]
        )

    def push(self, it: Item) -> None:
        state = self._state(it.tenant)
        if not self.items[it.tenant]:
            live = self._live()
            vtime = min([self.vtime, *(start for start, _, _ in live)])
            state["start"] = max(vtime, float(state["finish"]))
            state["held"] = False
        self.items[it.tenant].append(it)

    def pick(self, eligible: set[str]) -> Item | None:
        for name, state in self.tenants.items():
            if state["held"] and name in eligible:
                state["held"] = False
                state["start"] = max(float(state["start"]), self.vtime)
        for _, _, name in self._live():
            if name not in eligible:
                self.tenants[name]["held"] = True
                continue
            state = self.tenants[name]
            it = self.items[name].pop(0)
            rate = self.weight.get(name, 1.0)
            self.vtime = float(state["start"])
            state["finish"] = state["start"] = self.vtime + max(it.cost, 1e-6) / rate
            return it
        return None

    def complete(self, it: Item, actual: float) -> None:
        state = self.tenants[it.tenant]
        delta = (max(actual, 1e-6) - max(it.cost, 1e-6)) / self.weight.get(it.tenant, 1.0)
        state["finish"] = float(state["finish"]) + delta
        if self.items[it.tenant]:
            state["start"] = float(state["start"]) + delta


@settings(max_examples=300, deadline=None)
@given(
    ops=st.lists(
        st.tuples(
            st.sampled_from(["push", "push", "pick", "pick", "complete", "block", "unblock"]),
            st.sampled_from(["a", "b", "c", "d"]),
            st.floats(min_value=0.1, max_value=3.0),
        ),
        max_size=200,
    )
)
def test_the_heap_agrees_with_a_scan_over_every_tenant(ops: list[tuple[str, str, float]]) -> None:
    """Lazy deletion, held tenants apart, refunds that move a tag: the same picks, in the
    same order, as the plain rules applied to every tenant at every pick."""
    queue, reference = FairQueue(), _Reference()
    for name, weight in (("a", 3.0), ("b", 1.0), ("c", 2.0), ("d", 1.0)):
        queue.set_weight(name, weight)
        reference.weight[name] = weight
        reference._state(name)  # first seen in this order, as by set_weight
    allowed = {"a", "b", "c", "d"}
    for name in sorted(allowed) * 3:  # backlogged from the start: refunds move live tags
        key = str(next(counter))
        queue.push(Item(key, name, "f", 1.0))
        reference.push(Item(key, name, "f", 1.0))
    queue_done: list[Item] = []
    reference_done: list[Item] = []
    for op, tenant, cost in ops:
        if op == "push":
            key = str(next(counter))
            queue.push(Item(key, tenant, "f", cost))
            reference.push(Item(key, tenant, "f", cost))
        elif op == "pick":
            picked = queue.pick(lambda name, _flow: name in allowed)
            expected = reference.pick(allowed)
            assert (picked and picked.key) == (expected and expected.key)
            if picked is not None and expected is not None:
                queue_done.append(picked)
                reference_done.append(expected)
        elif op == "complete" and queue_done:
            queue.complete(queue_done.pop(0), cost)
            reference.complete(reference_done.pop(0), cost)
        elif op == "block":
            allowed.discard(tenant)
        elif op == "unblock":
            allowed.add(tenant)
        assert queue.backlog() == sum(len(items) for items in reference.items.values())
