"""Build the planner's engines from a models directory, by backend name (configuration).

    models/tokenizer.json  models/target/{config.json, model.safetensors}  models/draft/{...}
    models/onnx/...        exported graphs (chain-spec-export), for onnxruntime and tensorrt
    models/onnx/trt/...    TensorRT engines (chain-spec-build-engines), for tensorrt

A named backend tells two kinds of trouble apart. What the *machine* lacks (the tensorrt
package, a GPU, an ONNX Runtime execution provider, onnxruntime itself) makes the factory fall
back, explicitly: tensorrt -> onnxruntime -> torch; the returned engines say which backend they
are (`backend`) and why it is not the one asked for (`fallback_reason`, None when it is). What
the *models directory* lacks (no export, an export made from other weights, engines not built)
is an error with the command that fixes it: silently running a different network would be worse.

`auto` takes the fastest backend that runs here (constants.BACKENDS, fastest first): tensorrt
when the package, a GPU and built engines are there; else onnxruntime, exporting the graphs
first when the export is missing or stale (auto_export.py); else torch. Its `fallback_reason`
says what it chose and why not the faster ones (None when it got tensorrt).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from ..constants import BACKENDS
from ..models.draft import EagleDraft
from ..models.target import TargetVLA
from .auto_export import current_export
from .base import DraftEngine, TargetEngine
from .manifest import ExportError
from .ort_engine import OrtOptions, load_ort_engines, ort_unavailable_reason
from .torch_engine import TorchDraftEngine, TorchTargetEngine
from .trt_engine import load_trt_engines, trt_unavailable_reason

AUTO = "auto"

Engines = tuple[TargetEngine, DraftEngine | None]


def load_target_model(models: Path) -> TargetVLA:
    """MODELS/target in either checkpoint layout; a missing or malformed file is a
    CheckpointError (a ValueError) naming it."""
    return TargetVLA.from_pretrained(models / "target")


def build_engines(models: Path, backend: str = "torch", draft_dir: Path | None = None, *,
                  providers: Sequence[str] | None = None, threads: int = 0, device: str | None = None,
                  draft_int8: bool = True) -> Engines:
    """The target engine, and the draft engine when `draft_dir` is given, on `backend` (one of
    constants.BACKENDS, or "auto") or the closest available fallback (see the module docstring).

    providers: ONNX Runtime execution providers in order of preference (None: CUDA if usable,
    else CPU); threads: ONNX Runtime intra-op threads (0: torch.get_num_threads()); device: the
    torch backend's device (None: CUDA when present); draft_int8: ONNX Runtime's CPU provider
    runs the draft's int8 graphs (`OrtOptions.draft_int8`).
    """
    if backend not in (AUTO, *BACKENDS):
        raise ValueError(f"unknown backend {backend!r}; choose from {(AUTO, *BACKENDS)}")
    models = Path(models)
    options = OrtOptions(providers=providers, intra_op_threads=threads, draft_int8=draft_int8)
    if backend == AUTO:
        return _auto_engines(models, draft_dir, options, device)
    reasons: list[str] = []
    if backend == "tensorrt":
        problem = trt_unavailable_reason()
        if problem is None:
            return _tag(*load_trt_engines(models, draft_dir), reason=None)
        reasons.append(f"tensorrt backend unavailable: {problem}")
        backend = "onnxruntime"
    if backend == "onnxruntime":
        problem = ort_unavailable_reason()
        if problem is None:
            target, draft = load_ort_engines(models, draft_dir, options)
            return _tag(target, draft, reason=_joined(reasons + [target.fallback_reason]))
        reasons.append(f"onnxruntime backend unavailable: {problem}")
    return _tag(*_torch_engines(models, draft_dir, device), reason=_joined(reasons))


def _auto_engines(models: Path, draft_dir: Path | None, options: OrtOptions, device: str | None) -> Engines:
    """The first of tensorrt, onnxruntime, torch that runs here (see the module docstring)."""
    reasons: list[str] = []
    problem = trt_unavailable_reason()
    if problem is None:
        try:
            return _tag(*load_trt_engines(models, draft_dir), reason=None)
        except ExportError as error:  # no export, or engines not built for it
            problem = str(error)
    reasons.append(f"tensorrt unavailable: {problem}")
    problem = ort_unavailable_reason()
    if problem is None:
        try:
            onnx_dir, exported = current_export(models, draft_dir)
        except Exception as error:  # noqa: BLE001 - the export failed: torch computes the same network
            problem = f"exporting the ONNX graphs failed ({type(error).__name__}: {error})"
        else:
            target, draft = load_ort_engines(models, draft_dir, options, onnx_dir)
            notes = reasons + [f"onnxruntime: {exported}" if exported else None, target.fallback_reason]
            return _tag(target, draft, reason=f"auto: {_joined(notes)}; chose onnxruntime")
    reasons.append(f"onnxruntime unavailable: {problem}")
    return _tag(*_torch_engines(models, draft_dir, device), reason=f"auto: {_joined(reasons)}; chose torch")


def _torch_engines(models: Path, draft_dir: Path | None, device: str | None) -> Engines:
    target_model = load_target_model(models)
    draft = None
    if draft_dir is not None:
        draft = EagleDraft.from_pretrained(draft_dir, target_model.decoder)
    layers = list(draft.cfg.feature_layers) if draft is not None else []
    return TorchTargetEngine(target_model, layers, device), (TorchDraftEngine(draft, device) if draft is not None else None)


def _joined(reasons: list[str | None]) -> str | None:
    """The reasons given, in order, as one line (None when there are none)."""
    return "; ".join(reason for reason in reasons if reason) or None


def _tag(target: TargetEngine, draft: DraftEngine | None, reason: str | None) -> Engines:
    for engine in (target, draft):
        if engine is not None:
            engine.fallback_reason = reason
    return target, draft
