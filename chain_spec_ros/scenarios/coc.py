"""The chain-of-causation grammar: decision + because/since + cause, with real variety.

Phrases use a tiny markup: text inside <angle brackets> is *visual evidence* (only the
camera frames can tell it: the decision itself, the object, its colour, side and distance);
everything else is *routine* (connectives, lane keeping, and the ego's speed state and road
shape, which follow from the trajectory history).

The phrase tables and `SENTENCE_FORMS` are the whole grammar: `compose` writes sentences from
them and `check_grammar` recognises exactly the sentences they can produce, so a generated CoC
is well formed by construction and a model's CoC can be checked against the same source.
`speed_state` says which speed state a history shows, `speed_statement_matches` whether a CoC
states it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from ..trajectory import REST_SPEED, STEP_SECONDS
from .actors import VEHICLE_COLOURS
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
# What an ego at rest (or just setting off) does reads differently: it does not brake to a stop
# or slow down, it stays stopped, waits, pulls away.
DECISION_PHRASES_AT_REST = {
    "Stop": ["<stay stopped>", "<remain stopped>", "<keep waiting>"],
    "Yield": ["<wait and yield> to the {agent}", "<give way> to the {agent}", "<yield> to the {agent}"],
    "Resume speed": ["<pull away>", "<move off>", "<accelerate> back to cruising speed"],
    "Merge": ["<pull out> into the left lane", "<merge into the left lane>"],
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
    "stopped_traffic": ["the <{colour} {vehicle}> ahead is <stopped> {dist} in front",
                        "the <traffic ahead> has <stopped> at the <red> light"],
    "lead_creeping": ["the <{colour} {vehicle}> ahead is <crawling> {dist} in front",
                      "the <traffic ahead> is <inching forward>"],
    "route_turning": ["the route <turns {side}> through this intersection", "the <road> continues to the <{side}>"],
    "traffic_passing": ["a <{colour} {vehicle}> is <passing> on the <left>",
                        "<traffic> is coming past in the <left lane>"],
    "left_lane_clear": ["the <left lane is clear>", "there is <no traffic> in the left lane"],
}
DISTANCE_PHRASES = ["<{d} meters>", "about <{d} m>", "roughly <{d} meters>"]

LATERAL_KEEP = ["and keep lane", "while keeping the lane", "and stay in lane"]

# The ego's speed state at t0 as the history shows it. Moving states state the speed in whole
# m/s; below CREEP_SPEED a moving ego is creeping (no number: it would round to 0-2 m/s).
SPEED_PHRASES = {
    "stopped": ["stopped", "at a standstill"],
    "starting": ["starting from a stop", "pulling away from a stop"],
    "creeping": ["creeping forward", "creeping along"],
    "accelerating": ["accelerating through {speed} m/s"],
    "slowing": ["slowing from {speed} m/s"],
    "cruising": ["cruising at {speed} m/s"],
}
ROAD_PHRASES = {
    "straight": ["on a straight road"],
    "bend": ["in a gentle {side} bend"],
    "turn": ["mid-way through a {side} turn", "in the middle of a {side} turn"],
}
# The four sentence shapes; compose fills them, check_grammar matches them (first letter capitalised).
SENTENCE_FORMS = (
    "{decision} because {reason}, while {context}.",
    "{decision} since {reason}; the ego is {context}.",
    "since {reason}, {decision}, {context}.",
    "the ego is {context}; {decision} because {reason}.",
)

CREEP_SPEED = 2.0  # m/s: a moving ego slower than this is creeping
TREND_ACCEL = 0.4  # m/s^2: a history trend beyond this is accelerating or slowing
# How far a history may be from the thresholds above and still match a stated speed state: a
# stated speed is rounded (0.5 m/s) and is the speed at t0, while the last history step is the
# mean over the last 0.1 s (up to 0.35 m/s apart when braking hard).
SPEED_TOLERANCE = 0.5  # m/s


def speed_trend(history_speeds: np.ndarray) -> float:
    """Acceleration over the history (m/s^2): the last three step speeds against the first three."""
    speeds = np.asarray(history_speeds, dtype=float)
    return float((speeds[-3:].mean() - speeds[:3].mean()) / (STEP_SECONDS * (len(speeds) - 3)))


def speed_state(history_speeds: np.ndarray, speed: float) -> str:
    """The speed state (a key of SPEED_PHRASES) of an ego with these history step speeds
    (oldest first, `trajectory.history_speeds`) and this speed at t0."""
    if speed < REST_SPEED:
        return "stopped"
    if np.min(history_speeds) < REST_SPEED:
        return "starting"  # at rest inside the history, moving now
    if speed < CREEP_SPEED:
        return "creeping"
    trend = speed_trend(history_speeds)
    return "accelerating" if trend > TREND_ACCEL else "slowing" if trend < -TREND_ACCEL else "cruising"


@dataclass
class EgoState:
    """What the history says about the ego: its speed state, speed at t0 and the road shape
    ('' when the history is too short to show one)."""

    state: str
    speed: float
    road: str = ""
    side: str = ""

    def phrase(self, rng: np.random.Generator) -> str:
        state = str(rng.choice(SPEED_PHRASES[self.state])).format(speed=int(round(self.speed)))
        if not self.road or (self.road == "straight" and rng.random() >= 0.7):
            return state
        return state + " " + str(rng.choice(ROAD_PHRASES[self.road])).format(side=self.side)


def _distance(d: float, rng) -> str:
    d = max(5, int(5 * round(d / 5)))
    return DISTANCE_PHRASES[rng.integers(len(DISTANCE_PHRASES))].format(d=d)


def _decision_phrases(primary: str, ego: EgoState) -> list[str]:
    if ego.state in ("stopped", "starting") and primary in DECISION_PHRASES_AT_REST:
        return DECISION_PHRASES_AT_REST[primary]
    return DECISION_PHRASES[primary]


def compose(primary: str, lateral: str, cause: Cause, ego: EgoState, rng: np.random.Generator) -> str:
    """One CoC sentence in markup form; `parse` splits it into labelled segments."""
    vehicle = cause.detail if cause.detail in ("car", "truck") else "vehicle"
    agent = "<pedestrian>" if cause.kind == "pedestrian" else "<cyclist>" if cause.kind == "cyclist" else "<traffic>"
    obstacle = "cones" if cause.detail == "cones" else f"a parked {cause.colour} car"
    fields = dict(agent=agent, vehicle=vehicle, colour=cause.colour, side=cause.side, obstacle=obstacle,
                  dist=_distance(cause.distance, rng))
    decision = str(rng.choice(_decision_phrases(primary, ego))).format(**fields)
    if primary != lateral and rng.random() < 0.7:
        decision += " " + str(rng.choice(LATERAL_KEEP))
    reason = str(rng.choice(CAUSE_PHRASES[cause.kind])).format(**fields)
    form = SENTENCE_FORMS[rng.integers(len(SENTENCE_FORMS))]
    return _capitalise(form.format(decision=decision, reason=reason, context=ego.phrase(rng)))


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
    cues = set()
    for table in (DECISION_PHRASES, DECISION_PHRASES_AT_REST):
        for decision, phrases in table.items():
            for phrase in phrases:
                match = _SPAN.search(phrase)
                cues.add(((match.group(1) if match else phrase.split(" {")[0]).lower(), decision))
    return sorted(cues, key=lambda c: (-len(c[0]), c))


_CUES = _decision_cues()


def decision_from_coc(text: str) -> str | None:
    """The primary decision a generated CoC states, or None when it names none.

    The earliest whole-word cue wins (the longest at equal start, so 'slow down and yield' beats
    'slow down'). Lane keeping is the default lateral behaviour, so it counts only when no other
    decision phrase is present. The speed statement is left out of the search ('starting from a
    stop' names no Stop decision).
    """
    lower = text.lower()
    statement = _SPEED_CLAUSE.search(lower)
    if statement:
        start, end = statement.span("state")
        lower = lower[:start] + " " * (end - start) + lower[end:]
    found = []
    for cue, decision in _CUES:
        match = re.search(rf"\b{re.escape(cue)}\b", lower)
        if match:
            found.append((decision == "Keep lane", match.start(), -len(cue), decision))
    return min(found)[3] if found else None


# --- Recognising the grammar ------------------------------------------------------------------

def _template_regex(template: str) -> str:
    """A phrase template (markup, {slot}s) as a regex over its plain, lower-case text."""
    plain = template.replace("<", "").replace(">", "")
    return "".join(_SLOTS[part[1:-1]] if part.startswith("{") else re.escape(part)
                   for part in re.split(r"(\{\w+\})", plain))


def _alternatives(templates) -> str:
    return "(?:" + "|".join(sorted({_template_regex(t) for t in templates}, key=lambda r: (-len(r), r))) + ")"


_COLOUR = "(?:" + "|".join(VEHICLE_COLOURS) + ")"
_SLOTS = {"agent": "(?:pedestrian|cyclist|traffic)", "vehicle": "(?:car|truck|vehicle)", "colour": _COLOUR,
          "side": "(?:left|right)", "obstacle": f"(?:cones|a parked {_COLOUR} car)", "speed": r"\d+", "d": r"\d+"}
_SLOTS["dist"] = _alternatives(DISTANCE_PHRASES)

_SPEED = _alternatives(t for phrases in SPEED_PHRASES.values() for t in phrases)
_ROAD = _alternatives(t for phrases in ROAD_PHRASES.values() for t in phrases)
_DECISION = _alternatives(t for table in (DECISION_PHRASES, DECISION_PHRASES_AT_REST)
                          for phrases in table.values() for t in phrases)
PART_PATTERNS = {
    "decision": re.compile(f"{_DECISION}(?: {_alternatives(LATERAL_KEEP)})?"),
    "reason": re.compile(_alternatives(t for phrases in CAUSE_PHRASES.values() for t in phrases)),
    "context": re.compile(f"{_SPEED}(?: {_ROAD})?"),
}
# Each form with its parts as lazy wildcards: which form a sentence has, and what fills each part.
_FORM_SKELETONS = [re.compile("".join(f"(?P<{part[1:-1]}>.+?)" if part.startswith("{") else re.escape(part)
                                      for part in re.split(r"(\{\w+\})", form)))
                   for form in SENTENCE_FORMS]
# The speed statement where the forms put it: after 'the ego is', 'while' or a comma, and
# followed by an optional road phrase and the end of its clause.
_SPEED_CLAUSE = re.compile(rf"(?:\bthe ego is |\bwhile |, )(?P<state>{_SPEED})(?=(?: {_ROAD})?[.;])")
_STATE_PATTERNS = {state: re.compile(_alternatives(phrases)) for state, phrases in SPEED_PHRASES.items()}


def check_grammar(coc: str) -> list[str]:
    """What is wrong with a CoC sentence; an empty list when it is well formed.

    Well formed: one sentence that starts with a capital letter and ends with a period, one
    because/since clause, a known decision, and one of SENTENCE_FORMS whose decision, reason and
    speed/road context are each phrases of the tables (so a clause joined onto a wrong tail,
    "... turns left at the next is a straight road.", is caught).
    """
    text = coc.strip()
    if not text:
        return ["empty sentence"]
    problems = []
    if not text.endswith("."):
        problems.append("does not end with a period")
    if re.search(r"[.!?;]\s*[.!?]|[.!?]\s+\S", text):
        problems.append("more than one sentence")
    if not text[0].isupper():
        problems.append("does not start with a capital letter")
    connectives = len(re.findall(r"\b(?:because|since)\b", text, re.IGNORECASE))
    if connectives != 1:
        problems.append(f"{connectives} because/since clauses, expected one")
    if decision_from_coc(text) is None:
        problems.append("no known decision phrase")
    sentence = text[0].lower() + text[1:]
    parts = next((m.groupdict() for m in (s.fullmatch(sentence) for s in _FORM_SKELETONS) if m), None)
    if parts is None:
        problems.append("sentence form not in the grammar")
        return problems
    for name, value in parts.items():
        if not PART_PATTERNS[name].fullmatch(value):
            problems.append(f"{name} clause not in the grammar: {value!r}")
    return problems


@dataclass(frozen=True)
class SpeedStatement:
    """The speed state a CoC states (a key of SPEED_PHRASES) and its speed in m/s, which only
    the moving states (accelerating, slowing, cruising) give."""

    state: str
    speed: int | None = None


def speed_state_of(coc: str) -> SpeedStatement | None:
    """The speed statement of a CoC, or None when it has none where the grammar puts it."""
    match = _SPEED_CLAUSE.search(coc.lower())
    if match is None:
        return None
    text = match.group("state")
    state = next(state for state, pattern in _STATE_PATTERNS.items() if pattern.fullmatch(text))
    digits = re.search(r"\d+", text)
    return SpeedStatement(state, int(digits.group()) if digits else None)


def speed_statement_matches(coc: str, history_speeds: np.ndarray) -> bool:
    """Whether the speed state a CoC states agrees with the ego history.

    `history_speeds`: the 16 step speeds of the history, oldest first (`trajectory.history_speeds`
    of the 17 history poses). The world states what `speed_state` says; a statement matches when
    the history is within SPEED_TOLERANCE of that state's thresholds, so every generated CoC
    matches its own history and a model's statement is judged by the same yardstick:
    - stopped: the last step is slower than REST_SPEED (+ tolerance);
    - starting: the history was at rest (its slowest step under REST_SPEED + tolerance) and the
      last step is faster than that by REST_SPEED / 2;
    - creeping: no step slower than REST_SPEED / 2 (never at rest) and the last one slower than
      CREEP_SPEED (+ tolerance);
    - accelerating / slowing / cruising at N m/s: N within twice the tolerance of the last step
      (rounding plus the step's lag behind t0), and the history's trend (`speed_trend`) positive,
      negative, or within twice TREND_ACCEL of zero.
    A CoC without a speed statement does not match.
    """
    statement = speed_state_of(coc)
    if statement is None:
        return False
    speeds = np.asarray(history_speeds, dtype=float)
    last, slowest = speeds[-1], speeds.min()
    if statement.state == "stopped":
        return last < REST_SPEED + SPEED_TOLERANCE
    if statement.state == "starting":
        return slowest < REST_SPEED + SPEED_TOLERANCE and last >= slowest + REST_SPEED / 2
    if statement.state == "creeping":
        return slowest >= REST_SPEED / 2 and last < CREEP_SPEED + SPEED_TOLERANCE
    trend = speed_trend(speeds)
    trend_ok = {"accelerating": trend > 0, "slowing": trend < 0, "cruising": abs(trend) < 2 * TREND_ACCEL}
    return abs(statement.speed - last) <= 2 * SPEED_TOLERANCE and trend_ok[statement.state]
