"""Parameter file loading and validation (no ROS)."""
from pathlib import Path

import pytest
import yaml

from chain_spec_ros import node_config
from chain_spec_ros.node_config import (FIELDS, ConfigError, NodeConfig, load_config, read_parameter_file,
                                        render_yaml, validate)
from chain_spec_ros.paths import default_config_path

REPO = Path(__file__).resolve().parent.parent
SHIPPED = REPO / "config" / "chain_spec.yaml"


def _write(tmp_path, text: str) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(text)
    return path


def test_shipped_file_lists_every_parameter_with_its_default():
    raw = read_parameter_file(SHIPPED)
    assert set(raw) == set(FIELDS), "config/chain_spec.yaml must list every parameter"
    assert load_config(SHIPPED) == NodeConfig()
    assert default_config_path() == SHIPPED


def test_rendered_yaml_round_trips(tmp_path):
    config = validate({"plan_rate_hz": 5, "cameras": ["a"], "camera_topics": ["/a"], "use_sim_time": True})
    path = _write(tmp_path, render_yaml(config))
    assert load_config(path) == config
    assert config.plan_rate_hz == 5.0 and isinstance(config.plan_rate_hz, float)


def test_partial_file_takes_defaults_and_wildcard_entries(tmp_path):
    path = _write(tmp_path, "/**:\n  ros__parameters:\n    plan_rate_hz: 4.0\n    seed: 3\n"
                            "/vehicle/chain_spec_node:\n  ros__parameters:\n    seed: 5\n")
    config = load_config(path)
    assert config.plan_rate_hz == 4.0 and config.seed == 5 and config.backend == "auto"


def test_overrides_win(tmp_path):
    path = _write(tmp_path, "chain_spec_node:\n  ros__parameters:\n    backend: torch\n")
    assert load_config(path, overrides={"backend": "onnxruntime"}).backend == "onnxruntime"


@pytest.mark.parametrize("params, message", [
    ({"plan_rate": 2.0}, "plan_rate: unknown parameter (did you mean plan_rate_hz?)"),
    ({"plan_rate_hz": "fast"}, "plan_rate_hz: expected a number, got 'fast'"),
    ({"plan_rate_hz": 0.0}, "plan_rate_hz: 0.0 is out of range, must be > 0.0"),
    ({"plan_rate_hz": float("nan")}, "must be finite"),
    ({"torch_threads": 1.5}, "torch_threads: expected an integer"),
    ({"torch_threads": True}, "torch_threads: expected an integer"),
    ({"use_sim_time": "yes"}, "use_sim_time: expected true or false"),
    ({"use_sim_time": 1}, "use_sim_time: expected true or false"),
    ({"backend": "tpu"}, "backend: 'tpu' is not one of auto, tensorrt, onnxruntime, torch"),
    ({"image_transport": "theora"}, "image_transport: 'theora' is not one of compressed, raw"),
    ({"cameras": []}, "cameras: expected a non-empty list"),
    ({"cameras": "front_wide"}, "cameras: expected a non-empty list"),
    ({"cameras": ["a", "b", "c"]}, "camera_topics: 2 topic(s) for 3 camera(s)"),
    ({"cameras": ["a", "a"]}, "cameras: names must be unique"),
    ({"frame_tolerance_s": 0.2}, "frame_tolerance_s: 0.2 is out of range, must be <= 0.1"),
    ({"max_camera_skew_s": -1}, "max_camera_skew_s: -1.0 is out of range, must be >= 0.0"),
    ({"buffer_seconds": 1.7, "max_odom_staleness_s": 0.5}, "buffer_seconds: 1.7 s cannot hold"),
    ({"odom_topic": 5}, "odom_topic: expected a string"),
])
def test_validation_errors(params, message):
    with pytest.raises(ConfigError) as error:
        validate(params)
    assert message in str(error.value)


def test_all_errors_are_reported_together():
    with pytest.raises(ConfigError) as error:
        validate({"plan_rate_hz": -1.0, "backend": "x", "bogus": 1}, source="my.yaml")
    text = str(error.value)
    assert text.startswith("invalid my.yaml:")
    assert "plan_rate_hz" in text and "backend" in text and "bogus: unknown parameter" in text


def test_builtin_ros_parameters_are_accepted():
    config = validate({"use_sim_time": True, "start_type_description_service": True,
                       "qos_overrides./odom.subscription.depth": 5})
    assert config.use_sim_time


@pytest.mark.parametrize("text, message", [
    ("chain_spec_node: [1, 2", "not valid YAML"),
    ("- a\n- b\n", "expected a mapping of node names"),
    ("other_node:\n  ros__parameters:\n    seed: 1\n", "no entry for node 'chain_spec_node'"),
    ("chain_spec_node:\n  seed: 1\n", "must contain a 'ros__parameters' mapping"),
    ("chain_spec_node:\n  ros__parameters:\n    nested:\n      value: 1\n", "nested.value: unknown parameter"),
])
def test_file_errors(tmp_path, text, message):
    with pytest.raises(ConfigError) as error:
        load_config(_write(tmp_path, text))
    assert message in str(error.value)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="parameter file not found"):
        load_config(tmp_path / "nope.yaml")


def test_every_parameter_is_documented():
    for name, f in FIELDS.items():
        assert f.metadata["help"], name
    document = yaml.safe_load(render_yaml())
    assert set(document[node_config.NODE_NAME]["ros__parameters"]) == set(FIELDS)


# --- Launch file and RViz configuration -----------------------------------------------------------

LAUNCH = REPO / "launch" / "chain_spec.launch.py"
RVIZ = REPO / "config" / "chain_spec.rviz"


def _launch_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("chain_spec_launch", LAUNCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # must not need launch / launch_ros at import time
    return module


def test_launch_file_imports_without_launch_and_mirrors_the_yaml():
    module = _launch_module()
    assert callable(module.generate_launch_description)
    # Every override argument names a real parameter of the YAML.
    shipped = read_parameter_file(SHIPPED)
    assert {parameter for parameter, _, _ in module.OVERRIDES.values()} <= set(shipped)
    assert {"backend", "models_dir", "use_sim_time"} <= set(module.OVERRIDES)
    assert module._convert("True", bool) is True and module._convert("2", float) == 2.0
    with pytest.raises(ValueError):
        module._convert("yes", bool)


def test_launch_description_loads_where_launch_ros_is_installed():
    try:
        import launch  # noqa: F401
        import launch_ros  # noqa: F401
    except ImportError as error:
        pytest.skip(f"launch_ros is not importable here ({error}); the ROS 2 wheels ship no launch packages")
    from launch import LaunchDescription
    from launch.actions import DeclareLaunchArgument

    description = _launch_module().generate_launch_description()
    assert isinstance(description, LaunchDescription)
    names = {e.name for e in description.entities if isinstance(e, DeclareLaunchArgument)}
    assert {"config_file", "backend", "models_dir", "use_sim_time", "rviz"} <= names


def test_rviz_config_shows_path_markers_camera_and_odometry():
    document = yaml.safe_load(RVIZ.read_text())
    manager = document["Visualization Manager"]
    assert manager["Global Options"]["Fixed Frame"] == "base_link"
    displays = {d["Class"]: d for d in manager["Displays"]}
    assert displays["rviz_default_plugins/Path"]["Topic"]["Value"] == "/chain_spec_node/trajectory"
    assert displays["rviz_default_plugins/MarkerArray"]["Topic"]["Value"] == "/chain_spec_node/markers"
    assert displays["rviz_default_plugins/Odometry"]["Topic"]["Value"] == "/odom"
    assert "front_wide" in displays["rviz_default_plugins/Image"]["Topic"]["Value"]


# --- Runtime changes ---------------------------------------------------------------------------------

def test_runtime_changes_are_validated_and_read_only_ones_refused():
    from chain_spec_ros.node_config import RUNTIME_PARAMETERS, validate_update

    current = NodeConfig()
    assert validate_update(current, {"plan_rate_hz": 5.0, "draft_k": 4}).draft_k == 4
    for change, message in [({"plan_rate_hz": -1.0}, "must be > 0"), ({"plan_rate_hz": 0.0}, "must be > 0"),
                            ({"draft_k": 0}, "must be >= 1"), ({"draft_k": 10000}, "must be <= 32"),
                            ({"torch_threads": 100000}, "read-only"), ({"models_dir": "/etc"}, "read-only"),
                            ({"backend": "tpu"}, "read-only"), ({"drafter": "fast"}, "not one of")]:
        with pytest.raises(ConfigError, match=message):
            validate_update(current, change)
    assert {"plan_rate_hz", "draft_k", "drafter", "expert_steps", "max_camera_skew_s"} <= RUNTIME_PARAMETERS
    assert not {"models_dir", "backend", "cameras", "camera_topics", "torch_threads"} & RUNTIME_PARAMETERS
