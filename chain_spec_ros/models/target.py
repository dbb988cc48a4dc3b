"""TargetVLA: Qwen3-VL (vision tower + text decoder) + Alpamayo-R1's flow-matching trajectory expert.

The API follows the stages a planner runs: encode images, prefill the prompt with 3-D M-RoPE
positions, decode (one token, or k+1 tokens in a speculative verify pass) with text positions
cache.length + rope_delta, then sample the trajectory from the cache.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..trajectory import STEP_SECONDS
from .config import TargetConfig
from .decoder import Decoder
from .expert import Trajectory, TrajectoryExpert, trajectory_from_actions
from .kv_cache import KVCache
from .rope import text_position_ids
from .vision import VisionTower, VisualFeatures


def splice_image_embeds(embeds: Tensor, is_pad: Tensor, image_embeds: Tensor | None) -> Tensor:
    """Overwrite the `<|image_pad|>` rows of embeds [..., T, D] (is_pad [..., T]) in place, in
    order, with the image tokens (images of sample 0 first); returns embeds. In place, so the
    graph engines splice straight into the decoder input buffer they bound once."""
    count = int(is_pad.sum())
    if image_embeds is None:
        if count:
            raise ValueError("prompt has image pads but no image embeddings were given")
        return embeds
    flat = image_embeds.reshape(-1, embeds.shape[-1])
    if count != flat.shape[0]:
        raise ValueError(f"{count} image pad tokens but {flat.shape[0]} image embeddings")
    embeds[is_pad] = flat.to(device=embeds.device, dtype=embeds.dtype)
    return embeds


def scatter_deepstack(is_pad: Tensor, deepstack: Tensor, dtype: torch.dtype) -> Tensor | None:
    """Deepstack features [L, N, tokens, D] laid out at the image positions of a batch (is_pad
    [B, T]) -> [L, B, T, D], zero elsewhere; None when the tower has no deepstack layers."""
    if deepstack.shape[0] == 0:
        return None
    dense = deepstack.new_zeros(deepstack.shape[0], *is_pad.shape, deepstack.shape[-1], dtype=dtype)
    dense[:, is_pad] = deepstack.reshape(deepstack.shape[0], -1, deepstack.shape[-1]).to(dtype)
    return dense


class TargetVLA(nn.Module):
    def __init__(self, cfg: TargetConfig):
        super().__init__()
        self.cfg = cfg
        self.vision = VisionTower(cfg.vision)
        self.decoder = Decoder(cfg.decoder)
        self.expert = TrajectoryExpert(cfg.expert, cfg.decoder) if cfg.expert is not None else None
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)

    def new_cache(self, batch_size: int = 1, max_len: int | None = None) -> KVCache:
        p = next(self.parameters())
        return KVCache.for_config(self.cfg.decoder, batch_size, max_len, p.dtype, p.device)

    def encode_images(self, images: Tensor) -> VisualFeatures:
        """Camera frames [N, H, W, 3] uint8 BGR -> merged image tokens and deepstack features."""
        return self.vision(images)

    def build_inputs_embeds(self, input_ids: Tensor, visual: VisualFeatures | None
                            ) -> tuple[Tensor, Tensor | None]:
        """Token embeddings with every <|image_pad|> replaced, in order, by the next image token,
        and the deepstack features laid out at the same positions (`scatter_deepstack`).

        input_ids [B, T]; visual from `encode_images`, images of sample 0 first. The pad count
        must equal the number of image tokens.
        """
        is_pad = input_ids == self.cfg.image_pad_id
        embeds = splice_image_embeds(self.decoder.embed(input_ids), is_pad, None if visual is None else visual.embeds)
        deepstack = None if visual is None else scatter_deepstack(is_pad, visual.deepstack, embeds.dtype)
        return embeds, deepstack

    def prefill(self, input_ids: Tensor, visual: VisualFeatures | None, position_ids: Tensor,
                cache: KVCache | None, return_hidden_layers: Sequence[int] = (),
                num_logits: int | None = None) -> tuple[Tensor, list[Tensor]]:
        """Run the prompt (into the cache, when one is given). position_ids [3, T] (shared by the
        batch) or [3, B, T], from `rope.mrope_position_ids`. Returns logits and requested hidden
        states."""
        if position_ids.dim() == 2:
            position_ids = position_ids[:, None].expand(-1, input_ids.shape[0], -1)
        embeds, deepstack = self.build_inputs_embeds(input_ids, visual)
        return self.decoder(embeds, position_ids, cache, return_hidden_layers, num_logits, deepstack)

    def decode(self, token_ids: Tensor, cache: KVCache, rope_delta: int | Tensor,
               return_hidden_layers: Sequence[int] = ()) -> tuple[Tensor, list[Tensor]]:
        """Text tokens [B, T] after the prompt; T > 1 is a verify pass over k drafted tokens + 1.

        Token j sits at text position (p, p, p), p = cache.length + j + rope_delta.
        """
        B, T = token_ids.shape
        pos = text_position_ids(cache.length, T, rope_delta, token_ids.device)
        return self.decoder(self.decoder.embed(token_ids), pos.expand(B, T), cache,
                            return_hidden_layers)

    @torch.no_grad()
    def trajectory(self, cache: KVCache, rope_delta: int | Tensor, v0: Tensor | float,
                   steps: int | None = None, generator: torch.Generator | None = None,
                   dt: float = STEP_SECONDS, noise: Tensor | None = None) -> Trajectory:
        """Sample (accel, curvature) from the expert given the cache (prompt + CoC), denormalise,
        and integrate from current speed v0 [B] or scalar."""
        actions = self.expert.action_space.denormalize(
            self.expert.sample(cache, rope_delta, steps, generator, noise=noise))
        return trajectory_from_actions(actions, v0, dt)

    def save_pretrained(self, directory: str | Path, token_ids: Mapping[str, int] | None = None,
                        generation: Mapping[str, Any] | None = None, tokenizer_file: Path | None = None) -> None:
        """Alpamayo-R1's layout (`alpamayo.save_alpamayo`). token_ids: image_token_id,
        video_token_id, vision_start_token_id, vision_end_token_id of the tokenizer (default:
        the image pad id for all, enough for a model used without transformers' processor)."""
        from .alpamayo import save_alpamayo

        ids = token_ids or dict.fromkeys(("image_token_id", "video_token_id", "vision_start_token_id",
                                          "vision_end_token_id"), self.cfg.image_pad_id)
        save_alpamayo(self, directory, ids, generation or {}, tokenizer_file)

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: torch.device | str = "cpu") -> "TargetVLA":
        """From an Alpamayo-R1 or Qwen3-VL directory (`checkpoint.load_target`)."""
        from .checkpoint import load_target

        return load_target(directory, device=device)
