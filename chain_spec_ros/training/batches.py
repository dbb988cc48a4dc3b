"""Turning dataset scenes into model inputs: prompts, teacher-forced answers, padded batches.

Every prompt has the same layout (same cameras, frames and history length), so the prompt
positions are shared by the whole batch; only the answers differ in length. Answers are
right-padded, which a causal decoder never attends to from real tokens.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..data.dataset import SceneTable
from ..models.rope import text_position_ids
from ..prompt import Prompt, PromptBuilder

IGNORE = -100


@dataclass
class TeacherBatch:
    input_ids: torch.Tensor  # [B, P + A] prompt then padded answer
    labels: torch.Tensor  # [B, A] next-token targets for the answer positions (IGNORE on padding)
    images: torch.Tensor  # [B * num_images, H, W, 3] uint8
    position_ids: torch.Tensor  # [3, B, P + A]
    rope_delta: int
    prompt_length: int
    coc_end: torch.Tensor  # [B] index (in input_ids) one past `<|traj_future_start|>`
    future_controls: torch.Tensor  # [B, 64, 2]
    speed: torch.Tensor  # [B]


class SceneEncoder:
    """Prompt + answer token ids for the scenes of a table, computed once."""

    def __init__(self, builder: PromptBuilder, table: SceneTable, with_future_tokens: bool = True):
        self.builder, self.table = builder, table
        self.answers = [
            builder.answer_ids(r["coc"], table.arrays["future_controls"][i] if with_future_tokens else None)
            for i, r in enumerate(table.records)
        ]
        self.coc_lengths = np.array([len(builder.coc_ids(r["coc"])) for r in table.records])

    def prompt(self, i: int) -> Prompt:
        return self.builder.build(self.table.arrays["images"][i], self.table.arrays["history_tokens"][i])

    def batch(self, indices) -> TeacherBatch:
        prompts = [self.prompt(i) for i in indices]
        P = len(prompts[0])
        A = max(len(self.answers[i]) for i in indices)
        B = len(indices)
        input_ids = torch.zeros(B, P + A, dtype=torch.long)
        labels = torch.full((B, A), IGNORE, dtype=torch.long)
        for row, (i, prompt) in enumerate(zip(indices, prompts)):
            answer = torch.tensor(self.answers[i])
            input_ids[row, :P] = torch.from_numpy(prompt.input_ids)
            input_ids[row, P : P + len(answer)] = answer
            labels[row, : len(answer)] = answer
        answer_positions = text_position_ids(P, A, prompts[0].rope_delta).expand(3, A)
        positions = torch.cat([prompts[0].mrope_positions, answer_positions], dim=1)
        idx = np.asarray(indices)
        return TeacherBatch(
            input_ids=input_ids,
            labels=labels,
            images=torch.from_numpy(np.concatenate([p.images for p in prompts])),
            position_ids=positions[:, None].expand(3, B, P + A),
            rope_delta=prompts[0].rope_delta,
            prompt_length=P,
            coc_end=torch.from_numpy(P + self.coc_lengths[idx] + 2),
            future_controls=torch.from_numpy(self.table.arrays["future_controls"][idx]),
            speed=torch.from_numpy(self.table.arrays["speed"][idx]),
        )
