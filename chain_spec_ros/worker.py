"""The node's plain-Python machinery: the planning worker, latency windows, tick counters, the
executor-load meter, a rate-limited log with bounded state and the stop signals. No ROS imports;
unit-tested.
"""
from __future__ import annotations

import signal
import threading
import time
import traceback
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from .constants import PERCENTILES


def on_stop_signals(handler=signal.default_int_handler) -> None:
    """Route SIGINT and SIGTERM to `handler` (by default: raise KeyboardInterrupt in the main thread).

    The node raises while it loads (the main thread unwinds from wherever it is) and only sets a
    flag once it spins: a KeyboardInterrupt raised inside a callback's native code (message
    deserialisation) came back from pybind11 as a TypeError, the callback's guard caught it, and
    the node never exited."""
    for number in (signal.SIGINT, signal.SIGTERM):
        signal.signal(number, handler)


class LatencyWindow:
    """The last `size` values of each named series, and their percentiles."""

    def __init__(self, size: int):
        self._size = size
        self._series: dict[str, deque] = {}
        self._lock = threading.Lock()

    def resize(self, size: int) -> None:
        with self._lock:
            self._size = size
            self._series = {name: deque(values, maxlen=size) for name, values in self._series.items()}

    def add(self, name: str, value: float) -> None:
        with self._lock:
            self._series.setdefault(name, deque(maxlen=self._size)).append(float(value))

    def summary(self) -> dict[str, dict[str, float]]:
        """name -> {p50, p95, p99, mean, last, n}."""
        with self._lock:
            series = {name: np.array(values) for name, values in self._series.items() if values}
        out = {}
        for name, values in series.items():
            stats = {f"p{p}": float(np.percentile(values, p)) for p in PERCENTILES}
            stats.update(mean=float(values.mean()), last=float(values[-1]), n=len(values))
            out[name] = stats
        return out


class PlanWorker:
    """One planning thread. `submit` hands it a job unless it is busy (drop-if-busy).

    `work` must not raise (the node reports its own errors); an exception that escapes all the
    same goes to `on_crash` so that nothing is lost silently. `stop` lets a running job finish
    up to a timeout and never starts another one.
    """

    def __init__(self, work: Callable[[Any], None], on_crash: Callable[[str], None] | None = None,
                 name: str = "chain_spec_planner"):
        self._work = work
        self._on_crash = on_crash or (lambda text: None)
        self._condition = threading.Condition()
        self._job: Any = None
        self._busy = False
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @property
    def busy(self) -> bool:
        with self._condition:
            return self._busy

    def submit(self, job: Any) -> bool:
        with self._condition:
            if self._busy or self._stopping:
                return False
            self._job, self._busy = job, True
            self._condition.notify()
            return True

    def _run(self) -> None:
        while True:
            with self._condition:
                while self._job is None and not self._stopping:
                    self._condition.wait()
                if self._stopping:
                    return
                job, self._job = self._job, None
            try:
                self._work(job)
            except Exception:  # noqa: BLE001 - the safety net: report, keep the thread alive
                self._on_crash(traceback.format_exc(limit=6))
            finally:
                with self._condition:
                    self._busy = False
                    self._condition.notify_all()

    def stop(self, timeout: float = 5.0) -> bool:
        """Stop taking jobs and wait up to `timeout` for a running one. True if the thread ended."""
        with self._condition:
            self._stopping = True
            self._job = None
            self._condition.notify_all()
        self._thread.join(timeout)
        return not self._thread.is_alive()


@dataclass
class TickStats:
    ticks: int = 0
    dropped: int = 0  # the worker was busy
    skipped: int = 0  # inputs not usable; see last_skip_reason
    plans: int = 0  # plans published
    errors: int = 0  # plans that raised
    rejected_plans: int = 0  # plans whose output failed the plausibility check (not published)
    consecutive_errors: int = 0
    last_skip_reason: str = ""
    last_error: str = ""
    last_tick_skipped: bool = False

    def skip(self, reason: str) -> None:
        self.skipped += 1
        self.last_skip_reason, self.last_tick_skipped = reason, True

    def planned(self) -> None:
        self.plans += 1
        self.consecutive_errors = 0

    def failed(self, error: str, rejected: bool) -> None:
        """A plan raised (rejected: its output failed the plausibility check)."""
        self.errors += 1
        self.rejected_plans += rejected
        self.consecutive_errors += 1
        self.last_error = error


class RateCounter:
    """Events per second over a sliding window of `window_s` (monotonic time)."""

    def __init__(self, window_s: float = 10.0, clock: Callable[[], float] = time.monotonic):
        self.window_s, self._clock = window_s, clock
        self._times: deque[float] = deque()
        self._started = clock()
        self._lock = threading.Lock()

    def add(self) -> None:
        with self._lock:
            self._times.append(self._clock())

    def rate(self) -> float:
        now = self._clock()
        with self._lock:
            while self._times and self._times[0] < now - self.window_s:
                self._times.popleft()
            span = min(self.window_s, now - self._started)
            return len(self._times) / span if span > 0 else 0.0


class BusyMeter:
    """Share of wall time spent inside measured sections (the executor's callbacks), per window:
    how loaded the executor thread is."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter):
        self._clock = clock
        self._busy = 0.0
        self._since = clock()
        self._lock = threading.Lock()

    def add(self, seconds: float) -> None:
        with self._lock:
            self._busy += seconds

    def take(self) -> float:
        """Busy share (0..1) since the last call."""
        now = self._clock()
        with self._lock:
            share = self._busy / max(now - self._since, 1e-9)
            self._busy, self._since = 0.0, now
        return min(share, 1.0)


class ClockWatch:
    """How long a clock (the node's ROS clock under use_sim_time) has not moved, in seconds of
    monotonic time."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._value, self._since = None, clock()

    def silent_s(self, value: int) -> float:
        if value != self._value:
            self._value, self._since = value, self._clock()
        return self._clock() - self._since


class RateLimitedLog:
    """At most one line per `key` and `period`; keys are kinds (no numbers in them) and at most
    `max_keys` are remembered (the oldest are forgotten), so the state stays bounded."""

    def __init__(self, emit: Callable[[str], None], period_s: float = 10.0, max_keys: int = 256,
                 clock: Callable[[], float] = time.monotonic):
        self._emit, self.period_s, self.max_keys, self._clock = emit, period_s, max_keys, clock
        self._last: OrderedDict[str, float] = OrderedDict()
        self._suppressed: dict[str, int] = {}
        self._lock = threading.Lock()

    def __call__(self, key: str, text: str) -> bool:
        now = self._clock()
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last < self.period_s:
                self._suppressed[key] = self._suppressed.get(key, 0) + 1
                return False
            self._last[key] = now
            self._last.move_to_end(key)
            while len(self._last) > self.max_keys:
                old, _ = self._last.popitem(last=False)
                self._suppressed.pop(old, None)
            repeats = self._suppressed.pop(key, 0)
        self._emit(text + (f" ({repeats} more like it suppressed)" if repeats else ""))
        return True

    def __len__(self) -> int:
        return len(self._last)
