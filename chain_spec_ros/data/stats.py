"""Dataset statistics, including how well the ego history alone predicts the decision."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..models.tokenizer import ChainTokenizer
from ..scenarios.coc import SPEED_PHRASES, check_grammar, parse, speed_statement_matches
from ..scenarios.scene import ego_state_from_history
from ..trajectory import history_speeds
from .dataset import load_split

# The low-speed and turning situations the world must cover, each with a share of the scenes.
SPEED_CASES = ("stopped", "starting", "creeping")
MOTION_CASES = SPEED_CASES + ("mid-turn",)


def history_features(history_xyz: np.ndarray) -> np.ndarray:
    """Per-step speeds, accelerations and heading changes: everything the history shows."""
    xy = history_xyz[..., :2]
    steps = np.diff(xy, axis=-2)
    speed = history_speeds(history_xyz)
    heading = np.unwrap(np.arctan2(steps[..., 1], steps[..., 0]), axis=-1)
    return np.concatenate([speed, np.diff(speed, axis=-1), heading, xy[..., 1]], axis=-1).astype(np.float32)


def history_only_accuracy(train_x, train_y, test_x, test_y, num_classes: int, seed: int = 0, epochs: int = 60) -> float:
    """An MLP that sees only the ego history, trained on train and scored on test."""
    torch.manual_seed(seed)
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    x = torch.from_numpy((train_x - mean) / std)
    y = torch.from_numpy(train_y)
    model = nn.Sequential(nn.Linear(x.shape[1], 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, num_classes))
    optimiser = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    for _ in range(epochs):
        for batch in torch.randperm(len(x)).split(256):
            loss = nn.functional.cross_entropy(model(x[batch]), y[batch])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    with torch.no_grad():
        predicted = model(torch.from_numpy((test_x - mean) / std)).argmax(-1).numpy()
    return float((predicted == test_y).mean())


def motion_stats(history_xyz: np.ndarray, speeds: np.ndarray, records: list[dict]) -> dict:
    """Shares of scenes per speed state and per MOTION_CASE as the histories show them, the
    decisions taken in each case, and the shares of CoCs that are malformed or state a speed
    state their history does not show."""
    states = [ego_state_from_history(h, float(v)) for h, v in zip(history_xyz, speeds)]
    counts = Counter(state.state for state in states)
    counts["mid-turn"] = sum(state.road == "turn" for state in states)
    n = len(states)
    return {
        "speed_state_shares": {k: counts[k] / n for k in SPEED_PHRASES},
        "motion_case_shares": {k: counts[k] / n for k in MOTION_CASES},
        "motion_case_share_min": min(counts[k] for k in MOTION_CASES) / n,
        "decisions_by_speed_case": {
            case: dict(Counter(r["primary"] for r, state in zip(records, states) if state.state == case).most_common())
            for case in SPEED_CASES},
        "malformed_coc_share": sum(bool(check_grammar(r["coc"])) for r in records) / n,
        "speed_statement_mismatch_share": sum(not speed_statement_matches(r["coc"], history_speeds(h))
                                              for r, h in zip(records, history_xyz)) / n,
    }


def dataset_stats(root: str | Path, tokenizer: ChainTokenizer) -> dict:
    train = load_split(root, "train", with_images=False)
    test = load_split(root, "test", with_images=False)
    val = load_split(root, "val", with_images=False)
    records = train.records + val.records + test.records
    histogram = Counter(r["primary"] for r in records)
    lengths, routine, total = [], 0, 0
    for r in records:
        text, char_labels = parse(r["coc_markup"])
        _, labels = tokenizer.token_labels(text, char_labels)
        lengths.append(len(labels))
        routine += int((labels == 0).sum())
        total += len(labels)
    classes = sorted(histogram)
    index = {c: i for i, c in enumerate(classes)}
    accuracy = history_only_accuracy(
        history_features(train.arrays["history_xyz"]), np.array([index[r["primary"]] for r in train.records]),
        history_features(test.arrays["history_xyz"]), np.array([index[r["primary"]] for r in test.records]),
        len(classes),
    )
    history_xyz = np.concatenate([t.arrays["history_xyz"] for t in (train, val, test)])
    speeds = np.concatenate([t.arrays["speed"] for t in (train, val, test)])
    return {
        "num_scenes": len(records),
        "splits": {"train": len(train), "val": len(val), "test": len(test)},
        "decision_histogram": {c: histogram[c] for c in classes},
        "decision_share_min": min(histogram.values()) / len(records),
        "coc_tokens_median": float(np.median(lengths)),
        "coc_tokens_p5_p95": [float(np.percentile(lengths, 5)), float(np.percentile(lengths, 95))],
        "routine_token_share": routine / total,
        "history_only_decision_accuracy": accuracy,
        "majority_class_accuracy": max(histogram.values()) / len(records),
        **motion_stats(history_xyz, speeds, records),
    }
