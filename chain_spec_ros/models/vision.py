"""Qwen3-VL's vision tower, with transformers' parameter names (`Qwen3VLVisionModel`).

A camera frame becomes grid_h x grid_w patches of 16 x 16 pixels. A still image is repeated in
time to fill the temporal patch of 2 (as the Qwen-VL image processor does), so each patch is a
(3, 2, 16, 16) cube read by one Conv3d. Patches are ordered block by block over the 2 x 2 merge
blocks, so the merger can concatenate four consecutive patches into one token; the merged tokens
come out row-major over (grid_h / 2, grid_w / 2), the grid M-RoPE assigns to the image block.

Positions enter twice: learned embeddings on a square table, bilinearly resampled to the image's
patch grid, and a 2-D rotary embedding (half the frequencies rotate with the row, half with the
column). Deepstack: the outputs of a few early blocks, merged like the final one by their own
mergers, are added to the first decoder layers' hidden states at the image positions.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import VisionConfig
from .decoder import AttentionFunction
from .rope import rotate


class VisualFeatures(NamedTuple):
    """What the tower gives the decoder for N images of `tokens` merged tokens each."""

    embeds: Tensor  # [N, tokens, out_hidden]: replace the <|image_pad|> embeddings
    deepstack: Tensor  # [num_deepstack, N, tokens, out_hidden]: added after decoder layer i


def patchify(images: Tensor, cfg: VisionConfig) -> Tensor:
    """Camera frames [N, H, W, 3] uint8 BGR -> pixel patches [N, P, 3 * T * p * p], exactly as
    transformers' Qwen2-VL image processor lays out `pixel_values` for frames already at the
    model's size (RGB, rescaled to [0, 1], normalised by image_mean / image_std, each frame
    repeated T times, patches in merge-block order, a patch flattened as (channel, time, row, col))."""
    N, H, W, _ = images.shape
    if (H, W) != (cfg.image_height, cfg.image_width):
        raise ValueError(f"expected {cfg.image_height}x{cfg.image_width} images, got {H}x{W}")
    p, m, t = cfg.patch_size, cfg.spatial_merge_size, cfg.temporal_patch_size
    mean = torch.tensor(cfg.image_mean, device=images.device)
    std = torch.tensor(cfg.image_std, device=images.device)
    x = (images.flip(-1).float() / 255.0 - mean) / std  # BGR -> RGB, [N, H, W, 3]
    gh, gw = H // p, W // p
    x = x.view(N, gh // m, m, p, gw // m, m, p, 3)
    x = x.permute(0, 1, 4, 2, 5, 7, 3, 6)  # [N, gh/m, gw/m, m, m, 3, p, p]
    x = x.reshape(N, gh * gw, 3, 1, p * p).expand(N, gh * gw, 3, t, p * p)  # the still frame repeated in time
    return x.reshape(N, gh * gw, 3 * t * p * p)


def patch_coordinates(cfg: VisionConfig) -> tuple[Tensor, Tensor]:
    """(row, col) of each patch in merge-block order, [P] each."""
    p, m = cfg.patch_size, cfg.spatial_merge_size
    gh, gw = cfg.image_height // p, cfg.image_width // p
    rows, cols = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    block = (gh // m, m, gw // m, m)
    return rows.reshape(block).transpose(1, 2).flatten(), cols.reshape(block).transpose(1, 2).flatten()


def bilinear_taps(index: Tensor, size: int, side: int) -> tuple[Tensor, Tensor]:
    """Rows (or columns) of a `side`-long table read for `index` in 0..size-1 when the table is
    stretched over `size` with corners aligned: two taps and their weights, [len(index), 2] each."""
    src = index.float() * (side - 1) / max(size - 1, 1)
    floor = src.floor()
    taps = floor.long()[:, None] + torch.arange(2)
    weights = (1 - (src[:, None] - floor[:, None] - torch.arange(2)).abs()).clamp(min=0)
    return taps.clamp(0, side - 1), weights


class VisionRotary(nn.Module):
    """cos, sin [P, head_dim] for the patches: frequencies over head_dim / 2, the first half of
    each rotated pair turning with the row, the second with the column."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        half = cfg.head_dim // 2
        inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, half, 2, dtype=torch.float) / half))
        rows, cols = patch_coordinates(cfg)
        angles = torch.cat([rows[:, None] * inv_freq, cols[:, None] * inv_freq], dim=-1)
        angles = torch.cat([angles, angles], dim=-1)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)


class VisionAttention(nn.Module):
    """Full attention among one image's patches; images never attend to each other."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.attention: AttentionFunction = F.scaled_dot_product_attention

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        N, P, D = x.shape
        q, k, v = self.qkv(x).view(N, P, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)  # [N, heads, P, hd]
        y = self.attention(rotate(q, cos, sin), rotate(k, cos, sin), v)
        return self.proj(y.transpose(1, 2).reshape(N, P, D))


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        if cfg.hidden_act != "gelu_pytorch_tanh":
            raise ValueError(f"vision hidden_act {cfg.hidden_act!r} is not supported (Qwen3-VL: gelu_pytorch_tanh)")
        self.linear_fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.linear_fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_fc2(F.gelu(self.linear_fc1(x), approximate="tanh"))


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.hidden_size, eps=1e-6)
        self.attn = VisionAttention(cfg)
        self.norm2 = nn.LayerNorm(cfg.hidden_size, eps=1e-6)
        self.mlp = VisionMLP(cfg)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x), cos, sin)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """Four neighbouring patches -> one decoder-width token. The final merger normalises each
    patch before concatenating; the deepstack mergers normalise the concatenation."""

    def __init__(self, cfg: VisionConfig, norm_after_concat: bool):
        super().__init__()
        merged = cfg.hidden_size * cfg.spatial_merge_size ** 2
        self.norm_after_concat = norm_after_concat
        self.norm = nn.LayerNorm(merged if norm_after_concat else cfg.hidden_size, eps=1e-6)
        self.linear_fc1 = nn.Linear(merged, merged)
        self.linear_fc2 = nn.Linear(merged, cfg.out_hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        N, P, D = x.shape
        if not self.norm_after_concat:
            x = self.norm(x)
        x = x.reshape(N, P // 4, 4 * D)
        if self.norm_after_concat:
            x = self.norm(x)
        return self.linear_fc2(F.gelu(self.linear_fc1(x)))


class VisionTower(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        if cfg.spatial_merge_size != 2:
            raise ValueError("only Qwen3-VL's 2x2 spatial merge is supported")
        self.cfg = cfg
        p, t = cfg.patch_size, cfg.temporal_patch_size
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv3d(cfg.in_channels, cfg.hidden_size, (t, p, p), stride=(t, p, p))
        self.pos_embed = nn.Embedding(cfg.num_position_embeddings, cfg.hidden_size)
        side = int(cfg.num_position_embeddings ** 0.5)
        if side * side != cfg.num_position_embeddings:
            raise ValueError("num_position_embeddings must be a square")
        rows, cols = patch_coordinates(cfg)
        row_taps, row_weights = bilinear_taps(rows, cfg.image_height // p, side)
        col_taps, col_weights = bilinear_taps(cols, cfg.image_width // p, side)
        self.register_buffer("pos_taps", (row_taps[:, :, None] * side + col_taps[:, None]).flatten(1), persistent=False)
        self.register_buffer("pos_weights", (row_weights[:, :, None] * col_weights[:, None]).flatten(1), persistent=False)
        self.rotary_pos_emb = VisionRotary(cfg)
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.depth))
        self.merger = PatchMerger(cfg, norm_after_concat=False)
        self.deepstack_merger_list = nn.ModuleList(PatchMerger(cfg, norm_after_concat=True)
                                                   for _ in cfg.deepstack_visual_indexes)

    def forward(self, images: Tensor) -> VisualFeatures:
        """Camera frames [N, H, W, 3] uint8 BGR -> merged tokens and deepstack features."""
        return self.from_patches(patchify(images, self.cfg))

    def from_patches(self, pixel_patches: Tensor) -> VisualFeatures:
        """Pixel patches [N, P, 3 * T * p * p] (transformers' `pixel_values`, one row per image)."""
        cfg = self.cfg
        N, P, _ = pixel_patches.shape
        weight = self.patch_embed.proj.weight
        cubes = pixel_patches.to(weight.dtype).reshape(N * P, cfg.in_channels, cfg.temporal_patch_size,
                                                        cfg.patch_size, cfg.patch_size)
        x = self.patch_embed.proj(cubes).view(N, P, -1)
        x = x + (self.pos_embed(self.pos_taps) * self.pos_weights[..., None].to(x.dtype)).sum(1)
        cos, sin = self.rotary_pos_emb.cos[None], self.rotary_pos_emb.sin[None]  # [1, P, head_dim]
        deepstack = []
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin)
            if i in cfg.deepstack_visual_indexes:
                deepstack.append(self.deepstack_merger_list[cfg.deepstack_visual_indexes.index(i)](x))
        embeds = self.merger(x)
        stacked = torch.stack(deepstack) if deepstack else embeds.new_zeros(0, *embeds.shape)
        return VisualFeatures(embeds, stacked)
