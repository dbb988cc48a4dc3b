"""Prompt assembly: Alpamayo's layout, token ids, and both position schemes.

Order (docs/ARCHITECTURE.md, 'Prompt'): system text; per camera, its frames as image blocks
`<|vision_start|>` + pads + `<|vision_end|>`; `<|traj_history_start|>` + 48 history tokens +
`<|traj_history_end|>`; the instruction; the assistant turn opening `<|cot_start|>`.
The answer is the CoC, `<|cot_end|>`, `<|traj_future_start|>`, then (training only) the
discrete future tokens and `<|traj_future_end|>`.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .models.rope import mrope_position_ids
from .models.tokenizer import ChainTokenizer
from .trajectory import HISTORY_TOKENS, future_bins

# Alpamayo-R1's inference message through Qwen3-VL's chat template, the assistant turn left open.
SYSTEM_TEXT = ("<|im_start|>system\nYou are a driving assistant that generates safe and accurate actions.<|im_end|>\n"
               "<|im_start|>user\n")
INSTRUCTION_TEXT = ("output the chain-of-thought reasoning of the driving process, then output the future trajectory."
                    "<|im_end|>\n<|im_start|>assistant\n")


@dataclass
class Prompt:
    input_ids: np.ndarray  # [L] int64
    images: np.ndarray  # [num_images, H, W, 3] uint8, in prompt order
    mrope_positions: torch.Tensor  # [3, L], the target's 3-D positions
    rope_delta: int  # text after the prompt sits at cache position + rope_delta
    history_span: tuple[int, int]  # [start, end) of the 48 history tokens
    image_spans: list[tuple[int, int]]  # [start, end) of each image's pad tokens

    def __len__(self) -> int:
        return len(self.input_ids)

    def positions(self, start: int, length: int, mode: str) -> torch.Tensor:
        """Positions [3, length] of sequence indices start..start+length-1, which may run past
        the prompt into the CoC: `flat` is the index itself on all three axes (FlatRoPE);
        `mrope` is the target's 3-D position (text after the prompt: index + rope_delta)."""
        index = torch.arange(start, start + length)
        if mode == "flat":
            return index.expand(3, length)
        if mode != "mrope":
            raise ValueError(f"unknown position mode {mode!r}")
        inside = index < len(self.input_ids)
        out = (index + self.rope_delta).expand(3, length).clone()
        out[:, inside] = self.mrope_positions[:, index[inside]]
        return out


class PromptBuilder:
    """Builds prompts for one tokeniser, camera set and image grid."""

    def __init__(self, tokenizer: ChainTokenizer, grid_rows: int, grid_cols: int):
        self.tokenizer = tokenizer
        self.grid = (grid_rows, grid_cols)
        self.ids = {name: tokenizer.id(name) for name in (
            "<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|traj_history_start|>",
            "<|traj_history_end|>", "<|cot_start|>", "<|cot_end|>", "<|traj_future_start|>", "<|traj_future_end|>")}
        self._system = tokenizer.encode(SYSTEM_TEXT)
        self._instruction = tokenizer.encode(INSTRUCTION_TEXT)

    @property
    def cot_end_id(self) -> int:
        return self.ids["<|cot_end|>"]

    @property
    def tokens_per_image(self) -> int:
        return self.grid[0] * self.grid[1]

    def build(self, images: np.ndarray, history_tokens: np.ndarray) -> Prompt:
        """images [cameras, frames, H, W, 3]; history_tokens [48] bin indices."""
        images = np.asarray(images)
        if images.ndim != 5 or images.shape[-1] != 3:
            raise ValueError(f"images must be [cameras, frames, H, W, 3], got {images.shape}")
        history_tokens = np.asarray(history_tokens)
        if history_tokens.shape != (HISTORY_TOKENS,):
            raise ValueError(f"expected {HISTORY_TOKENS} history tokens, got {history_tokens.shape}")
        ids: list[int] = list(self._system)
        segments: list[tuple] = [("text", len(ids))]
        image_spans = []
        for _ in range(images.shape[0] * images.shape[1]):
            ids.append(self.ids["<|vision_start|>"])
            image_spans.append((len(ids), len(ids) + self.tokens_per_image))
            ids += [self.ids["<|image_pad|>"]] * self.tokens_per_image
            ids.append(self.ids["<|vision_end|>"])
            segments += [("text", 1), ("image", 1, *self.grid), ("text", 1)]
        tail_start = len(ids)
        ids.append(self.ids["<|traj_history_start|>"])
        history_span = (len(ids), len(ids) + HISTORY_TOKENS)
        ids += self.tokenizer.bins_to_ids(history_tokens).tolist()
        ids.append(self.ids["<|traj_history_end|>"])
        ids += self._instruction
        ids.append(self.ids["<|cot_start|>"])
        segments.append(("text", len(ids) - tail_start))
        positions, rope_delta = mrope_position_ids(_merge_text(segments))
        return Prompt(np.array(ids, dtype=np.int64), images.reshape(-1, *images.shape[2:]), positions, rope_delta,
                      history_span, image_spans)

    def coc_ids(self, coc: str) -> list[int]:
        return self.tokenizer.encode(coc)

    def answer_ids(self, coc: str, future_controls: np.ndarray | None = None) -> list[int]:
        """CoC + `<|cot_end|>` + `<|traj_future_start|>` (+ discrete future + end, when given)."""
        ids = self.coc_ids(coc) + [self.ids["<|cot_end|>"], self.ids["<|traj_future_start|>"]]
        if future_controls is not None:
            ids += self.tokenizer.bins_to_ids(future_bins(future_controls)).tolist()
            ids.append(self.ids["<|traj_future_end|>"])
        return ids


def _merge_text(segments: list[tuple]) -> list[tuple]:
    merged: list[tuple] = []
    for seg in segments:
        if seg[0] == "text" and merged and merged[-1][0] == "text":
            merged[-1] = ("text", merged[-1][1] + seg[1])
        else:
            merged.append(seg)
    return merged
