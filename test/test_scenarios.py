"""Scenario world: determinism, decision/motion consistency, CoC grammar and labels."""
import numpy as np
import pytest

from chain_spec_ros.scenarios.coc import ROUTINE, VISUAL, decision_from_coc, parse
from chain_spec_ros.scenarios.ego import simulate_ego
from chain_spec_ros.scenarios.events import BUILDERS, DECISIONS, T0, T_END, build_world
from chain_spec_ros.scenarios.scene import make_scene
from chain_spec_ros.trajectory import integrate_unicycle


def test_same_seed_same_scene_and_different_seed_differs():
    a, b, c = make_scene(11), make_scene(11), make_scene(12)
    assert np.array_equal(a.images, b.images) and a.coc == b.coc
    assert np.array_equal(a.history_tokens, b.history_tokens)
    assert not np.array_equal(a.images, c.images) or a.coc != c.coc


def test_scene_shapes_and_frames():
    scene = make_scene(5)
    assert scene.images.shape == (2, 4, 48, 96, 3) and scene.images.dtype == np.uint8
    assert scene.history_xyz.shape == (17, 3) and scene.history_tokens.shape == (48,)
    assert scene.future_xy.shape == (64, 2) and scene.future_controls.shape == (64, 2)
    assert np.allclose(scene.history_xyz[-1], 0.0, atol=1e-6)  # t0 is the origin of its own frame
    assert scene.history_tokens.min() >= 0 and scene.history_tokens.max() < 1000
    assert not np.array_equal(scene.images[0, 0], scene.images[0, -1])  # the ego moves between frames


def test_every_decision_class_has_a_builder():
    primaries = {build_world(np.random.default_rng(s), event).primary for s, event in enumerate(BUILDERS)}
    assert primaries == set(DECISIONS)


def _track(event, seed):
    world = build_world(np.random.default_rng(seed), event)
    track = simulate_ego(world.route, world.plan, world.s0, world.v0, T_END)
    i0, i1 = track.index(T0), track.index(T0 + 6.4)
    return world, track, i0, i1


@pytest.mark.parametrize("seed", range(6))
def test_decisions_agree_with_future_motion(seed):
    for event in ("red_light", "stop_sign"):
        world, track, i0, i1 = _track(event, seed)
        assert world.primary == "Stop"
        assert track.v[i1] < 0.5 * track.v[i0] and track.v[i1] < 2.5, event
        if event == "red_light":
            light = world.actors[0]
            assert light.light(T0) == "red"
    world, track, i0, i1 = _track("resume_speed", seed)
    assert track.v[i1] > track.v[i0] + 3.0
    world, track, i0, i1 = _track("yield", seed)
    assert track.v[i0:i1].min() < 0.7 * track.v[i0]
    world, track, i0, i1 = _track("pass_green", seed)
    assert track.v[i0:i1].min() > 0.8 * track.v[i0]
    world, track, i0, i1 = _track("lane_change_left", seed)
    assert track.offset[i1] - track.offset[i0] > 2.5
    world, track, i0, i1 = _track("lane_change_right", seed)
    assert track.offset[i1] - track.offset[i0] < -2.5
    world, track, i0, i1 = _track("merge", seed)
    assert track.offset[i1] - track.offset[i0] > 2.5
    world, track, i0, i1 = _track("nudge_left", seed)
    assert track.offset[i0:i1].max() > 0.5
    world, track, i0, i1 = _track("nudge_right", seed)
    assert track.offset[i0:i1].min() < -0.5
    world, track, i0, i1 = _track("turn_left", seed)
    assert track.yaw[i1] - track.yaw[i0] > np.radians(60)
    world, track, i0, i1 = _track("turn_right", seed)
    assert track.yaw[i1] - track.yaw[i0] < -np.radians(60)


def test_future_controls_reproduce_the_future_path():
    for seed in range(8):
        scene = make_scene(seed, render=False)
        path = integrate_unicycle(scene.future_controls, scene.speed)
        assert np.abs(path[:, 3] - scene.future_speed).max() < 1e-3
        assert np.linalg.norm(path[:, :2] - scene.future_xy, axis=1).max() < 0.5


def test_markup_parsing_and_labels():
    text, labels = parse("<Stop> at the line because the <light> is <red>.")
    assert text == "Stop at the line because the light is red."
    assert labels[:4].tolist() == [VISUAL] * 4 and labels[4] == ROUTINE
    assert "".join(c for c, lab in zip(text, labels) if lab == VISUAL) == "Stoplightred"


def test_coc_states_its_decision_and_varies():
    cocs = set()
    for seed in range(400):
        scene = make_scene(seed, render=False)
        assert decision_from_coc(scene.coc) == scene.primary, scene.coc
        assert scene.coc_char_labels.max() == VISUAL and scene.coc_char_labels.min() == ROUTINE
        cocs.add(scene.coc)
    assert len(cocs) > 390  # real variety, not one template per decision
