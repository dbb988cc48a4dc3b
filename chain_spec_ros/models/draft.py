"""The routine reasoner: an EAGLE-3 style one-layer draft with FlatRoPE.

At sequence index i the draft reads [embedding of token i+1 ; features of index i] and predicts
token i+2. For indices the target has processed, the features are a linear fusion of the
target's hidden states from a low, a middle and a high layer; while drafting a chain beyond
them, the draft feeds its own previous hidden state instead. The embedding table and LM head
are the target's, shared and frozen, so the draft owns only a fusion layer, an input
projection and one decoder layer (docs/ARCHITECTURE.md, 'The model').

`position_mode` chooses the draft's positions (docs/ARCHITECTURE.md, 'Positions'):
- `flat` (FlatRoPE): index i is at 1-D position i over the whole sequence, images included, so
  the hundreds of image tokens sit far from the CoC and rotary decay favours the recent
  trajectory-history tokens;
- `mrope`: the target's own 3-D positions, where each image block spans a handful of values.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .config import DecoderConfig
from .decoder import DecoderLayer, RMSNorm, causal_mask
from .kv_cache import KVCache
from .rope import RotaryEmbedding

POSITION_MODES = ("flat", "mrope")


@dataclass
class DraftConfig:
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rope_theta: float
    mrope_section: list[int]
    rms_norm_eps: float
    feature_layers: list[int] = field(default_factory=list)  # target layers fused (low, middle, high)
    position_mode: str = "flat"
    max_positions: int = 512
    # The draft vocabulary (EAGLE-3): the token ids drafting may propose, the tokens of the
    # training CoCs; None = the target's whole vocabulary. See `EagleDraft.proposal_logits`.
    vocab: list[int] | None = None

    def __post_init__(self) -> None:
        if self.position_mode not in POSITION_MODES:
            raise ValueError(f"position_mode must be one of {POSITION_MODES}, got {self.position_mode!r}")

    @classmethod
    def for_target(cls, target: DecoderConfig, position_mode: str = "flat") -> "DraftConfig":
        """One decoder layer shaped like the target's, fusing layers 1, L/2 and L-1 (EAGLE-3's
        low, middle and high)."""
        n = target.num_layers
        return cls(target.hidden_size, target.num_heads, target.num_kv_heads, target.head_dim,
                   target.intermediate_size, target.rope_theta, list(target.mrope_section), target.rms_norm_eps,
                   [min(1, n - 1), n // 2, n - 1], position_mode, target.max_positions)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> "DraftConfig":
        return cls(**json.loads(Path(path).read_text()))


class EagleDraft(nn.Module):
    def __init__(self, cfg: DraftConfig, embed_tokens: nn.Embedding, lm_head: nn.Linear):
        super().__init__()
        self.cfg = cfg
        d = cfg.hidden_size
        self.fuse = nn.Linear(len(cfg.feature_layers) * d, d, bias=False)
        self.embed_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.feature_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.input_proj = nn.Linear(2 * d, d, bias=False)
        self.layer = DecoderLayer(d, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size,
                                  cfg.rms_norm_eps)
        self.norm = RMSNorm(d, cfg.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(cfg.head_dim, cfg.rope_theta, cfg.mrope_section)
        # The target's embedding and LM head: used, never trained, never saved with the draft.
        self._shared = (embed_tokens, lm_head)
        vocab = None if cfg.vocab is None else torch.tensor(sorted(set(cfg.vocab)), dtype=torch.long)
        if vocab is not None and (len(vocab) == 0 or vocab[0] < 0 or vocab[-1] >= lm_head.weight.shape[0]):
            raise ValueError(f"the draft vocabulary must be a non-empty set of token ids below the target's "
                             f"{lm_head.weight.shape[0]}; this draft does not belong to this target")
        self.register_buffer("vocab", vocab, persistent=False)

    def fuse_features(self, target_hidden: list[Tensor]) -> Tensor:
        """Target hidden states of the feature layers [B, T, D] each -> fused features [B, T, D]."""
        return self.fuse(torch.cat(target_hidden, dim=-1))

    def embed(self, token_ids: Tensor) -> Tensor:
        return self._shared[0](token_ids)

    def logits(self, hidden: Tensor) -> Tensor:
        """Logits over the target's whole vocabulary (what training and AARL's KL read)."""
        return self._shared[1](self.norm(hidden))

    def proposal_logits(self, hidden: Tensor) -> Tensor:
        """What drafting proposes from: `logits` with the tokens outside the draft vocabulary at
        -inf, computing only the vocabulary's rows of the LM head. A CoC uses a few hundred of the
        target's tokens (151k for Qwen3-VL), so the head shrinks to a small fraction; greedy
        proposals are unchanged whenever the full argmax lies in the vocabulary, and the output
        stays the target's whatever the draft proposes."""
        if self.vocab is None:
            return self.logits(hidden)
        weight = self._shared[1].weight
        inside = F.linear(self.norm(hidden), weight[self.vocab])
        outside = torch.full((*inside.shape[:-1], weight.shape[0]), float("-inf"), dtype=inside.dtype,
                             device=inside.device)
        return outside.index_copy(-1, self.vocab, inside)

    def inputs(self, token_ids: Tensor, features: Tensor) -> Tensor:
        return self.input_proj(torch.cat([self.embed_norm(self.embed(token_ids)), self.feature_norm(features)], -1))

    def forward(self, token_ids: Tensor, features: Tensor, position_ids: Tensor, cache: KVCache | None = None,
                kv_hook=None, mask: Tensor | None = None, last_only: bool = False) -> Tensor:
        """Hidden states [B, T, D] for tokens [B, T] and features [B, T, D] at positions [3, B, T]
        ([B, 1, D], the last position's, with last_only: what drafting reads).

        With a cache the new entries attend to the cached ones causally (inference); training
        passes its own kv_hook and mask (the training-time-test rollout).
        """
        cos, sin = self.rotary_emb(position_ids)
        if cache is not None:
            kv_hook = lambda k, v: cache.append(0, k, v)  # noqa: E731
            mask = causal_mask(token_ids.shape[1], cache.length, token_ids.device)
        hidden = self.layer(self.inputs(token_ids, features), cos, sin, kv_hook, mask, last_only)
        if cache is not None:
            cache.advance(token_ids.shape[1])
        return hidden

    def new_cache(self, max_len: int | None = None) -> KVCache:
        p = self.fuse.weight
        return KVCache(1, 1, self.cfg.num_kv_heads, max_len or self.cfg.max_positions, self.cfg.head_dim,
                       p.dtype, p.device)

    def save_pretrained(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.cfg.save(directory / "config.json")
        save_file({k: v.detach().contiguous() for k, v in self.state_dict().items()}, str(directory / "model.safetensors"))

    @classmethod
    def from_pretrained(cls, directory: str | Path, embed_tokens: nn.Embedding, lm_head: nn.Linear,
                        position_mode: str | None = None) -> "EagleDraft":
        directory = Path(directory)
        for name in ("config.json", "model.safetensors"):
            if not (directory / name).is_file():
                raise FileNotFoundError(f"draft model file missing: {directory / name}")
        cfg = DraftConfig.load(directory / "config.json")
        if position_mode is not None:
            cfg.position_mode = position_mode
        if embed_tokens.embedding_dim != cfg.hidden_size:
            raise ValueError(f"draft hidden size {cfg.hidden_size} does not match the target's {embed_tokens.embedding_dim}")
        draft = cls(cfg, embed_tokens, lm_head)
        draft.load_state_dict(load_file(str(directory / "model.safetensors")))
        return draft.to(embed_tokens.weight.device)
