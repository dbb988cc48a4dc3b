"""Model hyper-parameters as plain dataclasses.

Defaults describe a small target with the structure of Alpamayo-R1 (docs/ARCHITECTURE.md, 'The
model'): Qwen3-VL's text decoder (GQA, q/k RMSNorm, interleaved M-RoPE) and vision tower
(16 x 16 x 2 patches, 2x2 merge, deepstack), and a narrower action expert that shares the
decoder's layer count and KV shape so it can read the decoder's KV cache. On disk they are the
Hugging Face config files of `checkpoint.py` / `alpamayo.py`, not these dataclasses.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .rope import scaled_mrope_section


@dataclass
class DecoderConfig:
    vocab_size: int
    hidden_size: int = 256
    num_layers: int = 6
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 64
    intermediate_size: int = 768
    rope_theta: float = 5e6
    mrope_section: list[int] | None = None  # None -> 24:20:20 scaled to head_dim // 2 pairs
    rms_norm_eps: float = 1e-6
    max_positions: int = 1024  # default KV-cache capacity
    tie_word_embeddings: bool = False

    def __post_init__(self) -> None:
        if self.mrope_section is None:
            self.mrope_section = scaled_mrope_section(self.head_dim)
        self.mrope_section = list(self.mrope_section)
        assert self.num_heads % self.num_kv_heads == 0, "GQA needs num_heads % num_kv_heads == 0"

    @classmethod
    def from_hf_text_config(cls, cfg: Any) -> "DecoderConfig":
        """From a transformers Qwen3VLTextConfig (object or dict), e.g. `config.text_config`.

        transformers 5.x keeps theta and mrope_section in `rope_parameters`; 4.x used
        `rope_theta` and `rope_scaling`. Both are read; transformers' own fallback for a missing
        mrope_section is [24, 20, 20], so we use the same.
        """
        get = cfg.get if isinstance(cfg, dict) else lambda k, d=None: getattr(cfg, k, d)
        if get("hidden_act", "silu") != "silu":
            raise ValueError(f"only SiLU MLPs are supported, got {get('hidden_act')}")
        rope = dict(get("rope_parameters") or get("rope_scaling") or {})
        theta = rope.get("rope_theta", get("rope_theta", 5e6))
        heads = get("num_attention_heads")
        return cls(
            vocab_size=get("vocab_size"),
            hidden_size=get("hidden_size"),
            num_layers=get("num_hidden_layers"),
            num_heads=heads,
            num_kv_heads=get("num_key_value_heads") or heads,
            head_dim=get("head_dim") or get("hidden_size") // heads,
            intermediate_size=get("intermediate_size"),
            rope_theta=float(theta),
            mrope_section=list(rope.get("mrope_section", [24, 20, 20])),
            rms_norm_eps=get("rms_norm_eps", 1e-6),
            max_positions=min(int(get("max_position_embeddings", 4096)), 4096),
            tie_word_embeddings=bool(get("tie_word_embeddings", False)),
        )


@dataclass
class VisionConfig:
    """Qwen3-VL's vision tower (the fields of transformers' Qwen3VLVisionConfig) and the image
    processor's settings (image_mean / image_std, and the camera frame size the model is fed,
    a multiple of patch_size * spatial_merge_size)."""

    depth: int = 3
    hidden_size: int = 128
    hidden_act: str = "gelu_pytorch_tanh"
    intermediate_size: int = 512
    num_heads: int = 4
    in_channels: int = 3
    patch_size: int = 16
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    out_hidden_size: int | None = None  # None -> the decoder's hidden size (set by TargetConfig)
    num_position_embeddings: int = 64
    deepstack_visual_indexes: list[int] = field(default_factory=lambda: [0, 1])
    rope_theta: float = 10000.0
    image_height: int = 64
    image_width: int = 128
    image_mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    image_std: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])

    def __post_init__(self) -> None:
        self.deepstack_visual_indexes = list(self.deepstack_visual_indexes)
        step = self.patch_size * self.spatial_merge_size
        if self.image_height % step or self.image_width % step:
            raise ValueError(f"image size {self.image_width}x{self.image_height} must be a multiple of {step}")
        if any(not 0 <= i < self.depth for i in self.deepstack_visual_indexes):
            raise ValueError(f"deepstack_visual_indexes {self.deepstack_visual_indexes} outside 0..{self.depth - 1}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def grid(self) -> tuple[int, int]:
        """(rows, cols) of merged tokens per image: the image block's M-RoPE grid."""
        step = self.patch_size * self.spatial_merge_size
        return self.image_height // step, self.image_width // step

    @property
    def tokens_per_image(self) -> int:
        rows, cols = self.grid
        return rows * cols

    @property
    def num_patches(self) -> int:
        return self.tokens_per_image * self.spatial_merge_size ** 2


@dataclass
class ExpertConfig:
    """Alpamayo-R1's trajectory side. Layer count, KV heads and head_dim come from the decoder
    (the expert reads its cache); the rest are the release's expert_cfg overrides (hidden_size,
    num_heads, intermediate_size), action_in_proj_cfg (proj_hidden_size, proj_layers,
    fourier_features, max_freq), action space (horizon, action_dim) and diffusion_cfg
    (euler_steps)."""

    hidden_size: int = 128
    num_heads: int = 4
    intermediate_size: int = 384
    horizon: int = 64  # waypoints at 10 Hz
    action_dim: int = 2  # (acceleration, curvature)
    euler_steps: int = 10
    proj_hidden_size: int = 256
    proj_layers: int = 4
    fourier_features: int = 20
    # The release uses 100: frequencies 1..100 cycles per normalised unit. A small expert trained
    # for minutes cannot unwrap such features into x_t (a 300-step fit of a fixed target stalled
    # at loss 1.0, i.e. x_t ignored; 0.09 with 0.1, whose frequencies run from 1 down to 0.1).
    max_freq: float = 0.1


@dataclass
class TargetConfig:
    """The whole target. `expert` is None for a bare Qwen3-VL checkpoint (no trajectory head)."""

    decoder: DecoderConfig
    vision: VisionConfig = field(default_factory=VisionConfig)
    expert: ExpertConfig | None = field(default_factory=ExpertConfig)
    image_pad_id: int = -1  # id of <|image_pad|>; set from the tokenizer

    def __post_init__(self) -> None:
        if self.vision.out_hidden_size is None:
            self.vision.out_hidden_size = self.decoder.hidden_size
        if self.vision.out_hidden_size != self.decoder.hidden_size:
            raise ValueError(f"vision out_hidden_size {self.vision.out_hidden_size} != decoder hidden_size "
                             f"{self.decoder.hidden_size}")
        if self.expert is not None and self.expert.num_heads % self.decoder.num_kv_heads:
            raise ValueError("the expert's heads must be a multiple of the decoder's KV heads")

    @classmethod
    def tiny(cls, vocab_size: int, image_pad_id: int) -> "TargetConfig":
        """A few-hundred-kilobyte target of the same structure, for tests and smoke runs."""
        return cls(
            decoder=DecoderConfig(vocab_size=vocab_size, hidden_size=64, num_layers=3, num_heads=4, num_kv_heads=2,
                                  head_dim=16, intermediate_size=128, max_positions=400),
            vision=VisionConfig(depth=2, hidden_size=32, num_heads=2, intermediate_size=64),
            expert=ExpertConfig(hidden_size=32, num_heads=2, intermediate_size=64, proj_hidden_size=32),
            image_pad_id=image_pad_id,
        )
