"""Rotary embeddings: Qwen3-VL's interleaved 3-D M-RoPE (target) and flat 1-D RoPE (draft).

The target gives every token a (temporal, height, width) position triple. Text tokens use
(p, p, p), so on pure text M-RoPE reduces to ordinary RoPE. An image block of t x rows x cols
merged tokens gets (t_idx, row, col) + offset, so hundreds of image tokens share a handful of
position values and the text after the block resumes only max(rows, cols) past the offset.
The draft instead uses FlatRoPE, plain positions 0..L-1 over the same sequence (all three axes
equal, so this module's tables reduce to 1-D RoPE): the image blocks then sit far from the CoC
(docs/ARCHITECTURE.md, 'Positions').
"""
from __future__ import annotations

from typing import Sequence, Union

import torch
from torch import Tensor

Segment = Union[tuple[str, int], tuple[str, int, int, int]]


def mrope_position_ids(segments: Sequence[Segment]) -> tuple[Tensor, int]:
    """3-D positions [3, L] for a prompt layout, plus rope_delta for the text that follows it.

    segments: ("text", n) or ("image", t, rows, cols), the grid *after* the 2x2 merge.
    Matches transformers' Qwen3-VL get_rope_index (5.x): a running offset `start`; text takes
    start..start+n-1 on all three axes; an image takes (start + t_idx, start + row, start + col)
    and then advances `start` by max(rows, cols) only (t is not counted: Qwen3-VL feeds video
    as t=1 frames separated by timestamp text, so for a still frame t_idx is always 0 and the
    next text lands at exactly the image's max + 1).
    rope_delta = max + 1 - L, so a token at cache position c after the prompt sits at text
    position c + rope_delta.
    """
    parts: list[Tensor] = []
    start = 0
    for seg in segments:
        if seg[0] == "text":
            n = int(seg[1])
            parts.append(torch.arange(n).expand(3, n) + start)
            start += n
        elif seg[0] == "image":
            t, rows, cols = (int(v) for v in seg[1:])
            # Row-major within a frame (col fastest), the order the vision encoder emits tokens.
            ti, ri, ci = torch.meshgrid(
                torch.arange(t), torch.arange(rows), torch.arange(cols), indexing="ij"
            )
            parts.append(torch.stack([ti.flatten(), ri.flatten(), ci.flatten()]) + start)
            start += max(rows, cols)
        else:
            raise ValueError(f"unknown segment kind {seg[0]!r}")
    positions = torch.cat(parts, dim=1) if parts else torch.zeros(3, 0, dtype=torch.long)
    top = int(positions.max()) + 1 if positions.numel() else 0
    return positions, top - positions.shape[1]


def text_position_ids(cache_length: int, num_tokens: int, rope_delta: int | Tensor,
                      device: torch.device | None = None) -> Tensor:
    """Positions [1 or B, T] of text tokens after the prompt: cache_length + j + rope_delta.

    This is how transformers continues M-RoPE while decoding (all three axes equal, shifted by
    the prompt's rope_delta); rope_delta may be an int or a [B] tensor.
    """
    delta = torch.as_tensor(rope_delta, device=device).reshape(-1, 1)
    return (cache_length + torch.arange(num_tokens, device=device))[None] + delta


def scaled_mrope_section(head_dim: int) -> list[int]:
    """Qwen3-VL's 24:20:20 split of frequency pairs (t, h, w) scaled to head_dim // 2 pairs.

    head_dim 128 -> [24, 20, 20]; 64 -> [12, 10, 10]. Rounding slack goes to the temporal axis
    so the sum is exactly head_dim // 2.
    """
    pairs = head_dim // 2
    h = w = round(pairs * 20 / 64)
    return [pairs - h - w, h, w]


class RotaryEmbedding(torch.nn.Module):
    """cos/sin tables for interleaved M-RoPE.

    Frequency pair j takes its angle from the height position if j % 3 == 1 and
    j < 3 * mrope_section[1], from the width position if j % 3 == 2 and j < 3 * mrope_section[2],
    else from the temporal position. Interleaving (rather than Qwen2-VL's contiguous chunks)
    spreads every axis over low and high frequencies.
    """

    def __init__(self, head_dim: int, theta: float, mrope_section: Sequence[int] | None = None):
        super().__init__()
        mrope_section = list(mrope_section or scaled_mrope_section(head_dim))
        assert sum(mrope_section) == head_dim // 2, (mrope_section, head_dim)
        inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        j = torch.arange(head_dim // 2)
        axis = torch.zeros(head_dim // 2, dtype=torch.long)  # 0 = temporal
        axis[(j % 3 == 1) & (j < 3 * mrope_section[1])] = 1
        axis[(j % 3 == 2) & (j < 3 * mrope_section[2])] = 2
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("axis", axis, persistent=False)

    def forward(self, position_ids: Tensor) -> tuple[Tensor, Tensor]:
        """position_ids [3, B, T] (or [B, T]: all axes equal) -> cos, sin [B, T, head_dim] fp32."""
        if position_ids.dim() == 2:
            position_ids = position_ids.unsqueeze(0).expand(3, -1, -1)
        # Pick, per frequency pair, the position on that pair's axis: [B, T, head_dim/2].
        pos = position_ids.float().permute(1, 2, 0)[..., self.axis]
        freqs = pos * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)  # rotate_half pairs dim i with dim i + head_dim/2
        return emb.cos(), emb.sin()


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x [B, H, T, head_dim] by cos, sin [B, T, head_dim] (broadcast over heads)."""
    cos, sin = cos.unsqueeze(1).to(x.dtype), sin.unsqueeze(1).to(x.dtype)
    return x * cos + rotate_half(x) * sin
