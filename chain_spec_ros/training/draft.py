"""Train the routine reasoner (EAGLE-3 draft) on the target's own greedy CoCs.

Training-time test (EAGLE-3): step 0 reads the target's fused features at every index; steps
1..6 re-run the draft at the same CoC base indices feeding its own previous hidden state as
the feature, exactly as chained drafting does at inference. A query at step s, base i attends
to the step-0 entries 0..i and to its own chain entries of steps 1..s, and predicts the token
2 + s after i. Losses are weighted 0.8^s. The checkpoint with the best validation tau (mean
accepted length, measured with the real draft-verify loop) is kept.

    chain-spec-train-draft --data DATA --target models/target --out models/draft [--position-mode flat|mrope]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ..data.dataset import load_split
from ..drafters import EagleDrafter
from ..models.decoder import causal_mask
from ..models.draft import DraftConfig, EagleDraft
from ..models.target import TargetVLA
from ..models.tokenizer import ChainTokenizer
from ..engines.torch_engine import TorchDraftEngine, TorchTargetEngine
from ..planner import Planner
from ..prompt import PromptBuilder
from .common import Runtime, cosine_lr, main_rank_first, rank_batches, save_curves, setup_runtime, shutdown_runtime
from .greedy import cached_greedy_cocs

TTT_STEPS = 7
STEP_DECAY = 0.8


class GreedyBatches:
    """Prompt + greedy CoC + `<|cot_end|>` sequences, right-padded, with the prompt layout."""

    def __init__(self, builder: PromptBuilder, table, cocs: list[list[int]]):
        self.builder, self.table = builder, table
        self.answers = [c + [builder.cot_end_id] for c in cocs]

    def __len__(self) -> int:
        return len(self.answers)

    def prompt(self, i: int):
        return self.builder.build(self.table.arrays["images"][i], self.table.arrays["history_tokens"][i])

    def batch(self, indices):
        prompts = [self.prompt(i) for i in indices]
        P, A = len(prompts[0]), max(len(self.answers[i]) for i in indices)
        ids = torch.zeros(len(indices), P + A, dtype=torch.long)
        valid = torch.zeros(len(indices), P + A, dtype=torch.bool)
        for row, (i, prompt) in enumerate(zip(indices, prompts)):
            answer = self.answers[i]
            ids[row, :P] = torch.from_numpy(prompt.input_ids)
            ids[row, P : P + len(answer)] = torch.tensor(answer)
            valid[row, : P + len(answer)] = True
        images = torch.from_numpy(np.concatenate([p.images for p in prompts]))
        return prompts[0], ids, valid, images


def greedy_splits(runtime: Runtime, data: str, train_scenes: int, val_scenes: int, target: TargetVLA,
                  builder: PromptBuilder, cache_dir: Path) -> tuple[GreedyBatches, GreedyBatches]:
    """Train and validation batches of the target's own greedy CoCs, cached in cache_dir (rank 0
    computes and writes the cache, the other ranks then read it)."""
    def load(split: str, limit: int) -> GreedyBatches:
        table = load_split(data, split, limit=limit)
        return GreedyBatches(builder, table, cached_greedy_cocs(cache_dir, split, target, builder, table))

    return main_rank_first(runtime, lambda: (load("train", train_scenes), load("val", val_scenes)))


def draft_vocabulary(answers: list[list[int]]) -> list[int]:
    """The draft vocabulary: every token of the training answers (greedy CoCs + `<|cot_end|>`)."""
    vocab = sorted({token for answer in answers for token in answer})
    if not vocab:
        raise ValueError("no training answers: the draft vocabulary would be empty")
    return vocab


@torch.no_grad()
def target_features(target: TargetVLA, prompt, ids: torch.Tensor, images: torch.Tensor, layers: list[int]):
    """The target's hidden states of the feature layers over prompt + answer (teacher forced)."""
    P = len(prompt)
    positions = torch.cat([prompt.mrope_positions, prompt.positions(P, ids.shape[1] - P, "mrope")], dim=1)
    _, hidden = target.prefill(ids, target.encode_images(images), positions, None, return_hidden_layers=layers,
                               num_logits=1)
    return hidden


def ttt_rollout(draft: EagleDraft, prompt, ids: torch.Tensor, features: list[torch.Tensor],
                steps: int = TTT_STEPS) -> list[torch.Tensor]:
    """Draft hidden states [B, nb, D] at every CoC base index (P-1 .. T-2), one per rollout step.

    Step s at base i is what chained drafting computes for the (s+1)-th draft after index i:
    input (token i+1+s, the step s-1 hidden state), position i + s, attending to the step-0
    entries 0..i and to the chain entries of steps 1..s at base i.
    """
    B, T = ids.shape
    P = len(prompt)
    mode = draft.cfg.position_mode
    n0 = T - 1  # step-0 indices 0..T-2: input (token i+1, feature i)
    step0_keys: list[tuple[torch.Tensor, torch.Tensor]] = []

    def remember(k, v):
        step0_keys.append((k, v))
        return k, v

    positions = prompt.positions(0, n0, mode)[:, None].expand(3, B, n0)
    hidden = draft(ids[:, 1:], draft.fuse_features(features)[:, :n0], positions, kv_hook=remember,
                   mask=causal_mask(n0, 0))
    k0, v0 = step0_keys[0]
    bases = torch.arange(P - 1, n0)
    nb = len(bases)
    padded = F.pad(ids, (0, steps + 2))
    step0_mask = torch.arange(n0)[None, :] <= bases[:, None]  # [nb, n0]
    chain_keys: list[tuple[torch.Tensor, torch.Tensor]] = []

    def extend(k, v):
        chain_keys.append((k, v))
        return (torch.cat([k0] + [ck for ck, _ in chain_keys], dim=2),
                torch.cat([v0] + [cv for _, cv in chain_keys], dim=2))

    rollout = [hidden[:, P - 1 :]]
    for s in range(1, steps):
        mask = torch.cat([step0_mask] + [torch.eye(nb, dtype=torch.bool)] * s, dim=1)
        tokens = padded[:, P + s : P + s + nb]  # token i+1+s for base i
        positions = prompt.positions(P - 1 + s, nb, mode)[:, None].expand(3, B, nb)
        rollout.append(draft(tokens, rollout[-1], positions, kv_hook=extend, mask=mask))
    return rollout


def ttt_loss(draft: EagleDraft, prompt, ids: torch.Tensor, valid: torch.Tensor, features: list[torch.Tensor],
             steps: int = TTT_STEPS) -> tuple[torch.Tensor, list[float]]:
    """Rollout loss (weights 0.8^s) and per-step accuracy on the CoC labels."""
    P = len(prompt)
    padded = F.pad(ids, (0, steps + 2))
    padded_valid = F.pad(valid, (0, steps + 2))
    total, accuracies = 0.0, []
    for s, hidden in enumerate(ttt_rollout(draft, prompt, ids, features, steps)):
        nb = hidden.shape[1]
        labels = padded[:, P + 1 + s : P + 1 + s + nb]  # token i+2+s for base i
        keep = padded_valid[:, P + 1 + s : P + 1 + s + nb]
        logits = draft.logits(hidden)[keep]
        total = total + STEP_DECAY**s * F.cross_entropy(logits, labels[keep])
        accuracies.append(float((logits.argmax(-1) == labels[keep]).float().mean()))
    return total, accuracies


def validation_tau(target: TargetVLA, draft: EagleDraft, data: GreedyBatches, n: int, k: int = 7) -> float:
    """Mean accepted length of the real draft-verify loop (PyTorch engines) on the first n scenes."""
    planner = Planner(TorchTargetEngine(target, draft.cfg.feature_layers), data.builder,
                      EagleDrafter(TorchDraftEngine(draft), stop_id=data.builder.cot_end_id), k, expert_steps=1)
    produced = passes = 0
    for i in range(min(n, len(data))):
        result = planner.plan(data.table.arrays["images"][i], data.table.arrays["history_tokens"][i], 0.0)
        produced += result.stats["tau"] * result.stats["target_passes"]
        passes += result.stats["target_passes"]
    draft.train()
    return produced / max(passes, 1)


class BestTauCheckpoint:
    """Measures validation tau and saves the draft whenever it beats every earlier measurement:
    the authors note checkpoints peak mid-training, so the best one is kept, not the last."""

    def __init__(self, target: TargetVLA, val: GreedyBatches, scenes: int, out: str | Path):
        self.target, self.val, self.scenes, self.out = target, val, scenes, out
        self.best = -1.0
        self.history: list[tuple[int, float]] = []  # (step, tau)

    def check(self, draft: EagleDraft, step: int) -> float:
        tau = validation_tau(self.target, draft, self.val, self.scenes)
        self.history.append((step, tau))
        if tau > self.best:
            self.best = tau
            draft.save_pretrained(self.out)
        return tau


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="chain-spec-train-draft", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--target", required=True, help="target model directory")
    parser.add_argument("--tokenizer", help="defaults to tokenizer.json beside the target directory")
    parser.add_argument("--out", required=True)
    parser.add_argument("--position-mode", choices=("flat", "mrope"), default="flat")
    parser.add_argument("--train-scenes", type=int, default=5000)
    parser.add_argument("--val-scenes", type=int, default=64)
    parser.add_argument("--steps", type=int, default=900)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--evals", type=int, default=5, help="validation-tau checkpoints during training")
    parser.add_argument("--cache-dir", help="where greedy target outputs are cached (default: OUT/../greedy_cache)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vocab-only", action="store_true",
                        help="only write the draft vocabulary of the training scenes (as many as SFT used) into the "
                             "config of the draft in OUT; re-export its ONNX graphs afterwards")
    args = parser.parse_args(argv)

    runtime = setup_runtime(args.seed)
    target_dir = Path(args.target)
    target = TargetVLA.from_pretrained(target_dir, runtime.device).eval()
    for p in target.parameters():
        p.requires_grad_(False)
    tokenizer = ChainTokenizer.load(args.tokenizer or target_dir.parent / "tokenizer.json")
    builder = PromptBuilder(tokenizer, *target.cfg.vision.grid)
    cache_dir = Path(args.cache_dir) if args.cache_dir else Path(args.out).parent / "greedy_cache"
    train, val = greedy_splits(runtime, args.data, args.train_scenes, args.val_scenes, target, builder, cache_dir)
    vocab = draft_vocabulary(train.answers)
    if args.vocab_only:
        config = DraftConfig.load(Path(args.out) / "config.json")
        config.vocab = vocab
        if runtime.is_main:
            config.save(Path(args.out) / "config.json")
            print(f"draft vocabulary: {len(vocab)} of {target.cfg.decoder.vocab_size} tokens -> {args.out}/config.json; "
                  f"re-export: chain-spec-export --models MODELS --draft {args.out}")
        shutdown_runtime(runtime)
        return 0

    config = DraftConfig.for_target(target.cfg.decoder, args.position_mode)
    config.vocab = vocab
    draft = EagleDraft(config, target.decoder.embed_tokens, target.decoder.lm_head).to(runtime.device)
    wrapped = runtime.wrap(_TTTObjective(draft, target))
    optimiser = torch.optim.AdamW(draft.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    checkpoint = BestTauCheckpoint(target, val, args.val_scenes, args.out)
    curves = {"ttt loss": [], "step-0 accuracy": [], "step-6 accuracy": [], "val tau": checkpoint.history}
    started = time.time()
    eval_every = max(args.steps // args.evals, 1)
    progress = tqdm(rank_batches(len(train), args.batch_size, args.steps, args.seed, runtime), total=args.steps,
                    desc=f"draft SFT ({args.position_mode})", disable=not runtime.is_main)
    for step, indices in enumerate(progress):
        for group in optimiser.param_groups:
            group["lr"] = cosine_lr(step, args.steps, args.lr)
        loss, accuracies = wrapped(*train.batch(list(indices)))
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(draft.parameters(), 1.0)
        optimiser.step()
        curves["ttt loss"].append((step, float(loss.detach())))
        curves["step-0 accuracy"].append((step, accuracies[0]))
        curves["step-6 accuracy"].append((step, accuracies[-1]))
        progress.set_postfix(loss=f"{float(loss.detach()):.3f}", acc0=f"{accuracies[0]:.2f}")
        if runtime.is_main and ((step + 1) % eval_every == 0 or step + 1 == args.steps):
            tau = checkpoint.check(draft, step)
            progress.write(f"step {step + 1}: val tau {tau:.3f}")
    if runtime.is_main:
        save_curves(Path(args.out) / "training_curves", curves, f"draft SFT ({args.position_mode})")
        summary = {"seconds": round(time.time() - started, 1), "best_val_tau": checkpoint.best,
                   "processes": runtime.world_size, "args": vars(args)}
        (Path(args.out) / "training_summary.json").write_text(json.dumps(summary, indent=1))
        print(json.dumps(summary))
    shutdown_runtime(runtime)
    return 0


class _TTTObjective(nn.Module):
    """Target features (frozen) then the draft's rollout loss; a module so DDP can wrap it."""

    def __init__(self, draft: EagleDraft, target: TargetVLA):
        super().__init__()
        self.draft = draft
        self._target = (target,)  # not a submodule: frozen and not synchronised by DDP

    def forward(self, prompt, ids, valid, images):
        # The frozen target runs in bf16 autocast (twice as fast on CPU); the draft learns in fp32
        # and meets fp32 features at inference, a difference well below its own error.
        with torch.autocast(ids.device.type, dtype=torch.bfloat16):
            features = target_features(self._target[0], prompt, ids, images, self.draft.cfg.feature_layers)
        return ttt_loss(self.draft, prompt, ids, valid, [f.float() for f in features])


if __name__ == "__main__":
    raise SystemExit(main())
