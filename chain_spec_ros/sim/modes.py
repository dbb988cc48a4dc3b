"""Decoding modes compared on the same seeds, and the lossy shortcuts a user might try instead.

Mode names (`chain-spec-sim --modes`, comma separated):

    greedy       target-only greedy decoding: the reference
    sample       target-only sampling at the model's generation_config temperature / top-p
    euler<N>     greedy, the expert integrating its flow in N Euler steps instead of the
                 model's own number (lossy: a coarser trajectory for less expert time)
    coc<N>       greedy, the CoC cut after N tokens (lossy: the expert reads shorter reasoning)
    spec-<mode>  any of the above with the CoC decoded speculatively by the draft
    scripted     no planner: the world's own scripted driver (IDM with the scenario's
                 knowledge), the baseline that shows what the metrics give a driver that does
                 everything right

Speculative greedy must drive exactly like its target-only twin (`Mode.lossless_twin`: the same
states and plans bit for bit); speculative sampling only in distribution (`Mode.sampled_twin`:
compared by the score distributions over the seeds).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from ..planner import Planner
from ..speculative import Drafter

DEFAULT_MODES = "scripted,greedy,spec-greedy,sample,spec-sample,euler2,coc16"
SPEC_PREFIX = "spec-"


@dataclass(frozen=True)
class Mode:
    name: str
    speculative: bool = False
    sampled: bool = False
    expert_steps: int | None = None  # None: the model's own
    max_coc_tokens: int | None = None  # None: planner.MAX_COC_TOKENS
    scripted: bool = False  # the world's scripted driver instead of the planner

    @property
    def lossless_twin(self) -> str | None:
        """The target-only mode this one must equal bit for bit, if any."""
        return self.name[len(SPEC_PREFIX):] if self.speculative and not self.sampled else None

    @property
    def sampled_twin(self) -> str | None:
        """The target-only sampled mode this one must equal in distribution, if any."""
        return self.name[len(SPEC_PREFIX):] if self.speculative and self.sampled else None

    @property
    def lossy(self) -> bool:
        return self.expert_steps is not None or self.max_coc_tokens is not None

    def node_parameters(self) -> dict[str, object]:
        """The chain_spec_node parameters that plan as this mode (`chain-spec-sim --ros`)."""
        if self.scripted or self.max_coc_tokens is not None:
            raise ValueError(f"mode {self.name} has no chain_spec_node equivalent (the node has no CoC cut-off "
                             f"and the scripted driver needs no node)")
        return {"drafter": "eagle" if self.speculative else "none", "decoding": "sample" if self.sampled else "greedy",
                "expert_steps": self.expert_steps or 0}


def parse_mode(name: str) -> Mode:
    """A mode from its name (see the module docstring); ValueError names what is wrong."""
    name = name.strip()
    speculative = name.startswith(SPEC_PREFIX)
    base = name[len(SPEC_PREFIX):] if speculative else name
    if name == "scripted":
        return Mode(name, scripted=True)
    if base in ("greedy", "sample"):
        return Mode(name, speculative, sampled=base == "sample")
    match = re.fullmatch(r"(euler|coc)(\d+)", base)
    if match and int(match.group(2)) > 0:
        count = int(match.group(2))
        if match.group(1) == "euler":
            return Mode(name, speculative, expert_steps=count)
        return Mode(name, speculative, max_coc_tokens=count)
    raise ValueError(f"unknown mode {name!r}: greedy, sample, euler<N>, coc<N>, each optionally with "
                     f"{SPEC_PREFIX!r}, or scripted")


def parse_modes(text: str) -> list[Mode]:
    modes = [parse_mode(name) for name in text.split(",") if name.strip()]
    names = [m.name for m in modes]
    if len(set(names)) != len(names):
        raise ValueError(f"a mode is named twice in {text!r}")
    if not modes:
        raise ValueError("no modes given")
    return modes


def configure(planner: Planner, mode: Mode, drafter: Drafter | None) -> None:
    """Set `planner` up to plan as `mode` says. The expert always reads a cache replayed in one
    pass (`Planner.replay_coc_for_expert`), in every mode alike, so that equal CoCs give equal
    trajectories bit for bit whichever decoder chose them."""
    if mode.speculative and drafter is None:
        raise ValueError(f"mode {mode.name} needs a draft model (none loaded)")
    planner.drafter = drafter if mode.speculative else None
    planner.sampling = planner.sampling_for("sample" if mode.sampled else "greedy")
    planner.expert_steps = mode.expert_steps
    planner.max_coc_tokens = mode.max_coc_tokens
    planner.replay_coc_for_expert = True
