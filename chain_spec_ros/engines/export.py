"""`chain-spec-export`: the target and the draft as ONNX graphs with the KV cache as explicit tensors.

    chain-spec-export --models MODELS [--draft MODELS/draft] [--out MODELS/onnx] [--k 16]

Every graph is traced (TorchScript exporter, opset 17) from the existing torch modules through a
thin wrapper that turns the stateful `KVCache` into explicit inputs and outputs; no layer is
re-implemented. The one substitution: while a model instance is traced, its attention layers
attend (`attention_in`) with plain matmuls with grouped queries (`grouped_attention`, tested
equal to SDPA) in the graphs with a dynamic token axis, and with ONNX Runtime's
GroupQueryAttention over the cache buffer in the fixed-size ones (`_InPlaceCacheAttention`).
Each draft graph also gets an int8 twin (`quantize_int8`), which ONNX Runtime's CPU provider runs.

The files, their inputs and outputs and the cache contract they follow are the export format,
described in manifest.py.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import sys
import warnings
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from ..constants import DEFAULT_K
from ..models.decoder import Attention, AttentionFunction, Decoder
from ..models.draft import EagleDraft, eagle3_feature_layers
from ..models.expert import TrajectoryExpert
from ..models.target import TargetVLA
from ..models.vision import VisionAttention, VisionTower
from .manifest import (EMBED_TABLE, EXPERT_GRAPH, FORMAT_VERSION, KV_APPEND, KV_IN_PLACE, MANIFEST, ONNX_DIR,
                       fingerprint, fixed_name, hidden_name, new_kv_names, past_names, present_names)

OPSET = 17  # LayerNormalization as one op; supported by ONNX Runtime and TensorRT 10/11


# --- wrappers: the torch modules with the cache as explicit tensors ------------------------------

def cache_mask(past_length: Tensor, num_new: int, cache_len: int) -> Tensor:
    """Bool [T, S + T] over keys [whole cache buffer ; new tokens]: slot j is visible when
    j < past_length, new token i' when i' <= i (causal)."""
    keys = torch.arange(cache_len + num_new, device=past_length.device)[None]
    queries = torch.arange(num_new, device=past_length.device)[:, None]
    return (keys < past_length) | ((keys >= cache_len) & (keys - cache_len <= queries))


def _attend_over_buffer(past_k: Tensor, past_v: Tensor, new: list[tuple[Tensor, Tensor]]):
    """KV hook for a layer: record this forward's rotated k, v (a graph output) and attend over
    [whole cache buffer ; new k, v]; `cache_mask` hides the invalid slots."""
    def hook(k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        new.append((k, v))
        return torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)
    return hook


class _GroupQueryAttention(torch.autograd.Function):
    """ONNX Runtime's `com.microsoft.GroupQueryAttention` over the engine's cache buffer.

    q [B, heads, T, d] and the T new k, v [B, kv_heads, T, d] come rotated (and q/k-normed) from
    the layer, as for `grouped_attention`; the op attends over the valid prefix of the buffer
    (`past_length` slots) plus the new tokens, causally, and returns the buffer with the new
    keys/values written at [past_length, past_length + T). When the engine binds that output
    to the input buffer's memory, ONNX Runtime writes in place (its shared past/present mode).
    `forward` is the same maths in torch (what the tracer runs); `symbolic` is what the graph gets
    (`sizes` = (B, heads, kv_heads, T, d) as ints: the tracer's values carry no static shapes).
    """

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, past_k: Tensor, past_v: Tensor, past_length: Tensor,
                sizes: tuple[int, ...]):
        T, S = q.shape[2], past_k.shape[2]
        y = grouped_attention(q, torch.cat([past_k, k], 2), torch.cat([past_v, v], 2),
                              attn_mask=cache_mask(past_length, T, S), enable_gqa=True)
        slots = past_length + torch.arange(T)
        return y, past_k.index_copy(2, slots, k), past_v.index_copy(2, slots, v)

    @staticmethod
    def symbolic(g, q, k, v, past_k, past_v, past_length, sizes):
        from torch.onnx import TensorProtoDataType as DType

        batch, heads, kv_heads, tokens, head_dim = sizes

        def const(values: list[int]):
            return g.op("Constant", value_t=torch.tensor(values, dtype=torch.long))

        def to_bsh(x):  # [B, N, T, d] -> [B, T, N * d]
            return g.op("Reshape", g.op("Transpose", x, perm_i=[0, 2, 1, 3]), const([batch, tokens, -1]))

        seqlens_k = g.op("Cast", g.op("Add", past_length, const([tokens - 1])), to_i=DType.INT32)  # last index
        total = g.op("Cast", g.op("Reshape", g.op("Add", past_length, const([tokens])), const([])), to_i=DType.INT32)
        y, present_k, present_v = g.op("com.microsoft::GroupQueryAttention", to_bsh(q), to_bsh(k), to_bsh(v), past_k,
                                       past_v, seqlens_k, total, num_heads_i=heads, kv_num_heads_i=kv_heads, outputs=3)
        y.setType(q.type().with_sizes([batch, tokens, heads * head_dim]))
        present_k.setType(past_k.type())
        present_v.setType(past_v.type())
        y = g.op("Transpose", g.op("Reshape", y, const([batch, tokens, heads, head_dim])), perm_i=[0, 2, 1, 3])
        return y, present_k, present_v


class _InPlaceCacheAttention:
    """Attention for the fixed-size step graphs: each layer's scaled-dot-product attention is
    one `_GroupQueryAttention` over that layer's cache buffer, and the buffers it returns
    (`presents`, in layer order) are graph outputs the engine aliases to its cache.

    Why: at decode and verify sizes the plain-ops attention (mask from `past_length`, concat,
    grouped matmuls, softmax, the shape arithmetic between them) is ~35 ONNX nodes per layer,
    and ONNX Runtime's CPU cost at these sizes is mostly per node; the fused kernel also reads
    only the valid prefix, and the engine no longer copies the new keys/values after the step.
    """

    def __init__(self, past_length: Tensor):
        self.past_length = past_length
        self.presents: list[tuple[Tensor, Tensor]] = []
        self._pending: tuple[Tensor, Tensor] | None = None

    def hook(self, past_k: Tensor, past_v: Tensor):
        """KV hook for a layer: attend over the new k, v only; the buffer joins in `attention`."""
        def kv_hook(k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
            self._pending = (past_k, past_v)
            return k, v
        return kv_hook

    def attention(self, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None, dropout_p: float = 0.0,
                  is_causal: bool = False, scale: float | None = None, enable_gqa: bool = False) -> Tensor:
        if q.shape[2] != k.shape[2] or attn_mask is not None or scale is not None:
            raise ValueError("in-place cache attention needs one query per new key (no last_only over T > 1), "
                             "its own causal mask and the default scale")
        (past_k, past_v), self._pending = self._pending, None
        sizes = (q.shape[0], q.shape[1], k.shape[1], q.shape[2], q.shape[3])
        y, present_k, present_v = _GroupQueryAttention.apply(q, k, v, past_k, past_v, self.past_length, sizes)
        self.presents.append((present_k, present_v))
        return y


@contextlib.contextmanager
def attention_in(model: nn.Module, attention: AttentionFunction) -> Iterator[None]:
    """While tracing: every attention layer of this model instance (decoder, expert, draft and
    vision layers alike) attends with `attention`; each gets its own function back afterwards.
    Other instances, and the rest of the process, keep SDPA."""
    layers = [m for m in model.modules() if isinstance(m, (Attention, VisionAttention))]
    own = [layer.attention for layer in layers]
    for layer in layers:
        layer.attention = attention
    try:
        yield
    finally:
        for layer, function in zip(layers, own):
            layer.attention = function


class _BufferView:
    """The engine's cache buffers, read only, behind the two `KVCache` members the expert uses.
    `length` is the buffer size S; the valid count goes in as the expert's `prefix_lengths`."""

    def __init__(self, keys: Sequence[Tensor], values: Sequence[Tensor]):
        self.keys, self.values = keys, values

    @property
    def length(self) -> int:
        return self.keys[0].shape[2]

    def get(self, layer: int) -> tuple[Tensor, Tensor]:
        return self.keys[layer], self.values[layer]


class VisionStep(nn.Module):
    """`VisionTower.forward` (patchify included) on camera frames uint8 [N, H, W, 3] BGR ->
    image_embeds, plus deepstack when the tower has deepstack layers (a runner cannot use an
    output of size zero).

    The frames are cast to float first: the same values (`patchify` casts the 0..255 pixels
    itself), but TensorRT takes uint8 only at the inputs and into a Cast, not into the BGR flip."""

    def __init__(self, vision: VisionTower):
        super().__init__()
        self.vision = vision

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        visual = self.vision(images.float())
        return (visual.embeds, visual.deepstack) if visual.deepstack.shape[0] else (visual.embeds,)


def _cache_attention(in_place: bool, model: nn.Module, past: Sequence[Tensor], past_length: Tensor, num_new: int):
    """How the layers of a step graph's `model` attend over the cache: (the context to run them
    in, the KV hook of layer i, the mask, the list that collects each layer's (key, value) graph
    outputs).

    Appending (`in_place=False`): plain-ops attention over [buffer ; new] under `cache_mask`; the
    outputs are the new tokens' keys/values, which the engine copies into its cache. In place:
    `_InPlaceCacheAttention`; the outputs are the whole buffers, aliased to the engine's cache.
    """
    n = len(past) // 2
    if in_place:
        attention = _InPlaceCacheAttention(past_length)
        context = attention_in(model, attention.attention)
        return context, lambda i: attention.hook(past[i], past[n + i]), None, attention.presents
    new: list[tuple[Tensor, Tensor]] = []
    mask = cache_mask(past_length, num_new, past[0].shape[2])
    return contextlib.nullcontext(), lambda i: _attend_over_buffer(past[i], past[n + i], new), mask, new


class DecoderStep(nn.Module):
    """`Decoder.forward` with the cache as inputs/outputs: the same rotary table, layers,
    deepstack additions, final norm and LM head; only the attention over the cache differs
    (`_cache_attention`)."""

    def __init__(self, decoder: Decoder, feature_layers: Sequence[int], deepstack_layers: int, in_place: bool = False):
        super().__init__()
        self.decoder, self.deepstack_layers, self.in_place = decoder, deepstack_layers, in_place
        n = len(decoder.layers)
        self.feature_layers = sorted({i % n for i in feature_layers})  # one output per distinct layer

    def forward(self, inputs_embeds: Tensor, positions: Tensor, past_length: Tensor, logit_index: Tensor,
                *rest: Tensor) -> tuple[Tensor, ...]:
        """rest: deepstack [L, 1, T, D] when the target has deepstack layers, then the cache buffers."""
        deepstack, past = (rest[0], rest[1:]) if self.deepstack_layers else (None, rest)
        cos, sin = self.decoder.rotary_emb(positions[:, None])
        context, hook, mask, kv = _cache_attention(self.in_place, self.decoder, past, past_length, inputs_embeds.shape[1])
        saved: dict[int, Tensor] = {}
        x = inputs_embeds
        with context:
            for i, layer in enumerate(self.decoder.layers):
                x = layer(x, cos, sin, hook(i), mask)
                if i < self.deepstack_layers:
                    x = x + deepstack[i]
                saved[i] = x
        logits = self.decoder.lm_head(self.decoder.norm(x.index_select(1, logit_index)))
        hidden = [saved[i] for i in self.feature_layers]
        return (logits, *hidden, *[k for k, _ in kv], *[v for _, v in kv])


class ExpertStep(nn.Module):
    """One velocity evaluation of `TrajectoryExpert.forward` over a fixed cache buffer: its
    `prefix_lengths` path (used in training for ragged batches) masks the slots past the valid
    length and places the action tokens right after it, as the unmasked path does."""

    def __init__(self, expert: TrajectoryExpert):
        super().__init__()
        self.expert = expert

    def forward(self, actions: Tensor, flow_time: Tensor, valid_length: Tensor, rope_delta: Tensor,
                *past: Tensor) -> Tensor:
        n = len(past) // 2
        return self.expert(actions, flow_time, _BufferView(past[:n], past[n:]), rope_delta,
                           prefix_lengths=valid_length)


class DraftStep(nn.Module):
    """`EagleDraft.forward` for the last position only (`last_only`) + its logits, with the
    one-layer cache explicit."""

    def __init__(self, draft: EagleDraft, in_place: bool = False):
        super().__init__()
        self.draft, self.in_place = draft, in_place

    def forward(self, token_ids: Tensor, features: Tensor, positions: Tensor, past_length: Tensor,
                past_key: Tensor, past_value: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        context, hook, mask, kv = _cache_attention(self.in_place, self.draft, [past_key, past_value], past_length,
                                                   token_ids.shape[1])
        with context:
            hidden = self.draft(token_ids, features, positions[:, None], kv_hook=hook(0), mask=mask, last_only=True)
        logits = self.draft.proposal_logits(hidden[:, -1])
        return hidden, logits, kv[0][0], kv[0][1]


class DraftFuse(nn.Module):
    def __init__(self, draft: EagleDraft):
        super().__init__()
        self.draft = draft

    def forward(self, *features: Tensor) -> Tensor:
        return self.draft.fuse_features(list(features))


def grouped_attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None, dropout_p: float = 0.0,
                      is_causal: bool = False, scale: float | None = None, enable_gqa: bool = False) -> Tensor:
    """`F.scaled_dot_product_attention` (same arguments, same maths) written with matmuls that
    trace to plain ONNX, with grouped-query attention done by grouping the queries per KV head
    ([B, kv, rep * T, d] @ [B, kv, d, S]) instead of repeating K/V to every query head.

    Why: the TorchScript exporter cannot export SDPA with enable_gqa at all, and its SDPA
    lowering adds a run-time scale and NaN guards; repeating K/V would copy the whole cache
    buffer once more per layer and step. Measured on the d256 x 8 target, ONNX Runtime CPU:
    about 15% less time per decode step than repeat + SDPA.
    """
    if dropout_p or is_causal:
        raise ValueError("grouped_attention exports inference attention only: no dropout, explicit masks instead of is_causal")
    b, heads, t, d = q.shape
    kv_heads = k.shape[1]
    rep = heads // kv_heads
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    scores = torch.matmul((q * scale).reshape(b, kv_heads, rep * t, d), k.transpose(-2, -1))
    scores = scores.reshape(b, kv_heads, rep, t, -1)
    if attn_mask is not None:
        if attn_mask.dim() == 4:  # [B, 1, T or 1, S] -> [B, 1, 1, T or 1, S]
            attn_mask = attn_mask.unsqueeze(2)
        scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask
    probs = torch.softmax(scores, dim=-1).reshape(b, kv_heads, rep * t, -1)
    return torch.matmul(probs, v).reshape(b, heads, t, d)


def _export(module: nn.Module, args: tuple, path: Path, inputs: list[str], outputs: list[str],
            dynamic: dict[str, dict[int, str]], opset: int) -> None:
    import onnx

    with torch.no_grad(), attention_in(module, grouped_attention), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about shape arithmetic and the legacy exporter
        torch.onnx.export(module.eval(), args, str(path), input_names=inputs, output_names=outputs,
                          dynamic_axes=dynamic, opset_version=opset, dynamo=False, do_constant_folding=True)
        results = module(*args)
    # Declare the output shapes exactly (the exporter's inference names static dims symbolically
    # at times): the example run's sizes, with the dynamic axes named.
    results = results if isinstance(results, tuple) else (results,)
    model = onnx.load(str(path))
    for value, result in zip(model.graph.output, results):
        dims = value.type.tensor_type.shape.dim
        del dims[:]
        for axis, size in enumerate(result.shape):
            dim = dims.add()
            if axis in dynamic.get(value.name, {}):
                dim.dim_param = dynamic[value.name][axis]
            else:
                dim.dim_value = size
    onnx.save(model, str(path))


# --- manifest entries -----------------------------------------------------------------------------

def _graph_io(path: Path) -> dict:
    import onnx

    model = onnx.load(str(path), load_external_data=False)

    def dims(value) -> list:
        return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]

    def elem(value) -> str:
        return onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type).name

    return {"file": path.name,
            "inputs": {v.name: {"shape": dims(v), "dtype": elem(v)} for v in model.graph.input},
            "outputs": {v.name: {"shape": dims(v), "dtype": elem(v)} for v in model.graph.output}}


def _step_variants(fixed_tokens: Sequence[int]) -> list[int | None]:
    """None = the graph with a dynamic token axis, then one fixed-size graph per entry."""
    return [None, *sorted(set(fixed_tokens))]


def _present_axes(in_place: bool, num_layers: int) -> dict[str, dict[int, str]]:
    return {name: {2: "cache_len"} for name in present_names(num_layers)} if in_place else {}


def _step_entry(path: Path, fixed: int | None, in_place: bool) -> dict:
    """Manifest entry of a step graph: its I/O, its token count (None: dynamic) and how it
    updates the cache (manifest.KV_IN_PLACE or KV_APPEND)."""
    return {**_graph_io(path), "tokens": fixed, "kv_update": KV_IN_PLACE if in_place else KV_APPEND}


def export_target(model: TargetVLA, out: Path, feature_layers: Sequence[int], opset: int = OPSET,
                  fixed_tokens: Sequence[int] = (1, DEFAULT_K + 1)) -> dict:
    """Vision tower, decoder steps and (when the target has one) expert step of `model` into
    `out`, and the embedding table; returns the manifest's graph entries."""
    dec = model.cfg.decoder
    S = 12 + max(fixed_tokens, default=0)  # example sizes for tracing (room for 8 + T); the cache axis is dynamic
    past = [torch.zeros(1, dec.num_kv_heads, S, dec.head_dim) for _ in range(2 * dec.num_layers)]
    graphs = {"target_vision": _export_vision(model.vision, out, opset),
              **_export_decoders(model, past, out, feature_layers, opset, fixed_tokens)}
    if model.expert is not None:  # a VLM-only target (no trajectory head) has no expert graph
        graphs[EXPERT_GRAPH] = _export_expert(model.expert, past, out, opset)
    np.save(out / EMBED_TABLE, model.decoder.embed_tokens.weight.detach().float().numpy())
    return graphs


def _export_vision(vision: VisionTower, out: Path, opset: int) -> dict:
    cfg = vision.cfg
    images = torch.zeros(2, cfg.image_height, cfg.image_width, 3, dtype=torch.uint8)
    outputs = ["image_embeds", "deepstack"] if cfg.deepstack_visual_indexes else ["image_embeds"]
    _export(VisionStep(vision), (images,), out / "target_vision.onnx", ["images"], outputs,
            {"images": {0: "num_images"}, "image_embeds": {0: "num_images"}, "deepstack": {1: "num_images"}}, opset)
    return _graph_io(out / "target_vision.onnx")


def _export_decoders(model: TargetVLA, past: list[Tensor], out: Path, feature_layers: Sequence[int], opset: int,
                     fixed_tokens: Sequence[int]) -> dict:
    """The decoder step with a dynamic token axis (prefill, any verify width), and one graph per
    size in `fixed_tokens` (decode: 1, verify: k + 1) with that axis fixed, so its shape
    arithmetic folds into constants (about 20% less time per decode step in ONNX Runtime on CPU,
    whose decode cost at this model size is mostly per-operator overhead), and with in-place
    GroupQueryAttention (`_InPlaceCacheAttention`: 476 nodes -> 308 in the verify graph; graph
    alone, 2 threads: decode 758 -> 596 us, 17-token verify 1763 -> 1458 us). TensorRT uses the
    dynamic graph with one optimisation profile per size instead."""
    dec = model.cfg.decoder
    n, layers = dec.num_layers, len(model.cfg.vision.deepstack_visual_indexes)
    deepstack_input = ["deepstack"] if layers else []
    cache_axes = {name: {2: "cache_len"} for name in past_names(n)}
    hidden = [hidden_name(i) for i in DecoderStep(model.decoder, feature_layers, layers).feature_layers]
    graphs = {}
    for fixed in _step_variants(fixed_tokens):
        T = fixed or 3
        name = "target_decoder" if fixed is None else fixed_name("target_decoder", fixed)
        token_axes = {} if fixed else {
            "inputs_embeds": {1: "tokens"}, "positions": {1: "tokens"}, "logit_index": {0: "logit_rows"},
            "deepstack": {2: "tokens"}, "logits": {1: "logit_rows"}, **{h: {1: "tokens"} for h in hidden},
            **{k: {2: "tokens"} for k in new_kv_names(n)}}
        deepstack = [torch.zeros(layers, 1, T, dec.hidden_size)] if layers else []
        args = (torch.zeros(1, T, dec.hidden_size), torch.arange(T).expand(3, T).contiguous(), torch.tensor([8]),
                torch.arange(T), *deepstack, *past)
        in_place = fixed is not None
        kv_names = present_names(n) if in_place else new_kv_names(n)
        _export(DecoderStep(model.decoder, feature_layers, layers, in_place), args, out / f"{name}.onnx",
                ["inputs_embeds", "positions", "past_length", "logit_index", *deepstack_input, *past_names(n)],
                ["logits", *hidden, *kv_names], {**token_axes, **cache_axes, **_present_axes(in_place, n)}, opset)
        graphs[name] = _step_entry(out / f"{name}.onnx", fixed, in_place)
    return graphs


def _export_expert(expert: TrajectoryExpert, past: list[Tensor], out: Path, opset: int) -> dict:
    cfg, path = expert.cfg, out / f"{EXPERT_GRAPH}.onnx"
    args = (torch.zeros(1, cfg.horizon, cfg.action_dim), torch.zeros(1), torch.tensor([8]), torch.tensor([5]), *past)
    names = past_names(len(past) // 2)
    _export(ExpertStep(expert), args, path, ["actions", "flow_time", "valid_length", "rope_delta", *names], ["velocity"],
            {name: {2: "cache_len"} for name in names}, opset)
    return _graph_io(path)


def export_draft(draft: EagleDraft, out: Path, opset: int = OPSET, fixed_tokens: Sequence[int] = (1,)) -> dict:
    """The draft's step graph (dynamic token axis, plus fixed-size variants: the chain step is
    1 token) and its feature fusion."""
    cfg = draft.cfg
    S = 12 + max(fixed_tokens, default=0)
    past = [torch.zeros(1, cfg.num_kv_heads, S, cfg.head_dim) for _ in range(2)]
    graphs = {}
    for fixed in _step_variants(fixed_tokens):
        T = fixed or 3
        name = "draft_step" if fixed is None else fixed_name("draft_step", fixed)
        token_axes = {} if fixed else {"token_ids": {1: "tokens"}, "features": {1: "tokens"}, "positions": {1: "tokens"},
                                       **{k: {2: "tokens"} for k in new_kv_names(1)}}
        args = (torch.zeros(1, T, dtype=torch.long), torch.zeros(1, T, cfg.hidden_size),
                torch.arange(T).expand(3, T).contiguous(), torch.tensor([8]), *past)
        in_place = fixed == 1  # T > 1 passes (prompt, accepted tokens) query the last position alone
        kv_names = present_names(1) if in_place else new_kv_names(1)
        _export(DraftStep(draft, in_place), args, out / f"{name}.onnx",
                ["token_ids", "features", "positions", "past_length", *past_names(1)], ["hidden", "logits", *kv_names],
                {**token_axes, **{k: {2: "cache_len"} for k in past_names(1)}, **_present_axes(in_place, 1)}, opset)
        graphs[name] = _step_entry(out / f"{name}.onnx", fixed, in_place)
    names = [f"feature_{j}" for j in range(len(cfg.feature_layers))]
    _export(DraftFuse(draft), tuple(torch.zeros(1, 3, cfg.hidden_size) for _ in names), out / "draft_fuse.onnx",
            names, ["fused"], {**{name: {1: "tokens"} for name in names}, "fused": {1: "tokens"}}, opset)
    graphs["draft_fuse"] = _graph_io(out / "draft_fuse.onnx")
    for entry in graphs.values():
        twin = quantize_int8(out / entry["file"])
        if twin is not None:
            entry["int8_file"] = twin.name
    return graphs


def quantize_int8(graph: Path) -> Path | None:
    """The graph's int8 twin beside it (`draft_step_t1.onnx` -> `draft_step_t1.int8.onnx`):
    every MatMul with a constant weight quantized per output channel, its input quantized on
    the fly (ONNX Runtime's dynamic quantization). None without onnxruntime, whose tools make it.

    Why, for the draft only: a draft step is a handful of matrix-vector products, bound by
    reading the weights, and a draft's rounding can only change which tokens are proposed,
    never what the verified output is. Measured on the 2-core Zen 2 host: a 16-token chain
    3.24 ms against 3.77 ms; 200 test scenes interleaved (benchmarks/k_sweep.py
    --fp32-draft-too), CoC speedup 2.63x against 2.56x, tau 10.39 against 10.33 (per-tensor
    scales proposed worse in a first comparison: tau 10.87 against 11.30 per channel on 60
    scenes). The target's graphs stay fp32: their logits are the output.
    """
    try:
        from onnxruntime.quantization import QuantType, quantize_dynamic
    except ImportError:
        return None
    twin = graph.with_suffix(".int8.onnx")
    with _root_logging_quiet():
        quantize_dynamic(graph, twin, op_types_to_quantize=["MatMul"], per_channel=True, weight_type=QuantType.QInt8)
    return twin


@contextlib.contextmanager
def _root_logging_quiet() -> Iterator[None]:
    """quantize_dynamic advises pre-processing through the root logger (installing a stderr
    handler when the root has none); the advice cannot be followed here (its symbolic shape
    inference stops at GroupQueryAttention), so it is silenced, without leaving a handler."""
    root = logging.getLogger()
    quiet, level = logging.NullHandler(), root.level
    root.addHandler(quiet)
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.removeHandler(quiet)
        root.setLevel(level)


def _expert_spec(expert: TrajectoryExpert | None) -> dict | None:
    """What the graph engine needs besides the expert graph to sample a trajectory: the action
    shape and the statistics that denormalise the sampled actions (None: no expert)."""
    if expert is None:
        return None
    return {"horizon": expert.cfg.horizon, "action_dim": expert.cfg.action_dim,
            "action_mean": expert.action_space.mean.tolist(), "action_std": expert.action_space.std.tolist()}


def export_models(models: str | Path, draft_dir: str | Path | None = None, out: str | Path | None = None,
                  opset: int = OPSET, k: int = DEFAULT_K) -> dict:
    """Export MODELS/target (and the draft in `draft_dir`) into `out` (default MODELS/onnx) and
    write the manifest. The target's feature outputs are the draft's feature layers, or
    EAGLE-3's default low/middle/high layers when no draft is given; `k` sizes the fixed
    verify graph (k + 1 tokens)."""
    models = Path(models)
    out = Path(out) if out is not None else models / ONNX_DIR
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)  # a half-written export must not look valid
    for old in out.glob("*.onnx"):  # never leave graphs of another export behind
        old.unlink()
    target = TargetVLA.from_pretrained(models / "target").eval()
    draft = None
    if draft_dir is not None:
        draft = EagleDraft.from_pretrained(draft_dir, target.decoder).eval()
    layers = draft.cfg.feature_layers if draft is not None else eagle3_feature_layers(target.cfg.decoder.num_layers)
    layers = sorted({i % target.cfg.decoder.num_layers for i in layers})
    graphs = export_target(target, out, layers, opset, fixed_tokens=(1, k + 1))
    if draft is not None:
        graphs.update(export_draft(draft, out, opset, fixed_tokens=(1,)))
    cfg = target.cfg
    manifest = {
        "format": FORMAT_VERSION,
        "opset": opset,
        "k": k,
        "dtype": "float32",
        "exporter": {"torch": torch.__version__},
        "target": {
            "source": str((models / "target").resolve()),
            "fingerprint": fingerprint(models / "target"),
            "feature_layers": layers,
            "num_layers": cfg.decoder.num_layers,
            "num_kv_heads": cfg.decoder.num_kv_heads,
            "head_dim": cfg.decoder.head_dim,
            "hidden_size": cfg.decoder.hidden_size,
            "vocab_size": cfg.decoder.vocab_size,
            "image_pad_id": cfg.image_pad_id,
            "deepstack_layers": len(cfg.vision.deepstack_visual_indexes),
            "expert": _expert_spec(target.expert),
        },
        "draft": None if draft is None else {
            "source": str(Path(draft_dir).resolve()),
            "fingerprint": fingerprint(draft_dir),
            "feature_layers": list(draft.cfg.feature_layers),
            "num_kv_heads": draft.cfg.num_kv_heads,
            "head_dim": draft.cfg.head_dim,
        },
        "graphs": graphs,
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def main(argv: list[str] | None = None) -> int:
    from ..paths import default_models_dir

    parser = argparse.ArgumentParser(prog="chain-spec-export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=str(default_models_dir()), help="models directory (target/ inside)")
    parser.add_argument("--draft", help="EAGLE draft directory to export too (e.g. MODELS/draft)")
    parser.add_argument("--out", help="output directory (default MODELS/onnx)")
    parser.add_argument("--opset", type=int, default=OPSET)
    parser.add_argument("--k", type=int, default=DEFAULT_K, help="draft length: a fixed-size verify graph of k + 1 tokens")
    args = parser.parse_args(argv)
    try:
        manifest = export_models(args.models, args.draft, args.out, args.opset, args.k)
    except (FileNotFoundError, ValueError) as error:
        print(f"chain-spec-export: error: {error}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else Path(args.models) / ONNX_DIR
    for name, graph in manifest["graphs"].items():
        for file in (graph["file"], graph.get("int8_file")):
            if file is not None:
                print(f"{name:20s} {file:25s} {(out / file).stat().st_size / 1e6:7.2f} MB")
    print(f"manifest: {out / MANIFEST} (feature layers {manifest['target']['feature_layers']}, opset {manifest['opset']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
