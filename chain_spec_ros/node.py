"""`chain_spec_node`: the planner as a ROS 2 node. Wiring only: subscriptions feed `sensing.SensorInputs` (guards,
conversion) and `SensorBuffers` (time alignment), a timer hands each assembled `SensorFrame` to the planning
worker, `outputs` builds what is published.

    chain_spec_node --ros-args --params-file config/chain_spec.yaml [-p plan_rate_hz:=5.0 ...]

Inputs arrive serialized and are decimated by header stamp before deserialisation; /diagnostics runs on the
steady clock (it reports when /clock is silent). A start-up problem (parameters, models, the self-test plan)
exits 2 with one clear line; after start-up nothing stops the node; SIGINT / SIGTERM exit 0 in every phase.
docs/ARCHITECTURE.md has the whole picture.
"""
from __future__ import annotations

import faulthandler
import os
import sys
import threading
import time
from functools import partial

import rclpy
import torch
from rclpy.clock import Clock, ClockType
from rclpy.experimental import EventsExecutor
from rclpy.node import Node
from rclpy.qos import QoSProfile, ReliabilityPolicy
from rclpy.serialization import deserialize_message
from rclpy.signals import SignalHandlerOptions

from . import node_parameters, outputs
from .constants import NS
from .node_config import FIELDS, NODE_NAME, ConfigError, NodeConfig, sensing_config, validate_update
from .planner import ImplausiblePlan, ModelLoadError, check_plan, load_configured_planner, self_test
from .sensing import ImageLimits, SensorBuffers, SensorInputs
from .worker import (BusyMeter, ClockWatch, LatencyWindow, PlanWorker, RateCounter, RateLimitedLog, TickStats,
                     on_stop_signals)

SILENT_CLOCK_S = 3.0  # use_sim_time with /clock silent this long: planning is paused, say so


class StartupError(RuntimeError):
    """The node cannot start (configuration or models); the message says why."""


class ChainSpecNode(Node):
    def __init__(self, planner_loader=load_configured_planner):
        super().__init__(NODE_NAME)
        self.log = self.get_logger()
        try:
            self.config = cfg = node_parameters.declare_all(self)
            self.log.info(f"loading the models ({cfg.models_dir or 'bundled'}, backend {cfg.backend})")
            torch.set_num_threads(cfg.torch_threads)
            self.planner, self.models_dir = planner_loader(cfg)
            warm_ms = self_test(self.planner, len(cfg.cameras), cfg.max_speed_mps)
        except BaseException as error:  # destroyed now, before the context shuts down, not when the GC gets to it
            self.destroy_node()
            if isinstance(error, (ConfigError, ModelLoadError)):
                raise StartupError(str(error)) from None
            raise
        self._draft = self.planner.drafter  # kept while drafting is switched off at runtime
        self.draft_int8 = bool(getattr(getattr(self._draft, "engine", None), "int8_weights", False))
        vision = self.planner.target.config.vision
        self.width, self.height = vision.image_width, vision.image_height
        self.backend, self.backend_fallback = self.planner.target.backend, self.planner.target.fallback_reason or ""
        if self.backend_fallback:  # auto's choice is information; a named backend replaced is a warning
            (self.log.info if cfg.backend == "auto" else self.log.warning)(
                f"backend {cfg.backend}: running on {self.backend} ({self.backend_fallback})")
        self.log.info(f"models from {self.models_dir} ({self.backend}, {self._decoding()}"
                      f"{', int8 draft' if self.draft_int8 else ''}); images "
                      f"{self.width}x{self.height}; cameras {', '.join(cfg.cameras)}; self-test plan {warm_ms:.0f} ms")
        self.buffers = SensorBuffers(sensing_config(cfg, self.width, self.height))
        self.latency, self.ticks = LatencyWindow(cfg.diagnostics_window), TickStats()
        self.plan_rate, self.busy = RateCounter(), BusyMeter()
        self.warn = RateLimitedLog(self.log.warning)
        self.diagnostics, self.types = outputs.DiagnosticsBuilder(), outputs.ros_types()
        self._lock = threading.Lock()  # tick stats, last plan, closing flag
        self._convert_ms, self._last_t0, self._generation = 0.0, None, self.buffers.generation
        self._last_frame, self._last_stats, self._staleness = None, {}, float("nan")
        self._closing, self.clock_watch = False, ClockWatch()
        self.inputs = SensorInputs(self.buffers, cfg.image_transport == "compressed",
                                   lambda data, kind: deserialize_message(data, self.types[kind]))
        qos = QoSProfile(depth=cfg.qos_depth, reliability=ReliabilityPolicy.BEST_EFFORT)  # sensor data, keep last
        topics = [(self.inputs.image_kind, topic, partial(self._on_image, camera))
                  for camera, topic in zip(cfg.cameras, cfg.camera_topics)] + [("Odometry", cfg.odom_topic, self._on_odometry)]
        self.subscriptions_ = [self.create_subscription(self.types[kind], topic, callback, qos, raw=True)
                               for kind, topic, callback in topics]
        names = ("coc", "String"), ("trajectory", "Path"), ("markers", "MarkerArray"), ("plan_info", "String")
        self.plan_publishers = {name: self.create_publisher(self.types[kind], f"~/{name}", 10) for name, kind in names}
        self.pub_diagnostics = self.create_publisher(self.types["DiagnosticArray"], "/diagnostics", 10)
        self.worker = PlanWorker(self._plan, on_crash=lambda text: self.log.error(f"planning worker: {text}"))
        self.timer = self.diag_timer = None
        self._apply(cfg)
        self.add_on_set_parameters_callback(
            lambda parameters: node_parameters.check_change(self.config, parameters, self._draft is not None))
        self.add_post_set_parameters_callback(self._parameters_set)
        self.log.info(f"planning at {cfg.plan_rate_hz:g} Hz on {', '.join(cfg.camera_topics)} + {cfg.odom_topic} "
                      f"(use_sim_time={self.get_parameter('use_sim_time').value})")

    # -- parameters

    def _parameters_set(self, parameters) -> None:
        changes = {p.name: p.value for p in parameters if p.name in FIELDS}
        if changes:
            self._apply(validate_update(self.config, changes))
            self.log.info("parameters applied: " + ", ".join(f"{k}={v}" for k, v in sorted(changes.items())))

    def _apply(self, cfg: NodeConfig) -> None:
        """Make a (validated) configuration take effect: timers, planner, guards."""
        (previous, self.config), planner = (self.config, cfg), self.planner
        planner.k, planner.expert_steps, planner.seed = cfg.draft_k, cfg.expert_steps or None, cfg.seed
        planner.sampling = planner.sampling_for(cfg.decoding, cfg.temperature, cfg.top_p)
        planner.num_traj_samples = cfg.num_traj_samples
        planner.drafter = None if cfg.drafter == "none" else self._draft
        self.buffers.config = sensing_config(cfg, self.width, self.height)
        self.inputs.configure(ImageLimits(cfg.max_image_bytes, cfg.max_image_pixels, cfg.min_image_scale),
                              cfg.camera_max_rate_hz, cfg.odom_max_rate_hz, cfg.frame_id)
        self.latency.resize(cfg.diagnostics_window)
        if self.timer is None or cfg.plan_rate_hz != previous.plan_rate_hz:
            self.timer = self._replace_timer(self.timer, 1.0 / cfg.plan_rate_hz, self._on_tick, None)
        if self.diag_timer is None or cfg.diagnostics_rate_hz != previous.diagnostics_rate_hz:
            self.diag_timer = self._replace_timer(self.diag_timer, 1.0 / cfg.diagnostics_rate_hz,
                                                  self._publish_diagnostics, Clock(clock_type=ClockType.STEADY_TIME))

    def _replace_timer(self, timer, period: float, callback, clock):
        if timer is not None:
            self.destroy_timer(timer)
        return self.create_timer(period, callback, clock=clock)

    # -- callbacks (executor thread; short)

    def _now_ns(self) -> int:
        return self.get_clock().now().nanoseconds

    def _decoding(self) -> str:
        return "speculative" if self.planner.drafter is not None else "target-only"

    def _account(self, start: float, rejected: tuple[str, str] | None) -> None:
        if rejected:
            self.warn(*rejected)
        elapsed = time.perf_counter() - start
        self.busy.add(elapsed)
        with self._lock:
            self._convert_ms += elapsed * 1e3

    def _on_image(self, camera: str, message) -> None:
        self._account(time.perf_counter(), self.inputs.image(camera, message, self._now_ns()))

    def _on_odometry(self, message) -> None:
        self._account(time.perf_counter(), self.inputs.odometry(message, self._now_ns()))

    def _on_tick(self) -> None:
        start, now = time.perf_counter(), self._now_ns()
        with self._lock:  # conversion time of the last period: what the inputs of this tick cost
            self.ticks.ticks += 1
            convert_ms, self._convert_ms = self._convert_ms, 0.0
        try:
            self.buffers.observe_clock(now)
            if self.buffers.generation != self._generation:  # reset (clock jump): a new timeline
                self._generation, self._last_t0 = self.buffers.generation, None
            frame, reason = (None, None) if self.worker.busy else self.buffers.assemble(now, self._last_t0)
            if frame is not None and self.worker.submit((frame, convert_ms)):
                self._last_t0 = frame.t0_ns
                with self._lock:
                    self.ticks.last_tick_skipped = False
            elif reason:
                with self._lock:
                    self.ticks.skip(reason)
                self.warn("skip:" + getattr(reason, "kind", "other"), f"tick skipped: {reason}")
            else:  # the worker is busy: drop-if-busy
                with self._lock:
                    self.ticks.dropped += 1
        except Exception as error:  # noqa: BLE001 - a tick must never stop the executor
            self.warn("tick", f"tick failed: {type(error).__name__}: {error}")
        finally:
            self.busy.add(time.perf_counter() - start)

    # -- planning (worker thread)

    def _plan(self, job) -> None:
        frame, convert_ms = job
        start = time.perf_counter()
        try:
            result = check_plan(self.planner.plan(frame.images, frame.history_tokens, frame.speed),
                                self.config.max_speed_mps)
            plan_ms = (time.perf_counter() - start) * 1e3
            build_start = time.perf_counter()
            tokens = [self.planner.builder.tokenizer.decode([i]) for i in result.coc_ids]
            info = outputs.plan_info(frame, result, tokens, backend=self.backend, convert_ms=convert_ms,
                                     assembly_ms=frame.assembly_ms)
            messages = outputs.plan_messages(self.types, frame, result, self.config)
            build_ms = (time.perf_counter() - build_start) * 1e3
            info.update(build_ms=build_ms, node_overhead_ms=convert_ms + frame.assembly_ms + build_ms,
                        planning_ms=convert_ms + frame.assembly_ms + plan_ms + build_ms)
            with self._lock:
                if self._closing:
                    return
                for name, message in zip(("coc", "trajectory", "markers"), messages):
                    self.plan_publishers[name].publish(message)
                self.plan_publishers["plan_info"].publish(outputs.plan_info_message(self.types, info))
        except Exception as error:  # noqa: BLE001 - report, keep running
            self._record_failure(frame, error)
            return
        overhead_ms = convert_ms + frame.assembly_ms + (time.perf_counter() - start) * 1e3 - plan_ms
        numeric = outputs.numeric_items(result.stats)
        for name, value in outputs.latency_series(result, plan_ms, overhead_ms, convert_ms + frame.assembly_ms).items():
            self.latency.add(name, value)
        self.plan_rate.add()
        with self._lock:
            self.ticks.planned()
            self._last_frame, self._last_stats = frame, numeric
            self._staleness = (self._now_ns() - frame.t0_ns) / NS

    def _record_failure(self, frame, error: Exception) -> None:
        with self._lock:
            if self._closing:
                return  # shutting down mid-plan: nothing to report
            self.ticks.failed(f"{type(error).__name__}: {error}", rejected=isinstance(error, ImplausiblePlan))
        self.warn(f"plan-{type(error).__name__}", f"plan at t0={frame.t0:.3f} not published: "
                                                  f"{type(error).__name__}: {error}")

    # -- diagnostics (steady clock)

    def _node_warnings(self, now: int) -> list[str]:
        """Problems of the node as a whole: a silent /clock under use_sim_time, a twin node."""
        warnings = {}
        silent = self.clock_watch.silent_s(now)
        if self.get_parameter("use_sim_time").value and silent > SILENT_CLOCK_S:
            warnings["clock"] = f"use_sim_time is on and /clock has not advanced for {silent:.0f} s: planning paused"
        twins = [n for n in self.get_node_names_and_namespaces() if n == (self.get_name(), self.get_namespace())]
        if len(twins) > 1:
            warnings["twin"] = (f"{len(twins)} nodes named {self.get_fully_qualified_name()} are running; "
                                f"their outputs mix on the same topics")
        for key, text in warnings.items():
            self.warn(key, text)
        return list(warnings.values())

    def _state(self) -> outputs.NodeState:
        now = self._now_ns()
        with self._lock:
            ticks, frame, last_stats = TickStats(**vars(self.ticks)), self._last_frame, dict(self._last_stats)
        ages = {name: (now - stamp) / NS if stamp is not None else float("nan")
                for name, stamp in self.buffers.newest_stamps().items()}
        node_values = {"plan_rate_hz": self.config.plan_rate_hz, "plan_rate_achieved_hz": self.plan_rate.rate(),
                       "draft_k": self.planner.k, "draft_int8": self.draft_int8, "executor_load_pct": 100.0 * self.busy.take(), "log_keys": len(self.warn)}
        return outputs.NodeState(
            name=self.get_name(), backend=self.backend, backend_requested=self.config.backend,
            backend_fallback=self.backend_fallback, decoding=self._decoding(), models_dir=str(self.models_dir),
            ticks=ticks, latency=self.latency.summary(), last_stats=last_stats, counters=dict(self.buffers.counters),
            reasons=dict(self.buffers.last_reasons), input_ages_s=ages, staleness_s=self._staleness, frame=frame,
            node_values=node_values, warnings=self._node_warnings(now))

    def _diagnostics(self):
        return self.diagnostics.build(self.types, self._state(), self._now_ns())

    def _publish_diagnostics(self) -> None:
        try:
            array = self._diagnostics()
            with self._lock:
                if not self._closing:
                    self.pub_diagnostics.publish(array)
        except Exception as error:  # noqa: BLE001
            self.warn("diagnostics", f"could not publish diagnostics: {type(error).__name__}: {error}")

    def close(self, timeout: float = 1.0) -> bool:
        """Stop publishing, let a running plan finish up to `timeout`. True if the worker ended."""
        with self._lock:
            self._closing = True
        return self.worker.stop(timeout)


def main(argv: list[str] | None = None) -> int:
    # A crash in native code (DDS, torch, ONNX Runtime) prints every thread's Python stack to stderr,
    # where the launch log keeps it: a rare startup segfault once left no trace but its exit code.
    faulthandler.enable(all_threads=True)
    # SIGINT/SIGTERM: KeyboardInterrupt while loading, a flag once spinning (why: `on_stop_signals`).
    stop = threading.Event()
    on_stop_signals()
    node, code = None, 0
    try:
        try:
            rclpy.init(args=list(sys.argv if argv is None else argv), signal_handler_options=SignalHandlerOptions.NO)
        except Exception as error:  # noqa: BLE001 - e.g. an unreadable --params-file
            raise StartupError(f"invalid ROS arguments: {error}") from None
        node = ChainSpecNode()
        on_stop_signals(lambda *_: stop.set())
        executor = EventsExecutor()  # per-message cost in C++, not a wait set rebuilt in Python
        executor.add_node(node)
        while rclpy.ok() and not stop.is_set():
            executor.spin_once(timeout_sec=0.2)
    except StartupError as error:
        print(f"chain_spec_node: error: {error}", file=sys.stderr, flush=True)
        code = 2
    except KeyboardInterrupt:
        pass
    finished = node is None or node.close()
    if node is not None:
        node.destroy_node()
    rclpy.try_shutdown()
    if not finished:  # a plan is still running in native code: do not wait for it
        sys.stdout.flush(), sys.stderr.flush()
        os._exit(code)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
