"""The planning pipeline without ROS: prompt -> vision -> prefill -> CoC decoding -> trajectory.

One call plans one scene and reports how long each stage took. The CoC decoder is
pluggable: target-only greedy decoding, or speculative decoding with a drafter. The models
run behind the engine interface, so the same pipeline serves every backend.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from .engines.base import TargetEngine
from .prompt import PromptBuilder
from .speculative import DEFAULT_K, Drafter, speculative_decode

MAX_COC_TOKENS = 64


@dataclass
class PlanResult:
    coc_ids: list[int]
    coc: str
    trajectory_xy: np.ndarray  # [64, 2] in the t0 frame
    controls: np.ndarray  # [64, 2] (acceleration, curvature)
    timings_ms: dict[str, float] = field(default_factory=dict)
    stats: dict = field(default_factory=dict)  # speculative decoding: tau, drafted share, ...
    token_sources: list[str] = field(default_factory=list)  # per CoC token: "draft" or "target"


class Planner:
    """Plans one scene; with a `drafter` the CoC is decoded speculatively (k drafts per target
    pass), otherwise token by token by the target alone."""

    def __init__(self, target: TargetEngine, builder: PromptBuilder, drafter: Drafter | None = None, k: int = DEFAULT_K,
                 expert_steps: int | None = None, seed: int = 0):
        self.target, self.builder = target, builder
        self.drafter, self.k = drafter, k
        self.expert_steps = expert_steps
        self.seed = seed
        self.stop_id = builder.cot_end_id
        self.future_start_id = builder.ids["<|traj_future_start|>"]
        if drafter is not None and list(drafter.feature_layers) != list(target.feature_layers)[: len(drafter.feature_layers)]:
            raise ValueError(f"the drafter reads target layers {drafter.feature_layers} but the target engine "
                             f"returns {target.feature_layers}")

    @property
    def backend(self) -> str:
        return self.target.backend

    def plan(self, images: np.ndarray, history_tokens: np.ndarray, speed: float) -> PlanResult:
        timings: dict[str, float] = {}
        clock = time.perf_counter()

        def lap(name: str) -> None:
            nonlocal clock
            now = time.perf_counter()
            timings[name] = (now - clock) * 1e3
            clock = now

        prompt = self.builder.build(images, history_tokens)
        max_len = len(prompt) + MAX_COC_TOKENS + self.k + 4
        self.target.start(max_len)
        if self.drafter is not None:
            self.drafter.start(max_len)
        lap("prompt")
        image_embeds = self.target.encode_images(prompt.images)
        lap("vision")
        logits, features = self.target.prefill(prompt.input_ids, image_embeds, prompt.mrope_positions)
        lap("prefill")
        stats, sources = {}, []
        if self.drafter is None:
            coc_ids = greedy_decode(self.target, logits, prompt.rope_delta, MAX_COC_TOKENS, self.stop_id)
            sources = ["target"] * len(coc_ids)
        else:
            coc_ids, spec = speculative_decode(self.target, self.drafter, prompt, logits, features,
                                               self.stop_id, MAX_COC_TOKENS, self.k)
            stats, sources = spec.as_dict(), spec.token_sources
        lap("decode")
        timings["decode_per_token"] = timings["decode"] / max(len(coc_ids), 1)
        # The expert reads the cache through `<|traj_future_start|>`, as in training.
        self.target.decode([self.stop_id, self.future_start_id], prompt.rope_delta)
        trajectory = self.target.trajectory(prompt.rope_delta, float(speed), self.expert_steps, self.seed)
        lap("expert")
        return PlanResult(
            coc_ids=coc_ids,
            coc=self.builder.tokenizer.decode(coc_ids),
            trajectory_xy=trajectory.xy,
            controls=trajectory.controls,
            timings_ms=timings,
            stats=stats,
            token_sources=sources,
        )


def greedy_decode(target: TargetEngine, first_logits, rope_delta: int, max_new: int, stop_id: int) -> list[int]:
    """Target-only greedy decoding until `stop_id` (not included) or max_new tokens.

    The cache ends holding the prompt and every emitted CoC token, but not the stop token.
    """
    tokens: list[int] = []
    token = int(first_logits.argmax())
    while token != stop_id and len(tokens) < max_new:
        tokens.append(token)
        logits, _ = target.decode([token], rope_delta)
        token = int(logits[-1].argmax())
    return tokens
