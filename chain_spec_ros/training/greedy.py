"""The target's own greedy CoCs, the draft's training data. The draft learns what the target
actually emits, its special tokens (`<|cot_end|>`) included, not the dataset's reference
sentences: greedy verification keeps a drafted token only where it equals the target's own choice
(docs/ARCHITECTURE.md, 'Training').

Prompts share one layout, so a batch prefills together and decodes in lock-step; rows that
have emitted `<|cot_end|>` keep decoding harmlessly until every row has, and their extra
tokens are dropped. Results are cached as JSON lines next to the dataset.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..models.target import TargetVLA
from ..planner import MAX_COC_TOKENS
from ..prompt import PromptBuilder


@torch.inference_mode()
def greedy_cocs(target: TargetVLA, builder: PromptBuilder, images: np.ndarray, history_tokens: np.ndarray,
                batch_size: int = 32, desc: str = "greedy CoCs") -> list[list[int]]:
    """Greedy CoC token ids (stop token excluded) for every scene."""
    stop = builder.cot_end_id
    out: list[list[int]] = []
    for begin in tqdm(range(0, len(images), batch_size), desc=desc, unit="batch"):
        prompts = [builder.build(images[i], history_tokens[i]) for i in range(begin, min(begin + batch_size, len(images)))]
        B, P = len(prompts), len(prompts[0])
        cache = target.new_cache(B, P + MAX_COC_TOKENS + 1)
        ids = torch.from_numpy(np.stack([p.input_ids for p in prompts]))
        pixels = torch.from_numpy(np.concatenate([p.images for p in prompts]))
        logits, _ = target.prefill(ids, target.encode_images(pixels), prompts[0].mrope_positions, cache, num_logits=1)
        token = logits[:, -1].argmax(-1)
        rows = [[] for _ in range(B)]
        done = torch.zeros(B, dtype=torch.bool)
        for _ in range(MAX_COC_TOKENS):
            done |= token == stop
            if done.all():
                break
            for b in (~done).nonzero().flatten().tolist():
                rows[b].append(int(token[b]))
            logits, _ = target.decode(token[:, None], cache, prompts[0].rope_delta)
            token = logits[:, -1].argmax(-1)
        out += rows
    return out


def target_fingerprint(target: TargetVLA) -> str:
    """Identifies the target's weights, so cached outputs of another target are never reused."""
    return hashlib.sha1(target.decoder.lm_head.weight.detach().numpy().tobytes()).hexdigest()[:12]


def cached_greedy_cocs(cache_dir: Path, split: str, target: TargetVLA, builder: PromptBuilder, table,
                       limit: int | None = None) -> list[list[int]]:
    """Greedy CoCs of the first `limit` scenes of a split, computed once per target and cached."""
    cache_path = cache_dir / f"greedy_{split}_{target_fingerprint(target)}.jsonl"
    n = min(len(table), limit or len(table))
    seeds = [int(r["seed"]) for r in table.records[:n]]
    if cache_path.is_file():
        cached = [json.loads(line) for line in cache_path.read_text().splitlines()]
        by_seed = {c["seed"]: c["ids"] for c in cached}
        if all(s in by_seed for s in seeds):
            return [by_seed[s] for s in seeds]
    cocs = greedy_cocs(target, builder, table.arrays["images"][:n], table.arrays["history_tokens"][:n])
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    partial = cache_path.with_suffix(".partial")  # a reader never sees a half-written cache
    partial.write_text("".join(json.dumps({"seed": s, "ids": c}) + "\n" for s, c in zip(seeds, cocs)))
    partial.replace(cache_path)
    return cocs
