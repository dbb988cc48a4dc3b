"""How a token is chosen from logits: greedy, or sampling with temperature and top-p, with the
trajectory tokens suppressed as Alpamayo's rollout suppresses them.

`Sampling.distribution` is the one definition of "the target's distribution" that target-only
sampling draws from and speculative sampling preserves; drafters use the same settings for
their proposals (any proposal keeps the output exact, a closer one is accepted more often).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    suppressed: range = range(0)  # token ids never generated in the CoC (the trajectory bins, consecutive)

    def __post_init__(self) -> None:
        if self.suppressed.step != 1:
            raise ValueError("suppressed ids must be consecutive")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"temperature must be >= 0 and top_p in (0, 1], got {self.temperature}, {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def masked(self, logits: Tensor) -> Tensor:
        if not self.suppressed:
            return logits
        logits = logits.clone()
        logits[..., self.suppressed.start:self.suppressed.stop] = float("-inf")
        return logits

    def distribution(self, logits: Tensor) -> Tensor:
        """Probabilities [..., V]: suppressed ids removed, tempered softmax, then the smallest
        set of most likely tokens whose mass reaches top_p kept and renormalised (transformers'
        TopPLogitsWarper keeps the same set, ties aside)."""
        probs = torch.softmax(self.masked(logits).float() / self.temperature, dim=-1)
        if self.top_p >= 1:
            return probs
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        sorted_probs = sorted_probs.masked_fill(mass_before >= self.top_p, 0.0)
        kept = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
        return kept / kept.sum(dim=-1, keepdim=True)

    def argmax(self, logits: Tensor) -> list[int] | int:
        """The greedy choice of logits [V] (an int) or [T, V] (a list), suppressed ids excluded.

        The unmasked argmax is the masked one whenever it is not suppressed (argmax returns the
        first maximum, so no kept id ties it earlier); only then is a masked copy made. Why: a
        draft chain chooses once per step, and the copy and fill of the suppressed range (the
        1,000 trajectory ids) cost more than the choice: 17 us a choice with them, 8 us without
        on the 2-core CPU."""
        choices = logits.argmax(-1).tolist()
        if self.suppressed and any(c in self.suppressed for c in (choices if isinstance(choices, list) else [choices])):
            return self.masked(logits).argmax(-1).tolist()
        return choices

    def choose(self, logits: Tensor, generator: torch.Generator | None = None) -> tuple[int, Tensor | None]:
        """A token from logits [V], and the distribution it was drawn from (None when greedy)."""
        if self.greedy:
            return self.argmax(logits), None
        probs = self.distribution(logits)
        return int(torch.multinomial(probs, 1, generator=generator)), probs


GREEDY = Sampling()
