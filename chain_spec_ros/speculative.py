"""The draft-verify loop: the routine reasoner proposes, the deliberative reasoner verifies.

Bookkeeping (index = position in the sequence prompt + CoC):
- the target's cache holds every committed token except the last one, which is *pending*: it
  was chosen from the target's logits but has not been fed back yet;
- each round the drafter proposes k tokens after the pending one; the target runs
  [pending, d1..dk] in ONE pass, which gives its own choice after each prefix;
- the longest prefix of drafts that equals the target's choices is committed, plus the
  target's token after it (the correction, or the bonus when all k match), which becomes the
  new pending token; both caches roll back by resetting their valid length.
Under greedy verification every committed token is the target's argmax given the committed
prefix, so the output equals target-only greedy decoding token for token. When sampling, p is
the target's distribution after suppression, temperature and top-p (`Sampling.distribution`),
drafts are accepted with probability min(1, p/q) and a rejection resamples from
max(p - q, 0), which leaves the output distributed exactly as target-only sampling's.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

from .constants import DEFAULT_K
from .engines.base import TargetEngine
from .sampling import GREEDY, Sampling


class Drafter(Protocol):
    """A routine reasoner behind one interface (EAGLE draft, n-gram, ...)."""

    feature_layers: list[int]  # target layers whose hidden states the drafter reads (may be empty)

    def start(self, max_len: int) -> None:
        """Prepare for a request of at most max_len tokens."""

    def begin(self, prompt, features: list[Tensor], first_token: int) -> None:
        """After the target's prefill: prompt features [1, P, D] per feature layer."""

    def propose(self, k: int, sampling: Sampling, generator: torch.Generator | None
                ) -> tuple[list[int], Tensor | None]:
        """Up to k tokens after the pending one, and their proposal distributions [k, V] when sampling."""

    def accept(self, num_accepted: int, next_token: int, features: list[Tensor]) -> None:
        """The target kept `num_accepted` drafts and chose `next_token` after them; features
        [1, num_accepted + 1, D] per layer are the target's for [pending, accepted drafts]."""


@dataclass
class SpeculativeStats:
    k: int
    target_passes: int = 0
    produced: int = 0  # tokens the verify passes decided (accepted drafts + the target's next token)
    proposed: int = 0  # tokens the drafter proposed (k per pass, fewer where it reached the stop or the budget)
    token_sources: list[str] = field(default_factory=list)  # per CoC token: "draft" or "target"
    accepted_at: np.ndarray = field(default=None)  # [k] how often draft position j was accepted
    draft_ms: float = 0.0
    verify_ms: float = 0.0

    def __post_init__(self) -> None:
        if self.accepted_at is None:
            self.accepted_at = np.zeros(self.k, dtype=np.int64)

    @property
    def tau(self) -> float:
        """Mean accepted length: tokens decided per target pass, the correction/bonus included."""
        return self.produced / max(self.target_passes, 1)

    @property
    def drafted_share(self) -> float:
        """Share of the CoC's tokens that the drafter proposed and the target kept."""
        return self.token_sources.count("draft") / max(len(self.token_sources), 1)

    def as_dict(self) -> dict:
        return {
            "tau": self.tau,
            "drafted_share": self.drafted_share,
            "target_passes": self.target_passes,
            "proposed": self.proposed,
            "acceptance_by_position": (self.accepted_at / max(self.target_passes, 1)).tolist(),
            "draft_ms": self.draft_ms,
            "verify_ms": self.verify_ms,
        }


def verify_greedy(drafts: list[int], target_logits: Tensor, sampling: Sampling = GREEDY) -> tuple[int, int]:
    """(number of drafts accepted, the target's token after them) under greedy verification."""
    choices = sampling.argmax(target_logits)
    accepted = 0
    while accepted < len(drafts) and drafts[accepted] == choices[accepted]:
        accepted += 1
    return accepted, choices[accepted]


def verify_sampled(drafts: list[int], draft_probs: Tensor, target_logits: Tensor, sampling: Sampling,
                   generator: torch.Generator | None) -> tuple[int, int]:
    """Speculative sampling: accept d_j with probability min(1, p/q), else resample from the
    normalised residual max(p - q, 0); after k acceptances draw the bonus from p."""
    p = sampling.distribution(target_logits)
    for j, token in enumerate(drafts):
        ratio = p[j, token] / draft_probs[j, token].clamp_min(1e-12)
        if torch.rand((), generator=generator) < ratio.clamp(max=1.0):
            continue
        residual = (p[j] - draft_probs[j]).clamp_min(0.0)
        if residual.sum() <= 0:  # p == q: any draw from p is exact
            residual = p[j]
        return j, int(torch.multinomial(residual / residual.sum(), 1, generator=generator))
    return len(drafts), int(torch.multinomial(p[len(drafts)], 1, generator=generator))


def speculative_decode(target: TargetEngine, drafter: Drafter, prompt, prefill_logits: Tensor,
                       prefill_features: list[Tensor], stop_id: int, max_new: int, k: int = DEFAULT_K,
                       sampling: Sampling = GREEDY, generator: torch.Generator | None = None
                       ) -> tuple[list[int], SpeculativeStats]:
    """Decode the CoC after a prefilled prompt (last logits [V]). Returns the tokens (stop
    excluded) and stats.

    The target cache ends holding the prompt and every emitted token, as after target-only
    decoding, so the trajectory expert can read it next.
    """
    stats = SpeculativeStats(k)
    pending, _ = sampling.choose(prefill_logits, generator)
    drafter.begin(prompt, prefill_features, pending)
    tokens: list[int] = []
    while pending != stop_id and len(tokens) < max_new:
        tokens.append(pending)  # the pending token is always the target's own choice
        stats.token_sources.append("target")
        budget = min(k, max_new - len(tokens))
        if budget == 0:  # length limit: feed the last token so the cache holds the whole CoC
            target.decode([pending], prompt.rope_delta)
            break
        clock = time.perf_counter()
        drafts, draft_probs = drafter.propose(budget, sampling, generator)
        verify_clock = time.perf_counter()
        stats.draft_ms += (verify_clock - clock) * 1e3
        stats.proposed += len(drafts)
        base = target.length
        logits, features = target.decode([pending] + drafts, prompt.rope_delta)
        if sampling.greedy:
            accepted, next_token = verify_greedy(drafts, logits, sampling)
        else:
            accepted, next_token = verify_sampled(drafts, draft_probs, logits, sampling, generator)
        stats.verify_ms += (time.perf_counter() - verify_clock) * 1e3
        stats.target_passes += 1
        stats.accepted_at[:accepted] += 1
        kept = drafts[:accepted]
        if stop_id in kept:  # the CoC ends inside the drafted block
            kept = kept[: kept.index(stop_id)]
            stats.produced += len(kept) + 1
            tokens += kept
            stats.token_sources += ["draft"] * len(kept)
            target.crop(base + 1 + len(kept))
            break
        stats.produced += accepted + 1
        tokens += kept
        stats.token_sources += ["draft"] * accepted
        target.crop(base + 1 + accepted)
        drafter.accept(accepted, next_token, [f[:, : accepted + 1] for f in features])
        pending = next_token
    return tokens, stats
