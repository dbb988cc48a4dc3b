"""The routine reasoner: EAGLE-3's one-layer draft, with FlatRoPE positions.

At sequence index i the draft reads the embedding of token i+1 and a hidden feature of index i
and predicts token i+2. For indices the target has processed, the feature is `fc` of the
target's hidden states from a low, a middle and a high layer (the outputs of layers 1, n/2-1
and n-4 of n, as EAGLE-3 and the paper's authors choose them); while drafting a chain beyond
them, the draft feeds its own previous hidden state (before the final norm) instead.

The draft layer is EAGLE-3's "midlayer": a Llama block whose attention reads the 2d-wide
[norm(embedding); norm(feature)] while the residual stream is the d-wide feature alone. The
draft predicts over its own vocabulary (EAGLE-3's reduced vocabulary: the tokens its training
answers use) with its own LM head; `d2t` maps a draft id to the target's (target = draft +
d2t[draft]) and `t2d` marks the target ids the draft can propose. The token embedding is the
target's, frozen. Module and buffer names are those of the EAGLE-3 checkpoint layout that
serving engines read (`draft_format.py`; docs/ARCHITECTURE.md, 'The model').

`position_mode` chooses the draft's rotary positions (docs/ARCHITECTURE.md, 'Positions'):
- `flat` (FlatRoPE): index i is at 1-D position i over the whole sequence, images included, so
  the image tokens sit far from the CoC and rotary decay favours the recent history tokens;
- `mrope`: the target's own 3-D positions, where each image block spans a handful of values.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .config import DecoderConfig
from .decoder import MLP, Attention, Decoder, KVHook, RMSNorm, causal_mask
from .kv_cache import KVCache
from .rope import RotaryEmbedding

POSITION_MODES = ("flat", "mrope")


def eagle3_feature_layers(num_layers: int) -> list[int]:
    """EAGLE-3's low, middle and high target layers (block outputs, 0-based): 1, n/2-1, n-4
    (1, 17, 32 of Qwen3-VL-8B's 36), clamped into a small target's range."""
    return [min(max(i, 0), num_layers - 1) for i in (1, num_layers // 2 - 1, num_layers - 4)]


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
    target_vocab_size: int
    draft_vocab: list[int]  # target token ids the draft predicts over, ascending
    feature_layers: list[int] = field(default_factory=list)  # target block outputs fused (low, middle, high)
    position_mode: str = "flat"
    max_positions: int = 512
    # Variants a speculators-trained draft may use (all off in EAGLE-3 and in our training):
    norm_before_residual: bool = False  # the residual stream starts from norm(feature)
    norm_before_fc: bool = False  # one RMSNorm over the concatenated target features before fc
    fc_norm: bool = False  # one RMSNorm per target feature before fc
    norm_output: bool = False  # the next chain step reads the final-normed hidden state ("EAGLE 3.1")
    qk_norm: bool = False  # a Qwen3 draft layer (q/k RMSNorm) instead of a Llama one

    def __post_init__(self) -> None:
        if self.position_mode not in POSITION_MODES:
            raise ValueError(f"position_mode must be one of {POSITION_MODES}, got {self.position_mode!r}")
        vocab = list(self.draft_vocab)
        if not vocab or vocab != sorted(set(vocab)) or vocab[0] < 0 or vocab[-1] >= self.target_vocab_size:
            raise ValueError(f"the draft vocabulary must be ascending distinct token ids below the target's "
                             f"{self.target_vocab_size}")

    @property
    def draft_vocab_size(self) -> int:
        return len(self.draft_vocab)

    @classmethod
    def for_target(cls, target: DecoderConfig, draft_vocab: list[int] | None = None,
                   position_mode: str = "flat") -> "DraftConfig":
        """One draft layer shaped like the target's layers (default vocabulary: all of the target's)."""
        vocab = sorted(set(draft_vocab)) if draft_vocab is not None else list(range(target.vocab_size))
        return cls(target.hidden_size, target.num_heads, target.num_kv_heads, target.head_dim,
                   target.intermediate_size, target.rope_theta, list(target.mrope_section), target.rms_norm_eps,
                   target.vocab_size, vocab, eagle3_feature_layers(target.num_layers), position_mode,
                   target.max_positions)


class Eagle3Layer(nn.Module):
    """The midlayer: attention over [norm(embedding); norm(feature)], residual = feature."""

    def __init__(self, cfg: DraftConfig):
        super().__init__()
        d, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.norm_before_residual = cfg.norm_before_residual
        self.input_layernorm = RMSNorm(d, eps)
        self.hidden_norm = RMSNorm(d, eps)
        self.self_attn = Attention(d, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, eps, input_size=2 * d,
                                   qk_norm=cfg.qk_norm)
        self.post_attention_layernorm = RMSNorm(d, eps)
        self.mlp = MLP(d, cfg.intermediate_size)

    def attention_input(self, embeds: Tensor, feature: Tensor) -> Tensor:
        """[norm(embedding); norm(feature)] [B, T, 2D]: what q, k and v read."""
        return torch.cat([self.input_layernorm(embeds), self.hidden_norm(feature)], dim=-1)

    def forward(self, embeds: Tensor, feature: Tensor, cos: Tensor, sin: Tensor, kv_hook: KVHook | None,
                mask: Tensor | None, last_only: bool = False) -> Tensor:
        """last_only: every position writes its keys and values, only the last one runs on ([B, 1, D] out)."""
        residual = self.hidden_norm(feature) if self.norm_before_residual else feature
        attended = self.self_attn(self.attention_input(embeds, feature), cos, sin, kv_hook, mask, last_only)
        x = (residual[:, -1:] if last_only else residual) + attended
        return x + self.mlp(self.post_attention_layernorm(x))


class EagleDraft(nn.Module):
    def __init__(self, cfg: DraftConfig, embed_tokens: nn.Embedding):
        super().__init__()
        if embed_tokens.num_embeddings != cfg.target_vocab_size or embed_tokens.embedding_dim != cfg.hidden_size:
            raise ValueError(f"the draft expects a target embedding of {cfg.target_vocab_size} x {cfg.hidden_size}, "
                             f"got {embed_tokens.num_embeddings} x {embed_tokens.embedding_dim}: this draft does "
                             f"not belong to this target")
        self.cfg = cfg
        d = cfg.hidden_size
        self.embed_tokens = embed_tokens  # the target's (shared, frozen)
        a = len(cfg.feature_layers)
        if cfg.norm_before_fc:
            self.input_norm = RMSNorm(a * d, cfg.rms_norm_eps)
        if cfg.fc_norm:
            self.fc_norm = nn.ModuleList(RMSNorm(d, cfg.rms_norm_eps) for _ in range(a))
        self.fc = nn.Linear(a * d, d, bias=False)
        self.layers = nn.ModuleList([Eagle3Layer(cfg)])
        self.norm = RMSNorm(d, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(d, cfg.draft_vocab_size, bias=False)
        self.rotary_emb = RotaryEmbedding(cfg.head_dim, cfg.rope_theta, cfg.mrope_section)
        target_ids = torch.tensor(cfg.draft_vocab, dtype=torch.long)
        self.register_buffer("d2t", target_ids - torch.arange(len(target_ids)))
        self.register_buffer("t2d", torch.zeros(cfg.target_vocab_size, dtype=torch.bool).index_fill(0, target_ids, True))
        self.register_buffer("target_ids", target_ids, persistent=False)

    def init_head_from(self, target_lm_head: nn.Linear) -> None:
        """Start the LM head from the target's rows of the draft vocabulary."""
        with torch.no_grad():
            self.lm_head.weight.copy_(target_lm_head.weight[self.target_ids])

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Everything but the target's embedding."""
        return [p for name, p in self.named_parameters() if not name.startswith("embed_tokens.")]

    def fuse_features(self, target_hidden: list[Tensor]) -> Tensor:
        """Target hidden states of the feature layers [B, T, D] each -> fused feature [B, T, D]."""
        if self.cfg.fc_norm:
            target_hidden = [norm(h) for norm, h in zip(self.fc_norm, target_hidden)]
        joined = torch.cat(target_hidden, dim=-1)
        return self.fc(self.input_norm(joined) if self.cfg.norm_before_fc else joined)

    def logits(self, hidden: Tensor) -> Tensor:
        """Logits over the draft vocabulary [..., draft_vocab_size] for `forward`'s hidden states."""
        return self.lm_head(hidden if self.cfg.norm_output else self.norm(hidden))

    def proposal_logits(self, hidden: Tensor) -> Tensor:
        """`logits` scattered into the target's vocabulary, -inf outside the draft vocabulary:
        what drafting proposes from, in the ids the target verifies."""
        inside = self.logits(hidden)
        outside = torch.full((*inside.shape[:-1], self.cfg.target_vocab_size), float("-inf"), dtype=inside.dtype,
                             device=inside.device)
        return outside.index_copy(-1, self.target_ids, inside)

    def forward(self, token_ids: Tensor, features: Tensor, position_ids: Tensor, cache: KVCache | None = None,
                kv_hook: KVHook | None = None, mask: Tensor | None = None, last_only: bool = False) -> Tensor:
        """Hidden states [B, T, D] for tokens [B, T] and features [B, T, D] at positions [3, B, T]
        ([B, 1, D], the last position's, with last_only: what drafting reads): what the next chain
        step reads as its feature, the layer's output before the final norm (after it with
        norm_output).

        With a cache the new entries attend to the cached ones causally (inference); training
        passes its own kv_hook and mask (the training-time-test rollout).
        """
        cos, sin = self.rotary_emb(position_ids)
        if cache is not None:
            kv_hook = lambda k, v: cache.append(0, k, v)  # noqa: E731
            mask = causal_mask(token_ids.shape[1], cache.length, token_ids.device)
        embeds = self.embed_tokens(token_ids).detach()  # frozen (EAGLE-3): no gradient into the target's table
        hidden = self.layers[0](embeds, features, cos, sin, kv_hook, mask, last_only)
        if cache is not None:
            cache.advance(token_ids.shape[1])
        return self.norm(hidden) if self.cfg.norm_output else hidden

    def new_cache(self, max_len: int | None = None) -> KVCache:
        p = self.fc.weight
        return KVCache(1, 1, self.cfg.num_kv_heads, max_len or self.cfg.max_positions, self.cfg.head_dim,
                       p.dtype, p.device)

    def save_pretrained(self, directory, verifier: str | None = None) -> None:
        from .draft_format import save_eagle3

        save_eagle3(self, directory, verifier)

    @classmethod
    def from_pretrained(cls, directory, target: Decoder, position_mode: str | None = None) -> "EagleDraft":
        """A draft in the EAGLE-3 layout for this target decoder (its embedding is shared)."""
        from .draft_format import load_eagle3

        return load_eagle3(directory, target, position_mode)
