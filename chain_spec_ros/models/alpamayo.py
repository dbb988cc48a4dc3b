"""Alpamayo-R1's release layout: config.json with model_type "alpamayo_r1", and its weights.

The release's config.json does not nest the VLM's architecture: `vlm_name_or_path` names a
Qwen3-VL checkpoint whose config.json gives it (with the vocabulary widened to `vocab_size`).
Here it must be a local folder, absolute or relative to the checkpoint. The expert is that
VLM's text config with `expert_cfg` applied key by key; it must keep the VLM's layer count, KV
heads and head_dim, since it reads the VLM's cache. The action heads come from
`action_in_proj_cfg`, `action_out_proj_cfg`, `diffusion_cfg` and `action_space_cfg`.

Weights: the release keeps everything in one (sharded) safetensors set under `vlm.model.visual.`,
`vlm.model.language_model.`, `vlm.lm_head.`, `expert.`, `action_in_proj.`, `action_out_proj.` and
`action_space.`. A checkpoint may instead leave the VLM's weights in the `vlm_name_or_path`
folder under transformers' own names (how `save_alpamayo` writes the bundled target, so that
transformers loads that folder as a Qwen3-VL model).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import save_file

from .config import ExpertConfig, TargetConfig
from .hf_format import (QWEN3_VL_PREFIXES, SAFETENSORS, CheckpointError, preprocessor_config, qwen3vl_config,
                        qwen3vl_configs, read_json, read_safetensors, require)

# (ours, theirs), most specific first.
EXPERT_PREFIXES = (("expert.action_in_proj.", "action_in_proj."), ("expert.action_out_proj.", "action_out_proj."),
                   ("expert.action_space.", "action_space."), ("expert.", "expert."))
ALPAMAYO_PREFIXES = EXPERT_PREFIXES + tuple((ours, "vlm." + theirs) for ours, theirs in QWEN3_VL_PREFIXES)
# Buffers a checkpoint may leave out: Fourier frequencies are fixed; the action statistics are also in the config.
OPTIONAL_KEYS = ("freqs", "action_space.")
EXPERT_OVERRIDES = {"hidden_size": "hidden_size", "num_attention_heads": "num_heads",
                    "intermediate_size": "intermediate_size"}
MUST_MATCH_VLM = ("num_hidden_layers", "num_key_value_heads", "head_dim")
TARGETS = {"action_in_proj_cfg": "alpamayo_r1.models.action_in_proj.PerWaypointActionInProjV2",
           "action_out_proj_cfg": "torch.nn.Linear",
           "diffusion_cfg": "alpamayo_r1.diffusion.flow_matching.FlowMatching",
           "action_space_cfg": "alpamayo_r1.action_space.unicycle_accel_curvature.UnicycleAccelCurvatureActionSpace"}


def vlm_directory(config: Mapping[str, Any], directory: Path) -> Path:
    name = require(config, "vlm_name_or_path", str(directory / "config.json"))
    path = Path(name) if Path(name).is_absolute() else directory / name
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{directory / 'config.json'}: vlm_name_or_path {name!r} is not a local Qwen3-VL folder "
                              f"with a config.json (download the VLM's config.json and tokenizer there, or set "
                              f"vlm_name_or_path to the folder that has them)")
    return path


def expert_config(config: Mapping[str, Any], text: Mapping[str, Any], where: str) -> ExpertConfig:
    """The expert's sizes: the VLM text config with expert_cfg applied, checked against the VLM."""
    overrides = dict(config.get("expert_cfg") or {})
    merged = {**text, **overrides}
    for name in MUST_MATCH_VLM:
        if name in overrides and merged.get(name) != text.get(name):
            raise CheckpointError(f"{where}: expert_cfg.{name} {overrides[name]} differs from the VLM's {text.get(name)}; "
                                  f"the expert reads the VLM's cache and must keep it")
    projection = dict(config.get("action_in_proj_cfg") or {})
    diffusion = dict(config.get("diffusion_cfg") or {})
    space = dict(config.get("action_space_cfg") or {})
    if diffusion.get("int_method", "euler") != "euler":
        raise CheckpointError(f"{where}: diffusion_cfg.int_method {diffusion['int_method']!r} is not supported (euler)")
    if abs(float(space.get("dt", 0.1)) - 0.1) > 1e-9:
        raise CheckpointError(f"{where}: action_space_cfg.dt {space['dt']} is not the 0.1 s the planner runs at")
    return ExpertConfig(
        hidden_size=int(merged["hidden_size"]), num_heads=int(merged["num_attention_heads"]),
        intermediate_size=int(merged["intermediate_size"]), horizon=int(space.get("n_waypoints", 64)),
        euler_steps=int(diffusion.get("num_inference_steps", 10)),
        proj_hidden_size=int(projection.get("hidden_size", 1024)), proj_layers=int(projection.get("num_enc_layers", 4)),
        fourier_features=int(projection.get("num_fourier_feats", 20)), max_freq=float(projection.get("max_freq", 100.0)))


def alpamayo_target_config(config: Mapping[str, Any], directory: Path, image_size: tuple[int, int],
                           preprocessor: Mapping[str, Any] | None) -> TargetConfig:
    where = str(directory / "config.json")
    vlm = read_json(vlm_directory(config, directory) / "config.json")
    vlm_where = str(vlm_directory(config, directory) / "config.json")
    if vlm.get("model_type") != "qwen3_vl":
        raise CheckpointError(f"{vlm_where}: model_type {vlm.get('model_type')!r}, expected 'qwen3_vl'")
    text = dict(require(vlm, "text_config", vlm_where))
    if "vocab_size" in config:  # the release widens the VLM's vocabulary to its tokenizer's length
        text["vocab_size"] = config["vocab_size"]
    decoder, vision, image_pad = qwen3vl_configs({**vlm, "text_config": text}, vlm_where, image_size, preprocessor)
    return TargetConfig(decoder=decoder, vision=vision, expert=expert_config(config, text, where),
                        image_pad_id=image_pad)


def alpamayo_state(directory: Path, config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors in the release's names, the VLM's read from its own folder
    when the top-level files do not hold them."""
    state = read_safetensors(directory)
    if not any(key.startswith("vlm.") for key in state):
        vlm = read_safetensors(vlm_directory(config, directory))
        state.update({"vlm." + key: value for key, value in vlm.items()})
    return state


def default_action_stats(model_state: Mapping[str, torch.Tensor], config: Mapping[str, Any],
                         found: dict[str, torch.Tensor]) -> None:
    """Fill `action_space.*` from action_space_cfg when the weights leave them out."""
    space = dict(config.get("action_space_cfg") or {})
    for name in ("accel_mean", "accel_std", "curvature_mean", "curvature_std"):
        key = "action_space." + name
        if key not in found and name in space:
            found[key] = torch.tensor(float(space[name]), dtype=model_state["expert." + key].dtype)


def save_alpamayo(model, directory: str | Path, token_ids: Mapping[str, int], generation: Mapping[str, Any],
                  tokenizer_file: Path | None = None, vlm_folder: str = "vlm") -> None:
    """Write `model` in Alpamayo-R1's layout, the VLM as a transformers Qwen3-VL folder
    (`vlm_folder`) that `Qwen3VLForConditionalGeneration.from_pretrained` loads as it is."""
    from .checkpoint import state_for_saving, write_project_file

    directory = Path(directory)
    vlm_dir = directory / vlm_folder
    vlm_dir.mkdir(parents=True, exist_ok=True)
    cfg: TargetConfig = model.cfg
    state = state_for_saving(model, ALPAMAYO_PREFIXES)
    vlm_state = {k[len("vlm."):]: v for k, v in state.items() if k.startswith("vlm.")}
    rest = {k: v for k, v in state.items() if not k.startswith("vlm.") and not k.endswith("freqs")}
    save_file(vlm_state, str(vlm_dir / SAFETENSORS), metadata={"format": "pt"})
    save_file(rest, str(directory / SAFETENSORS), metadata={"format": "pt"})
    write_json(vlm_dir / "config.json", {**qwen3vl_config(cfg.decoder, cfg.vision, token_ids), "dtype": "float32"})
    write_json(vlm_dir / "generation_config.json", dict(generation))
    write_json(vlm_dir / "preprocessor_config.json", preprocessor_config(cfg.vision))
    if tokenizer_file is not None:
        shutil.copyfile(tokenizer_file, vlm_dir / "tokenizer.json")
    expert, space = cfg.expert, model.expert.action_space
    write_json(directory / "config.json", {
        "architectures": ["AlpamayoR1"], "model_type": "alpamayo_r1", "vlm_name_or_path": vlm_folder,
        "vlm_backend": "qwenvl3", "vocab_size": cfg.decoder.vocab_size, "model_dtype": "float32",
        "keep_same_dtype": True, "expert_non_causal_attention": True,
        "expert_cfg": {"hidden_size": expert.hidden_size, "num_attention_heads": expert.num_heads,
                       "intermediate_size": expert.intermediate_size},
        "action_in_proj_cfg": {"_target_": TARGETS["action_in_proj_cfg"], "hidden_size": expert.proj_hidden_size,
                               "num_enc_layers": expert.proj_layers, "num_fourier_feats": expert.fourier_features,
                               "max_freq": expert.max_freq},
        "action_out_proj_cfg": {"_target_": TARGETS["action_out_proj_cfg"]},
        "diffusion_cfg": {"_target_": TARGETS["diffusion_cfg"], "num_inference_steps": expert.euler_steps,
                          "int_method": "euler"},
        "action_space_cfg": {"_target_": TARGETS["action_space_cfg"], "n_waypoints": expert.horizon, "dt": 0.1,
                             **{name: float(getattr(space, name)) for name in
                                ("accel_mean", "accel_std", "curvature_mean", "curvature_std")}},
    })
    write_project_file(directory, model)


def write_json(path: Path, value: Mapping[str, Any]) -> None:
    path.write_text(json.dumps(value, indent=2) + "\n")
