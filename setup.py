"""ament_python package: `colcon build` on a ROS 2 install, or `pip install -e .` in a venv."""
from glob import glob

from setuptools import find_packages, setup

PACKAGE = "chain_spec_ros"

setup(
    name=PACKAGE,
    version="0.1.0",
    packages=find_packages(exclude=["test", "test.*"]),
    data_files=[
        ("share/ament_index/resource_index/packages", [f"resource/{PACKAGE}"]),
        (f"share/{PACKAGE}", ["package.xml"]),
        (f"share/{PACKAGE}/launch", glob("launch/*.py")),
        (f"share/{PACKAGE}/config", glob("config/*.yaml") + glob("config/*.rviz")),
        (f"share/{PACKAGE}/models", [p for p in glob("models/**/*", recursive=True) if "." in p.rsplit("/", 1)[-1]]),
    ],
    install_requires=["setuptools"],
    zip_safe=True,
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
