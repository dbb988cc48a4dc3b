"""Load and save the target from Hugging Face-format directories.

Two layouts load (the `model_type` in config.json decides):
- "qwen3_vl": what `Qwen3VLForConditionalGeneration.save_pretrained` writes. The VLM only, so
  the target has no trajectory expert (it can reason, not drive);
- "alpamayo_r1": Alpamayo-R1's release layout: the VLM named by `vlm_name_or_path`, the expert
  and action heads beside it (`alpamayo.py`).

The camera frame size the model is fed is not part of either config (Qwen3-VL takes any size);
`chain_spec.json` beside them records it, else the caller passes `image_size`.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .config import TargetConfig
from .hf_format import (QWEN3_VL_PREFIXES, CheckpointError, check_state, qwen3vl_configs, read_json,
                        read_safetensors, rename)
from .alpamayo import (ALPAMAYO_PREFIXES, OPTIONAL_KEYS, alpamayo_state, alpamayo_target_config, default_action_stats,
                       vlm_directory)
from .target import TargetVLA

PROJECT_FILE = "chain_spec.json"  # {"image_height": H, "image_width": W}
DEFAULT_IMAGE_SIZE = (64, 128)


def frame_size(directory: Path, image_size: tuple[int, int] | None) -> tuple[int, int]:
    if image_size is not None:
        return image_size
    if (directory / PROJECT_FILE).is_file():
        project = read_json(directory / PROJECT_FILE)
        return int(project["image_height"]), int(project["image_width"])
    return DEFAULT_IMAGE_SIZE


def preprocessor_of(directory: Path) -> dict[str, Any] | None:
    path = directory / "preprocessor_config.json"
    return read_json(path) if path.is_file() else None


def load_target_config(directory: str | Path, image_size: tuple[int, int] | None = None) -> TargetConfig:
    """The configuration of a checkpoint directory (either layout), without its weights."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a directory")
    config = read_json(directory / "config.json")
    size = frame_size(directory, image_size)
    if config.get("model_type") == "qwen3_vl":
        decoder, vision, image_pad = qwen3vl_configs(config, str(directory / "config.json"), size,
                                                     preprocessor_of(directory))
        return TargetConfig(decoder=decoder, vision=vision, expert=None, image_pad_id=image_pad)
    if config.get("model_type") == "alpamayo_r1":
        preprocessor = preprocessor_of(directory) or preprocessor_of(vlm_directory(config, directory))
        return alpamayo_target_config(config, directory, size, preprocessor)
    raise CheckpointError(f"{directory / 'config.json'}: model_type {config.get('model_type')!r} is neither "
                          f"'qwen3_vl' nor 'alpamayo_r1'")


def load_target(directory: str | Path, image_size: tuple[int, int] | None = None,
                device: torch.device | str = "cpu") -> TargetVLA:
    """A TargetVLA from a checkpoint directory (either layout); CheckpointError names what is
    wrong with a malformed one."""
    directory = Path(directory)
    model = TargetVLA(load_target_config(directory, image_size))
    config = read_json(directory / "config.json")
    if model.cfg.expert is None:
        load_state(model, read_safetensors(directory), QWEN3_VL_PREFIXES, str(directory))
    else:
        found = alpamayo_state(directory, config)
        default_action_stats(model.state_dict(), config, found)
        load_state(model, found, ALPAMAYO_PREFIXES, str(directory), optional=OPTIONAL_KEYS)
    return model.to(device)


def load_state(model: TargetVLA, found: dict[str, torch.Tensor], prefixes, where: str,
               optional: tuple[str, ...] = ()) -> None:
    """Check `found` (in the checkpoint's names) against the model and load it. Keys containing
    one of `optional` may be absent (the model keeps its own values)."""
    expected = rename(model.state_dict(), prefixes, to_theirs=True)
    lm_head = rename({"decoder.lm_head.weight": None}, prefixes, to_theirs=True)
    tied = model.cfg.decoder.tie_word_embeddings
    may_miss = tuple(k for k in expected if any(part in k for part in optional)) + (tuple(lm_head) if tied else ())
    check_state(expected, found, where, optional=may_miss)
    state = rename(found, prefixes, to_theirs=False)
    if tied:
        state["decoder.lm_head.weight"] = state["decoder.embed_tokens.weight"]
    model.load_state_dict(state, strict=False)


def write_project_file(directory: Path, model: TargetVLA) -> None:
    vision = model.cfg.vision
    (directory / PROJECT_FILE).write_text(json.dumps(
        {"image_height": vision.image_height, "image_width": vision.image_width}, indent=2) + "\n")


def state_for_saving(model: TargetVLA, prefixes) -> dict[str, Any]:
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.cfg.decoder.tie_word_embeddings:  # safetensors refuses shared storage
        state.pop("decoder.lm_head.weight")
    return rename(state, prefixes, to_theirs=True)
