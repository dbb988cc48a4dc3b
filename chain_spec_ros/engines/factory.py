"""Build the planner's engines from a models directory, by backend name (configuration).

    models/tokenizer.json  models/target/{config.json, model.safetensors}  models/draft/{...}
    models/onnx/...        exported graphs (chain-spec-export), for onnxruntime and tensorrt
    models/onnx/trt/...    TensorRT engines (chain-spec-build-engines), for tensorrt

Two kinds of trouble are told apart. What the *machine* lacks (the tensorrt package, a GPU, an
ONNX Runtime execution provider, onnxruntime itself) makes the factory fall back, explicitly:
tensorrt -> onnxruntime -> torch; the returned engines say which backend they are (`backend`)
and why it is not the one asked for (`fallback_reason`, None when it is). What the *models
directory* lacks (no export, an export made from other weights, engines not built) is an error
with the command that fixes it: silently running a different network would be worse.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from ..models.draft import EagleDraft
from ..models.target import TargetVLA
from .base import DraftEngine, TargetEngine
from .torch_engine import TorchDraftEngine, TorchTargetEngine

BACKENDS = ("torch", "onnxruntime", "tensorrt")


def load_target_model(models: Path) -> TargetVLA:
    directory = models / "target"
    for name in ("config.json", "model.safetensors"):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"target model file missing: {directory / name}")
    return TargetVLA.from_pretrained(directory)


def build_engines(models: Path, backend: str = "torch", draft_dir: Path | None = None, *,
                  providers: Sequence[str] | None = None, threads: int = 0, device: str | None = None
                  ) -> tuple[TargetEngine, DraftEngine | None]:
    """The target engine, and the draft engine when `draft_dir` is given, on `backend` or the
    closest available fallback (see the module docstring).

    providers: ONNX Runtime execution providers in order of preference (None: CUDA if usable,
    else CPU); threads: ONNX Runtime intra-op threads (0: torch.get_num_threads()); device: the
    torch backend's device (None: CUDA when present).
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose from {BACKENDS}")
    models = Path(models)
    reasons: list[str] = []
    if backend == "tensorrt":
        from .trt_engine import load_trt_engines, trt_unavailable_reason

        problem = trt_unavailable_reason()
        if problem is None:
            return _tag(*load_trt_engines(models, draft_dir), reason=None)
        reasons.append(f"tensorrt backend unavailable: {problem}")
        backend = "onnxruntime"
    if backend == "onnxruntime":
        from .ort_engine import OrtOptions, load_ort_engines, ort_unavailable_reason

        problem = ort_unavailable_reason()
        if problem is None:
            target, draft = load_ort_engines(models, draft_dir, OrtOptions(providers=providers, intra_op_threads=threads))
            return _tag(target, draft, reason="; ".join(reasons + [target.fallback_reason or ""]).strip("; ") or None)
        reasons.append(f"onnxruntime backend unavailable: {problem}")
    target_model = load_target_model(models)
    draft = None
    if draft_dir is not None:
        draft = EagleDraft.from_pretrained(draft_dir, target_model.decoder.embed_tokens, target_model.decoder.lm_head)
    layers = list(draft.cfg.feature_layers) if draft is not None else []
    target = TorchTargetEngine(target_model, layers, device)
    return _tag(target, TorchDraftEngine(draft, device) if draft is not None else None,
                reason="; ".join(reasons) or None)


def _tag(target: TargetEngine, draft: DraftEngine | None, reason: str | None
         ) -> tuple[TargetEngine, DraftEngine | None]:
    for engine in (target, draft):
        if engine is not None:
            engine.fallback_reason = reason
    return target, draft
