"""Trajectory metrics shared by the evaluation, the replay report and the benchmarks."""
from __future__ import annotations

import numpy as np

from .constants import HORIZONS_S
from .trajectory import STEP_SECONDS


def displacement_errors(predicted: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """ADE and FDE at each horizon of HORIZONS_S for one trajectory pair [T, 2] (a horizon past
    the end of a shorter pair is cut to its length)."""
    errors = np.linalg.norm(np.asarray(predicted) - np.asarray(truth), axis=-1)
    out = {}
    for horizon in HORIZONS_S:
        n = min(int(round(horizon / STEP_SECONDS)), len(errors))
        out[f"ade_{horizon:g}s"] = float(errors[:n].mean())
        out[f"fde_{horizon:g}s"] = float(errors[n - 1])
    return out


def constant_velocity(speed: float, steps: int = 64) -> np.ndarray:
    """The baseline: keep the current speed and heading."""
    x = speed * STEP_SECONDS * np.arange(1, steps + 1)
    return np.stack([x, np.zeros_like(x)], axis=1)


def min_displacement_errors(samples: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """minADE / minFDE over trajectory samples [S, T, 2] at each horizon (the best sample per
    metric, as Alpamayo's minADE_6 is reported)."""
    per_sample = [displacement_errors(sample, truth) for sample in np.asarray(samples)]
    return {f"min{key}": min(errors[key] for errors in per_sample) for key in per_sample[0]}


def chi_square_p_value(observed, expected) -> float:
    """Pearson's chi-square goodness-of-fit p-value of counts against expected counts (same
    total). Categories expected fewer than 5 times are pooled into one, as the test requires."""
    import torch

    observed = torch.as_tensor(observed, dtype=torch.float64)
    expected = torch.as_tensor(expected, dtype=torch.float64)
    small = expected < 5
    if small.any():
        observed = torch.cat([observed[~small], observed[small].sum()[None]])
        expected = torch.cat([expected[~small], expected[small].sum()[None]])
    keep = expected > 0
    statistic = (((observed - expected) ** 2)[keep] / expected[keep]).sum()
    dof = int(keep.sum()) - 1
    if dof < 1:
        return 1.0
    return float(torch.special.gammaincc(torch.tensor(dof / 2.0, dtype=torch.float64), statistic / 2))


def chi_square_homogeneity_p_value(counts_a, counts_b) -> float:
    """p-value of the chi-square test that two samples of categories (counts per category, same
    order) come from one distribution: the 2 x K contingency table, categories with an expected
    count under 5 pooled."""
    import torch

    table = torch.stack([torch.as_tensor(counts_a, dtype=torch.float64), torch.as_tensor(counts_b, dtype=torch.float64)])
    expected = table.sum(1, keepdim=True) * table.sum(0, keepdim=True) / table.sum()
    small = expected.min(0).values < 5
    if small.any():
        table = torch.cat([table[:, ~small], table[:, small].sum(1, keepdim=True)], dim=1)
        expected = table.sum(1, keepdim=True) * table.sum(0, keepdim=True) / table.sum()
    keep = expected.min(0).values > 0
    statistic = (((table - expected) ** 2)[:, keep] / expected[:, keep]).sum()
    dof = int(keep.sum()) - 1
    if dof < 1:
        return 1.0
    return float(torch.special.gammaincc(torch.tensor(dof / 2.0, dtype=torch.float64), statistic / 2))


def bootstrap_ratio(numerators, denominators, other_numerators=None, other_denominators=None,
                    resamples: int = 2000, seed: int = 0, level: float = 0.95) -> tuple[float, float, float]:
    """A ratio of sums over scenes (tau = tokens decided / target passes) and its percentile
    bootstrap interval, resampling scenes. With `other_*` (the same scenes, another drafter): the
    paired difference ratio - other ratio and its interval, so a difference is called one only
    when the interval excludes 0. Returns (estimate, low, high)."""
    rng = np.random.default_rng(seed)
    num, den = np.asarray(numerators, float), np.asarray(denominators, float)
    paired = other_numerators is not None
    if paired:
        num2, den2 = np.asarray(other_numerators, float), np.asarray(other_denominators, float)
        if num2.shape != num.shape:
            raise ValueError("a paired bootstrap needs the same scenes on both sides")

    def statistic(index) -> float:
        value = num[index].sum() / max(den[index].sum(), 1e-12)
        return value - num2[index].sum() / max(den2[index].sum(), 1e-12) if paired else value

    draws = np.array([statistic(rng.integers(0, len(num), len(num))) for _ in range(resamples)])
    tail = (1 - level) / 2 * 100
    return statistic(np.arange(len(num))), float(np.percentile(draws, tail)), float(np.percentile(draws, 100 - tail))
