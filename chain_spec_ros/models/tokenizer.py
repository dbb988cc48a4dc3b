"""The project's tokeniser: a small byte-level BPE for the CoC language, Alpamayo's special
tokens and one token per quantisation bin (shared by the history and discrete future).

Built with the `tokenizers` library and saved as a standard `tokenizer.json`, so any
`tokenizers`/transformers user can load it.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from ..trajectory import NUM_BINS

SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>",
    "<|vision_start|>", "<|image_pad|>", "<|video_pad|>", "<|vision_end|>",
    "<|traj_history_start|>", "<|traj_history|>", "<|traj_history_end|>",
    "<|cot_start|>", "<|cot_end|>", "<|traj_future_start|>", "<|traj_future_end|>",
]
BIN_TOKENS = [f"<|bin_{i}|>" for i in range(NUM_BINS)]
BPE_VOCAB_SIZE = 1024


class ChainTokenizer:
    """Thin wrapper adding the ids the prompt and decoder need by name."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        missing = [t for t in SPECIAL_TOKENS + BIN_TOKENS[:1] + BIN_TOKENS[-1:] if tokenizer.token_to_id(t) is None]
        if missing:
            raise ValueError(f"tokenizer lacks required special tokens: {missing}")
        self.bin_offset = tokenizer.token_to_id(BIN_TOKENS[0])
        if tokenizer.token_to_id(BIN_TOKENS[-1]) != self.bin_offset + NUM_BINS - 1:
            raise ValueError("bin tokens must have consecutive ids")

    @classmethod
    def load(cls, path: str | Path) -> "ChainTokenizer":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {path}")
        return cls(Tokenizer.from_file(str(path)))

    def save(self, path: str | Path) -> None:
        self.tokenizer.save(str(path))

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def id(self, token: str) -> int:
        return self.tokenizer.token_to_id(token)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        encoding = self.tokenizer.encode(text, add_special_tokens=False)
        return encoding.ids, encoding.offsets

    def decode(self, ids) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)

    def bins_to_ids(self, bins: np.ndarray) -> np.ndarray:
        return np.asarray(bins, dtype=np.int64) + self.bin_offset

    def token_labels(self, text: str, char_labels: np.ndarray) -> tuple[list[int], np.ndarray]:
        """Token ids of a CoC and, per token, 1 if any of its characters is visual evidence."""
        ids, offsets = self.encode_with_offsets(text)
        labels = np.array([int(char_labels[a:b].max()) if b > a else 0 for a, b in offsets], dtype=np.uint8)
        return ids, labels


def train_tokenizer(corpus: list[str]) -> ChainTokenizer:
    """Byte-level BPE over the corpus, then the special and bin tokens appended as atoms."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    tokenizer.add_special_tokens(BIN_TOKENS)
    return ChainTokenizer(tokenizer)
