"""Where the bundled models live: the repository's `models/` in a source or editable
install, `share/chain_spec_ros/models` in a colcon/ament install, or $CHAIN_SPEC_MODELS."""
from __future__ import annotations

import os
import sys
from pathlib import Path


def default_models_dir() -> Path:
    if os.environ.get("CHAIN_SPEC_MODELS"):
        return Path(os.environ["CHAIN_SPEC_MODELS"])
    source = Path(__file__).resolve().parent.parent / "models"
    if source.is_dir():
        return source
    return Path(sys.prefix) / "share" / "chain_spec_ros" / "models"


def default_tokenizer_path() -> Path:
    return default_models_dir() / "tokenizer.json"
