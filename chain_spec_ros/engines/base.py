"""One engine interface for the target and one for the draft, whatever the backend.

The planner and the draft-verify loop only talk to these. An engine owns its KV cache,
preallocated per layer at a fixed maximum length; `crop` rolls back by resetting the valid
length and never copies. Tensors crossing the interface are torch tensors on the CPU (a
backend converts at its edge, zero-copy where it can).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from ..models.config import ExpertConfig, TargetConfig
from ..models.draft import DraftConfig
from ..models.expert import Trajectory
from ..models.vision import VisualFeatures


@dataclass
class TrajectoryOut:
    xy: np.ndarray  # [64, 2] in the t0 frame
    controls: np.ndarray  # [64, 2] (acceleration, curvature)

    @classmethod
    def from_trajectory(cls, trajectory: Trajectory) -> "TrajectoryOut":
        """The first (a request's only) sample of the model's batched trajectory."""
        t = trajectory
        return cls(torch.stack([t.x[0], t.y[0]], -1).cpu().numpy(),
                   torch.stack([t.accel[0], t.curvature[0]], -1).cpu().numpy())


def require_expert(config: TargetConfig) -> ExpertConfig:
    """The target's expert config; a target without one (a bare Qwen3-VL checkpoint) cannot
    plan a trajectory, and says so."""
    if config.expert is None:
        raise ValueError("this target has no trajectory expert (a VLM-only checkpoint: its config's expert is "
                         "None), so it can reason but not produce a trajectory")
    return config.expert


class TargetEngine(ABC):
    """The deliberative reasoner: vision encoder, prefill, decode / verify, trajectory expert."""

    backend: str  # the backend actually running
    fallback_reason: str | None = None  # why it is not the one configured, when it is not
    config: TargetConfig
    feature_layers: list[int]  # hidden layers returned with every prefill/decode (for the draft)

    @abstractmethod
    def start(self, max_len: int) -> None:
        """Begin a request: empty cache (valid length 0) with room for max_len tokens."""

    @abstractmethod
    def encode_images(self, images: np.ndarray) -> VisualFeatures:
        """Camera frames uint8 [N, H, W, 3] BGR -> image embeddings [N, tokens_per_image, D] and
        deepstack features [L, N, tokens_per_image, D]."""

    @abstractmethod
    def prefill(self, input_ids: np.ndarray, visual: VisualFeatures | None, positions: Tensor
                ) -> tuple[Tensor, list[Tensor]]:
        """Prompt ids [P] with 3-D positions [3, P] into the cache, the `<|image_pad|>` positions
        taking `visual` (from `encode_images`; None for a prompt without images) -> (last logits
        [V], features [1, P, D] each)."""

    @abstractmethod
    def decode(self, tokens: list[int], rope_delta: int) -> tuple[Tensor, list[Tensor]]:
        """T text tokens after the cache (T = 1 to decode, k + 1 to verify) -> (logits [T, V], features [1, T, D] each)."""

    @abstractmethod
    def crop(self, length: int) -> None:
        """Roll the cache back to `length` valid entries."""

    @property
    @abstractmethod
    def length(self) -> int:
        """Valid cache length."""

    @abstractmethod
    def trajectory(self, rope_delta: int, speed: float, steps: int | None, seed: int) -> TrajectoryOut:
        """Sample the expert over the cache (prompt + CoC + `<|cot_end|><|traj_future_start|>`).
        ValueError when the target has no expert (`require_expert`)."""


class DraftEngine(ABC):
    """The routine reasoner's network: feature fusion, one decoder layer with a cache, LM head."""

    backend: str
    fallback_reason: str | None = None
    config: DraftConfig
    int8_weights: bool = False  # runs int8-quantized weights (ONNX Runtime's CPU provider: export.quantize_int8)

    @abstractmethod
    def start(self, max_len: int) -> None:
        """Begin a request with an empty draft cache."""

    @abstractmethod
    def fuse(self, features: list[Tensor]) -> Tensor:
        """Target features of the low/mid/high layers [1, T, D] each -> fused [1, T, D]."""

    @abstractmethod
    def step(self, tokens: list[int], features: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        """Append T inputs (token, feature) at positions [3, T] -> (the last input's hidden state
        [1, 1, D], its logits [V]). Only the last position's output is computed: drafting never
        reads the others, and the cache needs only their keys and values."""

    def chain(self, logits: Tensor, hidden: Tensor, positions: Tensor, choose: Callable[[Tensor], tuple[int, Tensor | None]],
              stop_id: int | None) -> tuple[list[int], list[Tensor | None]]:
        """Chained drafting from a step's (hidden, logits): choose a token, run it with the draft's
        own hidden state as its feature at the next of `positions` [3, n], repeat; n + 1 tokens at
        most, none after `stop_id`. Returns the tokens and what `choose` returned with each (the
        distribution a sampled token was drawn from). The chain's cache entries stay appended."""
        advance = self.chain_steps(hidden)
        tokens, distributions = [], []
        for j in range(positions.shape[1] + 1):
            token, distribution = choose(logits)
            tokens.append(token)
            distributions.append(distribution)
            if j == positions.shape[1] or token == stop_id:
                break
            logits = advance(token, positions[:, j:j + 1])
        return tokens, distributions

    def chain_steps(self, hidden: Tensor) -> Callable[[int, Tensor], Tensor]:
        """(token, position [3, 1]) -> logits [V]: one chain step after `hidden`, each feeding its
        hidden state to the next. The logits are read before the next step runs, so an engine may
        return them in place (graph_engine.py does)."""
        def advance(token: int, position: Tensor) -> Tensor:
            nonlocal hidden
            hidden, logits = self.step([token], hidden, position)
            return logits
        return advance

    @abstractmethod
    def crop(self, length: int) -> None:
        """Roll the draft cache back to `length` valid entries."""

    @property
    @abstractmethod
    def length(self) -> int:
        """Valid draft cache length."""
