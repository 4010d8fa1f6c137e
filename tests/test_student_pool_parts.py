"""Unit tests of the pool's parts (backoff, breaker, balancer) and of health probes and hedging
through a TeacherPool over fake teachers (tests/helpers/fake_teachers.py)."""

from __future__ import annotations

import time

import grpc
import pytest

from student_client import (
    ConfigError,
    ExponentialBackoff,
    NoTeacherAvailableError,
    PoolConfig,
    SourceRequest,
)
from student_client import backoff as backoff_mod
from student_client.balancer import LatencyEwma, pick
from student_client.breaker import CircuitBreaker
from tests.helpers.fake_teachers import (  # noqa: F401  (net is a fixture)
    batch,
    make_pool,
    net,
    wait_for,
)


# ------------------------------------------------------------ backoff


def test_backoff_doubles_up_to_cap_without_jitter():
    b = ExponentialBackoff(base_s=0.1, cap_s=1.0, jitter=0.0)
    assert [b.delay_s(n) for n in (1, 2, 3, 4, 5, 100)] == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0])


def test_backoff_jitter_uses_the_random_source(monkeypatch):
    seen = []

    def fake_uniform(a, b):
        seen.append((a, b))
        return a  # the shortest delay the jitter allows

    monkeypatch.setattr(backoff_mod.random, "uniform", fake_uniform)
    b = ExponentialBackoff(base_s=1.0, cap_s=8.0, jitter=0.5, uniform=backoff_mod.random.uniform)
    assert b.delay_s(3) == pytest.approx(2.0)
    assert seen == [(2.0, 4.0)]


@pytest.mark.parametrize("kwargs", [dict(base_s=0), dict(base_s=1, cap_s=0.5), dict(jitter=1.5)])
def test_backoff_rejects_bad_values(kwargs):
    with pytest.raises(ConfigError):
        ExponentialBackoff(**kwargs)


# ------------------------------------------------------------ breaker


def test_breaker_opens_probes_once_and_closes():
    br = CircuitBreaker(ExponentialBackoff(base_s=1.0, cap_s=4.0, jitter=0.0))
    assert br.available(0.0) and br.on_send(0.0) is False
    br.on_failure(10.0, probe=False)
    assert br.state == "open" and br.open_until == pytest.approx(11.0)
    br.on_failure(10.5, probe=False)  # a straggler in flight before it opened: no longer backoff
    assert br.open_until == pytest.approx(11.0) and br.failures == 1
    assert not br.available(10.9)
    assert br.available(11.0) and br.on_send(11.0) is True  # the probe
    assert not br.available(11.1)  # only one probe at a time
    br.on_failure(11.2, probe=True)
    assert br.state == "open" and br.open_until == pytest.approx(13.2)  # backoff doubled
    assert br.on_send(13.3) is True
    br.on_success()
    assert br.state == "closed" and br.failures == 0 and br.available(13.4)


def test_breaker_abandoned_probe_frees_the_slot():
    br = CircuitBreaker(ExponentialBackoff(base_s=1.0, cap_s=4.0, jitter=0.0))
    br.on_failure(0.0, probe=False)
    assert br.on_send(2.0) is True and not br.available(2.0)
    br.on_abandon(probe=True)
    assert br.available(2.0)


# ----------------------------------------------------------- balancer


class Cand:
    def __init__(self, name, outstanding, latency_s, last_pick=0):
        self.name, self.outstanding, self.last_pick = name, outstanding, last_pick
        self.latency = LatencyEwma()
        if latency_s is not None:
            self.latency.add(latency_s)


def test_pick_prefers_fewer_outstanding_then_lower_latency():
    assert pick([Cand("a", 2, 0.01), Cand("b", 0, 0.01)]).name == "b"
    # a holds 1 at 10 ms (expected 20 ms), b is idle at 50 ms (expected 50 ms)
    assert pick([Cand("a", 1, 0.01), Cand("b", 0, 0.05)]).name == "a"
    assert pick([]) is None


def test_pick_new_teacher_is_tried_and_ties_rotate():
    assert pick([Cand("old", 1, 0.01), Cand("new", 0, None)]).name == "new"
    assert pick([Cand("a", 0, None, last_pick=5), Cand("b", 0, None, last_pick=3)]).name == "b"


def test_latency_ewma_follows_samples():
    e = LatencyEwma(alpha=0.5)
    e.add(1.0)
    e.add(3.0)
    assert e.value_s == pytest.approx(2.0)


# ------------------------------------------------------------ health probes (registry trust)


def test_unverified_teacher_gets_no_batch_until_its_health_check_answers_serving(net):
    net.default = "ok"
    net.health["b:2"] = "NOT_SERVING"
    pool = make_pool(net, endpoints=["a:1", "b:2"])
    try:
        results = [pool.submit(SourceRequest(batch([i]), i)) for i in range(12)]
        for f in results:
            f.result(timeout=5)
        assert net.calls_to("b:2") == [] and len(net.calls_to("a:1")) == 12
        st = pool.stats().teachers["b:2"]
        assert st.state.startswith("not ready") and "NOT_SERVING" in st.last_error
        # it is checked again (after the backoff) and used once it turns SERVING
        net.health["b:2"] = "SERVING"
        wait_for(lambda: pool.stats().teachers["b:2"].state == "healthy", what="b:2 re-probed and verified")
        assert len([c for c in net.health_calls if c.endpoint == "b:2"]) >= 2
        more = [pool.submit(SourceRequest(batch([i]), i)) for i in range(12, 40)]
        for f in more:
            f.result(timeout=5)
        assert net.calls_to("b:2"), "a teacher that turned SERVING was never used"
    finally:
        pool.close()


def test_health_check_is_sent_at_once_with_probe_timeout_and_failures_back_off(net):
    net.default = "ok"
    net.health["a:1"] = grpc.StatusCode.UNAVAILABLE
    pool = make_pool(net, endpoints=["a:1"], probe_timeout_s=0.7, wait_timeout_s=0.5,
                     backoff=ExponentialBackoff(base_s=0.05, cap_s=0.4, jitter=0.0))
    try:
        first = net.health_calls[0]  # sent by the constructor, not later by the dispatcher
        assert first.timeout == 0.7 and first.request.service == "edistill.v1.Teacher"
        with pytest.raises(NoTeacherAvailableError, match="health check failed"):
            pool.submit(SourceRequest(batch([0]), 0)).result(timeout=5)
        assert net.calls_to("a:1") == []
        n = len(net.health_calls)
        assert 2 <= n <= 12, f"{n} health checks in ~0.5 s with a 0.05..0.4 s backoff"
    finally:
        pool.close()


def test_a_pending_health_check_blocks_neither_set_endpoints_nor_submit(net):
    net.default = "ok"
    net.health["slow:1"] = "hold"
    pool = make_pool(net, endpoints=["a:1"])
    try:
        pool.set_endpoints(["a:1", "slow:1"])  # returns although slow:1 never answers its probe
        assert pool.submit(SourceRequest(batch([1]), 1)).result(timeout=5)["logits"].shape == (1, 4)
        assert net.calls_to("slow:1") == [] and pool.stats().teachers["slow:1"].state == "checking health"
        probe = next(c for c in net.health_calls if c.endpoint == "slow:1")
        probe.fail(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")
        assert "DEADLINE_EXCEEDED" in pool.stats().teachers["slow:1"].last_error
    finally:
        pool.close()


def test_probe_timeout_none_uses_teachers_without_a_health_check(net):
    net.default = "ok"
    pool = make_pool(net, endpoints=["a:1"], probe_timeout_s=None)
    try:
        assert pool.submit(SourceRequest(batch([1]), 1)).result(timeout=5)
        assert net.health_calls == []
    finally:
        pool.close()
    with pytest.raises(ConfigError, match="probe_timeout_s"):
        PoolConfig(probe_timeout_s=0)


# ------------------------------------------------------------- hedging


@pytest.mark.parametrize("cancellable", [True, False])
def test_a_teacher_that_never_answers_is_hedged_and_the_batch_delivered_once(net, cancellable):
    net.cancellable = cancellable  # False: the frozen teacher's answer still arrives, late
    with make_pool(net, ("a:1", "b:2"), hedge_after_s=0.2) as pool:
        fut = pool.submit(SourceRequest(batch([7]), "0:7"))
        (stuck,) = net.pending()
        other = "b:2" if stuck.endpoint == "a:1" else "a:1"
        (hedge,) = wait_for(lambda: net.pending(other), what="the hedge to the other teacher")
        assert hedge.request.request_id == stuck.request.request_id  # the same request, sent again
        hedge.succeed()
        assert fut.result(timeout=5)["logits"][0, 0].item() == 7.0
        assert stuck.cancelled() is cancellable  # the losing call is withdrawn
        if not cancellable:
            stuck.succeed()  # the frozen teacher wakes up: its answer is dropped
        st = wait_for(lambda: (s := pool.stats()).late_answers_dropped == (0 if cancellable else 1) and s,
                      what="the late answer counted")
        assert len(net.calls) == 2
    assert st.hedges == 1 and st.completed == 1 and st.failed == 0
    assert st.teachers[stuck.endpoint].failures == {"HEDGED": 1}
    assert st.teachers[stuck.endpoint].state.startswith("failing (retry in")  # no fresh batches for the stuck teacher
    assert st.teachers[other].successes == 1


def test_hedge_answer_losing_the_race_is_dropped(net):
    with make_pool(net, ("a:1", "b:2"), hedge_after_s=0.1) as pool:
        fut = pool.submit(SourceRequest(batch([3]), "0:3"))
        (slow,) = net.pending()
        other = "b:2" if slow.endpoint == "a:1" else "a:1"
        (hedge,) = wait_for(lambda: net.pending(other), what="the hedge")
        slow.succeed()  # the first teacher answers after all
        assert fut.result(timeout=5)["logits"][0, 0].item() == 3.0
        assert hedge.cancelled()
        st = pool.stats()
    assert st.hedges == 1 and st.completed == 1
    assert st.teachers[slow.endpoint].failures == {} and st.teachers[other].failures == {}


def test_auto_hedge_waits_for_latency_samples_then_hedges_a_stuck_teacher(net):
    with make_pool(net, ("a:1", "b:2"), hedge_min_s=0.2) as pool:  # hedge_after_s="auto"
        fut = pool.submit(SourceRequest(batch([1]), 1))
        (held,) = net.pending()
        time.sleep(0.5)  # no latency reference yet: no hedge, timeout_s applies
        assert len(net.calls) == 1 and pool.stats().hedges == 0
        held.succeed()
        fut.result(timeout=5)
        net.default = "ok"  # quick answers from every teacher give a p99 (threshold: hedge_min_s)
        for i in range(40):
            pool.submit(SourceRequest(batch([i]), f"w{i}")).result(timeout=5)
        # (a teacher with fewer than 8 answers borrows the others' threshold)
        net.default = "hold"
        fut = pool.submit(SourceRequest(batch([9]), 9))
        (stuck,) = net.pending()
        other = "b:2" if stuck.endpoint == "a:1" else "a:1"
        t0 = time.monotonic()
        net.mode[other] = "ok"
        assert fut.result(timeout=5)["logits"][0, 0].item() == 9.0  # hedged to the other teacher
        assert time.monotonic() - t0 >= 0.15
        st = pool.stats()
    assert st.hedges == 1 and st.teachers[stuck.endpoint].failures == {"HEDGED": 1}


def _health_checks(net, endpoint: str) -> int:
    return sum(c.endpoint == endpoint for c in net.health_calls)


@pytest.mark.parametrize("hedge_after_s", [None, "auto"])
def test_hedging_can_be_turned_off(net, hedge_after_s):
    # A setting under which "auto" (the control) hedges: latency samples from quick
    # answers and a 0.05 s floor. None must not hedge a call held 10x that long.
    net.health["c:3"] = grpc.StatusCode.UNAVAILABLE  # its re-checks show the dispatcher's passes
    with make_pool(net, ("a:1", "b:2", "c:3"), hedge_after_s=hedge_after_s, hedge_min_s=0.05) as pool:
        net.default = "ok"
        for i in range(40):
            pool.submit(SourceRequest(batch([i]), f"w{i}")).result(timeout=5)
        net.default = "hold"
        fut = pool.submit(SourceRequest(batch([9]), 9))
        (held,) = net.pending()
        t0 = time.monotonic()
        if hedge_after_s is None:
            wait_for(lambda: time.monotonic() - t0 > 0.5, what="the call to be held 10x the threshold")
            # The dispatcher re-checks c:3 every backoff (<= 0.2 s), after its hedging step:
            # the check after next comes from a pass that began with the call held > 0.5 s.
            checks = _health_checks(net, "c:3")
            wait_for(lambda: _health_checks(net, "c:3") >= checks + 2, what="two more dispatcher passes")
            assert net.pending() == [held] and len(net.calls) == 41 and pool.stats().hedges == 0
            held.succeed()
        else:
            (hedge,) = wait_for(lambda: [c for c in net.pending() if c is not held], what="the control's hedge")
            hedge.succeed()
        assert fut.result(timeout=5)["logits"][0, 0].item() == 9.0


@pytest.mark.parametrize("value", ["soon", 0, -1.0, float("nan")])
def test_hedge_after_s_is_validated(value):
    with pytest.raises(ConfigError, match="hedge_after_s"):
        PoolConfig(hedge_after_s=value)
