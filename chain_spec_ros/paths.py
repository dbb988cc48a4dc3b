"""Where the package's data folders (models/, config/, launch/) live.

One answer for every kind of install, in this order:
- $CHAIN_SPEC_MODELS, for the models folder only;
- a source checkout or an editable install: the repository itself (it holds package.xml);
- an installed package (colcon/ament, `pip install`, a wheel, `--prefix`): its share folder,
  `<prefix>/share/chain_spec_ros` beside the installed Python package
  (`<prefix>/lib/pythonX.Y/site-packages`), else the one the ament index names, else the one
  under the running interpreter's prefix.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

PACKAGE = "chain_spec_ros"
PACKAGE_DIR = Path(__file__).resolve().parent


def source_root() -> Path | None:
    """The repository root when running from a source checkout (or an editable install)."""
    root = PACKAGE_DIR.parent
    return root if (root / "package.xml").is_file() and (root / "setup.py").is_file() else None


def _share_candidates() -> list[Path]:
    """Most specific first: the share folder of the prefix this package runs from, then the
    ament index (which may name another prefix of an overlay), then the interpreter's prefix."""
    candidates = []
    # <prefix>/lib/pythonX.Y/site-packages/chain_spec_ros -> <prefix>/share/chain_spec_ros
    if PACKAGE_DIR.parent.name in ("site-packages", "dist-packages"):
        candidates.append(PACKAGE_DIR.parents[3] / "share" / PACKAGE)
    try:
        from ament_index_python.packages import PackageNotFoundError, get_package_share_directory

        try:
            candidates.append(Path(get_package_share_directory(PACKAGE)))
        except (PackageNotFoundError, OSError):  # not indexed, or AMENT_PREFIX_PATH unset
            pass
    except ImportError:  # no ament index: only the prefix layouts below
        pass
    candidates.append(Path(sys.prefix) / "share" / PACKAGE)
    return candidates


def package_share_dir() -> Path:
    """The folder holding models/, config/ and launch/ (see the module docstring)."""
    root = source_root()
    if root is not None:
        return root
    candidates = _share_candidates()
    for candidate in candidates:
        if (candidate / "package.xml").is_file():
            return candidate
    return candidates[0]


def default_models_dir() -> Path:
    if os.environ.get("CHAIN_SPEC_MODELS"):
        return Path(os.environ["CHAIN_SPEC_MODELS"])
    return package_share_dir() / "models"


def default_tokenizer_path() -> Path:
    return default_models_dir() / "tokenizer.json"


def default_config_path() -> Path:
    return package_share_dir() / "config" / "chain_spec.yaml"
