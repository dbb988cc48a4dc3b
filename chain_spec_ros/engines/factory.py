"""Build the planner's engines from a models directory, by backend name (configuration).

    models/tokenizer.json  models/target/{config.json, model.safetensors}  models/draft/{...}
    models/onnx/...        (exported graphs, for the onnxruntime and tensorrt backends)
"""
from __future__ import annotations

from pathlib import Path

from ..models.draft import EagleDraft
from ..models.target import TargetVLA
from .base import DraftEngine, TargetEngine
from .torch_engine import TorchDraftEngine, TorchTargetEngine

BACKENDS = ("torch",)


def load_target_model(models: Path) -> TargetVLA:
    directory = models / "target"
    for name in ("config.json", "model.safetensors"):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"target model file missing: {directory / name}")
    return TargetVLA.from_pretrained(directory)


def build_engines(models: Path, backend: str = "torch", draft_dir: Path | None = None
                  ) -> tuple[TargetEngine, DraftEngine | None]:
    """The target engine, and the draft engine when `draft_dir` is given."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose from {BACKENDS}")
    target_model = load_target_model(models)
    draft = None
    if draft_dir is not None:
        draft = EagleDraft.from_pretrained(draft_dir, target_model.decoder.embed_tokens, target_model.decoder.lm_head)
    layers = list(draft.cfg.feature_layers) if draft is not None else []
    target = TorchTargetEngine(target_model, layers)
    return target, (TorchDraftEngine(draft) if draft is not None else None)
