"""The chain-of-causation grammar: decision + because/since + cause, with real variety.

Phrases use a tiny markup: text inside <angle brackets> is *visual evidence* (only the
camera frames can tell it: the decision itself, the object, its colour, side and distance);
everything else is *routine* (connectives, lane keeping, and the ego's speed state and road
shape, which follow from the trajectory history).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from .events import Cause

ROUTINE, VISUAL = 0, 1

DECISION_PHRASES = {
    "Stop": ["<stop> at the stop line", "<come to a stop> before the line", "<brake to a stop> at the line"],
    "Yield": ["<yield> to the {agent}", "<slow down and yield> to the {agent}", "<give way> to the {agent}"],
    "Pass": ["<proceed through> the intersection", "<pass through> the intersection", "<continue through> the junction"],
    "Gap-search": ["<slow down and search for a gap> on the left", "<look for a gap> in the left lane"],
    "Keep distance": ["<keep a safe distance>", "<keep distance> to the lead {vehicle}", "<follow> the lead {vehicle} at a safe gap"],
    "Adapt speed": ["<reduce speed>", "<adapt speed>", "<slow down> ahead"],
    "Resume speed": ["<resume speed>", "<accelerate> back to cruising speed", "<speed up> again"],
    "Lane change left": ["<change to the left lane>", "<change lanes to the left>"],
    "Lane change right": ["<change to the right lane>", "<change lanes to the right>"],
    "Nudge left": ["<nudge left>", "<shift slightly left> within the lane"],
    "Nudge right": ["<nudge right>", "<shift slightly right> within the lane"],
    "Turn left": ["<turn left> at the intersection", "<make a left turn> at the junction"],
    "Turn right": ["<turn right> at the intersection", "<make a right turn> at the junction"],
    "Merge": ["<merge into the left lane>", "<merge left> into the through lane"],
    "Keep lane": ["keep lane", "stay in the current lane", "continue in the lane"],
}

CAUSE_PHRASES = {
    "red_light": ["the <traffic light> {dist} ahead is <red>", "the <light> at the intersection has turned <red>",
                  "the signal ahead shows <red>"],
    "stop_sign": ["there is a <stop sign> {dist} ahead", "a <stop sign> controls the intersection {dist} ahead"],
    "pedestrian": ["a <pedestrian> in <{colour}> is crossing from the <{side}>",
                   "a <pedestrian> is stepping onto the road from the <{side}> {dist} ahead"],
    "cyclist": ["a <cyclist> is crossing from the <{side}> {dist} ahead", "a <{colour} cyclist> is crossing the road"],
    "green_light": ["the <light> ahead is <green> and the intersection is clear", "the signal shows <green>"],
    "blocked_lane_busy_left": ["a <stopped {colour} truck> blocks the lane {dist} ahead and the <left lane is busy>",
                               "the lane is <blocked by a truck> {dist} ahead while <traffic passes on the left>"],
    "lead_braking": ["the <{colour} {vehicle}> ahead is <braking> {dist} in front",
                     "the lead <{vehicle}> is <slowing down> {dist} ahead"],
    "lead_slow": ["the <{colour} {vehicle}> ahead is <moving slower>", "a <slower {vehicle}> is {dist} ahead in the lane"],
    "sharp_curve": ["a <sharp {side} curve> begins {dist} ahead", "the road <bends sharply {side}> {dist} ahead"],
    "yellow_light": ["the <traffic light> ahead has turned <yellow>", "the signal {dist} ahead is <yellow>"],
    "light_turned_green": ["the <light> has turned <green>", "the signal ahead is now <green>"],
    "lead_pulled_away": ["the <{colour} {vehicle}> ahead has <pulled away>", "the lead <{vehicle}> is <moving off>"],
    "slow_vehicle_in_lane": ["a <slow {colour} {vehicle}> is in the lane {dist} ahead and the <{side} lane is free>",
                             "the lane is <blocked by a {vehicle}> {dist} ahead and the <{side} lane is clear>"],
    "obstacle_at_edge": ["the lane is <narrowed by {obstacle}> from the <{side}> {dist} ahead",
                         "the <{side} edge> of the lane is <blocked by {obstacle}>"],
    "route_turn": ["the <route sign> points <{side}>", "the route <turns {side}> at the next intersection"],
    "lane_ends": ["the <right lane ends> {dist} ahead", "<our lane ends> {dist} ahead"],
    "clear_road": ["the road ahead is <clear>", "the lane ahead is <free of obstacles>"],
}

LATERAL_KEEP = ["and keep lane", "while keeping the lane", "and stay in lane"]


@dataclass
class EgoState:
    """What the history says about the ego: speed at t0, its trend, and the road shape."""

    speed: float
    accel: float
    curvature: float

    def phrase(self, rng: np.random.Generator) -> str:
        speed = int(round(self.speed))
        if self.speed < 0.5:
            state = "stopped"
        elif self.accel > 0.4:
            state = f"accelerating through {speed} m/s"
        elif self.accel < -0.4:
            state = f"slowing from {speed} m/s"
        else:
            state = f"cruising at {speed} m/s"
        if abs(self.curvature) > 1 / 600 and self.speed > 2:
            road = f" in a gentle {'left' if self.curvature > 0 else 'right'} bend"
        else:
            road = " on a straight road" if rng.random() < 0.7 else ""
        return state + road


def _distance(d: float, rng) -> str:
    d = max(5, int(5 * round(d / 5)))
    return [f"<{d} meters>", f"about <{d} m>", f"roughly <{d} meters>"][rng.integers(3)]


def compose(primary: str, lateral: str, cause: Cause, ego: EgoState, rng: np.random.Generator) -> str:
    """One CoC sentence in markup form; `parse` splits it into labelled segments."""
    vehicle = cause.detail if cause.detail in ("car", "truck") else "vehicle"
    agent = "<pedestrian>" if cause.kind == "pedestrian" else "<cyclist>" if cause.kind == "cyclist" else "<traffic>"
    obstacle = "cones" if cause.detail == "cones" else f"a parked {cause.colour} car"
    fields = dict(agent=agent, vehicle=vehicle, colour=cause.colour, side=cause.side, obstacle=obstacle,
                  dist=_distance(cause.distance, rng))
    decision = str(rng.choice(DECISION_PHRASES[primary])).format(**fields)
    if primary != lateral and rng.random() < 0.7:
        decision += " " + str(rng.choice(LATERAL_KEEP))
    reason = str(rng.choice(CAUSE_PHRASES[cause.kind])).format(**fields)
    context = ego.phrase(rng)
    form = rng.integers(4)
    if form == 0:
        sentence = f"{decision} because {reason}, while {context}."
    elif form == 1:
        sentence = f"{decision} since {reason}; the ego is {context}."
    elif form == 2:
        sentence = f"Since {reason}, {decision}, {context}."
    else:
        sentence = f"The ego is {context}; {decision} because {reason}."
    return _capitalise(sentence)


def _capitalise(sentence: str) -> str:
    i = 1 if sentence.startswith("<") else 0
    return sentence[:i] + sentence[i].upper() + sentence[i + 1 :]


_SPAN = re.compile(r"<([^<>]*)>")


def parse(markup: str) -> tuple[str, np.ndarray]:
    """Plain text and a per-character label array (ROUTINE or VISUAL)."""
    text, labels, last = [], [], 0
    for match in _SPAN.finditer(markup):
        plain = markup[last : match.start()]
        text.append(plain)
        labels += [ROUTINE] * len(plain)
        text.append(match.group(1))
        labels += [VISUAL] * len(match.group(1))
        last = match.end()
    text.append(markup[last:])
    labels += [ROUTINE] * len(markup[last:])
    return "".join(text), np.array(labels, dtype=np.uint8)


def _decision_cues() -> list[tuple[str, str]]:
    """(lower-case cue, decision): the visual span of every decision phrase, longest first so
    'slow down and yield' wins over 'slow down'."""
    cues = []
    for decision, phrases in DECISION_PHRASES.items():
        for phrase in phrases:
            match = _SPAN.search(phrase)
            cue = (match.group(1) if match else phrase.split(" {")[0]).lower()
            cues.append((cue, decision))
    return sorted(cues, key=lambda c: -len(c[0]))


_CUES = _decision_cues()


def decision_from_coc(text: str) -> str | None:
    """The primary decision a generated CoC states, or None when it names none.

    The earliest whole-word cue wins (the longest at equal start, so 'slow down and yield' beats
    'slow down'). Lane keeping is the default lateral behaviour, so it counts only when no other
    decision phrase is present.
    """
    lower = text.lower()
    found = []
    for cue, decision in _CUES:
        match = re.search(rf"\b{re.escape(cue)}\b", lower)
        if match:
            found.append((decision == "Keep lane", match.start(), -len(cue), decision))
    return min(found)[3] if found else None
