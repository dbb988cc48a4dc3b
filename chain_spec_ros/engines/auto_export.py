"""Backend `auto`'s ONNX export: made on first use, remade when the weights change.

The export goes where `chain-spec-export` puts it, MODELS/onnx, when that directory is
writable; else (an installed package's read-only share folder) into a per-user cache,
${XDG_CACHE_HOME:-~/.cache}/chain_spec_ros/onnx/<hash of the weights>, so each set of weights
is exported once per user.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

from .export import export_models
from .manifest import ONNX_DIR, ExportError, fingerprint, load_manifest


def export_cache_dir(models: Path, draft_dir: str | Path | None) -> Path:
    """The per-user cache directory of the export of these weights (target, and the draft when given)."""
    weights = fingerprint(models / "target") + (fingerprint(draft_dir) if draft_dir is not None else "")
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "chain_spec_ros" / ONNX_DIR / hashlib.sha256(weights.encode()).hexdigest()[:16]


def _writable(directory: Path) -> bool:
    """Whether an export can be written into `directory` (created when missing)."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(directory, os.W_OK)


def current_export(models: Path, draft_dir: str | Path | None) -> tuple[Path, str | None]:
    """(a directory holding an ONNX export current with the weights, what was done to get it or
    None when MODELS/onnx already was). Exports when MODELS/onnx is missing, incomplete or
    stale; in the cache, an export made earlier for the same weights is used as it is."""
    try:
        return Path(load_manifest(models, draft_dir)["dir"]), None
    except ExportError as error:
        problem = error.problem
    out = models / ONNX_DIR
    if not _writable(out):
        out = export_cache_dir(models, draft_dir)
        try:
            return Path(load_manifest(models, draft_dir, out)["dir"]), f"{problem}; using the export in {out}"
        except ExportError:
            pass
    export_models(models, draft_dir, out)
    return out, f"{problem}; exported the graphs to {out}"
