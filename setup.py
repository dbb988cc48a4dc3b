"""ament_python package: `colcon build` on a ROS 2 install, or `pip install .` in a venv.

The data folders are installed under share/chain_spec_ros/ with their folder structure intact
(models/target/config.json and models/draft/config.json must not land on one path). The list is
generated from the tree, so a new file under models/, config/ or launch/ is installed without
editing this file. Exported ONNX graphs (models/onnx/) travel with the install when they exist at
build time; TensorRT engines (models/trt/, models/onnx/trt/) are built for one GPU and never do.
"""
import os
from glob import glob

from setuptools import find_packages, setup

PACKAGE = "chain_spec_ros"
DATA_FOLDERS = ("models", "config", "launch")
MACHINE_SPECIFIC = ("models/trt", "models/onnx/trt")  # TensorRT engines: rebuilt on each machine


def tree_data_files(folder: str) -> list[tuple[str, list[str]]]:
    """(share/<package>/<sub-folder>, [its files]) for every folder under `folder`."""
    entries = []
    for directory, subfolders, files in os.walk(folder):
        subfolders[:] = sorted(d for d in subfolders if d != "__pycache__"
                               and os.path.join(directory, d) not in MACHINE_SPECIFIC)
        if files:
            entries.append((os.path.join("share", PACKAGE, directory),
                            sorted(os.path.join(directory, name) for name in files)))
    return entries


setup(
    name=PACKAGE,
    version="0.1.0",
    packages=find_packages(exclude=["test", "test.*"]),
    data_files=[
        ("share/ament_index/resource_index/packages", [f"resource/{PACKAGE}"]),
        (f"share/{PACKAGE}", ["package.xml"]),
        *[entry for folder in DATA_FOLDERS for entry in tree_data_files(folder)],
    ],
    install_requires=["setuptools"],
    zip_safe=False,
    maintainer="chain_spec_ros developers",
    maintainer_email="team@chain-spec-ros.dev",
    description="Speculative decoding of a VLA driving planner's chain-of-causation, as a ROS 2 node.",
    license="Apache-2.0",
    tests_require=["pytest"],
    entry_points={
        "console_scripts": [
            "chain-spec-data = chain_spec_ros.data.cli:main",
            "chain-spec-train-target = chain_spec_ros.training.target:main",
            "chain-spec-train-draft = chain_spec_ros.training.draft:main",
            "chain-spec-train-aarl = chain_spec_ros.training.aarl:main",
            "chain-spec-eval = chain_spec_ros.evaluate:main",
            "chain-spec-sim = chain_spec_ros.sim.cli:main",
            "chain-spec-demo = chain_spec_ros.demo:main",
            "chain-spec-export = chain_spec_ros.engines.export:main",
            "chain-spec-build-engines = chain_spec_ros.engines.build:main",
            "chain_spec_node = chain_spec_ros.node:main",
            "chain-spec-replay = chain_spec_ros.replay.replay:main",
            "chain-spec-report = chain_spec_ros.replay.report:main",
            "chain-spec-ros-demo = chain_spec_ros.replay.demo:main",
            "chain-spec-comma-bag = chain_spec_ros.replay.comma:main",
        ],
    },
)
