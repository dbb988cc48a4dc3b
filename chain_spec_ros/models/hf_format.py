"""Hugging Face-format checkpoints: Qwen3-VL directories and the parameter-name mapping.

A Qwen3-VL directory is what `Qwen3VLForConditionalGeneration.save_pretrained` writes:
config.json (model_type "qwen3_vl", text_config, vision_config, special token ids),
model.safetensors or model.safetensors.index.json with shards, generation_config.json, and the
tokenizer and preprocessor files of the processor. Our modules keep transformers' names below
their prefix, so the mapping is a prefix swap: `vision.` <-> `model.visual.`, `decoder.lm_head.`
<-> `lm_head.`, `decoder.` <-> `model.language_model.`.

Every problem with a directory (a missing file or config field, a missing, unexpected or
mis-shaped tensor) raises `CheckpointError` naming the file, field or key.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from safetensors.torch import load_file
from torch import Tensor

from .config import DecoderConfig, VisionConfig

# (ours, theirs), most specific first.
QWEN3_VL_PREFIXES = (("decoder.lm_head.", "lm_head."), ("decoder.", "model.language_model."),
                     ("vision.", "model.visual."))
SAFETENSORS, SAFETENSORS_INDEX = "model.safetensors", "model.safetensors.index.json"
VISION_FIELDS = ("depth", "hidden_size", "hidden_act", "intermediate_size", "num_heads", "in_channels",
                 "patch_size", "spatial_merge_size", "temporal_patch_size", "out_hidden_size",
                 "num_position_embeddings", "deepstack_visual_indexes")


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded; the message names what is wrong."""


def read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"{path}: file missing")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path}: not valid JSON ({error})") from error


def require(config: Mapping[str, Any], field: str, where: str) -> Any:
    if field not in config or config[field] is None:
        raise CheckpointError(f"{where}: required field {field!r} is missing")
    return config[field]


def read_safetensors(directory: Path) -> dict[str, Tensor]:
    """All tensors of a directory: one model.safetensors, or the shards its index lists."""
    index = directory / SAFETENSORS_INDEX
    if index.is_file():
        shards = sorted(set(require(read_json(index), "weight_map", str(index)).values()))
        state: dict[str, Tensor] = {}
        for shard in shards:
            if not (directory / shard).is_file():
                raise CheckpointError(f"{directory / shard}: shard listed in {SAFETENSORS_INDEX} is missing")
            state.update(load_file(str(directory / shard)))
        return state
    if not (directory / SAFETENSORS).is_file():
        raise CheckpointError(f"{directory}: neither {SAFETENSORS} nor {SAFETENSORS_INDEX} found")
    return load_file(str(directory / SAFETENSORS))


def rename(state: Mapping[str, Tensor], prefixes, to_theirs: bool) -> dict[str, Tensor]:
    """Swap key prefixes (ours -> theirs, or back). Keys matching no prefix are kept as they are."""
    out = {}
    for key, value in state.items():
        for ours, theirs in prefixes:
            source, target = (ours, theirs) if to_theirs else (theirs, ours)
            if key.startswith(source):
                key = target + key[len(source):]
                break
        out[key] = value
    return out


def check_state(expected: Mapping[str, Tensor], found: Mapping[str, Tensor], where: str,
                optional: tuple[str, ...] = ()) -> None:
    """Raise CheckpointError on the first missing, unexpected or mis-shaped tensor (names in the
    checkpoint's own spelling)."""
    missing = sorted(k for k in expected if k not in found and k not in optional)
    if missing:
        raise CheckpointError(f"{where}: tensor {missing[0]!r} missing ({len(missing)} missing in all)")
    unexpected = sorted(k for k in found if k not in expected)
    if unexpected:
        raise CheckpointError(f"{where}: unexpected tensor {unexpected[0]!r} ({len(unexpected)} unexpected in all)")
    for key, value in found.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise CheckpointError(f"{where}: tensor {key!r} has shape {tuple(value.shape)}, the config implies "
                                  f"{tuple(expected[key].shape)}")


def vision_config_from_hf(vision: Mapping[str, Any], image_height: int, image_width: int,
                          preprocessor: Mapping[str, Any] | None = None) -> VisionConfig:
    fields = {name: require(vision, name, "vision_config") for name in VISION_FIELDS}
    rope = vision.get("rope_parameters") or {}
    processor = preprocessor or {}
    for name, value in (("patch_size", fields["patch_size"]), ("merge_size", fields["spatial_merge_size"]),
                        ("temporal_patch_size", fields["temporal_patch_size"])):
        if name in processor and processor[name] != value:
            raise CheckpointError(f"preprocessor_config.json: {name} {processor[name]} differs from the vision "
                                  f"config's {value}")
    try:
        return VisionConfig(**fields, rope_theta=float(rope.get("rope_theta", 10000.0)), image_height=image_height,
                            image_width=image_width, image_mean=list(processor.get("image_mean", [0.5] * 3)),
                            image_std=list(processor.get("image_std", [0.5] * 3)))
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"vision_config: {error}") from error


def vision_config_to_hf(cfg: VisionConfig) -> dict[str, Any]:
    out = {name: getattr(cfg, name) for name in VISION_FIELDS}
    out.update(model_type="qwen3_vl_vision", initializer_range=0.02,
               rope_parameters={"rope_type": "axial", "rope_theta": cfg.rope_theta})
    return out


def text_config_to_hf(cfg: DecoderConfig) -> dict[str, Any]:
    return {"model_type": "qwen3_vl_text", "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
            "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_layers,
            "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
            "hidden_act": "silu", "max_position_embeddings": cfg.max_positions, "rms_norm_eps": cfg.rms_norm_eps,
            "attention_bias": False, "attention_dropout": 0.0, "initializer_range": 0.02, "use_cache": True,
            "tie_word_embeddings": cfg.tie_word_embeddings,
            "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta,
                                "mrope_section": list(cfg.mrope_section), "mrope_interleaved": True}}


def preprocessor_config(cfg: VisionConfig) -> dict[str, Any]:
    """The image processor transformers' AutoProcessor builds for Qwen3-VL, bounded so that a
    frame of the model's size passes through unresized."""
    pixels = cfg.image_height * cfg.image_width
    return {"image_processor_type": "Qwen2VLImageProcessorFast", "do_resize": True, "do_rescale": True,
            "rescale_factor": 1 / 255, "do_normalize": True, "do_convert_rgb": True,
            "image_mean": list(cfg.image_mean), "image_std": list(cfg.image_std), "patch_size": cfg.patch_size,
            "temporal_patch_size": cfg.temporal_patch_size, "merge_size": cfg.spatial_merge_size,
            "size": {"shortest_edge": pixels, "longest_edge": pixels}}


def qwen3vl_configs(config: Mapping[str, Any], where: str, image_size: tuple[int, int],
                    preprocessor: Mapping[str, Any] | None = None) -> tuple[DecoderConfig, VisionConfig, int]:
    """(decoder, vision, image_pad_id) of a Qwen3-VL config.json's contents."""
    text = require(config, "text_config", where)
    for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
        require(text, name, f"{where}: text_config")
    try:
        decoder = DecoderConfig.from_hf_text_config({**text, "tie_word_embeddings": config.get(
            "tie_word_embeddings", text.get("tie_word_embeddings", False))})
    except (TypeError, ValueError, AssertionError) as error:
        raise CheckpointError(f"{where}: text_config: {error}") from error
    vision = vision_config_from_hf(require(config, "vision_config", where), *image_size, preprocessor)
    if vision.out_hidden_size != decoder.hidden_size:
        raise CheckpointError(f"{where}: vision_config.out_hidden_size {vision.out_hidden_size} differs from "
                              f"text_config.hidden_size {decoder.hidden_size}")
    return decoder, vision, int(require(config, "image_token_id", where))


def qwen3vl_config(decoder: DecoderConfig, vision: VisionConfig, token_ids: Mapping[str, int]) -> dict[str, Any]:
    """config.json of a Qwen3VLForConditionalGeneration; token_ids: image_token_id,
    video_token_id, vision_start_token_id, vision_end_token_id."""
    return {"architectures": ["Qwen3VLForConditionalGeneration"], "model_type": "qwen3_vl", **token_ids,
            "tie_word_embeddings": decoder.tie_word_embeddings, "text_config": text_config_to_hf(decoder),
            "vision_config": vision_config_to_hf(vision)}
