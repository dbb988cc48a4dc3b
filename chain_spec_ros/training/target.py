"""Train the target VLA: stage 1 language modelling, stage 2 flow matching for the expert.

Stage 1 (Alpamayo's stage 1): next-token loss on the answer: the CoC, `<|cot_end|>`,
`<|traj_future_start|>` and discrete future tokens. Stage 2: the decoder is frozen and the
trajectory expert learns the flow from noise to the future (acceleration, curvature) while
reading the decoder's KV cache of prompt + CoC.

    chain-spec-train-target --data DATA --out models/target            # single CPU process
    torchrun --nproc_per_node 4 -m chain_spec_ros.training.target ...  # DDP on several GPUs
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ..data.dataset import load_split
from ..models.alpamayo import save_alpamayo
from ..models.config import DecoderConfig, TargetConfig, VisionConfig
from ..models.target import TargetVLA
from ..models.tokenizer import ChainTokenizer
from ..paths import default_tokenizer_path
from ..prompt import PromptBuilder
from .batches import IGNORE, SceneEncoder, TeacherBatch
from .common import Runtime, cosine_lr, rank_batches, save_curves, setup_runtime, shutdown_runtime


class LanguageObjective(nn.Module):
    """Teacher-forced answer loss; a module so DDP can wrap it."""

    def __init__(self, model: TargetVLA):
        super().__init__()
        self.model = model

    def forward(self, batch: TeacherBatch) -> torch.Tensor:
        answer_length = batch.labels.shape[1]
        logits, _ = self.model.prefill(batch.input_ids, self.model.encode_images(batch.images), batch.position_ids,
                                       None, num_logits=answer_length + 1)
        return F.cross_entropy(logits[:, :answer_length].reshape(-1, logits.shape[-1]), batch.labels.reshape(-1),
                               ignore_index=IGNORE)


class FlowObjective(nn.Module):
    """Expert flow-matching loss over the frozen decoder's cache of prompt + CoC."""

    def __init__(self, model: TargetVLA):
        super().__init__()
        self.model = model

    def forward(self, batch: TeacherBatch) -> torch.Tensor:
        model = self.model
        with torch.no_grad():
            cache = model.new_cache(batch.input_ids.shape[0], batch.input_ids.shape[1])
            model.prefill(batch.input_ids, model.encode_images(batch.images), batch.position_ids, cache, num_logits=1)
        actions = model.expert.action_space.normalize(batch.future_controls)
        return model.expert.flow_matching_loss(cache, batch.rope_delta, actions, prefix_lengths=batch.coc_end)


# How Alpamayo's release samples the reasoning (`sample_trajectories_from_data_with_vlm_rollout`).
GENERATION = {"do_sample": True, "temperature": 0.6, "top_p": 0.98}


def save_target(model: TargetVLA, out: Path, tokenizer: ChainTokenizer, tokenizer_file: Path) -> None:
    """The bundle: Alpamayo-R1's layout, its VLM a transformers Qwen3-VL folder."""
    token_ids = {"image_token_id": tokenizer.id("<|image_pad|>"), "video_token_id": tokenizer.id("<|video_pad|>"),
                 "vision_start_token_id": tokenizer.id("<|vision_start|>"),
                 "vision_end_token_id": tokenizer.id("<|vision_end|>")}
    generation = {**GENERATION, "eos_token_id": tokenizer.id("<|traj_future_start|>"),
                  "pad_token_id": tokenizer.id("<|endoftext|>")}
    save_alpamayo(model, out, token_ids, generation, tokenizer_file)


def to_device(batch: TeacherBatch, device: torch.device) -> TeacherBatch:
    return TeacherBatch(**{k: v.to(device) if torch.is_tensor(v) else v for k, v in vars(batch).items()})


def run_stage(name: str, objective: nn.Module, parameters, encoder: SceneEncoder, val: SceneEncoder,
              steps: int, batch_size: int, lr: float, seed: int, runtime: Runtime, curves: dict) -> None:
    """AdamW with warm-up and cosine decay; compute in bf16 autocast over fp32 master weights
    where bf16 is native (2x faster on CPUs with avx512_bf16 or AMX, and on GPUs), else fp32
    (`common.native_bf16`)."""
    optimiser = torch.optim.AdamW(parameters, lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
    wrapped = runtime.wrap(objective)
    val_batches = [val.batch(list(range(k, min(k + batch_size, len(val.table))))) for k in range(0, min(len(val.table), 128), batch_size)]
    progress = tqdm(rank_batches(len(encoder.table), batch_size, steps, seed, runtime), total=steps, desc=name,
                    disable=not runtime.is_main)
    for step, indices in enumerate(progress):
        for group in optimiser.param_groups:
            group["lr"] = cosine_lr(step, steps, lr)
        with runtime.autocast():
            loss = wrapped(to_device(encoder.batch(list(indices)), runtime.device))
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimiser.step()
        curves[f"{name} train loss"].append((step, float(loss)))
        progress.set_postfix(loss=f"{float(loss):.3f}")
        if runtime.is_main and (step + 1) % max(steps // 8, 1) == 0:
            with torch.no_grad(), runtime.autocast():
                objective.eval()
                torch.manual_seed(seed)
                value = sum(float(objective(to_device(b, runtime.device))) for b in val_batches) / len(val_batches)
                objective.train()
            curves[f"{name} val loss"].append((step, value))
            progress.write(f"{name} step {step + 1}: val loss {value:.4f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="chain-spec-train-target", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="dataset directory from `chain-spec-data generate`")
    parser.add_argument("--out", required=True, help="where to write config.json, model.safetensors, curves")
    parser.add_argument("--tokenizer", default=str(default_tokenizer_path()))
    parser.add_argument("--language-steps", type=int, default=2600)
    parser.add_argument("--flow-steps", type=int, default=800)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1.5e-3)
    parser.add_argument("--flow-lr", type=float, default=1e-3)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--no-amp", action="store_true", help="train in fp32 instead of bf16 autocast")
    parser.add_argument("--limit", type=int, help="use only the first N training scenes (smoke tests)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    runtime = setup_runtime(args.seed, amp=not args.no_amp)
    tokenizer = ChainTokenizer.load(args.tokenizer)
    train_table = load_split(args.data, "train", limit=args.limit)
    val_table = load_split(args.data, "val", limit=128)
    height, width = train_table.arrays["images"].shape[-3:-1]
    vision = VisionConfig(image_height=int(height), image_width=int(width))
    builder = PromptBuilder(tokenizer, *vision.grid)
    config = TargetConfig(
        decoder=DecoderConfig(vocab_size=tokenizer.vocab_size, hidden_size=args.hidden, num_layers=args.layers,
                              intermediate_size=3 * args.hidden, max_positions=512),
        vision=vision,
        image_pad_id=tokenizer.id("<|image_pad|>"),
    )
    model = TargetVLA(config).to(runtime.device)
    model.expert.action_space.fit(torch.from_numpy(train_table.arrays["future_controls"]))
    train, val = SceneEncoder(builder, train_table), SceneEncoder(builder, val_table)
    curves: dict[str, list] = {k: [] for k in ("language train loss", "language val loss", "flow train loss", "flow val loss")}
    started = time.time()

    model.train()
    language_params = [p for n, p in model.named_parameters() if not n.startswith("expert.")]
    run_stage("language", LanguageObjective(model), language_params, train, val, args.language_steps,
              args.batch_size, args.lr, args.seed, runtime, curves)
    language_seconds = time.time() - started
    for p in language_params:  # stage 2 freezes everything but the expert
        p.requires_grad_(False)
    run_stage("flow", FlowObjective(model), list(model.expert.parameters()), train, val, args.flow_steps,
              args.batch_size, args.flow_lr, args.seed + 1, runtime, curves)

    if runtime.is_main:
        out = Path(args.out)
        model.eval()
        save_target(model, out, tokenizer, Path(args.tokenizer))
        save_curves(out / "training_curves", curves, "target VLA training")
        summary = {"seconds": round(time.time() - started, 1), "language_seconds": round(language_seconds, 1),
                   "train_scenes": len(train_table), "args": vars(args), "world_size": runtime.world_size,
                   "bf16_autocast": runtime.amp, "final": {k: v[-1][1] for k, v in curves.items() if v}}
        (out / "training_summary.json").write_text(json.dumps(summary, indent=1))
        print(json.dumps(summary))
    shutdown_runtime(runtime)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
