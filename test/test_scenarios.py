"""Scenario world: determinism, decision/motion consistency, CoC grammar and labels."""
import numpy as np
import pytest

from chain_spec_ros.scenarios.coc import (ROUTINE, VISUAL, SpeedStatement, check_grammar, decision_from_coc, parse,
                                          speed_state_of, speed_statement_matches)
from chain_spec_ros.scenarios.ego import simulate_ego
from chain_spec_ros.scenarios.events import BUILDERS, DECISIONS, T0, T_END, build_world
from chain_spec_ros.scenarios.scene import ego_state_from_history, make_scene
from chain_spec_ros.trajectory import HISTORY_SECONDS, history_speeds, integrate_unicycle


def test_same_seed_same_scene_and_different_seed_differs():
    a, b, c = make_scene(11), make_scene(11), make_scene(12)
    assert np.array_equal(a.images, b.images) and a.coc == b.coc
    assert np.array_equal(a.history_tokens, b.history_tokens)
    assert not np.array_equal(a.images, c.images) or a.coc != c.coc


def test_scene_shapes_and_frames():
    scene = make_scene(5)
    assert scene.images.shape == (2, 4, 64, 128, 3) and scene.images.dtype == np.uint8
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


def _history_start(track):
    return track.index(T0 - HISTORY_SECONDS)


@pytest.mark.parametrize("seed", range(6))
def test_decisions_agree_with_future_motion(seed):
    for event in ("red_light", "stop_sign"):
        world, track, i0, i1 = _track(event, seed)
        assert world.primary == "Stop"
        assert track.v[i1] <= 0.5 * track.v[i0] + 0.05 and track.v[i1] < 2.5, event  # at rest it stays at rest
        if event == "red_light":
            light = next(actor for actor in world.actors if actor.kind == "traffic_light")
            assert light.light(T0) == "red"
    world, track, i0, i1 = _track("resume_speed", seed)
    assert track.v[i1] > track.v[i0] + 3.0
    world, track, i0, i1 = _track("yield", seed)
    assert track.v[i0:i1].min() <= 0.7 * track.v[i0]
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
    # Mid-way through a turn at t0, part of it lies in the history.
    world, track, i0, i1 = _track("turn_left", seed)
    assert track.yaw[i1] - track.yaw[_history_start(track)] > np.radians(60)
    world, track, i0, i1 = _track("turn_right", seed)
    assert track.yaw[i1] - track.yaw[_history_start(track)] < -np.radians(60)


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


SURVEY_SEEDS = range(10_000_000, 10_003_000)  # the first seeds of `chain-spec-data generate --seed 1`


@pytest.fixture(scope="module")
def survey():
    """3000 text-only scenes: (scene, the ego state its history shows)."""
    scenes = [make_scene(seed, render=False) for seed in SURVEY_SEEDS]
    return [(scene, ego_state_from_history(scene.history_xyz, scene.speed)) for scene in scenes]


def test_every_generated_coc_is_well_formed_and_states_the_history(survey):
    for scene, _ in survey:
        assert check_grammar(scene.coc) == [], scene.coc
        assert speed_statement_matches(scene.coc, history_speeds(scene.history_xyz)), scene.coc
        assert decision_from_coc(scene.coc) == scene.primary, scene.coc


def test_standstill_starting_creeping_and_mid_turn_each_have_3_percent(survey):
    states = [state.state for _, state in survey]
    shares = {name: states.count(name) / len(states) for name in ("stopped", "starting", "creeping")}
    shares["mid-turn"] = sum(state.road == "turn" for _, state in survey) / len(survey)
    assert min(shares.values()) >= 0.03, shares
    decisions = [scene.primary for scene, _ in survey]
    assert min(decisions.count(d) for d in DECISIONS) / len(decisions) >= 0.04  # no class collapses


def test_low_speed_scenes_move_as_their_decision_says(survey):
    for scene, state in survey:
        if state.state == "stopped" and scene.primary == "Stop":
            assert scene.future_speed.max() < 0.5, scene.coc  # stays stopped
        if state.state in ("stopped", "starting") and scene.primary == "Resume speed":
            assert scene.future_speed[-1] > scene.speed + 5.0, scene.coc  # speeds up
        if state.state == "creeping":
            assert 0.2 <= scene.speed < 2.0 and history_speeds(scene.history_xyz).min() >= 0.2
        if state.road == "turn":
            assert scene.primary in ("Turn left", "Turn right") and state.side in scene.primary.lower()


def test_a_car_standing_still_has_an_all_zero_history():
    scene = next(s for s in (make_scene(seed, event="stop_sign", render=False) for seed in range(50)) if s.speed == 0)
    assert np.all(scene.history_xyz == 0.0) and np.all(scene.future_speed == 0.0)
    assert speed_state_of(scene.coc) == SpeedStatement("stopped")


def test_speed_statements_are_read_and_judged_against_the_history():
    standing, cruising = np.zeros(16), np.full(16, 8.0)
    starting = np.r_[np.zeros(10), np.linspace(0.2, 1.4, 6)]
    creeping = np.full(16, 1.0)
    coc = "Stay stopped because the signal ahead shows red, while {}."
    cases = {"stopped": standing, "starting from a stop": starting, "creeping forward": creeping,
             "cruising at 8 m/s on a straight road": cruising}
    for statement, speeds in cases.items():
        for other, other_speeds in cases.items():
            matches = speed_statement_matches(coc.format(statement), other_speeds)
            assert matches == (other == statement), (statement, other)
    assert speed_state_of("The ego is slowing from 12 m/s; keep lane because the road ahead is clear.") == \
        SpeedStatement("slowing", 12)
    # The cause's words are not the ego's speed state.
    assert speed_state_of("Keep distance because the traffic ahead has stopped at the red light, while creeping "
                          "along.") == SpeedStatement("creeping")
    assert not speed_statement_matches("Keep lane because the road ahead is clear.", cruising)
    assert not speed_statement_matches(coc.format("cruising at 12 m/s"), cruising)
    assert decision_from_coc("The ego is starting from a stop; pull away because the signal shows green.") == \
        "Resume speed"


@pytest.mark.parametrize("coc, problem", [
    ("Turn left at the intersection because the route turns left at the next is a straight road.",
     "sentence form not in the grammar"),
    ("Keep lane because the road ahead is clear, while cruising at 8 m/s at the next is a straight road.",
     "context clause not in the grammar"),
    ("Keep lane because the road ahead is clear, while cruising at 8 m/s", "does not end with a period"),
    ("Keep lane because the road ahead is clear, while cruising at 8 m/s. Stop.", "more than one sentence"),
    ("keep lane because the road ahead is clear, while cruising at 8 m/s.", "does not start with a capital letter"),
    ("Keep lane because the road ahead is clear because it is, while cruising at 8 m/s.", "2 because/since clauses"),
    ("Dance because the road ahead is clear, while cruising at 8 m/s.", "no known decision phrase"),
    ("Keep lane because the road ahead is purple, while cruising at 8 m/s.", "reason clause not in the grammar"),
])
def test_grammar_check_names_what_is_malformed(coc, problem):
    assert any(p.startswith(problem) for p in check_grammar(coc)), check_grammar(coc)
    assert check_grammar("Keep lane because the road ahead is clear, while cruising at 8 m/s.") == []
