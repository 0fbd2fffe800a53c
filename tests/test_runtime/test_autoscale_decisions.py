"""The autoscaler's decisions on a simulated clock: steady load, bursts, decay, zero, flapping."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
from faastube_autoscale import (
    AutoscaleSettings,
    Decision,
    FunctionAutoscaler,
    Sample,
    ScaleBounds,
    autoscalers_for,
    bounds_of,
)
from faastube_autoscale.decision import AutoscaleInputError
from faastube_spec.workflow import parse_workflow

SETTINGS = AutoscaleSettings()  # the defaults: 60 s stable, 6 s panic, 2x, 30 s delay, 30 s grace
TICK_S = 1.0


@dataclass
class Run:
    """A scaler ticked once a second; replicas become ready at once (or never, with ``ready``)."""

    scaler: FunctionAutoscaler
    now_s: float = 0.0
    ready: int | None = None  # fixed ready count; None: whatever was decided last
    last: Decision | None = None

    def __post_init__(self) -> None:
        self.history: list[tuple[float, int]] = []

    def until(self, end_s: float, load: Callable[[float], float], *, waiting: int = 0) -> Decision:
        while self.now_s < end_s - 1e-9:
            self.now_s += TICK_S
            self.scaler.observe(Sample(at_s=self.now_s, interval_s=TICK_S, concurrency=load(self.now_s),
                                       waiting=waiting))
            ready = self.ready if self.ready is not None else (self.last.desired if self.last else 1)
            self.last = self.scaler.decide(now_s=self.now_s, ready=ready)
            self.history.append((self.now_s, self.last.desired))
        assert self.last is not None
        return self.last

    def desired_at(self, t_s: float) -> int:
        return next(d for t, d in self.history if t >= t_s)

    def changes(self, since_s: float) -> int:
        values = [d for t, d in self.history if t >= since_s]
        return sum(1 for a, b in zip(values, values[1:]) if a != b)


def scaler(low: int = 1, high: int = 20, *, target: float = 1.0, initial: int = 1,
           settings: AutoscaleSettings = SETTINGS) -> FunctionAutoscaler:
    return FunctionAutoscaler(ScaleBounds(low, high, target), initial_replicas=initial, now_s=0.0,
                              settings=settings)


def constant(value: float) -> Callable[[float], float]:
    return lambda _t: value


def test_steady_load_settles_at_concurrency_over_target_and_stays() -> None:
    run = Run(scaler())
    decision = run.until(120, constant(3.0))
    assert decision.desired == 3 and decision.reason == "stable" and not decision.panicking
    assert decision.stable_concurrency == pytest.approx(3.0)
    run.until(300, constant(3.0))
    assert run.changes(since_s=120) == 0


def test_target_concurrency_divides_the_load_and_rounds_up() -> None:
    assert Run(scaler(target=4.0)).until(120, constant(9.0)).desired == 3  # ceil(9 / 4)
    assert Run(scaler(target=4.0)).until(120, constant(8.0)).desired == 2  # exactly two targets
    assert Run(scaler(target=0.5)).until(120, constant(1.5)).desired == 3


def test_the_bounds_clamp_every_decision() -> None:
    assert Run(scaler(high=4)).until(120, constant(50.0)).desired == 4
    assert Run(scaler(low=2)).until(300, constant(0.0)).desired == 2


def test_a_burst_panics_and_scales_up_within_the_panic_window() -> None:
    run = Run(scaler())
    run.until(120, constant(1.0))
    assert run.last is not None and run.last.desired == 1
    burst = run.until(126, lambda t: 10.0 if t > 120 else 1.0)  # six seconds of 10x
    assert burst.panicking and burst.reason == "panic"
    assert burst.desired >= 10  # the 60 s average alone would still ask for about 2
    assert burst.stable_concurrency < 3
    # two seconds in: the panic window's average, (4 x 1 + 2 x 10) / 6
    assert run.desired_at(122) == 4


def test_no_scale_down_while_panicking_and_panic_ends_a_stable_window_after_the_burst() -> None:
    run = Run(scaler())
    run.until(120, constant(1.0))
    run.until(130, lambda t: 10.0 if t > 120 else 1.0)
    peak = run.desired_at(130)
    panics: list[tuple[float, bool]] = []
    while run.now_s < 400:
        panics.append((run.now_s + TICK_S, run.until(run.now_s + TICK_S, constant(1.0)).panicking))
    calm_at = next(t for t, panicking in panics if not panicking)
    # Panic is re-armed while the load is over twice the ready replicas (up to ~123 s here,
    # when enough were ready) and lasts a stable window after that.
    assert 120 + SETTINGS.stable_window_s <= calm_at <= 130 + SETTINGS.stable_window_s
    assert all(d == peak for t, d in run.history if 130 <= t < calm_at)  # never down while panicking
    assert run.desired_at(calm_at + SETTINGS.scale_down_delay_s - 2) == peak  # then the delay holds it
    assert run.last is not None and not run.last.panicking and run.last.desired == 1


def test_decay_steps_down_only_after_the_scale_down_delay() -> None:
    run = Run(scaler())
    run.until(200, constant(8.0))
    assert run.last is not None and run.last.desired == 8
    run.until(500, constant(2.0))  # a fall to a quarter: a slow decay, not a burst
    after = [d for t, d in run.history if t > 200]
    assert after == sorted(after, reverse=True)  # never back up on the way down
    assert run.desired_at(200 + SETTINGS.scale_down_delay_s) == 8  # nothing sheds within the delay
    assert run.last.desired == 2 and run.last.reason == "stable"


def test_flapping_load_keeps_a_steady_count() -> None:
    run = Run(scaler())
    # Alternates between 1 and 3 calls every 2 s: the 60 s average is 2.
    run.until(600, lambda t: 3.0 if int(t) // 2 % 2 else 1.0)
    assert run.changes(since_s=120) == 0
    assert run.last is not None and run.last.desired in (2, 3)


def test_short_pauses_do_not_shed_replicas() -> None:
    run = Run(scaler())
    # 20 s on at 4, 10 s idle, repeated: the idle stretches are shorter than the delay.
    run.until(600, lambda t: 4.0 if t % 30 < 20 else 0.0)
    assert run.changes(since_s=120) == 0


def test_scale_to_zero_waits_for_the_grace_period_without_load() -> None:
    run = Run(scaler(low=0, high=4))
    run.until(100, constant(1.0))
    run.until(400, constant(0.0))
    zero_at = next(t for t, d in run.history if d == 0)
    # The 60 s window must empty (the 30 s grace from the last load has passed by then), and
    # the last non-zero recommendation must be a scale-down delay old.
    assert zero_at == 100 + SETTINGS.stable_window_s + SETTINGS.scale_down_delay_s - TICK_S
    assert run.last is not None and run.last.desired == 0


def test_a_function_that_is_never_called_goes_to_zero_after_the_grace_from_start() -> None:
    run = Run(scaler(low=0, high=2, initial=1))
    run.until(200, constant(0.0))
    zero_at = next(t for t, d in run.history if d == 0)
    # One replica is recommended through the grace, and held for the delay after it.
    assert zero_at == SETTINGS.scale_to_zero_grace_s + SETTINGS.scale_down_delay_s - TICK_S


def test_a_function_that_starts_at_zero_is_not_given_a_replica_by_the_grace() -> None:
    quick = AutoscaleSettings(stable_window_s=10, panic_window_s=1, scale_down_delay_s=0,
                              scale_to_zero_grace_s=30)
    run = Run(scaler(low=0, high=2, initial=0, settings=quick), ready=0)
    run.until(100, constant(0.0))
    assert all(desired == 0 for _, desired in run.history)  # a gateway (re)start starts nothing
    decision = run.until(101, constant(1.0), waiting=1)  # ...until a call waits
    assert decision.desired == 1
    run.ready = None
    run.until(120, constant(0.0))  # the window is empty from 111 s: the grace keeps it
    assert run.last is not None and (run.last.desired, run.last.reason) == (1, "grace")
    run.until(135, constant(0.0))
    assert run.last.desired == 0


def test_grace_keeps_one_replica_after_recent_load_even_without_delay() -> None:
    quick = AutoscaleSettings(stable_window_s=10, panic_window_s=1, scale_down_delay_s=0,
                              scale_to_zero_grace_s=30)
    run = Run(scaler(low=0, high=2, settings=quick))
    run.until(20, constant(1.0))
    run.until(45, constant(0.0))  # window empty from 30 s, grace runs to 50 s
    assert run.last is not None and (run.last.desired, run.last.reason) == (1, "grace")
    run.until(55, constant(0.0))
    assert run.last.desired == 0


def test_min_one_never_goes_to_zero() -> None:
    assert Run(scaler(low=1, high=4)).until(600, constant(0.0)).desired == 1


def test_a_waiting_call_with_no_replica_scales_from_zero_at_once() -> None:
    fn = scaler(low=0, high=3, initial=0)
    assert fn.decide(now_s=0.5, ready=0).desired == 0  # no sample yet: nothing to do
    fn.observe(Sample(at_s=100.0, interval_s=1.0, concurrency=0.0, waiting=0))
    assert fn.decide(now_s=100.0, ready=0).desired == 0
    # A call arrived just before the sample: a sliver of average, one waiting now.
    fn.observe(Sample(at_s=100.2, interval_s=0.2, concurrency=0.001, waiting=1))
    decision = fn.decide(now_s=100.2, ready=0)
    assert decision.desired == 1


def test_a_waiting_call_counts_even_when_the_interval_average_is_zero() -> None:
    fn = scaler(low=0, high=3, initial=0)
    fn.observe(Sample(at_s=100.0, interval_s=1.0, concurrency=0.0, waiting=1))
    decision = fn.decide(now_s=100.0, ready=0)
    assert (decision.desired, decision.reason) == (1, "from-zero")


def test_a_burst_from_zero_panics_to_its_size() -> None:
    run = Run(scaler(low=0, high=10, initial=0), ready=0)  # replicas still starting
    decision = run.until(3, constant(6.0), waiting=6)
    assert decision.panicking and decision.desired == 6


def test_without_samples_in_the_window_the_last_count_holds() -> None:
    fn = scaler(low=0, high=5, initial=3)
    fn.observe(Sample(at_s=10.0, interval_s=1.0, concurrency=5.0))
    assert fn.decide(now_s=10.0, ready=3).desired == 5
    decision = fn.decide(now_s=500.0, ready=5)  # the sampler stopped: do not act on nothing
    assert (decision.desired, decision.reason) == (5, "no-data")


def test_the_average_weights_samples_by_the_time_they_cover() -> None:
    fn = scaler(high=50)
    fn.observe(Sample(at_s=50.0, interval_s=50.0, concurrency=1.0))
    fn.observe(Sample(at_s=60.0, interval_s=10.0, concurrency=7.0))
    decision = fn.decide(now_s=60.0, ready=7)
    assert decision.stable_concurrency == pytest.approx((50 * 1 + 10 * 7) / 60)
    assert decision.panic_concurrency == pytest.approx(7.0)


def test_the_starting_count_holds_for_the_scale_down_delay() -> None:
    run = Run(scaler(low=1, high=8, initial=4))
    run.until(SETTINGS.scale_down_delay_s - 1, constant(0.0))
    assert run.last is not None and (run.last.desired, run.last.reason) == (4, "scale-down-delay")
    run.until(60, constant(0.0))
    assert run.last.desired == 1


def test_the_same_inputs_give_the_same_decisions() -> None:
    def trace() -> list[tuple[float, int]]:
        run = Run(scaler(low=0, high=12))
        run.until(400, lambda t: (t * 7) % 11)
        return run.history

    assert trace() == trace()


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(AutoscaleInputError, match="bounds"):
        ScaleBounds(3, 2)
    with pytest.raises(AutoscaleInputError, match="bounds"):
        ScaleBounds(0, 0)
    with pytest.raises(AutoscaleInputError, match="target_concurrency"):
        ScaleBounds(0, 2, 0.0)
    with pytest.raises(AutoscaleInputError, match="positive interval"):
        Sample(at_s=1.0, interval_s=0.0, concurrency=1.0)
    with pytest.raises(AutoscaleInputError, match="not negative"):
        Sample(at_s=1.0, interval_s=1.0, concurrency=-1.0)
    fn = scaler()
    fn.observe(Sample(at_s=5.0, interval_s=1.0, concurrency=1.0))
    with pytest.raises(AutoscaleInputError, match="older"):
        fn.observe(Sample(at_s=4.0, interval_s=1.0, concurrency=1.0))
    fn.decide(now_s=5.0, ready=1)
    with pytest.raises(AutoscaleInputError, match="clock went back"):
        fn.decide(now_s=4.0, ready=1)
    with pytest.raises(AutoscaleInputError, match="ready"):
        fn.decide(now_s=6.0, ready=-1)


@pytest.mark.parametrize(("settings", "message"), [
    (AutoscaleSettings(stable_window_s=0), "stable_window_s: must be a positive"),
    (AutoscaleSettings(panic_window_s=float("nan")), "panic_window_s: must be a positive"),
    (AutoscaleSettings(stable_window_s=5, panic_window_s=6), "must be at most stable_window_s"),
    (AutoscaleSettings(panic_threshold=1.0), "panic_threshold: must be a number above 1"),
    (AutoscaleSettings(scale_down_delay_s=-1), "scale_down_delay_s: must be 0 or more"),
    (AutoscaleSettings(scale_to_zero_grace_s=float("inf")), "scale_to_zero_grace_s: must be 0 or more"),
])
def test_bad_settings_are_named(settings: AutoscaleSettings, message: str) -> None:
    assert any(message in p for p in settings.problems()), settings.problems()
    with pytest.raises(AutoscaleInputError, match=message):
        scaler(settings=settings)


def test_bounds_and_scalers_come_from_the_workflow() -> None:
    workflow = parse_workflow({
        "apiVersion": "faastube.io/v1alpha1", "kind": "Workflow", "metadata": {"name": "w"},
        "spec": {"slo": "1s", "functions": [
            {"name": "a", "handler": "m:a", "replicas": 2},
            {"name": "b", "handler": "m:b", "minReplicas": 0, "replicas": 0, "maxReplicas": 6,
             "targetConcurrency": 2}],
            "edges": [{"from": "a", "to": "b", "size": 1}]}})
    assert bounds_of(workflow.function("a")) == ScaleBounds(2, 2, 1.0)
    assert bounds_of(workflow.function("b")) == ScaleBounds(0, 6, 2.0)
    scalers = autoscalers_for(workflow, now_s=0.0)
    assert set(scalers) == {"a", "b"}
    scalers["a"].observe(Sample(at_s=1.0, interval_s=1.0, concurrency=9.0))
    assert scalers["a"].decide(now_s=1.0, ready=2).desired == 2  # fixed: always its replicas
    scalers["b"].observe(Sample(at_s=1.0, interval_s=1.0, concurrency=9.0, waiting=9))
    assert scalers["b"].decide(now_s=1.0, ready=0).desired == 5  # ceil(9 / 2)
