"""The on-disk scene dataset: sharded, split by scenario seed, with a documented schema.

Layout::

    DIR/meta.json                     schema version, generator settings, shard list, counts
    DIR/<split>/shard_00000.npz       numeric arrays, one row per scene (see ARRAYS)
    DIR/<split>/shard_00000.jsonl     one JSON object per scene (see TEXT_FIELDS), same order

A scene's split is a pure function of its seed (`split_of`), so regenerating any subset
reproduces the same split membership.
"""
from __future__ import annotations

import json
import multiprocessing as mp
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..constants import IMAGE_HEIGHT, IMAGE_WIDTH
from ..scenarios.render import DEFAULT_CAMERAS, Renderer
from ..scenarios.scene import Scene, make_scene

SCHEMA_VERSION = 1
SPLITS = ("train", "val", "test")
ARRAYS = {  # name: (dtype, shape per scene, meaning)
    "seed": ("int64", (), "scenario seed"),
    "images": ("uint8", ("cameras", "frames", "H", "W", 3), "BGR frames, last one at t0, 10 Hz"),
    "history_xyz": ("float32", (17, 3), "ego poses t0-1.6 s .. t0 in the t0 frame (x fwd, y left, z up)"),
    "history_tokens": ("int64", (48,), "history bins (dx, dy, dz per step)"),
    "speed": ("float32", (), "ego speed at t0, m/s"),
    "future_xy": ("float32", (64, 2), "future positions t0+0.1 .. t0+6.4 s in the t0 frame"),
    "future_yaw": ("float32", (64,), "future headings in the t0 frame"),
    "future_speed": ("float32", (64,), "future speeds"),
    "future_controls": ("float32", (64, 2), "(acceleration m/s^2, curvature 1/m) per step"),
}
TEXT_FIELDS = ("seed", "event", "primary", "longitudinal", "lateral", "coc", "coc_markup")
SHARD_SIZE = 500


def split_of(seed: int) -> str:
    """90 / 5 / 5 by a hash of the seed, stable across runs and machines."""
    bucket = (seed * 2654435761) % 2**32 % 20
    return "train" if bucket < 18 else "val" if bucket == 18 else "test"


def _scene_seeds(base_seed: int, num: int) -> list[int]:
    return [base_seed * 10_000_000 + i for i in range(num)]


def _write_shard(args) -> tuple[str, int]:
    path, seeds, width, height = args
    renderer = Renderer(DEFAULT_CAMERAS, width, height)
    scenes = [make_scene(seed, renderer) for seed in seeds]
    arrays = {name: np.stack([np.asarray(getattr(s, name)) for s in scenes]).astype(ARRAYS[name][0]) for name in ARRAYS}
    np.savez_compressed(path.with_suffix(".npz"), **arrays)
    with open(path.with_suffix(".jsonl"), "w") as f:
        for s in scenes:
            f.write(json.dumps({k: getattr(s, k) for k in TEXT_FIELDS}) + "\n")
    return str(path), len(scenes)


def generate(out: str | Path, num: int, seed: int, width: int = IMAGE_WIDTH, height: int = IMAGE_HEIGHT, workers: int = 2) -> dict:
    out = Path(out)
    by_split = {split: [] for split in SPLITS}
    for s in _scene_seeds(seed, num):
        by_split[split_of(s)].append(s)
    jobs = []
    for split, seeds in by_split.items():
        (out / split).mkdir(parents=True, exist_ok=True)
        for k in range(0, len(seeds), SHARD_SIZE):
            jobs.append((out / split / f"shard_{k // SHARD_SIZE:05d}", seeds[k : k + SHARD_SIZE], width, height))
    shards = []
    with mp.get_context("spawn").Pool(workers) as pool:
        for path, count in tqdm(pool.imap_unordered(_write_shard, jobs), total=len(jobs), desc="shards", unit="shard"):
            shards.append({"path": str(Path(path).relative_to(out)), "count": count})
    meta = {
        "schema_version": SCHEMA_VERSION,
        "base_seed": seed,
        "num_scenes": num,
        "cameras": [c.name for c in DEFAULT_CAMERAS],
        "image_size": [height, width],
        "splits": {split: len(seeds) for split, seeds in by_split.items()},
        "shards": sorted(shards, key=lambda s: s["path"]),
        "arrays": {k: {"dtype": v[0], "shape": list(v[1]), "meaning": v[2]} for k, v in ARRAYS.items()},
        "text_fields": list(TEXT_FIELDS),
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    return meta


@dataclass
class SceneTable:
    """All scenes of one split held in memory: arrays stacked, text fields as lists."""

    arrays: dict[str, np.ndarray]
    records: list[dict]

    def __len__(self) -> int:
        return len(self.records)

    def scene(self, i: int) -> dict:
        return {**{k: v[i] for k, v in self.arrays.items()}, **self.records[i]}


def load_split(root: str | Path, split: str, limit: int | None = None, with_images: bool = True) -> SceneTable:
    root = Path(root)
    meta_path = root / "meta.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{root} is not a dataset (no meta.json); run `chain-spec-data generate`")
    meta = json.loads(meta_path.read_text())
    if meta["schema_version"] != SCHEMA_VERSION:
        raise ValueError(f"dataset schema {meta['schema_version']} != supported {SCHEMA_VERSION}")
    arrays, records = {k: [] for k in ARRAYS}, []
    for shard in meta["shards"]:
        if not shard["path"].startswith(split + "/"):
            continue
        with np.load(root / (shard["path"] + ".npz")) as data:
            for k in ARRAYS:
                if k != "images" or with_images:
                    arrays[k].append(data[k])
        with open(root / (shard["path"] + ".jsonl")) as f:
            records += [json.loads(line) for line in f]
        if limit is not None and len(records) >= limit:
            break
    stacked = {k: np.concatenate(v)[:limit] for k, v in arrays.items() if v}
    return SceneTable(stacked, records[:limit])


def scene_as_record(scene: Scene) -> dict:
    """A freshly made Scene in the same shape as a loaded one (for tests and tools)."""
    return {**{k: np.asarray(getattr(scene, k)) for k in ARRAYS}, **{k: getattr(scene, k) for k in TEXT_FIELDS}}
