"""Start chain_spec_node (and optionally RViz).

    ros2 launch chain_spec_ros chain_spec.launch.py [config_file:=...] [backend:=torch]
        [models_dir:=...] [use_sim_time:=true] [rviz:=true] [plan_rate_hz:=2.0]

The arguments mirror config/chain_spec.yaml: the file gives every parameter, and an argument
left empty keeps the file's value; a non-empty one overrides it. `launch` and `launch_ros` are
imported inside generate_launch_description only, so this file can be imported (and its
arguments listed) where they are not installed.
"""

CONFIG_FILE = "chain_spec.yaml"
RVIZ_FILE = "chain_spec.rviz"
# Launch argument -> (parameter in the YAML, parameter type, description). Empty = keep the YAML value.
OVERRIDES = {
    "backend": ("backend", str, "inference backend: auto, tensorrt, onnxruntime or torch"),
    "models_dir": ("models_dir", str, "directory with tokenizer.json and target/"),
    "drafter": ("drafter", str, "CoC decoding: auto, eagle (speculative) or none (target only)"),
    "use_sim_time": ("use_sim_time", bool, "follow /clock (bag replay)"),
    "plan_rate_hz": ("plan_rate_hz", float, "planning timer rate (Hz)"),
}


def _package_file(folder: str, name: str) -> str:
    """share/chain_spec_ros/<folder>/<name> of the running install (or of the source checkout)."""
    from chain_spec_ros.paths import package_share_dir

    return str(package_share_dir() / folder / name)


def _convert(text: str, kind):
    if kind is bool:
        lowered = text.strip().lower()
        if lowered not in ("true", "false"):
            raise ValueError(f"expected true or false, got {text!r}")
        return lowered == "true"
    return kind(text)


def _file_value(config_file: str, name: str, default):
    try:
        from chain_spec_ros.node_config import read_parameter_file

        return read_parameter_file(config_file).get(name, default)
    except Exception:  # noqa: BLE001 - the node reports a bad file itself
        return default


def _node_actions(context, *_, **__):
    from launch.substitutions import LaunchConfiguration
    from launch_ros.actions import Node

    config_file = LaunchConfiguration("config_file").perform(context)
    overrides = {}
    for argument, (parameter, kind, _) in OVERRIDES.items():
        value = LaunchConfiguration(argument).perform(context)
        if value != "":
            overrides[parameter] = _convert(value, kind)
    # The file, then the non-empty arguments: later entries win, as with any ROS 2 node.
    actions = [Node(package="chain_spec_ros", executable="chain_spec_node", name="chain_spec_node", output="screen",
                    parameters=[config_file, overrides] if overrides else [config_file])]
    if LaunchConfiguration("rviz").perform(context).lower() == "true":
        sim_time = overrides.get("use_sim_time", _file_value(config_file, "use_sim_time", False))
        actions.append(Node(package="rviz2", executable="rviz2", name="rviz2", output="screen",
                            arguments=["-d", LaunchConfiguration("rviz_config").perform(context)],
                            parameters=[{"use_sim_time": sim_time}]))
    return actions


def generate_launch_description():
    from launch import LaunchDescription
    from launch.actions import DeclareLaunchArgument, OpaqueFunction

    arguments = [
        DeclareLaunchArgument("config_file", default_value=_package_file("config", CONFIG_FILE),
                              description="ROS 2 parameter file with every chain_spec_node parameter"),
        *[DeclareLaunchArgument(name, default_value="", description=f"{text} (empty: the config file's value)")
          for name, (_, _, text) in OVERRIDES.items()],
        DeclareLaunchArgument("rviz", default_value="false", description="also start RViz"),
        DeclareLaunchArgument("rviz_config", default_value=_package_file("config", RVIZ_FILE),
                              description="RViz configuration"),
    ]
    return LaunchDescription([*arguments, OpaqueFunction(function=_node_actions)])
