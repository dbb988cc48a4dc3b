"""AARL: action-aware RL post-training of the draft, as the paper's authors' code runs it
(docs/ARCHITECTURE.md, 'Training').

One update per training scene (prompt + the target's greedy CoC + `<|cot_end|>`):
1. the reference action a*: the target's expert on its own CoC (one noise draw), in the expert's
   normalised (acceleration, curvature) space;
2. the probe: the policy draft's greedy gamma-step chain at every block start b (every CoC
   index b, anchored at CoC token b), and the first chain position where it departs from the
   target's CoC;
3. windows of up to `--window` positions from each block's first rejection, taken in order of
   b, never overlapping, until `--budget` positions are taken;
4. per block, K samples: at each window position the greedy chain rejects, K tokens drawn
   independently from the chain's distribution there (temperature 1); the other positions keep
   the greedy token (the target's). Each sampled CoC goes through the target and its expert with
   its own noise; reward = -MSE(action, a*) + 0.5 x the window's token-match rate; advantage =
   reward - group mean; block loss = -mean(advantage x log pi(samples)) + 0.02 x KL(pi || pi_ref),
   the KL over the chain positions where the frozen SFT reference's greedy token is the target's;
5. the update's loss is the mean over its blocks; AdamW (lr 1e-5, betas 0.9/0.95, no decay,
   constant), gradients clipped to 1.

pi is the draft's distribution over its vocabulary, the one drafting chooses from. The authors
pick checkpoints by evaluation after training; here validation tau (the real draft-verify loop)
picks them during training, the SFT start included.

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

from ..models.draft import EagleDraft
from ..models.target import TargetVLA
from ..models.tokenizer import ChainTokenizer
from ..prompt import PromptBuilder
from .common import average_gradients, save_curves, setup_runtime, shutdown_runtime
from .draft import BestTauCheckpoint, chain_rollout, greedy_splits, target_features


def chain_logits(draft: EagleDraft, prompt, ids: torch.Tensor, features, gamma: int) -> torch.Tensor:
    """The draft's greedy chains of `gamma` steps at every CoC block start: logits over the draft
    vocabulary [gamma, N-1, Vd], chain step s at block b predicting CoC token b+1+s (N: CoC length
    with its stop token; block b is anchored at CoC token b, base index P+b-1)."""
    P, T = len(prompt), ids.shape[1]
    rollout, _ = chain_rollout(draft, prompt, ids, features, gamma, first_base=P - 1, greedy=True)
    return torch.stack([draft.logits(hidden[0, : T - P - 1]) for hidden in rollout])


def select_windows(rejected: torch.Tensor, available: torch.Tensor, window: int, budget: int
                   ) -> list[tuple[int, int, int]]:
    """(block b, first rejected chain step, window length) in order of b: windows start at each
    block's first rejection, hold up to `window` positions, never overlap, and stop at `budget`
    positions in all. rejected [gamma, N-1] bool; available [N-1]: CoC tokens after each block."""
    chosen, cursor, total = [], 0, 0
    for b in range(rejected.shape[1]):
        steps = rejected[: int(available[b]), b].nonzero().flatten()
        if b < cursor or len(steps) == 0:
            continue
        first = int(steps[0])
        take = min(window, int(available[b]) - first, budget - total)
        chosen.append((b, first, take))
        cursor, total = b + first + take, total + take
        if total >= budget:
            break
    return chosen


@torch.no_grad()
def actions_for(target: TargetVLA, prompt, ids: torch.Tensor, images: torch.Tensor, start: int,
                suffixes: torch.Tensor, steps: int | None, generator: torch.Generator) -> torch.Tensor:
    """The expert's normalised actions [R, H, 2] for the sequences ids[:start] + each suffix row
    (a CoC's rest, its stop token and `<|traj_future_start|>`), each row with its own noise; the
    shared prefix runs once."""
    rows = suffixes.shape[0]
    cache = target.new_cache(1, start + suffixes.shape[1] + 1)
    positions = torch.cat([prompt.mrope_positions, prompt.positions(len(prompt), start - len(prompt), "mrope")], 1)
    target.prefill(ids[:, :start], target.encode_images(images), positions, cache, num_logits=1)
    batched = target.new_cache(rows, cache.max_len)
    for layer in range(len(cache.keys)):
        batched.keys[layer][:, :, :start] = cache.keys[layer][:, :, :start]
        batched.values[layer][:, :, :start] = cache.values[layer][:, :, :start]
    batched.length = start
    target.decode(suffixes, batched, prompt.rope_delta)
    return target.expert.sample(batched, prompt.rope_delta, steps, generator)


def block_loss(logits: torch.Tensor, ref_logits: torch.Tensor, truth: torch.Tensor, b: int, first: int, take: int,
               draft: EagleDraft, samples: int, generator: torch.Generator
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For block b: sampled window tokens [K, take] (target ids), their summed log-probabilities
    [K] (differentiable) and the KL anchor (scalar). logits / ref_logits [gamma, N-1, Vd];
    truth [gamma, N-1] the target's CoC token each chain step predicts (-1 past the CoC)."""
    chain, reference, wanted = logits[:, b], ref_logits[:, b], truth[:, b]
    greedy = draft.target_ids[chain.argmax(-1)]
    log_pi = F.log_softmax(chain.float(), dim=-1)
    tokens, log_prob = [], torch.zeros(samples)
    for s in range(first, first + take):
        if greedy[s] == wanted[s]:  # accepted inside the window: every sample keeps it
            tokens.append(greedy[s].expand(samples))
            continue
        drawn = torch.multinomial(log_pi[s].exp().detach(), samples, replacement=True, generator=generator)
        tokens.append(draft.target_ids[drawn])
        log_prob = log_prob + log_pi[s, drawn]
    inside = wanted >= 0
    anchored = inside & (draft.target_ids[reference.argmax(-1)] == wanted)
    if anchored.any():
        log_ref = F.log_softmax(reference[anchored].float(), dim=-1)
        kl = (log_pi[anchored].exp() * (log_pi[anchored] - log_ref)).sum(-1).mean()
    else:
        kl = torch.zeros(())
    return torch.stack(tokens, dim=1), log_prob, kl


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
    parser.add_argument("--updates", type=int, default=200, help="optimizer steps (one training scene each)")
    parser.add_argument("--gamma", type=int, default=7, help="chain length of the probe (the authors' block_size - 1)")
    parser.add_argument("--window", type=int, default=5, help="positions per block window (multiblock_N)")
    parser.add_argument("--budget", type=int, default=10, help="window positions per update (multiblock_max_total)")
    parser.add_argument("--samples", type=int, default=32, help="K samples per block")
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--kl-weight", type=float, default=0.02)
    parser.add_argument("--match-weight", type=float, default=0.5)
    parser.add_argument("--expert-steps", type=int, default=None, help="Euler steps (default: the expert's)")
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
    draft = EagleDraft.from_pretrained(args.draft, target.decoder)
    reference = copy.deepcopy(draft).eval()
    for p in reference.parameters():
        p.requires_grad_(False)
    cache_dir = Path(args.cache_dir) if args.cache_dir else Path(args.draft).parent / "greedy_cache"
    train, val = greedy_splits(runtime, args.data, args.train_scenes, args.val_scenes, target, builder, cache_dir)
    future_start = builder.ids["<|traj_future_start|>"]

    parameters = draft.trainable_parameters()
    optimiser = torch.optim.AdamW(parameters, lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    generator = torch.Generator().manual_seed(args.seed + runtime.rank)
    order = np.random.default_rng(args.seed).permutation(len(train))
    checkpoint = BestTauCheckpoint(target, val, args.val_scenes, args.out)
    if runtime.is_main:  # the SFT start competes too
        print(f"SFT start: val tau {checkpoint.check(draft, 0):.3f}")
    curves = {"reward": [], "action MSE": [], "advantage std": [], "kl": [], "window positions": [],
              "val tau": checkpoint.history}
    eval_every = max(args.updates // args.evals, 1)
    started, update, cursor, skipped = time.time(), 0, 0, 0
    progress = tqdm(total=args.updates, desc="AARL", disable=not runtime.is_main)
    while update < args.updates:
        index = int(order[(cursor * runtime.world_size + runtime.rank) % len(order)])  # each rank its own scenes
        cursor += 1
        prompt, ids, _, images = train.batch([index])
        P, T = len(prompt), ids.shape[1]
        features, _ = target_features(target, prompt, ids, images, draft.cfg.feature_layers)
        logits = chain_logits(draft, prompt, ids, features, args.gamma)
        with torch.no_grad():
            ref_logits = chain_logits(reference, prompt, ids, features, args.gamma)
        coc = ids[0, P:]  # the target's CoC and its stop token
        blocks = torch.arange(T - P - 1)
        steps = torch.arange(args.gamma)[:, None]
        predicted = blocks[None, :] + 1 + steps  # the CoC index chain step s of block b predicts
        truth = torch.where(predicted < len(coc), coc[predicted.clamp(max=len(coc) - 1)], -1)
        rejected = (draft.target_ids[logits.argmax(-1)] != truth) & (truth >= 0)
        windows = select_windows(rejected, (len(coc) - 1 - blocks).clamp(max=args.gamma), args.window, args.budget)
        if not windows:  # the draft already drafts this CoC perfectly
            skipped += 1
            continue
        action_generator = torch.Generator().manual_seed(int(torch.randint(2**31 - 1, (), generator=generator)))
        tail = torch.tensor([future_start])
        reference_action = actions_for(target, prompt, ids, images, T, tail[None], args.expert_steps, action_generator)
        losses, rewards, mses, kls = [], [], [], []
        for b, first, take in windows:
            tokens, log_prob, kl = block_loss(logits, ref_logits, truth, b, first, take, draft, args.samples, generator)
            start = P + b + 1 + first  # sequence index of the window's first token
            rest = ids[0, start + take :]
            suffixes = torch.cat([tokens, rest.expand(args.samples, -1), tail.expand(args.samples, 1)], dim=1)
            actions = actions_for(target, prompt, ids, images, start, suffixes, args.expert_steps, action_generator)
            mse = ((actions - reference_action) ** 2).mean(dim=(1, 2))
            match = (tokens == ids[0, start : start + take]).float().mean(dim=1)
            reward = -mse + args.match_weight * match
            advantage = reward - reward.mean()
            losses.append(-(advantage * log_prob).mean() + args.kl_weight * kl)
            rewards.append(reward)
            mses.append(mse)
            kls.append(float(kl))
        loss = torch.stack(losses).mean()
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        average_gradients(draft, runtime)  # every rank then takes the same step
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimiser.step()
        update += 1
        rewards_all = torch.cat(rewards)
        curves["reward"].append((update, float(rewards_all.mean())))
        curves["action MSE"].append((update, float(torch.cat(mses).mean())))
        curves["advantage std"].append((update, float(torch.stack([r - r.mean() for r in rewards]).std())))
        curves["kl"].append((update, float(np.mean(kls))))
        curves["window positions"].append((update, sum(take for _, _, take in windows)))
        progress.update(1)
        progress.set_postfix(reward=f"{float(rewards_all.mean()):.3f}", blocks=len(windows))
        if runtime.is_main and (update % eval_every == 0 or update == args.updates):
            best = checkpoint.best
            tau = checkpoint.check(draft, update)
            progress.write(f"update {update}: val tau {tau:.3f} (best before {best:.3f})")
    progress.close()
    if runtime.is_main:
        save_curves(Path(args.out) / "aarl_curves", curves, "AARL")
        summary = {"seconds": round(time.time() - started, 1), "best_val_tau": checkpoint.best,
                   "sft_val_tau": curves["val tau"][0][1], "scenes_without_rejection": skipped,
                   "processes": runtime.world_size, "args": vars(args)}
        (Path(args.out) / "aarl_summary.json").write_text(json.dumps(summary, indent=1))
        print(json.dumps(summary))
    shutdown_runtime(runtime)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
