"""Routine reasoners behind the `Drafter` interface of `speculative.py`.

- `EagleDrafter`: the trained EAGLE-3 draft (FlatRoPE or M-RoPE positions).
- `NgramDrafter`: a zero-training baseline that continues the CoC from n-gram counts of the
  target's own greedy CoCs (no gradient step, just counting).
"""
from __future__ import annotations

from collections import Counter, defaultdict

import torch
from torch import Tensor

from .engines.base import DraftEngine
from .sampling import Sampling


class EagleDrafter:
    """Keeps the draft engine's KV cache in step with the target's committed sequence.

    Draft input at sequence index i is (token i+1, features of index i). Inputs whose target
    features are known wait in `pending_*` until the next proposal runs them in one pass;
    chain entries beyond them use the draft's own hidden states and are rolled back after
    every verification.
    """

    def __init__(self, engine: DraftEngine, stop_id: int | None = None):
        """Drafting stops early after `stop_id` (nothing follows the end of the CoC). (A stop on
        low draft confidence was tried and removed: at thresholds 0.3-0.7 it lost more tau than it
        saved draft steps.)"""
        self.engine, self.stop_id = engine, stop_id
        self.feature_layers = list(engine.config.feature_layers)
        self.mode = engine.config.position_mode

    def start(self, max_len: int) -> None:
        self.engine.start(max_len)

    def begin(self, prompt, features: list[Tensor], first_token: int) -> None:
        self.prompt = prompt
        self.engine.crop(0)
        self.pending_tokens = prompt.input_ids[1:].tolist() + [first_token]
        self.pending_features = self.engine.fuse(features)
        self.start_index = 0  # sequence index of the first pending input
        self.drafts: list[int] = []

    def _step(self, tokens: list[int], features: Tensor, start: int) -> tuple[Tensor, Tensor]:
        return self.engine.step(tokens, features, self.prompt.positions(start, len(tokens), self.mode))

    def propose(self, k: int, sampling: Sampling, generator=None) -> tuple[list[int], Tensor | None]:
        hidden, logits = self._step(self.pending_tokens, self.pending_features, self.start_index)
        self.committed_length = self.engine.length
        index = self.start_index + len(self.pending_tokens)
        drafts, probs = self.engine.chain(logits, hidden, self.prompt.positions(index, k - 1, self.mode),
                                          lambda chain_logits: sampling.choose(chain_logits, generator), self.stop_id)
        self.drafts = drafts
        return drafts, None if sampling.greedy else torch.stack(probs)

    def accept(self, num_accepted: int, next_token: int, features: list[Tensor]) -> None:
        self.engine.crop(self.committed_length)
        self.start_index = self.committed_length
        self.pending_tokens = self.drafts[:num_accepted] + [next_token]
        self.pending_features = self.engine.fuse(features)


class NgramDrafter:
    """Continues the CoC with the most frequent next token after the last n tokens (n = 3, 2, 1),
    counted over a corpus of the target's greedy CoCs; proposes nothing on an unseen context."""

    feature_layers: list[int] = []

    def __init__(self, corpus: list[list[int]], vocab_size: int, order: int = 3, start_token: int = -1):
        self.order, self.start_token, self.vocab_size = order, start_token, vocab_size
        self.table: dict[tuple[int, ...], Counter] = defaultdict(Counter)
        for sequence in corpus:
            padded = [start_token] * order + list(sequence)
            for i in range(order, len(padded)):
                for n in range(1, order + 1):
                    self.table[tuple(padded[i - n : i])][padded[i]] += 1

    def _next(self, history: list[int]) -> Counter | None:
        for n in range(self.order, 0, -1):
            counts = self.table.get(tuple(history[-n:]))
            if counts:
                return counts
        return None

    def start(self, max_len: int) -> None:
        pass  # no state beyond the token history

    def begin(self, prompt, features, first_token: int) -> None:
        self.history = [self.start_token] * self.order + [first_token]

    def propose(self, k: int, sampling: Sampling, generator=None) -> tuple[list[int], Tensor | None]:
        history, drafts, probs = list(self.history), [], []
        for _ in range(k):
            counts = self._next(history)
            if counts is None:
                break
            if sampling.greedy:
                token = counts.most_common(1)[0][0]
            else:  # the proposal distribution: normalised counts, sharpened by the temperature
                ids = torch.tensor(list(counts))
                weights = torch.tensor(list(counts.values()), dtype=torch.float) ** (1.0 / sampling.temperature)
                token = int(ids[torch.multinomial(weights, 1, generator=generator)])
                p = torch.zeros(self.vocab_size)
                p[ids] = weights / weights.sum()
                probs.append(p)
            drafts.append(token)
            history.append(token)
        self.drafts = drafts
        return drafts, (torch.stack(probs) if probs else None)

    def accept(self, num_accepted: int, next_token: int, features) -> None:
        self.history += self.drafts[:num_accepted] + [next_token]
