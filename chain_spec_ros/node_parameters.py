"""The node's parameters in ROS 2 terms: descriptors (type, description, range, read-only),
declaration from the overrides (`--params-file`, `-p`) validated as a whole, and the check of a
runtime change. The rules themselves live in `node_config.py` (plain Python)."""
from __future__ import annotations

from rcl_interfaces.msg import (FloatingPointRange, IntegerRange, ParameterDescriptor, ParameterType,
                                SetParametersResult)
from rclpy.parameter import Parameter

from .node_config import FIELDS, ROS_BUILTIN_PARAMETERS, ConfigError, NodeConfig, defaults, kind_of, validate, validate_update

ROS_TYPES = {"bool": ParameterType.PARAMETER_BOOL, "int": ParameterType.PARAMETER_INTEGER,
             "float": ParameterType.PARAMETER_DOUBLE, "str": ParameterType.PARAMETER_STRING,
             "list": ParameterType.PARAMETER_STRING_ARRAY}


def descriptor(name: str) -> ParameterDescriptor:
    meta, kind = FIELDS[name].metadata, kind_of(name)
    text = meta["help"] + (f" (one of: {', '.join(meta['choices'])})" if meta["choices"] else "")
    out = ParameterDescriptor(name=name, type=ROS_TYPES[kind], description=text, read_only=not meta["runtime"])
    if meta["low"] is not None and meta["high"] is not None:
        if kind == "float":
            out.floating_point_range = [FloatingPointRange(from_value=float(meta["low"]), to_value=float(meta["high"]))]
        elif kind == "int":
            out.integer_range = [IntegerRange(from_value=int(meta["low"]), to_value=int(meta["high"]), step=1)]
    return out


def declare_all(node) -> NodeConfig:
    """Validate the node's overrides together (every problem in one ConfigError), then declare
    every parameter with its descriptor. `use_sim_time` is rclpy's own and only read."""
    overrides = node._parameter_overrides  # rclpy keeps them here until a parameter is declared
    values = {**defaults(), **{name: p.value for name, p in overrides.items()
                               if name not in ROS_BUILTIN_PARAMETERS and not name.startswith("qos_overrides.")}}
    values["use_sim_time"] = node.get_parameter("use_sim_time").value
    config = validate(values, source="parameters")
    for name in FIELDS:
        if name == "use_sim_time":
            continue
        if name in overrides:  # normalised, e.g. `-p plan_rate_hz:=5` arrives as an integer
            overrides[name] = Parameter(name, value=getattr(config, name))
        node.declare_parameter(name, getattr(config, name), descriptor(name))
    return config


def check_change(current: NodeConfig, parameters, draft_loaded: bool) -> SetParametersResult:
    """Accept or refuse (with the reason) a `ros2 param set` on the running node."""
    changes = {p.name: p.value for p in parameters if p.name in FIELDS}
    try:
        config = validate_update(current, changes)
    except ConfigError as error:
        return SetParametersResult(successful=False, reason=str(error))
    if config.drafter == "eagle" and not draft_loaded:
        return SetParametersResult(successful=False, reason="drafter: no draft was loaded at start-up; restart the "
                                                            "node with drafter:=eagle")
    return SetParametersResult(successful=True)
