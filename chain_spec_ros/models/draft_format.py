"""The draft on disk: EAGLE-3's checkpoint layouts, so drafts move between this node and serving
engines (docs/ARCHITECTURE.md, 'Draft checkpoints').

Written: the `speculators` eagle3 layout (vllm-project/speculators, format of v0.7), which vLLM
serves directly: config.json with `speculators_model_type` "eagle3", a Llama
`transformer_layer_config`, `draft_vocab_size`, `norm_before_residual`,
`eagle_aux_hidden_state_layer_ids` and `speculators_config` (greedy proposals, the verifier);
model.safetensors with `embed_tokens.weight`, `fc.weight`, `layers.0.*`, `norm.weight`,
`lm_head.weight`, `d2t` (int64) and `t2d` (bool).

Read: that layout (with its optional `norm_before_fc`, `fc_norm`, `norm_output` and Qwen3 draft
layers) and the original EAGLE-3 layout (SafeAILab/EAGLE: a Llama config.json with
`draft_vocab_size`, `midlayer.*` weights, no embedding, model.safetensors or
pytorch_model.bin).

Conventions: `eagle_aux_hidden_state_layer_ids` count hidden states as vLLM does (id i is the
input of target layer i, so id i = our block output i-1); the original layout has none and means
vLLM's default (2, n/2, n-3). Positions: a draft whose rotary has an `mrope_section` runs on the
target's 3-D positions, one without runs on 1-D positions over the whole sequence (FlatRoPE).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from .config import DecoderConfig
from .decoder import Decoder
from .draft import DraftConfig, EagleDraft, eagle3_feature_layers
from .rope import scaled_mrope_section

SPECULATORS_FORMAT_VERSION = "0.7.0"
DEFAULT_PROPOSAL_TOKENS = 7  # the paper's chain length


class DraftFormatError(ValueError):
    """A draft directory that is not an EAGLE-3 checkpoint this target can run (names the file and field)."""


def save_eagle3(draft: EagleDraft, directory: str | Path, verifier: str | None = None) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cfg = draft.cfg
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.position_mode == "mrope":
        rope.update(mrope_section=list(cfg.mrope_section), mrope_interleaved=True)
    layer = {
        "model_type": "qwen3" if cfg.qk_norm else "llama",
        "vocab_size": cfg.target_vocab_size, "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size, "num_hidden_layers": 1,
        "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
        "hidden_act": "silu", "max_position_embeddings": cfg.max_positions, "rms_norm_eps": cfg.rms_norm_eps,
        "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": False, "rope_parameters": rope,
    }
    config = {
        "architectures": ["Eagle3Speculator"],
        "speculators_model_type": "eagle3",
        "speculators_version": SPECULATORS_FORMAT_VERSION,
        "transformer_layer_config": layer,
        "draft_vocab_size": cfg.draft_vocab_size,
        "norm_before_residual": cfg.norm_before_residual,
        "norm_before_fc": cfg.norm_before_fc,
        "fc_norm": cfg.fc_norm,
        "norm_output": cfg.norm_output,
        "target_hidden_size": cfg.hidden_size,
        "eagle_aux_hidden_state_layer_ids": [i + 1 for i in cfg.feature_layers],
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "speculators_config": {
            "algorithm": "eagle3",
            "proposal_methods": [{"proposal_type": "greedy", "speculative_tokens": DEFAULT_PROPOSAL_TOKENS,
                                  "verifier_accept_k": 1, "accept_tolerance": 0.0}],
            "default_proposal_method": "greedy",
            "verifier": {"name_or_path": verifier, "architectures": ["Qwen3VLForConditionalGeneration"]},
        },
    }
    (directory / "config.json").write_text(json.dumps(config, indent=1) + "\n")
    state = {k: v.detach().contiguous().cpu() for k, v in draft.state_dict().items()}
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})


def _field(config: dict, name: str, where: Path):
    if name not in config:
        raise DraftFormatError(f"{where}: missing field {name!r}")
    return config[name]


def draft_config(directory: str | Path, target: DecoderConfig, position_mode: str | None = None,
                 d2t: Tensor | None = None) -> DraftConfig:
    """The DraftConfig of an EAGLE-3 directory (either layout), checked against the target's
    decoder; the draft vocabulary from `d2t` (default: read from the weights)."""
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"draft model file missing: {path}")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise DraftFormatError(f"{path}: not JSON ({error})") from None
    speculators = "speculators_model_type" in config
    if speculators:
        if config["speculators_model_type"] != "eagle3":
            raise DraftFormatError(f"{path}: speculators_model_type {config['speculators_model_type']!r} is not 'eagle3'")
        layer = _field(config, "transformer_layer_config", path)
    else:
        layer = config
    n = target.num_layers
    aux = config.get("eagle_aux_hidden_state_layer_ids") or [i + 1 for i in eagle3_feature_layers(n)]
    if any(not 1 <= i <= n for i in aux):
        raise DraftFormatError(f"{path}: eagle_aux_hidden_state_layer_ids {aux} outside the target's 1..{n}")
    rope = layer.get("rope_parameters") or layer.get("rope_scaling") or {}
    theta = rope.get("rope_theta", layer.get("rope_theta", 10000.0))
    mrope = rope.get("mrope_section")
    if _field(layer, "num_hidden_layers", path) != 1:
        raise DraftFormatError(f"{path}: num_hidden_layers {layer['num_hidden_layers']}: only one-layer EAGLE-3 drafts run here")
    if layer.get("model_type", "llama") not in ("llama", "qwen3"):
        raise DraftFormatError(f"{path}: draft layer model_type {layer['model_type']!r} (llama or qwen3 expected)")
    window = layer.get("sliding_window") if layer.get("use_sliding_window", "sliding_window" in layer) else None
    if window is not None and window < target.max_positions:
        raise DraftFormatError(f"{path}: sliding_window {window} is shorter than the target's {target.max_positions} "
                               f"positions (sliding-window draft attention is not implemented)")
    heads = _field(layer, "num_attention_heads", path)
    hidden = _field(layer, "hidden_size", path)
    vocab = _field(layer, "vocab_size", path)
    for name, value, expected in (("hidden_size", hidden, target.hidden_size),
                                  ("vocab_size", vocab, target.vocab_size)):
        if value != expected:
            raise DraftFormatError(f"{path}: {name} {value} does not match the target's {expected}: this draft "
                                   f"belongs to another target")
    mode = position_mode or ("mrope" if mrope else "flat")
    draft_vocab_size = config.get("draft_vocab_size", vocab)
    if d2t is None:
        d2t = _read_d2t(Path(directory))
    if d2t is None:
        if draft_vocab_size != vocab:
            raise DraftFormatError(f"{path}: draft_vocab_size {draft_vocab_size} < the target's {vocab} but no d2t map")
        d2t = torch.zeros(vocab, dtype=torch.long)
    if d2t.shape != (draft_vocab_size,):
        raise DraftFormatError(f"{directory}: d2t has shape {tuple(d2t.shape)}, draft_vocab_size is {draft_vocab_size}")
    draft_vocab = (torch.arange(draft_vocab_size) + d2t.long()).tolist()
    if draft_vocab != sorted(set(draft_vocab)) or draft_vocab[0] < 0 or draft_vocab[-1] >= vocab:
        raise DraftFormatError(f"{directory}: d2t does not map the draft vocabulary to ascending target ids below {vocab}")
    head_dim = layer.get("head_dim") or hidden // heads
    return DraftConfig(
        hidden_size=hidden, num_heads=heads, num_kv_heads=layer.get("num_key_value_heads", heads),
        head_dim=head_dim, intermediate_size=_field(layer, "intermediate_size", path), rope_theta=float(theta),
        # FlatRoPE feeds equal positions on every axis, so the section only matters for mrope mode
        mrope_section=list(mrope or scaled_mrope_section(head_dim)),
        rms_norm_eps=layer.get("rms_norm_eps", 1e-6), target_vocab_size=vocab,
        draft_vocab=draft_vocab,
        feature_layers=[i - 1 for i in aux], position_mode=mode,
        max_positions=layer.get("max_position_embeddings", target.max_positions),
        # vLLM reads a missing norm_before_residual as True in the speculators layout; the original
        # EAGLE-3 code has no such option (False)
        norm_before_residual=bool(config.get("norm_before_residual", speculators)),
        norm_before_fc=bool(config.get("norm_before_fc", False)), fc_norm=bool(config.get("fc_norm", False)),
        norm_output=bool(config.get("norm_output", False)), qk_norm=layer.get("model_type") == "qwen3",
    )


def _read_d2t(directory: Path) -> Tensor | None:
    if (directory / "model.safetensors").is_file():
        with safe_open(str(directory / "model.safetensors"), "pt") as weights:
            return weights.get_tensor("d2t") if "d2t" in weights.keys() else None
    return _weights(directory).get("d2t")


def _weights(directory: Path) -> dict[str, Tensor]:
    if (directory / "model.safetensors").is_file():
        return load_file(str(directory / "model.safetensors"))
    if (directory / "pytorch_model.bin").is_file():
        return torch.load(directory / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"draft model file missing: {directory / 'model.safetensors'} (or pytorch_model.bin)")


def load_eagle3(directory: str | Path, target: Decoder, position_mode: str | None = None) -> EagleDraft:
    """An EAGLE-3 draft for `target` (its embedding shared unless the checkpoint brings its own)."""
    directory = Path(directory)
    state = {("layers.0." + k[len("midlayer."):] if k.startswith("midlayer.") else k): v
             for k, v in _weights(directory).items()}
    cfg = draft_config(directory, target.cfg, position_mode, state.get("d2t"))
    state["d2t"] = torch.tensor(cfg.draft_vocab) - torch.arange(cfg.draft_vocab_size)
    own_embedding = state.pop("embed_tokens.weight", None)
    draft = EagleDraft(cfg, target.embed_tokens)
    if own_embedding is not None and not torch.equal(own_embedding.to(target.embed_tokens.weight), target.embed_tokens.weight):
        draft.embed_tokens = torch.nn.Embedding.from_pretrained(own_embedding.float(), freeze=True)
    if "t2d" in state and not torch.equal(state["t2d"].bool(), draft.t2d):
        raise DraftFormatError(f"{directory}: t2d does not mark the ids d2t maps to")
    state["t2d"] = draft.t2d
    own = {k: v for k, v in draft.state_dict().items() if not k.startswith("embed_tokens.")}
    missing, unexpected = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys())
    if missing or unexpected:
        raise DraftFormatError(f"{directory}: missing weights {missing}, unexpected weights {unexpected}")
    for key, value in state.items():
        if value.shape != own[key].shape:
            raise DraftFormatError(f"{directory}: {key} has shape {tuple(value.shape)}, expected {tuple(own[key].shape)}")
    draft.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=False)
    return draft.to(target.embed_tokens.weight.device)
