"""An installed (non-editable) package carries its data folders intact and the node finds them.

The repository's tracked files are copied to a temporary folder (what a fresh clone holds) and
installed two ways, each into its own prefix:
- as `colcon build` installs an ament_python package (`setup.py ... install --prefix
  --single-version-externally-managed`, which honours setup.cfg: executables in
  `<prefix>/lib/chain_spec_ros`, where `ros2 launch` looks for them);
- as pip installs a wheel (`pip install --prefix`: executables in `<prefix>/bin`).
Both share folders must hold the same tree as the source (models/target and models/draft apart),
and the node started from the colcon-style install with the default models_dir loads the models
from that share folder.
"""
import filecmp
import os
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DATA_FOLDERS = ("models", "config", "launch")


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """The tracked files of the working tree, as a fresh clone would have them."""
    listing = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True)
    if listing.returncode != 0:
        pytest.skip(f"not a git checkout: {listing.stderr.decode(errors='replace').strip()}")
    out = tmp_path_factory.mktemp("source")
    for name in listing.stdout.decode().split("\0"):
        if name and (REPO / name).is_file():
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            (out / name).write_bytes((REPO / name).read_bytes())
    return out


def _site_packages(prefix: Path) -> Path:
    return Path(sysconfig.get_path("purelib", vars={"base": str(prefix), "platbase": str(prefix)}))


def _colcon_style_install(source: Path, work: Path) -> Path:
    prefix, build = work / "install", work / "build"
    build.mkdir(parents=True)
    command = [sys.executable, "setup.py", "-q", "egg_info", "--egg-base", str(build), "build", "--build-base",
               str(build / "build"), "install", "--prefix", str(prefix), "--record", str(build / "files.txt"),
               "--single-version-externally-managed"]
    result = subprocess.run(command, cwd=source, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return prefix


def _assert_same_tree(source: Path, share: Path) -> None:
    expected = sorted(str(p.relative_to(source)) for folder in DATA_FOLDERS for p in (source / folder).rglob("*")
                      if p.is_file() and "__pycache__" not in p.parts)
    installed = sorted(str(p.relative_to(share)) for folder in DATA_FOLDERS for p in (share / folder).rglob("*")
                       if p.is_file() and "__pycache__" not in p.parts)
    assert installed == expected
    for name in ("models/target/config.json", "models/draft/config.json", "models/target/model.safetensors",
                 "models/draft/model.safetensors", "models/tokenizer.json", "config/chain_spec.yaml",
                 "launch/chain_spec.launch.py"):
        assert name in installed, name
    different = [name for name in expected if not filecmp.cmp(source / name, share / name, shallow=False)]
    assert not different, different
    assert (share / "package.xml").is_file()
    assert (share.parent / "ament_index" / "resource_index" / "packages" / "chain_spec_ros").is_file()


def test_colcon_style_install_keeps_the_tree_and_the_node_loads_its_models(source, tmp_path):
    prefix = _colcon_style_install(source, tmp_path)
    share = prefix / "share" / "chain_spec_ros"
    _assert_same_tree(source, share)
    executable = prefix / "lib" / "chain_spec_ros" / "chain_spec_node"
    assert executable.is_file(), sorted(p.name for p in (prefix / "lib").iterdir())

    env = dict(os.environ, PYTHONPATH=str(_site_packages(prefix)), AMENT_PREFIX_PATH=str(prefix),
               ROS_DOMAIN_ID="77", ROS_AUTOMATIC_DISCOVERY_RANGE="LOCALHOST", PYTHONUNBUFFERED="1")
    env.pop("CHAIN_SPEC_MODELS", None)
    log_path = tmp_path / "node.log"
    with open(log_path, "w") as log:
        # No /clock: use_sim_time keeps the node idle once loaded.
        node = subprocess.Popen([str(executable), "--ros-args", "-p", "use_sim_time:=true"], cwd=tmp_path,
                                env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and node.poll() is None and "models from" not in log_path.read_text():
                time.sleep(0.2)
            output = log_path.read_text()
            assert node.poll() is None, output
            assert f"models from {share / 'models'}" in output, output
        finally:
            node.send_signal(signal.SIGINT)
            code = node.wait(30)
    assert code == 0, log_path.read_text()


def test_wheel_install_keeps_the_tree(source, tmp_path):
    prefix = tmp_path / "prefix"
    command = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
               "--no-index", "--prefix", str(prefix), str(source)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    _assert_same_tree(source, prefix / "share" / "chain_spec_ros")
    # The installed package finds its share folder without a source tree or an ament index.
    env = dict(os.environ, PYTHONPATH=str(_site_packages(prefix)))
    env.pop("AMENT_PREFIX_PATH", None)
    env.pop("CHAIN_SPEC_MODELS", None)
    probe = ("import chain_spec_ros.paths as p; print(p.__file__); print(p.default_models_dir()); "
             "print(p.default_config_path())")
    result = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    module, models, config = result.stdout.split()[-3:]
    assert module.startswith(str(prefix)), module
    assert Path(models) == prefix / "share" / "chain_spec_ros" / "models"
    assert Path(config) == prefix / "share" / "chain_spec_ros" / "config" / "chain_spec.yaml"
