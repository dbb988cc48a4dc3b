"""Closed-loop simulation (`chain_spec_ros.sim`): a short episode with the bundled target is
deterministic and speculative greedy drives it bit for bit like target-only greedy; the metrics
catch what they are for (scripted stand-in planners drive through a red light, into a car, off
the road); the first tick sees exactly the dataset scene's inputs; the controller follows a
lane-centre plan; the command runs end to end."""
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from chain_spec_ros.models.draft import DraftConfig, EagleDraft
from chain_spec_ros.paths import default_models_dir
from chain_spec_ros.planner import PlanResult, load_planner
from chain_spec_ros.scenarios.ego import SIM_DT
from chain_spec_ros.scenarios.events import build_world
from chain_spec_ros.scenarios.scene import make_scene
from chain_spec_ros.sim.cli import driving_digest, ks_two_sample, main
from chain_spec_ros.sim.controller import TrackedPlan, track
from chain_spec_ros.sim.episode import EpisodeConfig, run_episode
from chain_spec_ros.sim.geometry import route_position
from chain_spec_ros.sim.metrics import episode_metrics
from chain_spec_ros.sim.modes import configure, parse_mode, parse_modes
from chain_spec_ros.sim.vehicle import VehicleState, step
from chain_spec_ros.trajectory import FUTURE_STEPS, integrate_unicycle, to_local_frame

SHORT = EpisodeConfig(duration_s=2.0)  # 4 planning ticks at the node's 2 Hz


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Small models plan fastest on one thread, and a shared CI machine stays responsive."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def planner(tmp_path_factory):
    """The bundled target with a randomly initialised draft: greedy verification keeps the CoC
    the target's whatever the draft proposes, so any draft must drive identically."""
    models = default_models_dir()
    target = load_planner(models, "torch", "none").target.model
    torch.manual_seed(0)
    draft = tmp_path_factory.mktemp("sim") / "draft"
    EagleDraft(DraftConfig.for_target(target.cfg.decoder), target.decoder.embed_tokens).save_pretrained(draft)
    speculative = load_planner(models, "torch", "eagle", draft, k=4)
    return speculative, speculative.drafter


def _drive(planner_and_drafter, mode: str, seed: int = 1, event: str = "keep_distance"):
    planner, drafter = planner_and_drafter
    configure(planner, parse_mode(mode), drafter)
    return run_episode(planner, seed, event, SHORT)


def test_episode_is_deterministic_and_speculative_greedy_drives_identically(planner):
    first, again, speculative = (_drive(planner, m) for m in ("greedy", "greedy", "spec-greedy"))
    assert len(first.plans) == 4 and all(p.coc for p in first.plans)
    assert first.same_driving(again) and driving_digest(first) == driving_digest(again)
    timeless = lambda m: {k: v for k, v in m.items() if k != "plan_latency_ms"}  # noqa: E731
    assert timeless(episode_metrics(first)) == timeless(episode_metrics(again))
    assert sum(p.stats.get("target_passes", 0) for p in speculative.plans) > 0  # it did decode speculatively
    assert speculative.same_driving(first), speculative.first_difference(first)
    assert driving_digest(speculative) == driving_digest(first)
    # The planner, not the world's scripted driver, moved the ego after the first tick.
    start = first.start_index
    assert np.array_equal(first.x[: start + 1], first.reference.x[: start + 1])
    assert not np.array_equal(first.x[start + 5:], first.reference.x[start + 5:])
    # A lossy shortcut is a different planner: fewer Euler steps move the trajectories.
    coarse = _drive(planner, "euler1")
    assert [p.coc for p in coarse.plans][0] == first.plans[0].coc
    assert not np.array_equal(coarse.plans[0].trajectory_xy, first.plans[0].trajectory_xy)


class ScriptedPlanner:
    """A stand-in planner that always plans constant acceleration and curvature, and records
    what it was given."""

    def __init__(self, accel: float = 0.0, curvature: float = 0.0):
        self.accel, self.curvature, self.seed, self.calls = accel, curvature, 0, []
        self.target = SimpleNamespace(config=SimpleNamespace(vision=SimpleNamespace(image_width=128, image_height=64)))

    def plan(self, images, history_tokens, speed):
        self.calls.append((images, history_tokens, speed))
        controls = np.tile([self.accel, self.curvature], (FUTURE_STEPS, 1))
        xy = integrate_unicycle(controls, speed)[:, :2]
        return PlanResult(coc_ids=[1], coc="Keep lane because the road ahead is clear.", trajectory_xy=xy,
                          controls=controls)


def _seed_where(event: str, kind: str) -> int:
    """The first seed whose `event` world has the cause `kind` less than 40 m ahead on a straight
    road, and a moving ego."""
    return next(s for s in range(200) if (w := build_world(np.random.default_rng(s), event)).cause.kind == kind
                and w.v0 > 5 and w.cause.distance < 40 and len(w.route.pieces) == 1)


def test_first_tick_sees_the_dataset_scene():
    """At the first tick the ego is where the scene's t0 is: same frames, history and speed."""
    stand_in = ScriptedPlanner()
    run_episode(stand_in, 7, "yield", EpisodeConfig(duration_s=0.5))
    scene = make_scene(7, event="yield")
    images, history, speed = stand_in.calls[0]
    assert np.array_equal(images, scene.images)
    assert np.array_equal(history, scene.history_tokens)
    assert speed == pytest.approx(scene.speed)


def test_cruising_straight_on_a_clear_road_scores_well_and_standing_still_does_not():
    seed = next(s for s in range(100) if len(build_world(np.random.default_rng(s), "keep_lane").route.pieces) == 1)
    config = EpisodeConfig(duration_s=6.0)
    cruise = episode_metrics(run_episode(ScriptedPlanner(), seed, "keep_lane", config))
    assert not (cruise["collision"] or cruise["offroad"] or cruise["lane_departure"])
    assert cruise["red_light_violations"] == cruise["stop_sign_violations"] == 0
    assert cruise["progress"] > 0.7 and cruise["comfortable"] and cruise["score"] > 0.8
    assert cruise["decision_agrees"] and cruise["decision_share"] == 1.0
    stand = episode_metrics(run_episode(ScriptedPlanner(accel=-4.0), seed, "keep_lane", config))
    assert stand["progress"] < 0.6 * cruise["progress"] and stand["score"] < cruise["score"] - 0.1


def test_metrics_catch_a_red_light_a_stop_sign_a_crash_and_leaving_the_road():
    config = EpisodeConfig(duration_s=8.0, plan_rate_hz=1.0)
    red = episode_metrics(run_episode(ScriptedPlanner(), _seed_where("red_light", "red_light"), "red_light", config))
    assert red["red_light_violations"] == 1 and red["score"] <= 0.5
    stop = episode_metrics(run_episode(ScriptedPlanner(), _seed_where("stop_sign", "stop_sign"), "stop_sign", config))
    assert stop["stop_sign_violations"] == 1
    blocked = _seed_where("lane_change_left", "slow_vehicle_in_lane")
    crash = episode_metrics(run_episode(ScriptedPlanner(), blocked, "lane_change_left", config))
    assert crash["collision"] and crash["collision_with"] in ("car", "truck") and crash["min_ttc_s"] == 0.0
    assert crash["score"] == 0.0 and crash["lane_departure"]  # it never left the blocked lane
    swerve = episode_metrics(run_episode(ScriptedPlanner(curvature=0.05), blocked, "lane_change_left", config))
    assert swerve["offroad"] and swerve["score"] == 0.0


@pytest.mark.parametrize("event, speed", [("turn_right", 6.0), ("lane_change_left", 12.0)])
def test_the_controller_follows_a_lane_centre_plan(event, speed):
    """Replanned every 0.5 s along the lane centre the scenario drives (a 7-9 m turn, a lane
    change), pure pursuit keeps the ego within 0.4 m of it."""
    world = build_world(np.random.default_rng(0), event)
    route, lateral = world.route, world.plan.lateral
    x, y, yaw = route.pose(12.0, lateral.offset(2.0))
    state, s, worst = VehicleState(float(x), float(y), float(yaw), speed), 12.0, 0.0
    for i in range(400):  # 8 s
        t = 2.0 + i * SIM_DT
        s, offset = route_position(route, state.x, state.y, s)
        if i % 25 == 0:
            ahead = 0.1 * np.arange(1, FUTURE_STEPS + 1)
            px, py, _ = route.pose(s + speed * ahead, [lateral.offset(t + a) for a in ahead])
            local = to_local_frame(np.column_stack([px, py]), state.pose)
            plan = TrackedPlan.from_plan(t, state.pose, speed, local, np.zeros((FUTURE_STEPS, 2)))
        command = track(plan, state, t)
        state, _ = step(state, command.accel, command.curvature, SIM_DT, command.hold)
        worst = max(worst, abs(offset - lateral.offset(t)) if i > 25 else 0.0)
    assert worst < 0.4 and state.v == pytest.approx(speed)


def test_mode_names_and_the_distribution_check():
    assert [m.name for m in parse_modes("greedy,spec-greedy,spec-euler2,coc8")] == \
        ["greedy", "spec-greedy", "spec-euler2", "coc8"]
    assert parse_mode("spec-greedy").lossless_twin == "greedy"
    assert parse_mode("spec-sample").sampled_twin == "sample" and parse_mode("spec-sample").lossless_twin is None
    assert parse_mode("euler2").expert_steps == 2 and parse_mode("coc8").max_coc_tokens == 8
    for bad in ("beam", "euler0", "greedy,greedy"):
        with pytest.raises(ValueError):
            parse_modes(bad)
    # through ROS a mode is the node's parameters; a CoC cut-off has none, refused before any node starts
    assert parse_mode("spec-euler2").node_parameters() == {"drafter": "eagle", "decoding": "greedy", "expert_steps": 2}
    assert parse_mode("sample").node_parameters() == {"drafter": "none", "decoding": "sample", "expert_steps": 0}
    with pytest.raises(ValueError, match="no chain_spec_node equivalent"):
        parse_mode("coc16").node_parameters()
    for bad in (["--plan-rate", "0"], ["--duration", "-1"], ["--episodes", "0"], ["--ros", "--realtime-factor", "0"]):
        assert main(bad) == 2  # one clear line, before any model loads
    assert ks_two_sample([0.1, 0.2, 0.3], [0.1, 0.2, 0.3])[0] == 0.0
    assert ks_two_sample([0.0] * 20, [1.0] * 20) == (1.0, pytest.approx(0.0, abs=1e-6))


def test_command_writes_the_table_json_and_pictures(tmp_path, capsys):
    from chain_spec_ros.replay.fixtures import write_tiny_models

    models = write_tiny_models(tmp_path / "models", draft=True)
    out = tmp_path / "sim.json"
    code = main(["--models", str(models), "--backend", "torch", "--episodes", "2", "--events", "keep_lane,yield",
                 "--duration", "1", "--modes", "greedy,spec-greedy,euler1,coc4", "--k", "3", "--json", str(out),
                 "--png-dir", str(tmp_path / "png")])
    assert code == 0
    table = capsys.readouterr().out
    assert "spec-greedy == greedy: 2/2 episodes identical bit for bit" in table
    report = json.loads(out.read_text())
    assert set(report["modes"]) == {"greedy", "spec-greedy", "euler1", "coc4"}
    assert {"score", "collision_rate", "offroad_rate", "progress", "comfort_rate", "decision_agreement",
            "plan_latency_ms_p50"} <= set(report["modes"]["greedy"])
    digests = {mode: [m["digest"] for m in rows] for mode, rows in report["episodes"].items()}
    assert digests["greedy"] == digests["spec-greedy"] and digests["greedy"] != digests["coc4"]
    assert len(list((tmp_path / "png").glob("*.png"))) == 8


def test_through_ros_the_node_drives_and_sees_what_the_planner_sees_in_process(tmp_path):
    """`chain-spec-sim --ros`: the real chain_spec_node in its own process, over DDS on a private
    domain, drives an episode. Its plans start at camera instants, from the simulator's own pose
    (time alignment), reach the simulator after their t0 (latency costs simulated time), and
    the first one is the very plan the planner makes in process from the same log: same CoC,
    same trajectory (the node received exactly the frames and the history the simulator had)."""
    pytest.importorskip("rclpy", reason="the ROS 2 wheels (rclpy) are not installed")
    import os

    from chain_spec_ros.scenarios.render import DEFAULT_CAMERAS, Renderer
    from chain_spec_ros.sim.episode import _plan_tick
    from chain_spec_ros.sim.ros_link import RosDriver

    models = default_models_dir()
    config = EpisodeConfig(duration_s=2.0)
    parameters = {"backend": "torch", "torch_threads": 1, "drafter": "none"}
    with RosDriver(models, list(DEFAULT_CAMERAS), config, parameters, domain=1 + (os.getpid() * 13) % 101,
                   realtime_factor=0.5, log_dir=tmp_path) as driver, driver.mode(parse_mode("greedy")) as drive:
        episode = drive(0, "keep_distance")
    assert episode.plans and episode.t[episode.start_index] >= config.start_s
    for plan in episode.plans:
        assert plan.pose_error_m < 1e-6, "the node's pose at t0 is not the simulator's"
        assert abs(plan.t * 10 - round(plan.t * 10)) < 1e-6, f"t0 {plan.t} is not a camera instant"
        assert plan.received_t > plan.t
    assert not np.array_equal(episode.x[episode.start_index:], episode.reference.x[episode.start_index:])

    planner = load_planner(models, "torch", "none")
    log = {k: getattr(episode, k) for k in ("x", "y", "yaw", "v", "s")}
    first = episode.plans[0]
    vision = planner.target.config.vision
    local = _plan_tick(planner, episode.world, Renderer(DEFAULT_CAMERAS, vision.image_width, vision.image_height),
                       log, int(round(first.t / SIM_DT)), seed=0, tick=0)  # plan_seed(0, 0) = 0, the node's seed
    assert first.coc_ids == local.coc_ids, (first.coc, local.coc)
    np.testing.assert_allclose(first.trajectory_xy, local.trajectory_xy, atol=1e-5)
