"""Helpers shared by the test modules."""
import numpy as np
import torch

from chain_spec_ros.models.config import TargetConfig
from chain_spec_ros.models.target import TargetVLA
from chain_spec_ros.models.tokenizer import ChainTokenizer
from chain_spec_ros.paths import default_tokenizer_path
from chain_spec_ros.prompt import PromptBuilder


def tiny_target(seed: int) -> tuple[TargetVLA, PromptBuilder]:
    """A random `TargetConfig.tiny` target (seeded) and the prompt builder of the bundled tokeniser."""
    torch.manual_seed(seed)
    tok = ChainTokenizer.load(default_tokenizer_path())
    cfg = TargetConfig.tiny(tok.vocab_size, tok.id("<|image_pad|>"))
    return TargetVLA(cfg).eval(), PromptBuilder(tok, *cfg.vision.grid)


def random_scene(seed: int, cameras: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Random camera frames [cameras, 4 frames, H, W, 3] uint8 at the `TargetConfig.tiny`
    targets' frame size, and 48 random history bins."""
    vision = TargetConfig.tiny(vocab_size=1, image_pad_id=0).vision
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 255, size=(cameras, 4, vision.image_height, vision.image_width, 3), dtype=np.uint8)
    return images, rng.integers(0, 1000, size=48)
