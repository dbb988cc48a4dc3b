"""AARL: action-aware RL post-training of the draft (docs/ARCHITECTURE.md, 'Training').

For each training scene, at CoC positions where the greedy draft disagrees with the target:
sample K draft continuations (temperature 1.0) that replace 5 consecutive CoC tokens, re-run
the target and its trajectory expert on every modified CoC, and reward each sample with
    -MSE(trajectory of the modified CoC, trajectory of the original CoC) + 0.5 x token-match rate
(plus an optional rule-based meta-action term, weight 0 by default). The advantage is the
reward minus the group mean (GRPO style). The loss is
    -advantage x sum of log pi over the replaced positions + 0.02 x KL(pi || pi_ref),
with pi_ref a frozen copy of the SFT draft that is never refreshed (the static-reference KL
anchor), applied at CoC positions where pi_ref's argmax matches the target. pi is the draft's
proposal distribution (`EagleDraft.proposal_logits`: its vocabulary only), the one drafting
greedily picks from and samples from, so disagreements and samples are those of deployment;
the KL compares the whole-vocabulary distributions. The checkpoint
with the best validation tau is kept, the SFT start included.

    chain-spec-train-aarl --data DATA --target models/target --draft models/draft --out models/draft_aarl
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..models.decoder import causal_mask
from ..models.draft import EagleDraft
from ..models.target import TargetVLA
from ..models.tokenizer import ChainTokenizer
from ..prompt import PromptBuilder
from ..scenarios.coc import decision_from_coc
from .common import average_gradients, save_curves, setup_runtime, shutdown_runtime
from .draft import BestTauCheckpoint, greedy_splits, target_features

REPLACED = 5


def step0_logits(draft: EagleDraft, prompt, ids: torch.Tensor, features, remember=None):
    """Draft hidden states and logits [1, T-1, V] at every index i (predicting token i+2), with
    the true target features; `remember` captures the draft's keys for chained sampling."""
    n0 = ids.shape[1] - 1
    positions = prompt.positions(0, n0, draft.cfg.position_mode)[:, None]
    hidden = draft(ids[:, 1:], draft.fuse_features(features)[:, :n0], positions, kv_hook=remember,
                   mask=causal_mask(n0, 0))
    return hidden, draft.logits(hidden)


def sample_chains(draft: EagleDraft, prompt, hidden0: torch.Tensor, keys, base: int, num: int, length: int,
                  generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """`num` chained samples of `length` tokens after `base` (temperature 1), as drafting does.

    Returns tokens [num, length] and the summed log-probabilities [num] (differentiable).
    """
    k0, v0 = keys
    prefix_k = k0[:, :, : base + 1].expand(num, -1, -1, -1)
    prefix_v = v0[:, :, : base + 1].expand(num, -1, -1, -1)
    chain_k, chain_v = [], []

    def extend(k, v):
        chain_k.append(k)
        chain_v.append(v)
        return torch.cat([prefix_k] + chain_k, dim=2), torch.cat([prefix_v] + chain_v, dim=2)

    hidden = hidden0[:, base : base + 1].expand(num, -1, -1)
    tokens, log_prob = [], 0.0
    for t in range(length):
        log_probs = F.log_softmax(draft.proposal_logits(hidden)[:, -1].float(), dim=-1)
        token = torch.multinomial(log_probs.exp().detach(), 1, generator=generator)
        tokens.append(token)
        log_prob = log_prob + log_probs.gather(1, token).squeeze(1)
        if t + 1 < length:
            positions = prompt.positions(base + 1 + t, 1, draft.cfg.position_mode)[:, None].expand(3, num, 1)
            hidden = draft(token, hidden, positions, kv_hook=extend)
    return torch.cat(tokens, dim=1), log_prob


@torch.no_grad()
def trajectories_for(target: TargetVLA, prompt, ids: torch.Tensor, images: torch.Tensor, start: int,
                     suffixes: torch.Tensor, tail: list[int], speed: float, steps: int, seed: int) -> torch.Tensor:
    """Expert trajectories (x, y) [R, 64, 2] for prompt + ids[start-prefix] + each suffix + tail.

    The shared prefix runs once; every row samples the flow from the same noise, so rows differ
    only through their CoC.
    """
    rows = suffixes.shape[0]
    prefix = ids[:, :start]
    cache = target.new_cache(1, ids.shape[1] + suffixes.shape[1] + len(tail) + 2)
    positions = torch.cat([prompt.mrope_positions, prompt.positions(len(prompt), start - len(prompt), "mrope")], 1)
    target.prefill(prefix, target.encode_images(images), positions, cache, num_logits=1)
    batched = target.new_cache(rows, cache.max_len)
    for layer in range(len(cache.keys)):
        batched.keys[layer][:, :, :start] = cache.keys[layer][:, :, :start]
        batched.values[layer][:, :, :start] = cache.values[layer][:, :, :start]
    batched.length = start
    target.decode(torch.cat([suffixes, torch.tensor(tail).expand(rows, -1)], dim=1), batched, prompt.rope_delta)
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(1, target.cfg.expert.horizon, target.cfg.expert.action_dim, generator=generator)
    traj = target.trajectory(batched, prompt.rope_delta, speed, steps, noise=noise.expand(rows, -1, -1))
    return torch.stack([traj.x, traj.y], dim=-1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="chain-spec-train-aarl", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--target", required=True)
    parser.add_argument("--draft", required=True, help="the SFT draft to start from (also the frozen reference)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--tokenizer")
    parser.add_argument("--train-scenes", type=int, default=5000)
    parser.add_argument("--val-scenes", type=int, default=64)
    parser.add_argument("--updates", type=int, default=200, help="policy-gradient updates (one disagreement each)")
    parser.add_argument("--samples", type=int, default=32, help="K continuations per disagreement")
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--kl-weight", type=float, default=0.02)
    parser.add_argument("--match-weight", type=float, default=0.5)
    parser.add_argument("--meta-action-weight", type=float, default=0.0)
    parser.add_argument("--expert-steps", type=int, default=5)
    parser.add_argument("--evals", type=int, default=4)
    parser.add_argument("--cache-dir")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    runtime = setup_runtime(args.seed)
    target = TargetVLA.from_pretrained(args.target, runtime.device).eval()
    for p in target.parameters():
        p.requires_grad_(False)
    tokenizer = ChainTokenizer.load(args.tokenizer or Path(args.target).parent / "tokenizer.json")
    builder = PromptBuilder(tokenizer, *target.cfg.vision.grid)
    draft = EagleDraft.from_pretrained(args.draft, target.decoder.embed_tokens, target.decoder.lm_head)
    reference = copy.deepcopy(draft).eval()
    for p in reference.parameters():
        p.requires_grad_(False)
    cache_dir = Path(args.cache_dir) if args.cache_dir else Path(args.draft).parent / "greedy_cache"
    train, val = greedy_splits(runtime, args.data, args.train_scenes, args.val_scenes, target, builder, cache_dir)
    tail = [builder.cot_end_id, builder.ids["<|traj_future_start|>"]]

    optimiser = torch.optim.AdamW(draft.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    generator = torch.Generator().manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    checkpoint = BestTauCheckpoint(target, val, args.val_scenes, args.out)
    if runtime.is_main:  # the SFT start competes too
        print(f"SFT start: val tau {checkpoint.check(draft, 0):.3f}")
    curves = {"reward": [], "advantage std": [], "kl": [], "val tau": checkpoint.history}
    eval_every = max(args.updates // args.evals, 1)
    started, update = time.time(), 0
    progress = tqdm(total=args.updates, desc="AARL", disable=not runtime.is_main)
    order = rng.permutation(len(train))
    cursor = 0
    while update < args.updates:
        index = int(order[(cursor * runtime.world_size + runtime.rank) % len(order)])  # each rank its own scenes
        cursor += 1
        prompt, ids, valid, images = train.batch([index])
        P, T = len(prompt), ids.shape[1]
        features = target_features(target, prompt, ids, images, draft.cfg.feature_layers)
        keys: list = []
        hidden0, logits = step0_logits(draft, prompt, ids, features, lambda k, v: keys.append((k, v)) or (k, v))
        with torch.no_grad():
            _, ref_logits = step0_logits(reference, prompt, ids, features)
        # Index i predicts token i+2; the CoC's drafted tokens are P+1 .. T-1 (bases P-1 .. T-3).
        bases = torch.arange(P - 1, T - 2)
        truth = ids[0, bases + 2]
        disagree = bases[(draft.proposal_logits(hidden0[:, bases])[0].argmax(-1) != truth)]
        if len(disagree) == 0:
            continue
        base = int(disagree[rng.integers(len(disagree))])
        length = min(REPLACED, T - 1 - (base + 2))  # never replace the stop token
        if length <= 0:
            continue
        samples, log_prob = sample_chains(draft, prompt, hidden0, keys[0], base, args.samples, length, generator)
        start = base + 2
        original = ids[0, start : start + length]
        rows = torch.cat([original[None], samples])
        suffix_rest = ids[0, start + length : T - 1]  # the rest of the CoC, stop excluded
        suffixes = torch.cat([rows, suffix_rest.expand(rows.shape[0], -1)], dim=1)
        xy = trajectories_for(target, prompt, ids, images, start, suffixes, tail,
                              float(train.table.arrays["speed"][index]), args.expert_steps, args.seed + update)
        mse = ((xy[1:] - xy[:1]) ** 2).mean(dim=(1, 2))
        match = (samples == original).float().mean(dim=1)
        reward = -mse + args.match_weight * match
        if args.meta_action_weight:
            wanted = decision_from_coc(tokenizer.decode(ids[0, P:T - 1].tolist()))
            same = [decision_from_coc(tokenizer.decode(s.tolist())) == wanted for s in suffixes[1:]]
            reward = reward + args.meta_action_weight * torch.tensor(same, dtype=torch.float)
        advantage = reward - reward.mean()
        policy_loss = -(advantage.detach() * log_prob).mean()
        anchored = bases[ref_logits[0, bases].argmax(-1) == truth]
        log_p = F.log_softmax(logits[0, anchored].float(), -1)
        log_ref = F.log_softmax(ref_logits[0, anchored].float(), -1)
        kl = (log_p.exp() * (log_p - log_ref)).sum(-1).mean() if len(anchored) else torch.zeros(())
        loss = policy_loss + args.kl_weight * kl
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        average_gradients(draft, runtime)  # every rank then takes the same step
        torch.nn.utils.clip_grad_norm_(draft.parameters(), 1.0)
        optimiser.step()
        curves["reward"].append((update, float(reward.mean())))
        curves["advantage std"].append((update, float(advantage.std())))
        curves["kl"].append((update, float(kl)))
        update += 1
        progress.update(1)
        progress.set_postfix(reward=f"{float(reward.mean()):.3f}", kl=f"{float(kl):.4f}")
        if runtime.is_main and (update % eval_every == 0 or update == args.updates):
            best = checkpoint.best
            tau = checkpoint.check(draft, update)
            progress.write(f"update {update}: val tau {tau:.3f} (best before {best:.3f})")
    progress.close()
    if runtime.is_main:
        save_curves(Path(args.out) / "aarl_curves", curves, "AARL")
        summary = {"seconds": round(time.time() - started, 1), "best_val_tau": checkpoint.best,
                   "sft_val_tau": curves["val tau"][0][1], "processes": runtime.world_size, "args": vars(args)}
        (Path(args.out) / "aarl_summary.json").write_text(json.dumps(summary, indent=1))
        print(json.dumps(summary))
    shutdown_runtime(runtime)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
