"""The node's plain machinery without ROS: the planning worker, latency windows, tick counters,
rate and load meters, the clock watch and the rate-limited log."""
import threading
import time

import numpy as np
import pytest

from chain_spec_ros.worker import (BusyMeter, ClockWatch, LatencyWindow, PlanWorker, RateCounter, RateLimitedLog,
                                   TickStats)


class FakeClock:
    def __init__(self, now: float = 100.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_worker_drops_jobs_while_busy_and_never_queues():
    release, done = threading.Event(), []
    worker = PlanWorker(lambda job: (release.wait(5), done.append(job)))
    try:
        assert worker.submit(1)
        assert worker.busy and not worker.submit(2)  # busy: dropped, not queued
        release.set()
        deadline = time.monotonic() + 5
        while worker.busy:
            assert time.monotonic() < deadline
            time.sleep(0.001)
        assert worker.submit(3)
        while worker.busy:
            assert time.monotonic() < deadline
            time.sleep(0.001)
        assert done == [1, 3]
    finally:
        assert worker.stop(2.0)


def test_worker_survives_an_escaping_exception_and_reports_it():
    crashes = []
    worker = PlanWorker(lambda job: 1 / 0, on_crash=crashes.append)
    try:
        assert worker.submit("a")
        deadline = time.monotonic() + 5
        while not crashes or worker.busy:
            assert time.monotonic() < deadline
            time.sleep(0.001)
        assert "ZeroDivisionError" in crashes[0]
        assert worker.submit("b")  # the thread is still alive and takes jobs
    finally:
        worker.stop(2.0)


def test_stop_waits_for_a_running_job_up_to_its_timeout_and_refuses_new_ones():
    started, release = threading.Event(), threading.Event()
    worker = PlanWorker(lambda job: (started.set(), release.wait(5)))
    worker.submit(1)
    assert started.wait(5)
    start = time.monotonic()
    assert not worker.stop(0.2)  # the job is still running: stop returns after the timeout
    assert 0.15 < time.monotonic() - start < 2.0
    assert not worker.submit(2)
    release.set()
    worker._thread.join(5)
    assert not worker._thread.is_alive()


def test_latency_window_percentiles_and_resize():
    window = LatencyWindow(100)
    for value in range(1, 201):
        window.add("plan", float(value))
    summary = window.summary()["plan"]
    assert summary["n"] == 100 and summary["last"] == 200.0
    assert summary["p50"] == pytest.approx(np.percentile(np.arange(101, 201), 50))
    assert summary["p99"] == pytest.approx(np.percentile(np.arange(101, 201), 99))
    window.resize(10)
    assert window.summary()["plan"]["n"] == 10 and window.summary()["plan"]["mean"] == pytest.approx(195.5)
    window.add("plan", 0.0)
    assert window.summary()["plan"]["n"] == 10


def test_tick_stats_bookkeeping():
    stats = TickStats()
    stats.skip("no frames")
    assert stats.skipped == 1 and stats.last_tick_skipped and stats.last_skip_reason == "no frames"
    stats.failed("RuntimeError: x", rejected=False)
    stats.failed("ImplausiblePlan: far", rejected=True)
    assert stats.errors == 2 and stats.rejected_plans == 1 and stats.consecutive_errors == 2
    assert stats.last_error == "ImplausiblePlan: far"
    stats.planned()
    assert stats.plans == 1 and stats.consecutive_errors == 0 and stats.errors == 2


def test_rate_counter_over_its_window():
    clock = FakeClock()
    rate = RateCounter(window_s=10.0, clock=clock)
    for _ in range(20):
        clock.now += 0.5
        rate.add()
    assert rate.rate() == pytest.approx(2.0)  # 20 events over the 10 s window
    clock.now += 20.0
    assert rate.rate() == 0.0
    young = RateCounter(window_s=10.0, clock=FakeClock(0.0))
    young._clock.now = 2.0
    young.add(), young.add()
    assert young.rate() == pytest.approx(1.0)  # a node 2 s old: over its age, not the window


def test_busy_meter_share():
    clock = FakeClock(0.0)
    meter = BusyMeter(clock=clock)
    meter.add(0.25)
    meter.add(0.25)
    clock.now = 2.0
    assert meter.take() == pytest.approx(0.25)
    clock.now = 3.0
    assert meter.take() == 0.0


def test_clock_watch_counts_silence():
    clock = FakeClock(0.0)
    watch = ClockWatch(clock=clock)
    assert watch.silent_s(5) == 0.0
    clock.now = 4.0
    assert watch.silent_s(5) == pytest.approx(4.0)
    assert watch.silent_s(6) == 0.0


def test_rate_limited_log_is_per_kind_and_bounded():
    lines, clock = [], FakeClock()
    log = RateLimitedLog(lines.append, period_s=10.0, max_keys=3, clock=clock)
    assert log("skip:camera_skew", "tick skipped: camera skew 0.21 s")
    for i in range(50):  # the text changes with every tick; the key does not
        assert not log("skip:camera_skew", f"tick skipped: camera skew 0.{i} s")
    clock.now += 10.0
    assert log("skip:camera_skew", "tick skipped: camera skew 0.3 s")
    assert lines[-1].endswith("(50 more like it suppressed)")
    for key in ("a", "b", "c", "d", "e"):
        log(key, key)
    assert len(log) == 3  # the oldest keys are forgotten
    assert len(lines) == 7
