"""A small ViT image encoder with Qwen-VL's 2x2 patch merge.

Each image becomes rows x cols tokens (rows = H / patch / 2, cols = W / patch / 2) in row-major
order, which is exactly the (row, col) grid M-RoPE assigns to the image block. Merging 2x2
neighbours cuts the decoder's sequence length 4x while keeping all patch features.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import VisionConfig
from .decoder import AttentionFunction


def to_float_image(images: Tensor) -> Tensor:
    """[N, H, W, 3] uint8 (camera layout) or [N, 3, H, W] float in [0, 1] -> [N, 3, H, W] in
    [-1, 1]."""
    if images.dtype == torch.uint8:
        if images.shape[-1] == 3:
            images = images.permute(0, 3, 1, 2)
        images = images.float() / 255.0
    return images * 2.0 - 1.0


class VisionBlock(nn.Module):
    """Pre-norm transformer block with full (bidirectional) attention within one image."""

    def __init__(self, dim: int, num_heads: int, intermediate: int):
        super().__init__()
        self.num_heads = num_heads
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, intermediate), nn.GELU(),
                                 nn.Linear(intermediate, dim))
        self.attention: AttentionFunction = F.scaled_dot_product_attention

    def forward(self, x: Tensor) -> Tensor:
        N, T, D = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(N, T, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        y = self.attention(q, k, v)
        x = x + self.proj(y.transpose(1, 2).reshape(N, T, D))
        return x + self.mlp(self.norm2(x))


class VisionEncoder(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        p, m, d = cfg.patch_size, cfg.merge_size, cfg.hidden_size
        self.grid_h, self.grid_w = cfg.image_height // p, cfg.image_width // p
        self.patch_embed = nn.Linear(p * p * 3, d)
        self.pos_embed = nn.Parameter(torch.randn(self.grid_h * self.grid_w, d) * 0.02)
        self.blocks = nn.ModuleList(VisionBlock(d, cfg.num_heads, cfg.intermediate_size)
                                    for _ in range(cfg.num_layers))
        self.norm = nn.LayerNorm(d, eps=1e-6)
        self.merger = nn.Sequential(nn.Linear(m * m * d, m * m * d), nn.GELU(),
                                    nn.Linear(m * m * d, cfg.out_hidden_size))

    def forward(self, images: Tensor) -> Tensor:
        """[N, H, W, 3] uint8 or [N, 3, H, W] float in [0, 1] -> [N, rows * cols, out_hidden]."""
        x = to_float_image(images).to(self.patch_embed.weight.dtype)
        N, _, H, W = x.shape
        p, m = self.cfg.patch_size, self.cfg.merge_size
        if (H, W) != (self.cfg.image_height, self.cfg.image_width):
            raise ValueError(f"expected {self.cfg.image_height}x{self.cfg.image_width} images")
        gh, gw = self.grid_h, self.grid_w
        # [N, 3, gh, p, gw, p] -> one (p, p, 3) patch per grid cell, row-major.
        x = x.view(N, 3, gh, p, gw, p).permute(0, 2, 4, 3, 5, 1).reshape(N, gh * gw, p * p * 3)
        x = self.patch_embed(x) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        # Merge each m x m neighbourhood into one token:
        # [N, gh/m, m, gw/m, m, D] -> [N, rows, cols, m, m, D] -> [N, rows * cols, m * m * D].
        x = x.view(N, gh // m, m, gw // m, m, -1).permute(0, 1, 3, 2, 4, 5)
        x = x.reshape(N, (gh // m) * (gw // m), -1)
        return self.merger(x)
