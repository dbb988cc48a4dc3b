"""Train the routine reasoner (EAGLE-3 draft) on the target's own greedy CoCs, as the paper's
authors' `train_eagle3.py` does.

Training-time test (EAGLE-3): step 0 reads the target's fused features at every index; steps
1..6 re-run the draft at the same base indices feeding its own previous hidden state as the
feature, exactly as chained drafting does at inference. A query at step s, base i attends to the
step-0 entries 0..i and to its own chain entries of steps 1..s, and predicts the token 2 + s
after i. Each step's loss is the cross-entropy to the target's distribution there (soft labels,
over the draft vocabulary), weighted 0.8^s; chains rooted inside the prompt count from the step
whose input is an answer token. The checkpoint with the best validation tau (mean accepted
length, measured with the real draft-verify loop at k = 7) is kept.

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
def target_features(target: TargetVLA, prompt, ids: torch.Tensor, images: torch.Tensor, layers: list[int]
                    ) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The target's hidden states of the feature layers over prompt + answer (teacher forced),
    and its logits at the answer's indices P .. T-1 [B, T-P, V] (index j predicts token j+1)."""
    P = len(prompt)
    positions = torch.cat([prompt.mrope_positions, prompt.positions(P, ids.shape[1] - P, "mrope")], dim=1)
    logits, hidden = target.prefill(ids, target.encode_images(images), positions, None, return_hidden_layers=layers,
                                    num_logits=ids.shape[1] - P)
    return hidden, logits


def chain_rollout(draft: EagleDraft, prompt, ids: torch.Tensor, features: list[torch.Tensor], steps: int,
                  first_base: int, greedy: bool = False) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The draft's chains rooted at every base index i = first_base .. T-2, all in one pass per
    chain step: hidden states [B, nb, D] per step, and the tokens [B, nb] each step read.

    Step s at base i is what chained drafting computes for the (s+1)-th draft after index i:
    input (token, the step s-1 hidden state), position i + s, attending to the step-0 entries
    0..i and to the chain entries of steps 1..s at base i (EAGLE-3's training-time test). The
    token is the sequence's i+1+s (teacher forcing: training) or, with greedy, the draft's own
    choice of step s-1 (what deployment feeds; AARL probes and samples along it).
    """
    B, T = ids.shape
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
    bases = torch.arange(first_base, n0)
    nb = len(bases)
    padded = F.pad(ids, (0, steps + 2))
    step0_mask = torch.arange(n0)[None, :] <= bases[:, None]  # [nb, n0]
    chain_keys: list[tuple[torch.Tensor, torch.Tensor]] = []

    def extend(k, v):
        chain_keys.append((k, v))
        return (torch.cat([k0] + [ck for ck, _ in chain_keys], dim=2),
                torch.cat([v0] + [cv for _, cv in chain_keys], dim=2))

    rollout, tokens = [hidden[:, first_base:]], [ids[:, first_base + 1 : first_base + 1 + nb]]
    for s in range(1, steps):
        mask = torch.cat([step0_mask] + [torch.eye(nb, dtype=torch.bool)] * s, dim=1)
        if greedy:
            token = draft.target_ids[draft.logits(rollout[-1]).argmax(-1)]
        else:
            token = padded[:, first_base + 1 + s : first_base + 1 + s + nb]  # token i+1+s for base i
        positions = prompt.positions(first_base + s, nb, mode)[:, None].expand(3, B, nb)
        rollout.append(draft(token, rollout[-1], positions, kv_hook=extend, mask=mask))
        tokens.append(token)
    return rollout, tokens


def ttt_loss(draft: EagleDraft, prompt, ids: torch.Tensor, valid: torch.Tensor, features: list[torch.Tensor],
             target_logits: torch.Tensor, steps: int = TTT_STEPS) -> tuple[torch.Tensor, list[float]]:
    """EAGLE-3's soft-label training-time test: sum over steps s of 0.8^s x the cross-entropy of
    the draft's distribution to the target's (restricted to the draft vocabulary and
    renormalised), pooled over every (base, step) whose predicted token is an answer token. Chains
    start inside the prompt too (bases P-steps ..), as the authors train them: a chain rooted
    before the answer counts from the step whose input is the first answer token. Returns the
    loss and per-step accuracy (draft argmax == target argmax)."""
    P = len(prompt)
    first_base = max(P - steps, 0)
    padded_valid = F.pad(valid, (0, steps + 2))
    teacher = F.pad(target_logits, (0, 0, 0, steps + 2))  # index j - P holds the target's logits at index j
    total, accuracies = 0.0, []
    rollout, _ = chain_rollout(draft, prompt, ids, features, steps, first_base)
    for s, hidden in enumerate(rollout):
        nb = hidden.shape[1]
        inputs = torch.arange(first_base + 1 + s, first_base + 1 + s + nb)  # input token index i+1+s
        keep = (inputs >= P)[None, :] & padded_valid[:, first_base + 2 + s : first_base + 2 + s + nb]
        if not keep.any():
            continue
        rows = teacher[:, (inputs - P).clamp_min(0)][keep]  # the target's logits at i+1+s, predicting i+2+s
        target_p = F.softmax(rows.float()[:, draft.target_ids], dim=-1)
        log_q = F.log_softmax(draft.logits(hidden[keep]).float(), dim=-1)
        total = total + STEP_DECAY**s * -(target_p * log_q).sum(-1).mean()
        accuracies.append(float((draft.target_ids[log_q.argmax(-1)] == rows.argmax(-1)).float().mean()))
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
    parser.add_argument("--rope-theta", type=float, help="the draft's rotary base (default: the target's)")
    parser.add_argument("--init", help="continue from this draft (its vocabulary, positions and rotary kept)")
    parser.add_argument("--train-scenes", type=int, default=5000)
    parser.add_argument("--val-scenes", type=int, default=64)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--evals", type=int, default=5, help="validation-tau checkpoints during training")
    parser.add_argument("--cache-dir", help="where greedy target outputs are cached (default: OUT/../greedy_cache)")
    parser.add_argument("--seed", type=int, default=0)
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
    if args.init:
        draft = EagleDraft.from_pretrained(args.init, target.decoder).to(runtime.device).train()
    else:
        config = DraftConfig.for_target(target.cfg.decoder, draft_vocabulary(train.answers), args.position_mode)
        config.rope_theta = args.rope_theta or config.rope_theta
        draft = EagleDraft(config, target.decoder.embed_tokens).to(runtime.device)
        draft.init_head_from(target.decoder.lm_head)
    wrapped = runtime.wrap(_TTTObjective(draft, target, runtime))
    optimiser = torch.optim.AdamW(draft.trainable_parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    checkpoint = BestTauCheckpoint(target, val, args.val_scenes, args.out)
    curves = {"ttt loss": [], "step-0 accuracy": [], "step-6 accuracy": [], "val tau": checkpoint.history}
    started = time.time()
    eval_every = max(args.steps // args.evals, 1)
    progress = tqdm(rank_batches(len(train), args.batch_size, args.steps, args.seed, runtime), total=args.steps,
                    desc=f"draft SFT ({draft.cfg.position_mode})", disable=not runtime.is_main)
    for step, indices in enumerate(progress):
        for group in optimiser.param_groups:
            group["lr"] = cosine_lr(step, args.steps, args.lr)
        loss, accuracies = wrapped(*train.batch(list(indices)))
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(draft.trainable_parameters(), 1.0)
        optimiser.step()
        curves["ttt loss"].append((step, float(loss.detach())))
        curves["step-0 accuracy"].append((step, accuracies[0]))
        curves["step-6 accuracy"].append((step, accuracies[-1]))
        progress.set_postfix(loss=f"{float(loss.detach()):.3f}", acc0=f"{accuracies[0]:.2f}")
        if runtime.is_main and ((step + 1) % eval_every == 0 or step + 1 == args.steps):
            tau = checkpoint.check(draft, step)
            progress.write(f"step {step + 1}: val tau {tau:.3f}")
    if runtime.is_main:
        save_curves(Path(args.out) / "training_curves", curves, f"draft SFT ({draft.cfg.position_mode})")
        summary = {"seconds": round(time.time() - started, 1), "best_val_tau": checkpoint.best,
                   "processes": runtime.world_size, "bf16_autocast": runtime.amp, "args": vars(args)}
        (Path(args.out) / "training_summary.json").write_text(json.dumps(summary, indent=1))
        print(json.dumps(summary))
    shutdown_runtime(runtime)
    return 0


class _TTTObjective(nn.Module):
    """Target features (frozen) then the draft's rollout loss; a module so DDP can wrap it."""

    def __init__(self, draft: EagleDraft, target: TargetVLA, runtime: Runtime):
        super().__init__()
        self.draft = draft
        self._target, self._runtime = (target,), runtime  # the target is not a submodule: frozen, not synchronised by DDP

    def forward(self, prompt, ids, valid, images):
        # The frozen target runs in bf16 autocast where bf16 is native (twice as fast on such
        # CPUs); the draft learns in fp32 and meets fp32 features at inference, a difference well
        # below its own error.
        with self._runtime.autocast():
            features, logits = target_features(self._target[0], prompt, ids, images, self.draft.cfg.feature_layers)
        return ttt_loss(self.draft, prompt, ids, valid, [f.float() for f in features], logits.float())


if __name__ == "__main__":
    raise SystemExit(main())
