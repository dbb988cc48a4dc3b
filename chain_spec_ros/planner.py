"""The planning pipeline without ROS: prompt -> vision -> prefill -> CoC decoding -> trajectory.

One call plans one scene and reports how long each stage took. The CoC decoder is
pluggable: target-only greedy decoding, or speculative decoding with a draft.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from .models.target import TargetVLA
from .prompt import PromptBuilder

MAX_COC_TOKENS = 64


@dataclass
class PlanResult:
    coc_ids: list[int]
    coc: str
    trajectory_xy: np.ndarray  # [64, 2] in the t0 frame
    controls: np.ndarray  # [64, 2] (acceleration, curvature)
    timings_ms: dict[str, float] = field(default_factory=dict)


class Planner:
    def __init__(self, target: TargetVLA, builder: PromptBuilder, expert_steps: int | None = None, seed: int = 0):
        self.target, self.builder = target.eval(), builder
        self.expert_steps = expert_steps
        self.seed = seed
        self.stop_id = builder.cot_end_id
        self.future_start_id = builder.ids["<|traj_future_start|>"]

    @torch.inference_mode()
    def plan(self, images: np.ndarray, history_tokens: np.ndarray, speed: float) -> PlanResult:
        timings: dict[str, float] = {}
        clock = time.perf_counter()

        def lap(name: str) -> None:
            nonlocal clock
            now = time.perf_counter()
            timings[name] = (now - clock) * 1e3
            clock = now

        prompt = self.builder.build(images, history_tokens)
        lap("prompt")
        image_embeds = self.target.encode_images(torch.from_numpy(prompt.images))
        lap("vision")
        cache = self.target.new_cache(1, len(prompt) + MAX_COC_TOKENS + 4)
        input_ids = torch.from_numpy(prompt.input_ids)[None]
        logits, _ = self.target.prefill(input_ids, image_embeds, prompt.mrope_positions, cache, num_logits=1)
        lap("prefill")
        coc_ids = greedy_decode(self.target, cache, logits[0, -1], prompt.rope_delta, MAX_COC_TOKENS, self.stop_id)
        lap("decode")
        timings["decode_per_token"] = timings["decode"] / max(len(coc_ids), 1)
        # The expert reads the cache through `<|traj_future_start|>`, as in training.
        self.target.decode(torch.tensor([[self.stop_id, self.future_start_id]]), cache, prompt.rope_delta)
        generator = torch.Generator().manual_seed(self.seed)
        trajectory = self.target.trajectory(cache, prompt.rope_delta, float(speed), self.expert_steps, generator)
        lap("expert")
        return PlanResult(
            coc_ids=coc_ids,
            coc=self.builder.tokenizer.decode(coc_ids),
            trajectory_xy=torch.stack([trajectory.x[0], trajectory.y[0]], -1).numpy(),
            controls=torch.stack([trajectory.accel[0], trajectory.curvature[0]], -1).numpy(),
            timings_ms=timings,
        )


def greedy_decode(target: TargetVLA, cache, first_logits: torch.Tensor, rope_delta: int, max_new: int,
                  stop_id: int) -> list[int]:
    """Target-only greedy decoding until `stop_id` (not included) or max_new tokens.

    The cache ends holding the prompt and every emitted CoC token, but not the stop token.
    """
    tokens: list[int] = []
    token = int(first_logits.argmax())
    while token != stop_id and len(tokens) < max_new:
        tokens.append(token)
        logits, _ = target.decode(torch.tensor([[token]]), cache, rope_delta)
        token = int(logits[0, -1].argmax())
    return tokens
