"""PyTorch backend (CPU, or CUDA when present): the reference every other backend is tested against."""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ..models.draft import EagleDraft
from ..models.kv_cache import KVCache
from ..models.target import TargetVLA
from ..models.vision import VisualFeatures
from .base import DraftEngine, TargetEngine, TrajectoryOut, require_expert


class TorchTargetEngine(TargetEngine):
    backend = "torch"

    def __init__(self, model: TargetVLA, feature_layers: list[int] | None = None, device: str | None = None):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.eval().to(self.device)
        self.config = model.cfg
        self.feature_layers = list(feature_layers or [])
        self.cache: KVCache | None = None

    def start(self, max_len: int) -> None:
        if self.cache is None or self.cache.max_len < max_len:  # allocate once, reuse across requests
            self.cache = self.model.new_cache(1, max_len)
        self.cache.reset()

    @torch.inference_mode()
    def encode_images(self, images: np.ndarray) -> VisualFeatures:
        return self.model.encode_images(torch.from_numpy(images).to(self.device))

    @torch.inference_mode()
    def prefill(self, input_ids: np.ndarray, visual: VisualFeatures | None, positions: Tensor
                ) -> tuple[Tensor, list[Tensor]]:
        if visual is not None:  # features another engine encoded (on the CPU) work too
            visual = VisualFeatures(*(t.to(self.device) for t in visual))
        logits, features = self.model.prefill(torch.from_numpy(input_ids)[None].to(self.device), visual,
                                              positions.to(self.device), self.cache,
                                              return_hidden_layers=self.feature_layers, num_logits=1)
        return logits[0, -1].cpu(), [f.cpu() for f in features]

    @torch.inference_mode()
    def decode(self, tokens: list[int], rope_delta: int) -> tuple[Tensor, list[Tensor]]:
        logits, features = self.model.decode(torch.tensor([tokens], device=self.device), self.cache, rope_delta,
                                             return_hidden_layers=self.feature_layers)
        return logits[0].cpu(), [f.cpu() for f in features]

    def crop(self, length: int) -> None:
        self.cache.crop(length)

    @property
    def length(self) -> int:
        return self.cache.length

    @torch.inference_mode()
    def trajectory(self, rope_delta: int, speed: float, steps: int | None, seed: int) -> TrajectoryOut:
        require_expert(self.config)
        generator = torch.Generator(device=self.device).manual_seed(seed)
        trajectory = self.model.trajectory(self.cache, rope_delta, float(speed), steps, generator)
        return TrajectoryOut.from_trajectory(trajectory)


class TorchDraftEngine(DraftEngine):
    backend = "torch"

    def __init__(self, draft: EagleDraft, device: str | None = None):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.draft = draft.eval().to(self.device)
        self.config = draft.cfg
        self.cache: KVCache | None = None

    def start(self, max_len: int) -> None:
        if self.cache is None or self.cache.max_len < max_len:
            self.cache = self.draft.new_cache(max_len)
        self.cache.reset()

    @torch.inference_mode()
    def fuse(self, features: list[Tensor]) -> Tensor:
        return self.draft.fuse_features([f.to(self.device) for f in features])

    @torch.inference_mode()
    def step(self, tokens: list[int], features: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        hidden = self.draft(torch.tensor([tokens], device=self.device), features.to(self.device),
                            positions[:, None].to(self.device), self.cache, last_only=True)
        return hidden, self.draft.proposal_logits(hidden)[0, -1].cpu()

    def crop(self, length: int) -> None:
        self.cache.crop(length)

    @property
    def length(self) -> int:
        return self.cache.length
