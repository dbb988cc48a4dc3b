"""Loading a planner, its start-up self-test and the plausibility check on every plan (no ROS)."""
import numpy as np
import pytest

from chain_spec_ros.planner import (ImplausiblePlan, ModelLoadError, PlanResult, check_plan, load_planner,
                                    plan_problem, self_test)
from chain_spec_ros.replay.fixtures import poison_target_weights, write_tiny_models


def _result(xy, controls=None) -> PlanResult:
    xy = np.asarray(xy, dtype=float)
    return PlanResult(coc_ids=[1], coc="Keep lane.", trajectory_xy=xy,
                      controls=np.zeros_like(xy) if controls is None else controls)


def test_plan_problem_rejects_non_finite_and_impossible_trajectories():
    straight = np.column_stack([np.arange(1, 65) * 1.0, np.zeros(64)])  # 10 m/s
    assert plan_problem(_result(straight), max_speed_mps=90.0) is None
    assert check_plan(_result(straight), 90.0).coc == "Keep lane."
    nan = straight.copy()
    nan[10, 1] = np.nan
    assert "not finite" in plan_problem(_result(nan), 90.0)
    assert "not finite" in plan_problem(_result(straight, np.full((64, 2), np.inf)), 90.0)
    far = straight.copy()
    far[20:] += 667_000.0  # waypoints 667 km away
    assert "waypoint 21" in plan_problem(_result(far), 90.0)
    assert "waypoint 1 " in plan_problem(_result(straight), max_speed_mps=5.0)  # 1 m per 0.1 s > 0.5 m
    with pytest.raises(ImplausiblePlan, match="not finite"):
        check_plan(_result(nan), 90.0)
    assert "shape" in plan_problem(_result(np.zeros((64, 3))), 90.0)


def test_self_test_passes_a_healthy_model_and_refuses_nan_weights(tmp_path):
    healthy = load_planner(write_tiny_models(tmp_path / "ok"), "torch", "none")
    assert self_test(healthy, cameras=2, max_speed_mps=90.0) > 0.0
    broken = poison_target_weights(write_tiny_models(tmp_path / "nan"))
    with pytest.raises(ModelLoadError, match="self-test plan failed"):
        self_test(load_planner(broken, "torch", "none"), cameras=2, max_speed_mps=90.0)


def test_load_errors_are_one_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="models directory not found"):
        load_planner(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="cannot load the models"):
        load_planner(tmp_path / "empty", "torch")
    with pytest.raises(ModelLoadError, match="unknown drafter"):
        load_planner(write_tiny_models(tmp_path / "tiny"), "torch", drafter="magic")
    auto = load_planner(write_tiny_models(tmp_path / "draft", draft=True), "torch", drafter="auto")
    assert auto.drafter is not None  # auto: the draft directory exists


def test_sampled_plans_are_seeded_and_reproducible_and_greedy_follows_generation_config(tmp_path):
    from chain_spec_ros.sampling import GREEDY
    from conftest import random_scene

    models = write_tiny_models(tmp_path / "models", draft=True)
    planner = load_planner(models, "torch", "eagle")
    assert (planner.generation.temperature, planner.generation.top_p) == (0.6, 0.98)  # the release's defaults
    assert planner.sampling_for("greedy", 0.9, 0.5) is GREEDY
    planner.sampling, planner.num_traj_samples = planner.sampling_for("sample", 1.5, 0.0), 3
    assert (planner.sampling.temperature, planner.sampling.top_p) == (1.5, 0.98)
    images, history = random_scene(4)
    first, again = planner.plan(images, history, 5.0), planner.plan(images, history, 5.0)
    assert first.coc_ids == again.coc_ids and np.array_equal(first.samples_xy, again.samples_xy)
    assert first.samples_xy.shape == (3, 64, 2) and np.array_equal(first.samples_xy[0], first.trajectory_xy)
    assert not np.array_equal(first.samples_xy[0], first.samples_xy[1])  # different flow noise per sample
    outputs = set()
    for seed in range(6):
        planner.seed = seed
        outputs.add(tuple(planner.plan(images, history, 5.0).coc_ids))
    assert len(outputs) > 1  # the seed changes the sampled CoC
    bins = range(planner.builder.tokenizer.bin_offset, planner.builder.tokenizer.bin_offset + 1000)
    assert not any(token in bins for coc in outputs for token in coc)  # trajectory tokens suppressed
