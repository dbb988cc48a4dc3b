"""Pieces every trainer shares: seeding, (optional) DDP, the LR schedule and loss plots.

The trainers run as a single CPU process by default and unchanged under
`torchrun --nproc_per_node N` (DDP: gloo on CPU, NCCL on GPUs); each rank takes every
N-th batch of the same seeded permutation.
"""
from __future__ import annotations

import json
import math
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes in bf16 natively. On a CPU without AVX512-BF16 or AMX (AVX2
    only, e.g. AMD Zen 2) bf16 autocast is emulated and slower than fp32: measured on such a
    2-core machine, a draft SFT step took 5.5 s under autocast (see chain-spec-train-draft)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


@dataclass
class Runtime:
    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    amp: bool = True  # bf16 autocast where the device computes bf16 natively (`native_bf16`)

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        if self.world_size == 1:
            return module
        ids = [self.device.index] if self.device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(module, device_ids=ids)


def setup_runtime(seed: int, threads: int | None = None, amp: bool = True) -> Runtime:
    """Seed everything; join the process group when launched by torchrun."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(threads or max(1, (os.cpu_count() or 1) // world_size))
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return Runtime(rank, world_size, device, amp and native_bf16(device))


def main_rank_first(runtime: Runtime, make):
    """`make()` on rank 0, then on the other ranks once rank 0 is done: rank 0 fills a cache
    (the target's greedy CoCs) that the others then read instead of racing to write it."""
    if runtime.world_size > 1 and not runtime.is_main:
        dist.barrier()
    result = make()
    if runtime.world_size > 1 and runtime.is_main:
        dist.barrier()
    return result


def average_gradients(module: torch.nn.Module, runtime: Runtime) -> None:
    """All-reduce the gradients to their mean over the ranks, for a trainer whose loss is not
    one forward call that DDP could wrap (AARL: sampling, re-running the target, rewards)."""
    if runtime.world_size == 1:
        return
    for p in module.parameters():
        if p.grad is None:  # every rank must reduce the same tensors, or the collectives hang
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)
        p.grad /= runtime.world_size


def shutdown_runtime(runtime: Runtime) -> None:
    if runtime.world_size > 1 and dist.is_initialized():
        dist.destroy_process_group()


def rank_batches(num_items: int, batch_size: int, steps: int, seed: int, runtime: Runtime):
    """`steps` index batches for this rank, from seeded epoch permutations of all items."""
    rng = np.random.default_rng(seed)
    order = np.empty(0, dtype=np.int64)
    needed = steps * batch_size * runtime.world_size
    while len(order) < needed:
        order = np.concatenate([order, rng.permutation(num_items)])
    for step in range(steps):
        start = (step * runtime.world_size + runtime.rank) * batch_size
        yield order[start : start + batch_size]


def cosine_lr(step: int, total: int, peak: float, warmup: int = 100, floor: float = 0.1) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min((step - warmup) / max(total - warmup, 1), 1.0)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def save_curves(path: Path, curves: dict[str, list[tuple[int, float]]], title: str) -> None:
    """Write the curves as JSON and as a PNG beside it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.with_suffix(".json").write_text(json.dumps(curves))
    fig, axes = plt.subplots(1, len(curves), figsize=(4.5 * len(curves), 3.2), squeeze=False)
    for ax, (name, points) in zip(axes[0], curves.items()):
        if points:
            steps, values = zip(*points)
            ax.plot(steps, values)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path.with_suffix(".png"), dpi=100)
    plt.close(fig)
