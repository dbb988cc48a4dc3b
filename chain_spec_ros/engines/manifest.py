"""The ONNX export's format: what the exporter (export.py) writes and the runners read.

    MODELS/onnx/target_vision.onnx   images uint8 [N, H, W, 3] BGR -> image_embeds [N, tokens_per_image, D],
                                     deepstack [L, N, tokens_per_image, D] (L deepstack layers; absent when L = 0)
    MODELS/onnx/target_decoder.onnx  inputs_embeds [1, T, D], positions [3, T] (M-RoPE), past_length [1],
                                     logit_index [N], deepstack [L, 1, T, D] (when L > 0),
                                     past_key_i / past_value_i [1, kv_heads, S, head_dim]
                                     -> logits [1, N, V], hidden_<layer> [1, T, D] (the draft's feature layers),
                                        new_key_i / new_value_i [1, kv_heads, T, head_dim]
    MODELS/onnx/target_expert.onnx   actions [1, H, 2], flow_time [1], valid_length [1], rope_delta [1],
                                     past_key_i / past_value_i -> velocity [1, H, 2]
                                     (absent for a target without a trajectory expert)
    MODELS/onnx/draft_step.onnx      token_ids [1, T], features [1, T, D], positions [3, T], past_length [1],
                                     past_key_0 / past_value_0 -> hidden [1, 1, D] (last), logits [1, V], new_key_0 / new_value_0
    MODELS/onnx/draft_fuse.onnx      feature_j [1, T, D] per fused target layer -> fused [1, T, D]
    MODELS/onnx/target_decoder_t1.onnx, target_decoder_t17.onnx, draft_step_t1.onnx
                                     the same step graphs with T fixed (decode, k + 1 verify, chain
                                     step): they write the T new keys/values into the buffer themselves
                                     and return it as present_key_i / present_value_i (bound to the same
                                     memory as past_key_i / past_value_i)
    MODELS/onnx/draft_*.int8.onnx    each draft graph with int8 weights (per-channel dynamic quantization of its
                                     MatMuls; the manifest entry's `int8_file`): what ONNX Runtime's CPU provider runs
    MODELS/onnx/target_embed.npy     the token embedding table (see below)
    MODELS/onnx/manifest.json        shapes, feature layers, deepstack layers, the expert's sizes (or null),
                                     opset, fingerprints of the source weights; per step graph its token
                                     count and `kv_update` (KV_IN_PLACE or KV_APPEND)

The cache contract, and its cost. A graph that reads a cache takes the engine's *whole*
preallocated buffer (S slots per layer) plus the number of valid slots; the T new keys/values
go to [valid, valid + T) (by the engine from the new_* outputs, or by the in-place graph), and
a rollback just lowers the valid count. New token i attends to slots < past_length and to new
tokens 0..i. Why: a decode or verify step has the same shapes all request long, so TensorRT
profiles are exact and CUDA graphs can be captured, and the host never slices or copies the
cache. Cost, in the plain-ops graphs: attention, and the concatenation of cache and new keys
inside the graph, cover all S slots rather than the valid prefix; the masked tail is wasted
work (not an error). The planner sizes S to prompt + 64 + k + 4, so the waste is the
not-yet-generated part of the CoC (about 25% of the keys at the first CoC token, none at the
last). GroupQueryAttention reads the valid prefix only.

The engine, not the graph, looks up token embeddings and splices the image embeddings over
the `<|image_pad|>` positions (a gather and a masked copy), and lays the deepstack features out
at the same positions (zero elsewhere, so the graph adds them everywhere): one decoder graph
then serves prefill (with images) and decode/verify (text only: a zero deepstack input), with
no data-dependent shapes inside.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

# 2: draft_step returns the last position's hidden state only; 3: in-place fixed-size steps; 4: Qwen3-VL's
# vision tower (deepstack output), the decoders' deepstack input, the expert optional; 5: the draft graphs'
# int8 twins
FORMAT_VERSION = 5
ONNX_DIR = "onnx"
MANIFEST = "manifest.json"
EMBED_TABLE = "target_embed.npy"
EXPERT_GRAPH = "target_expert"
GRAPHS = ("target_vision", "target_decoder", EXPERT_GRAPH, "draft_step", "draft_fuse")
KV_IN_PLACE = "in_place"  # present_* outputs are the past_* buffers, written by the graph
KV_APPEND = "append"  # new_* outputs, copied into the cache by the engine


class ExportError(RuntimeError):
    """The exported graphs cannot be used as they are (missing, or made from other weights).
    `problem` is what is wrong; the message adds `fix`, the command that repairs it, when given."""

    def __init__(self, problem: str, fix: str | None = None):
        super().__init__(problem if fix is None else f"{problem}; {fix}")
        self.problem = problem


class StaleExportError(ExportError):
    """The graphs were exported from different weights than the ones in the models directory."""


def _kv_names(kind: str, num_layers: int) -> list[str]:
    """Every layer's key, then every layer's value: the order of the graphs' cache inputs/outputs."""
    return [f"{kind}_key_{i}" for i in range(num_layers)] + [f"{kind}_value_{i}" for i in range(num_layers)]


def past_names(num_layers: int) -> list[str]:
    return _kv_names("past", num_layers)


def new_kv_names(num_layers: int) -> list[str]:
    return _kv_names("new", num_layers)


def present_names(num_layers: int) -> list[str]:
    return _kv_names("present", num_layers)


def hidden_name(layer: int) -> str:
    return f"hidden_{layer}"


def fixed_name(graph: str, tokens: int) -> str:
    """The fixed-token variant of a step graph, e.g. target_decoder_t17 for a k = 16 verify."""
    return f"{graph}_t{tokens}"


def checkpoint_folders(directory: Path) -> list[Path]:
    """The folders a checkpoint's model is read from: its own, and the VLM folder an Alpamayo-R1
    config.json names (`vlm_name_or_path`) when that lies outside it."""
    folders = [directory]
    vlm = json.loads((directory / "config.json").read_text()).get("vlm_name_or_path")
    if vlm is not None:
        path = (directory / vlm).resolve()
        if not path.is_relative_to(directory.resolve()):
            folders.append(path)
    return folders


def fingerprint(directory: str | Path) -> str:
    """sha256 over the names and contents of every file of a checkpoint (`checkpoint_folders`):
    configs, weights in any layout (one file, shards, an Alpamayo-R1 VLM folder), the frame size.
    Any change of what the model computes changes it."""
    digest = hashlib.sha256()
    for folder in checkpoint_folders(Path(directory)):
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            digest.update(str(path.relative_to(folder)).encode() + b"\0")
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    digest.update(chunk)
    return digest.hexdigest()


def required_graphs(manifest: dict, with_draft: bool) -> list[str]:
    """The core graphs (GRAPHS) the engines need from this export: the expert's only when the
    target has an expert, the draft's only when a draft is loaded."""
    has_expert = manifest["target"]["expert"] is not None
    return [g for g in GRAPHS if (with_draft or not g.startswith("draft")) and (has_expert or g != EXPERT_GRAPH)]


def export_command(models: str | Path, draft_dir: str | Path | None = None) -> str:
    """The command that (re-)exports these weights."""
    return f"chain-spec-export --models {models}" + (f" --draft {draft_dir}" if draft_dir else "")


def load_manifest(models: str | Path, draft_dir: str | Path | None = None, onnx_dir: str | Path | None = None) -> dict:
    """The manifest of the export in `onnx_dir` (default MODELS/onnx), checked against the
    weights it claims to come from; its "dir" entry is the export's directory.

    Raises ExportError when the export is missing or incomplete, and StaleExportError when the
    target (or the draft in `draft_dir`) changed since the export, with the command that fixes it.
    """
    models = Path(models)
    onnx_dir = Path(onnx_dir) if onnx_dir is not None else models / ONNX_DIR
    command = export_command(models, draft_dir)
    path = onnx_dir / MANIFEST
    if not path.is_file():
        raise ExportError(f"no ONNX export at {onnx_dir} (missing {MANIFEST})", f"run: {command}")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT_VERSION:
        raise StaleExportError(f"{path} has export format {manifest.get('format')}, this code reads "
                               f"{FORMAT_VERSION}", f"re-run: {command}")
    current = fingerprint(models / "target")
    if manifest["target"]["fingerprint"] != current:
        raise StaleExportError(
            f"stale ONNX export: {onnx_dir} was exported from target weights {manifest['target']['fingerprint'][:12]}, "
            f"but {models / 'target'} now holds {current[:12]}", f"re-run: {command}")
    if draft_dir is not None:
        if manifest["draft"] is None:
            raise ExportError(f"the ONNX export at {onnx_dir} has no draft graphs", f"run: {command}")
        current = fingerprint(draft_dir)
        if manifest["draft"]["fingerprint"] != current:
            raise StaleExportError(
                f"stale ONNX export: the draft graphs in {onnx_dir} come from draft weights "
                f"{manifest['draft']['fingerprint'][:12]} ({manifest['draft']['source']}), but {draft_dir} holds "
                f"{current[:12]}", f"re-run: {command}")
    wanted = {*required_graphs(manifest, draft_dir is not None),
              *(g for g in manifest["graphs"] if draft_dir is not None or not g.startswith("draft"))}
    entries = [manifest["graphs"].get(g, {"file": f"{g}.onnx"}) for g in sorted(wanted)]
    missing = [entry[key] for entry in entries for key in ("file", "int8_file")
               if key in entry and not (onnx_dir / entry[key]).is_file()]
    if missing or not (onnx_dir / EMBED_TABLE).is_file():
        raise ExportError(f"incomplete ONNX export at {onnx_dir} (missing {missing or [EMBED_TABLE]})", f"run: {command}")
    manifest["dir"] = str(onnx_dir)
    return manifest
