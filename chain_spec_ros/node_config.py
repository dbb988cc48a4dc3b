"""Every parameter of `chain_spec_node`, its default, type and range, and their validation.

Plain Python (no ROS imports), so the same checks run in tests, in the launch file and in the
node. The on-disk format is the ROS 2 parameter file, passed the ROS way
(`chain_spec_node --ros-args --params-file config/chain_spec.yaml`):

    chain_spec_node:          # or /** for any node
      ros__parameters:
        plan_rate_hz: 2.0
        ...

`config/chain_spec.yaml` lists every parameter; `load_config` reads and validates such a
file, `validate` checks a flat mapping (the node's parameters after ROS overrides). Errors are
collected and reported together, one line per problem.

Each parameter is either `runtime` (a `ros2 param set` on the running node takes effect at once,
after `validate_update` accepted it) or read-only (the node declares it so, and ROS refuses a
change with a reason: it needs a restart).
"""
from __future__ import annotations

import math
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

import yaml

from .constants import BACKENDS, DEFAULT_K
from .sensing import SensingConfig
from .trajectory import HISTORY_SECONDS

NODE_NAME = "chain_spec_node"
DRAFTERS = ("auto", "none", "eagle")
DECODINGS = ("greedy", "sample")
IMAGE_TRANSPORTS = ("compressed", "raw")
# Parameters rclpy declares on every node by itself; accepted but not ours.
ROS_BUILTIN_PARAMETERS = ("start_type_description_service",)


class ConfigError(ValueError):
    """An invalid configuration; the message lists every problem found."""


def _param(default, help: str, low: float | None = None, high: float | None = None, choices=None,
           low_open: bool = False, runtime: bool = False):
    metadata = {"help": help, "low": low, "high": high, "choices": choices, "low_open": low_open,
                "runtime": runtime}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class NodeConfig:
    # Models and planning.
    models_dir: str = _param("", "directory with tokenizer.json and target/ ('' = the bundled models)")
    backend: str = _param("auto", "inference backend; auto = the fastest available (tensorrt, then onnxruntime, "
                          "exporting its graphs on first use, then torch)", choices=("auto", *BACKENDS))
    drafter: str = _param("auto", "CoC decoding: eagle (speculative, with the draft), none (target only), "
                          "auto (eagle when the models directory has a draft/)", choices=DRAFTERS, runtime=True)
    draft_dir: str = _param("", "directory of the draft model ('' = <models_dir>/draft)")
    draft_k: int = _param(DEFAULT_K, "tokens drafted per target pass", low=1, high=32, runtime=True)
    use_sim_time: bool = _param(False, "follow /clock (bag replay) instead of the system clock", runtime=True)
    plan_rate_hz: float = _param(2.0, "planning timer rate; ticks arriving while a plan runs are dropped",
                                 low=0.0, high=100.0, low_open=True, runtime=True)
    torch_threads: int = _param(2, "CPU threads of the engines: PyTorch's, or the size of ONNX Runtime's one thread pool "
                                 "(torch then glues on one thread)", low=1, high=256)
    expert_steps: int = _param(0, "Euler steps of the trajectory expert (0 = the model's own)", low=0, high=100,
                               runtime=True)
    seed: int = _param(0, "seed of every plan's sampling and trajectory noise", low=0, high=2**31 - 1, runtime=True)
    decoding: str = _param("greedy", "CoC decoding: greedy (deterministic; what an onboard deployment runs) or sample "
                           "(temperature and top-p, as Alpamayo's release rolls out)", choices=DECODINGS, runtime=True)
    temperature: float = _param(0.0, "sampling temperature (0 = the model's generation_config, else 0.6)",
                                low=0.0, high=10.0, runtime=True)
    top_p: float = _param(0.0, "nucleus mass kept when sampling (0 = the model's generation_config, else 0.98)",
                          low=0.0, high=1.0, runtime=True)
    num_traj_samples: int = _param(1, "trajectories drawn from the expert per plan (the first is ~/trajectory, all go "
                                   "to ~/markers and ~/plan_info)", low=1, high=16, runtime=True)
    # Inputs.
    cameras: list = _param(["front_wide", "front_tele"], "camera names, in the model's prompt order")
    camera_topics: list = _param(["/cameras/front_wide/image/compressed", "/cameras/front_tele/image/compressed"],
                                 "one image topic per camera, same order")
    image_transport: str = _param("compressed", "sensor_msgs/CompressedImage or raw sensor_msgs/Image",
                                  choices=IMAGE_TRANSPORTS)
    odom_topic: str = _param("/odom", "nav_msgs/Odometry topic")
    qos_depth: int = _param(10, "queue depth of the sensor-data subscriptions", low=1, high=1000)
    resize_images: bool = _param(True, "resize images of another size to the model's (false: reject them)",
                                 runtime=True)
    camera_max_rate_hz: float = _param(25.0, "camera frames above this rate are dropped before decoding (0 = keep all; "
                                       "at least 1 / frame_tolerance_s)",
                                       low=0.0, high=10000.0, runtime=True)
    odom_max_rate_hz: float = _param(100.0, "odometry above this rate is dropped before deserialisation (0 = keep all)",
                                     low=0.0, high=100000.0, runtime=True)
    max_image_bytes: int = _param(16 * 1024 * 1024, "largest accepted image message payload (bytes)",
                                  low=1024, high=2**31 - 1, runtime=True)
    max_image_pixels: int = _param(4096 * 4096, "largest accepted image (width x height, read from the header "
                                   "before decoding)", low=1, high=2**31 - 1, runtime=True)
    min_image_scale: float = _param(0.25, "reject frames narrower or lower than this share of the model's input",
                                    low=0.0, high=1.0, runtime=True)
    # Time alignment and input checks (seconds).
    frame_tolerance_s: float = _param(0.04, "a camera frame may be this far from its 10 Hz instant",
                                      low=0.0, high=0.1, low_open=True, runtime=True)
    max_camera_skew_s: float = _param(0.15, "skip a tick when the cameras' newest stamps spread more",
                                      low=0.0, high=10.0, runtime=True)
    max_odom_staleness_s: float = _param(0.2, "skip when the newest odometry is older than t0 by more",
                                         low=0.0, high=10.0, runtime=True)
    max_odom_gap_s: float = _param(0.5, "skip when odometry has a longer gap inside the history",
                                   low=0.0, high=10.0, low_open=True, runtime=True)
    max_input_age_s: float = _param(1.0, "skip when t0 is older than this at the tick", low=0.0, high=3600.0,
                                    low_open=True, runtime=True)
    clock_jump_threshold_s: float = _param(1.0, "a stamp further than this behind its topic's timeline is an outlier; "
                                           "a confirmed backward jump (or of the clock) resets all buffers",
                                           low=0.0, high=3600.0, low_open=True, runtime=True)
    max_future_stamp_s: float = _param(0.25, "a stamp further than this ahead of the node's clock is an outlier "
                                       "(dropped, counted)", low=0.0, high=3600.0, low_open=True, runtime=True)
    buffer_seconds: float = _param(3.0, "history kept per topic (>= 1.6 s of ego history + margin)",
                                   low=1.7, high=60.0)
    max_speed_mps: float = _param(90.0, "odometry faster than this, or a planned step covering more, is implausible",
                                  low=0.0, high=1000.0, low_open=True, runtime=True)
    max_reverse_speed_mps: float = _param(15.0, "odometry reversing faster than this is implausible",
                                          low=0.0, high=1000.0, runtime=True)
    max_abs_position_m: float = _param(1e8, "odometry positions beyond this (any axis) are implausible",
                                       low=0.0, high=1e12, low_open=True, runtime=True)
    # Outputs.
    frame_id: str = _param("base_link", "frame of the published trajectory and markers", runtime=True)
    diagnostics_rate_hz: float = _param(1.0, "/diagnostics publishing rate (steady clock)", low=0.0, high=100.0,
                                        low_open=True, runtime=True)
    diagnostics_window: int = _param(100, "plans in the latency percentile window", low=1, high=100000, runtime=True)
    marker_lifetime_s: float = _param(0.0, "marker lifetime (0 = until replaced)", low=0.0, high=3600.0, runtime=True)
    marker_line_width: float = _param(0.3, "width of the trajectory line strip (m)", low=0.0, high=10.0,
                                      low_open=True, runtime=True)
    marker_text_size: float = _param(1.0, "height of the CoC text (m)", low=0.0, high=100.0, low_open=True,
                                     runtime=True)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


FIELDS = {f.name: f for f in fields(NodeConfig)}
RUNTIME_PARAMETERS = frozenset(name for name, f in FIELDS.items() if f.metadata["runtime"])


def defaults() -> dict[str, Any]:
    out = {}
    for name, f in FIELDS.items():
        out[name] = f.default_factory() if f.default is MISSING else f.default
    return out


def _type_name(value) -> str:
    return type(value).__name__


def _check(name: str, value: Any, kind: type, meta: dict) -> tuple[Any, list[str]]:
    """One parameter -> (normalised value, errors)."""
    errors: list[str] = []
    if kind is bool:
        if not isinstance(value, bool):
            return value, [f"{name}: expected true or false, got {value!r} ({_type_name(value)})"]
        return value, []
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            return value, [f"{name}: expected an integer, got {value!r} ({_type_name(value)})"]
    elif kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return value, [f"{name}: expected a number, got {value!r} ({_type_name(value)})"]
        value = float(value)
        if not math.isfinite(value):
            return value, [f"{name}: must be finite, got {value}"]
    elif kind is str:
        if not isinstance(value, str):
            return value, [f"{name}: expected a string, got {value!r} ({_type_name(value)})"]
    elif kind is list:
        if not isinstance(value, (list, tuple)) or not value or not all(isinstance(v, str) and v for v in value):
            return value, [f"{name}: expected a non-empty list of non-empty strings, got {value!r}"]
        value = list(value)
    low, high = meta.get("low"), meta.get("high")
    if low is not None and (value < low or (meta.get("low_open") and value == low)):
        errors.append(f"{name}: {value} is out of range, must be {'>' if meta.get('low_open') else '>='} {low}")
    if high is not None and value > high:
        errors.append(f"{name}: {value} is out of range, must be <= {high}")
    if meta.get("choices") and value not in meta["choices"]:
        errors.append(f"{name}: {value!r} is not one of {', '.join(meta['choices'])}")
    return value, errors


_KINDS = {"bool": bool, "int": int, "float": float, "str": str, "list": list}


def validate(params: Mapping[str, Any], source: str = "parameters", partial_ok: bool = True) -> NodeConfig:
    """A flat mapping of parameter values -> NodeConfig. Missing keys take their defaults
    (unless partial_ok is false); unknown keys, wrong types and out-of-range values are errors."""
    errors: list[str] = []
    values = defaults()
    for name in sorted(params):
        if name in ROS_BUILTIN_PARAMETERS or name.startswith("qos_overrides."):
            continue
        if name not in FIELDS:
            close = [f for f in FIELDS if f.split("_")[0] == name.split("_")[0]]
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            errors.append(f"{name}: unknown parameter{hint}")
            continue
        f = FIELDS[name]
        value, problems = _check(name, params[name], _KINDS[f.type], f.metadata)
        errors += problems
        values[name] = value
    if not partial_ok:
        errors += [f"{name}: missing" for name in FIELDS if name not in params]
    if not errors:
        errors += _cross_checks(values)
    if errors:
        raise ConfigError(f"invalid {source}:\n  " + "\n  ".join(errors))
    return NodeConfig(**values)


def _cross_checks(values: dict[str, Any]) -> list[str]:
    errors = []
    cameras, topics = values["cameras"], values["camera_topics"]
    if len(set(cameras)) != len(cameras):
        errors.append(f"cameras: names must be unique, got {cameras}")
    if len(topics) != len(cameras):
        errors.append(f"camera_topics: {len(topics)} topic(s) for {len(cameras)} camera(s); give one per camera")
    if len(set(topics)) != len(topics):
        errors.append(f"camera_topics: topics must be unique, got {topics}")
    rate, tolerance = values["camera_max_rate_hz"], values["frame_tolerance_s"]
    if 0 < rate < 1.0 / tolerance:  # decimated frames would leave gaps the 10 Hz instants miss
        errors.append(f"camera_max_rate_hz: {rate:g} Hz leaves frames more than frame_tolerance_s ({tolerance:g} s) "
                      f"from some 10 Hz instants; use 0 (keep all) or at least {1.0 / tolerance:g} Hz")
    if values["buffer_seconds"] < HISTORY_SECONDS + values["max_odom_staleness_s"]:
        errors.append(f"buffer_seconds: {values['buffer_seconds']} s cannot hold {HISTORY_SECONDS:g} s of history plus "
                      f"max_odom_staleness_s ({values['max_odom_staleness_s']} s)")
    return errors


def validate_update(current: NodeConfig, changes: Mapping[str, Any]) -> NodeConfig:
    """The configuration after a runtime change, or ConfigError with the reason: a read-only
    parameter, a wrong type or range, or a combination that does not hold."""
    errors = [f"{name}: read-only, it needs a restart of the node" for name in sorted(changes)
              if name in FIELDS and name not in RUNTIME_PARAMETERS]
    if errors:
        raise ConfigError("refused:\n  " + "\n  ".join(errors))
    return validate({**current.to_dict(), **changes}, source="parameter change")


def kind_of(name: str) -> str:
    """The parameter's type: bool, int, float, str or list (of strings)."""
    return FIELDS[name].type


def sensing_config(cfg: NodeConfig, width: int, height: int) -> SensingConfig:
    """The input buffers' settings for a node configuration and the model's image size."""
    keys = ("frame_tolerance_s", "max_camera_skew_s", "max_odom_staleness_s", "max_odom_gap_s", "max_input_age_s",
            "clock_jump_threshold_s", "max_future_stamp_s", "buffer_seconds", "resize_images", "max_speed_mps", "max_reverse_speed_mps",
            "max_abs_position_m")
    return SensingConfig(cameras=tuple(cfg.cameras), image_width=width, image_height=height,
                         **{key: getattr(cfg, key) for key in keys})


def read_parameter_file(path: str | Path, node_name: str = NODE_NAME) -> dict[str, Any]:
    """The flat `ros__parameters` mapping for `node_name` in a ROS 2 parameter file.

    Entries under `/**` apply to every node, then the node's own entry (by name, with or
    without a leading slash or namespace) overrides them. Nested mappings are flattened with
    dots, as ROS does.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"parameter file not found: {path}")
    try:
        document = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None
    if not isinstance(document, dict):
        raise ConfigError(f"{path}: expected a mapping of node names, got {_type_name(document)}")
    params: dict[str, Any] = {}
    matched = False
    for key in sorted(document, key=lambda k: k != "/**"):  # wildcard first, the node's own entry wins
        name = str(key)
        if name != "/**" and name.strip("/").split("/")[-1] != node_name:
            continue
        entry = document[key]
        if not isinstance(entry, dict) or "ros__parameters" not in entry:
            raise ConfigError(f"{path}: '{name}' must contain a 'ros__parameters' mapping")
        section = entry["ros__parameters"]
        if not isinstance(section, dict):
            raise ConfigError(f"{path}: '{name}.ros__parameters' must be a mapping")
        params.update(_flatten(section))
        matched = True
    if not matched:
        raise ConfigError(f"{path}: no entry for node '{node_name}' (expected '{node_name}:' or '/**:' "
                          f"with 'ros__parameters:')")
    return params


def _flatten(mapping: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


def load_config(path: str | Path, node_name: str = NODE_NAME, overrides: Mapping[str, Any] | None = None
                ) -> NodeConfig:
    """Read, merge overrides into and validate a parameter file."""
    params = read_parameter_file(path, node_name)
    params.update(overrides or {})
    return validate(params, source=str(path))


def render_yaml(config: NodeConfig | None = None, node_name: str = NODE_NAME) -> str:
    """A complete, commented parameter file for `config` (the defaults when None)."""
    config = config or NodeConfig()
    lines = [f"{node_name}:", "  ros__parameters:"]
    for name, f in FIELDS.items():
        value = getattr(config, name)
        lines.append(f"    # {f.metadata['help']}")
        lines.append(f"    {name}: {_yaml_value(value)}")
    return "\n".join(lines) + "\n"


def _yaml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, list):
        return "[" + ", ".join(_yaml_value(v) for v in value) + "]"
    return str(value)
