"""PyTorch backend (CPU, or CUDA when present): the reference every other backend is tested against."""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..models.draft import EagleDraft
from ..models.kv_cache import KVCache
from ..models.rope import rotate_half
from ..models.target import TargetVLA
from ..models.vision import VisualFeatures
from .base import DraftEngine, TargetEngine, TrajectoryOut, require_expert


class TorchTargetEngine(TargetEngine):
    backend = "torch"

    def __init__(self, model: TargetVLA, feature_layers: list[int] | None = None, device: str | None = None):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.eval().to(self.device)
        self.config = model.cfg
        self.feature_layers = list(feature_layers or [])
        self.cache: KVCache | None = None

    def start(self, max_len: int) -> None:
        if self.cache is None or self.cache.max_len < max_len:  # allocate once, reuse across requests
            self.cache = self.model.new_cache(1, max_len)
        self.cache.reset()

    @torch.inference_mode()
    def encode_images(self, images: np.ndarray) -> VisualFeatures:
        return self.model.encode_images(torch.from_numpy(images).to(self.device))

    @torch.inference_mode()
    def prefill(self, input_ids: np.ndarray, visual: VisualFeatures | None, positions: Tensor
                ) -> tuple[Tensor, list[Tensor]]:
        if visual is not None:  # features another engine encoded (on the CPU) work too
            visual = VisualFeatures(*(t.to(self.device) for t in visual))
        logits, features = self.model.prefill(torch.from_numpy(input_ids)[None].to(self.device), visual,
                                              positions.to(self.device), self.cache,
                                              return_hidden_layers=self.feature_layers, num_logits=1)
        return logits[0, -1].cpu(), [f.cpu() for f in features]

    @torch.inference_mode()
    def decode(self, tokens: list[int], rope_delta: int) -> tuple[Tensor, list[Tensor]]:
        logits, features = self.model.decode(torch.tensor([tokens], device=self.device), self.cache, rope_delta,
                                             return_hidden_layers=self.feature_layers)
        return logits[0].cpu(), [f.cpu() for f in features]

    def crop(self, length: int) -> None:
        self.cache.crop(length)

    @property
    def length(self) -> int:
        return self.cache.length

    @torch.inference_mode()
    def trajectory(self, rope_delta: int, speed: float, steps: int | None, seed: int) -> TrajectoryOut:
        require_expert(self.config)
        generator = torch.Generator(device=self.device).manual_seed(seed)
        trajectory = self.model.trajectory(self.cache, rope_delta, float(speed), steps, generator)
        return TrajectoryOut.from_trajectory(trajectory)


class TorchDraftEngine(DraftEngine):
    backend = "torch"

    def __init__(self, draft: EagleDraft, device: str | None = None):
        """The engine serves the draft's weights as they are now (the chain step keeps fused
        copies, as an export does): build a new engine after changing them."""
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.draft = draft.eval().to(self.device)
        self.config = draft.cfg
        self.cache: KVCache | None = None
        self.chain_step = FusedChainStep(self.draft)

    def start(self, max_len: int) -> None:
        if self.cache is None or self.cache.max_len < max_len:
            self.cache = self.draft.new_cache(max_len)
        self.cache.reset()

    @torch.inference_mode()
    def fuse(self, features: list[Tensor]) -> Tensor:
        return self.draft.fuse_features([f.to(self.device) for f in features])

    @torch.inference_mode()
    def step(self, tokens: list[int], features: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        hidden = self.draft(torch.tensor([tokens], device=self.device), features.to(self.device),
                            positions[:, None].to(self.device), self.cache, last_only=True)
        return hidden, self.draft.proposal_logits(hidden)[0, -1].cpu()

    def chain_steps(self, hidden: Tensor) -> Callable[[int, Tensor], Tensor]:
        """`DraftEngine.chain_steps` through `FusedChainStep`; the logits [V] are returned in one
        buffer, rewritten by the next step (the base class's contract allows it)."""
        hidden = hidden.reshape(-1).to(self.device)
        logits = torch.full((self.config.target_vocab_size,), float("-inf"), device=self.device)
        target_ids = self.draft.target_ids

        @torch.inference_mode()
        def advance(token: int, position: Tensor) -> Tensor:
            nonlocal hidden
            hidden, inside = self.chain_step(token, hidden, position, self.cache)
            return logits.index_copy_(0, target_ids, inside).cpu()
        return advance

    def crop(self, length: int) -> None:
        self.cache.crop(length)

    @property
    def length(self) -> int:
        return self.cache.length


class FusedChainStep:
    """One chain step of the draft (a single token after the cache) written for eager PyTorch,
    where a step of this small layer costs mostly per-operator overhead: no batch or time axes,
    q/k/v and gate/up each one product over weights concatenated once, each RMSNorm's weight
    folded into the product that reads its output, the rotary angles a row of a 1-D table, and
    one query's grouped attention as two products.

    Why: drafting runs about 12 chain steps per verify pass. With the bundled draft on the
    2-core Zen 2 host a step through the module code took 0.82-0.86 ms and this one 0.40 ms
    (alternating in one process); the target's layers run the module code in both decoding
    modes, so the saving is the draft's own. The maths is `EagleDraft.forward` for one token with `last_only`, every
    configuration variant included, rounded differently (the folded weights);
    `test_fused_chain_step_equals_the_module_step` holds the two within 1e-5.
    """

    def __init__(self, draft: EagleDraft):
        cfg, layer = draft.cfg, draft.layers[0]
        attention, mlp = layer.self_attn, layer.mlp
        self.draft, self.layer, self.cfg = draft, layer, cfg
        self.heads, self.kv_heads, self.head_dim = attention.num_heads, attention.num_kv_heads, attention.head_dim
        with torch.no_grad():
            input_norms = torch.cat([layer.input_layernorm.weight, layer.hidden_norm.weight])
            self.qkv_weight = torch.cat([attention.q_proj.weight, attention.k_proj.weight,
                                         attention.v_proj.weight]) * input_norms
            self.gate_up_weight = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]) * layer.post_attention_layernorm.weight
            self.head_weight = draft.lm_head.weight if cfg.norm_output else draft.lm_head.weight * draft.norm.weight
            dtype, device = self.qkv_weight.dtype, self.qkv_weight.device
            self.eps = torch.tensor(cfg.rms_norm_eps, device=device)
            # Chain steps are past the prompt, where every position is text: (p, p, p) in both
            # position modes, so one row of a 1-D table gives the angles.
            cos, sin = draft.rotary_emb(torch.arange(cfg.max_positions, device=device)[None])
            self.cos, self.sin = cos[0].to(dtype), sin[0].to(dtype)

    def rotation(self, position: Tensor) -> tuple[Tensor, Tensor]:
        """cos, sin [head_dim] at position [3, 1]: a table row, or computed off the table."""
        t, h, w = position[:, 0].tolist()
        if t == h == w and 0 <= t < len(self.cos):
            return self.cos[t], self.sin[t]
        cos, sin = self.draft.rotary_emb(position[:, None].to(self.cos.device))
        return cos[0, 0].to(self.cos.dtype), sin[0, 0].to(self.cos.dtype)

    def unit_rms(self, x: Tensor) -> Tensor:
        """x / rms(x) in fp32, as RMSNorm computes it (a half-precision sum of squares overflows
        at realistic widths), without the weight (folded into the next product)."""
        xf = x.float()
        return (xf * torch.add(self.eps, torch.dot(xf, xf), alpha=1 / x.shape[-1]).rsqrt_()).to(x.dtype)

    def __call__(self, token: int, hidden: Tensor, position: Tensor, cache: KVCache) -> tuple[Tensor, Tensor]:
        """(token, the previous step's hidden state [D], position [3, 1]) -> (this step's hidden
        state [D], its logits over the draft vocabulary); the step's key and value enter the cache."""
        cfg, attention = self.cfg, self.layer.self_attn
        heads, kv_heads, head_dim = self.heads, self.kv_heads, self.head_dim
        embeds = self.draft.embed_tokens.weight[token]
        rows = F.linear(torch.cat([self.unit_rms(embeds), self.unit_rms(hidden)]), self.qkv_weight).view(-1, head_dim)
        qk = rows[:heads + kv_heads]  # q heads, then k heads: rotated together
        if cfg.qk_norm:
            qk = torch.cat([attention.q_norm(qk[:heads]), attention.k_norm(qk[heads:])])
        cos, sin = self.rotation(position)
        qk = qk * cos + rotate_half(qk) * sin
        keys, values = cache.append(0, qk[heads:].view(1, kv_heads, 1, head_dim),
                                    rows[heads + kv_heads:].view(1, kv_heads, 1, head_dim))
        cache.advance(1)
        # Query head i reads kv head i // (heads / kv_heads), as enable_gqa does.
        scores = qk[:heads].view(kv_heads, -1, head_dim) @ keys[0].transpose(1, 2)
        attended = (scores.mul_(head_dim ** -0.5).softmax(-1) @ values[0]).view(-1)
        residual = self.layer.hidden_norm(hidden) if cfg.norm_before_residual else hidden
        x = residual + F.linear(attended, attention.o_proj.weight)
        gate, up = F.linear(self.unit_rms(x), self.gate_up_weight).chunk(2)
        x = x + F.linear(F.silu(gate) * up, self.layer.mlp.down_proj.weight)
        if cfg.norm_output:
            x = self.draft.norm(x)
            return x, F.linear(x, self.head_weight)
        return x, F.linear(self.unit_rms(x), self.head_weight)
