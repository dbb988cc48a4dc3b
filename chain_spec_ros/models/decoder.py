"""Qwen3-VL text decoder: pre-norm transformer with GQA, per-head q/k RMSNorm, SwiGLU, M-RoPE.

Parameter names are those of transformers' Qwen3VLTextModel (embed_tokens, layers.i.self_attn.
q_proj ..., norm) plus lm_head, so a real Qwen3-VL checkpoint loads with a prefix strip
(`load_hf_text_weights`). Deepstack: the vision tower's early-block features are added to the
hidden states after the first decoder layers, at the image positions only.
"""
from __future__ import annotations

from functools import partial
from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import DecoderConfig
from .kv_cache import KVCache
from .rope import RotaryEmbedding, rotate

# Given this forward's rotated keys/values [B, kv_heads, T, head_dim], return what to attend over.
KVHook = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]
# What an attention layer attends with: F.scaled_dot_product_attention's arguments and maths. The
# layers hold it as their `attention`, so the ONNX exporter can trace one model instance with an
# exportable implementation (engines/export.py) while every other model keeps SDPA.
AttentionFunction = Callable[..., Tensor]


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in fp32 (as Qwen3 does) so low-precision runs stay stable."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class Attention(nn.Module):
    """Grouped-query attention; q and k are RMS-normalised per head before the rotation (Qwen3).

    input_size: the width q, k and v read (default `hidden`; EAGLE-3's draft layer reads its
    2 x hidden [embedding; feature] input); qk_norm=False gives a Llama attention, as EAGLE-3's
    draft layer has."""

    def __init__(self, hidden: int, num_heads: int, num_kv_heads: int, head_dim: int, eps: float,
                 input_size: int | None = None, qk_norm: bool = True):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        input_size = input_size or hidden
        self.q_proj = nn.Linear(input_size, num_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(input_size, num_kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(input_size, num_kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden, bias=False)
        self.q_norm = RMSNorm(head_dim, eps) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(head_dim, eps) if qk_norm else nn.Identity()
        self.attention: AttentionFunction = F.scaled_dot_product_attention

    def project(self, x: Tensor, cos: Tensor, sin: Tensor, last_query_only: bool = False
                ) -> tuple[Tensor, Tensor, Tensor]:
        """Rotated q [B, heads, T, hd] (the last position's only, [B, heads, 1, hd], with
        last_query_only) and k, v [B, kv_heads, T, hd]. Also used by attention analysis."""
        B, T, _ = x.shape
        k = rotate(self.k_norm(self.k_proj(x).view(B, T, -1, self.head_dim)).transpose(1, 2), cos, sin)
        v = self.v_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        if last_query_only:
            x, cos, sin = x[:, -1:], cos[:, -1:], sin[:, -1:]
        q = self.q_norm(self.q_proj(x).view(B, x.shape[1], -1, self.head_dim)).transpose(1, 2)
        return rotate(q, cos, sin), k, v

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, kv_hook: KVHook | None,
                mask: Tensor | None, last_only: bool = False) -> Tensor:
        """last_only: every position's key and value goes to kv_hook, but only the last position
        queries (the others' outputs are never read)."""
        q, k, v = self.project(x, cos, sin, last_query_only=last_only)
        if kv_hook is not None:  # cache the rotated keys, so cached keys never need re-rotation
            k, v = kv_hook(k, v)
        if last_only:
            mask = None if mask is None else mask[..., -1:, :]
        y = self.attention(q, k, v, attn_mask=mask, enable_gqa=True)
        return self.o_proj(y.transpose(1, 2).reshape(x.shape[0], q.shape[2], -1))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Pre-norm block. Also used by the action expert, with its own (narrower) sizes."""

    def __init__(self, hidden: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 intermediate: int, eps: float):
        super().__init__()
        self.input_layernorm = RMSNorm(hidden, eps)
        self.self_attn = Attention(hidden, num_heads, num_kv_heads, head_dim, eps)
        self.post_attention_layernorm = RMSNorm(hidden, eps)
        self.mlp = MLP(hidden, intermediate)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, kv_hook: KVHook | None = None,
                mask: Tensor | None = None, last_only: bool = False) -> Tensor:
        """last_only: every position writes its keys and values (through kv_hook) but only the
        last one runs attention and the MLP, [B, 1, D] out. For a one-layer draft that is all a
        prompt or a block of accepted tokens needs: nothing reads the other positions' outputs."""
        attended = self.self_attn(self.input_layernorm(x), cos, sin, kv_hook, mask, last_only)
        x = (x[:, -1:] if last_only else x) + attended
        return x + self.mlp(self.post_attention_layernorm(x))


def causal_mask(num_new: int, past: int, device: torch.device | None = None) -> Tensor | None:
    """Bool mask [T, past + T]: new token i (absolute position past + i) sees keys 0..past + i.

    None for a single new token, which may see everything in the cache.
    """
    if num_new == 1:
        return None
    keys = torch.arange(past + num_new, device=device)
    queries = past + torch.arange(num_new, device=device)
    return keys[None, :] <= queries[:, None]


class Decoder(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                         cfg.intermediate_size, cfg.rms_norm_eps)
            for _ in range(cfg.num_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.rotary_emb = RotaryEmbedding(cfg.head_dim, cfg.rope_theta, cfg.mrope_section)

    def embed(self, input_ids: Tensor) -> Tensor:
        return self.embed_tokens(input_ids)

    def forward(
        self,
        inputs_embeds: Tensor,
        position_ids: Tensor,
        cache: KVCache | None = None,
        return_hidden_layers: Sequence[int] = (),
        num_logits: int | None = None,
        deepstack: Tensor | None = None,
    ) -> tuple[Tensor, list[Tensor]]:
        """Run the stack over T new tokens.

        inputs_embeds [B, T, D]; position_ids [3, B, T] (M-RoPE) or [B, T] (text: all axes equal).
        With a cache the new tokens attend to the cached prefix plus themselves (causally) and
        the cache advances by T. return_hidden_layers: indices i whose block output (before the
        final norm) is returned, in that order (EAGLE-3 fuses low/mid/high features).
        num_logits: only project the last n positions through lm_head (saves time at prefill).
        deepstack [L, B, T, D]: added to the output of layer i < L; zero except at image positions
        (`TargetVLA.build_inputs_embeds` lays it out), so adding it everywhere is exact.
        Returns logits [B, T or n, vocab] and the list of requested hidden states [B, T, D].
        """
        T = inputs_embeds.shape[1]
        cos, sin = self.rotary_emb(position_ids)
        past = cache.length if cache is not None else 0
        mask = causal_mask(T, past, inputs_embeds.device)
        wanted = {i % len(self.layers) for i in return_hidden_layers}
        saved: dict[int, Tensor] = {}
        x = inputs_embeds
        for i, layer in enumerate(self.layers):
            hook = partial(cache.append, i) if cache is not None else None
            x = layer(x, cos, sin, hook, mask)
            if deepstack is not None and i < deepstack.shape[0]:
                x = x + deepstack[i].to(x.dtype)
            if i in wanted:
                saved[i] = x
        if cache is not None:
            cache.advance(T)
        if num_logits is not None:
            x = x[:, -num_logits:]
        logits = self.lm_head(self.norm(x))
        return logits, [saved[i % len(self.layers)] for i in return_hidden_layers]


def load_hf_text_weights(model: Decoder, hf_state_dict: Mapping[str, Tensor]) -> None:
    """Load a transformers Qwen3-VL text model's weights into `model` (in place).

    Accepts a Qwen3VLTextModel state dict (keys `embed_tokens...`, `layers...`, `norm...`,
    possibly under `model.`), or a Qwen3VLForConditionalGeneration one (`model.language_model.*`
    plus `lm_head.weight`; vision keys are ignored). A missing lm_head means tied embeddings.
    """
    prefixes = ("model.language_model.", "language_model.", "model.")
    own = model.state_dict()
    mapped: dict[str, Tensor] = {}
    for key, value in hf_state_dict.items():
        for p in prefixes:
            if key.startswith(p):
                key = key[len(p):]
                break
        if key in own:
            mapped[key] = value
    if "lm_head.weight" not in mapped:
        mapped["lm_head.weight"] = mapped["embed_tokens.weight"]
    missing = sorted(set(own) - set(mapped))
    if missing:
        raise KeyError(f"weights missing from the HF state dict: {missing[:8]}")
    model.load_state_dict(mapped)
