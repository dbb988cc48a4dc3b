"""The bundled target + draft on fresh scenes: speculative decoding is lossless with the trained
draft (long acceptances, stops inside drafted blocks), and ONNX Runtime plans what PyTorch plans."""
import os
from pathlib import Path

import numpy as np
import pytest

from chain_spec_ros.engines.export import export_models
from chain_spec_ros.evaluate import load_planner
from chain_spec_ros.paths import default_models_dir
from chain_spec_ros.planner import Planner
from chain_spec_ros.scenarios.events import BUILDERS
from chain_spec_ros.scenarios.scene import make_scene

SEED = 91_000_000  # far from the dataset's and the demo's seeds
NUM_SCENES = 16


@pytest.fixture(scope="module")
def scenes():
    events = list(BUILDERS)
    return [make_scene(SEED + i, event=events[i % len(events)]) for i in range(NUM_SCENES)]


@pytest.fixture(scope="module")
def reference(scenes):
    """Target-only and speculative plans with the PyTorch engines."""
    speculative = load_planner(default_models_dir(), "torch", drafter="eagle")
    target_only = Planner(speculative.target, speculative.builder)
    plan = lambda planner, s: planner.plan(s.images, s.history_tokens, s.speed)  # noqa: E731
    return [plan(target_only, s) for s in scenes], [plan(speculative, s) for s in scenes]


def test_speculative_equals_target_only_with_the_trained_draft(reference):
    target_only, speculative = reference
    for base, spec in zip(target_only, speculative):
        assert spec.coc_ids == base.coc_ids
        assert spec.token_sources.count("draft") + spec.token_sources.count("target") == len(spec.coc_ids)
    tau = np.mean([s.stats["tau"] for s in speculative])
    assert tau > 8.0, f"tau {tau:.2f}: the bundled draft should keep most of its 16 proposals"


def test_onnxruntime_plans_what_torch_plans(reference, scenes, tmp_path_factory):
    models = tmp_path_factory.mktemp("bundled")
    for name in ("target", "draft", "tokenizer.json"):  # the bundled files, exported next to them
        os.symlink(default_models_dir() / name, models / name)
    export_models(models, models / "draft")
    speculative = load_planner(Path(models), "onnxruntime", drafter="eagle")
    assert speculative.backend == "onnxruntime"
    target_only, _ = reference
    for scene, base in zip(scenes, target_only):
        result = speculative.plan(scene.images, scene.history_tokens, scene.speed)
        assert result.coc_ids == base.coc_ids
        assert np.abs(result.trajectory_xy - base.trajectory_xy).max() < 1e-3
