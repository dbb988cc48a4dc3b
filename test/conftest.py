"""Helpers shared by the test modules."""
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
