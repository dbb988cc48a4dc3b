"""Where does the draft look? Its attention mass on image, history and text tokens, flat vs mrope.

    .venv/bin/python benchmarks/attention.py --data DATA --drafts models/draft runs/draft_mrope --png OUT.png

For each test scene the target's greedy CoC is teacher-forced through the target; the draft's
attention probabilities (its one layer, averaged over heads) from every CoC query are summed
per key group. Draft index i holds (token i+1, target features of index i) and is grouped by i.
The hypothesis under test: with FlatRoPE the hundreds of image tokens sit far (in 1-D position)
from the CoC, so rotary long-range decay should move the draft's attention off the images and onto
the trajectory history (docs/ARCHITECTURE.md, 'Positions').
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from chain_spec_ros.data.dataset import load_split  # noqa: E402
from chain_spec_ros.engines.factory import load_target_model  # noqa: E402
from chain_spec_ros.evaluate import load_planner  # noqa: E402
from chain_spec_ros.models.decoder import causal_mask  # noqa: E402
from chain_spec_ros.models.draft import EagleDraft  # noqa: E402
from chain_spec_ros.paths import default_models_dir  # noqa: E402
from chain_spec_ros.training.draft import target_features  # noqa: E402
from chain_spec_ros.training.greedy import greedy_cocs  # noqa: E402

GROUPS = ("image", "history", "text")


@torch.inference_mode()
def attention_mass(draft: EagleDraft, prompt, ids: torch.Tensor, features) -> np.ndarray:
    """Mean attention share of CoC queries on (image, history, text) keys."""
    n0 = ids.shape[1] - 1
    positions = prompt.positions(0, n0, draft.cfg.position_mode)[:, None]
    layer = draft.layers[0]
    x = layer.attention_input(draft.embed_tokens(ids[:, 1:]), draft.fuse_features(features)[:, :n0])
    cos, sin = draft.rotary_emb(positions)
    q, k, _ = layer.self_attn.project(x, cos, sin)
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    scores = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
    scores = scores.masked_fill(~causal_mask(n0, 0), float("-inf"))
    probs = scores.softmax(-1).mean(1)[0]  # [queries, keys], averaged over heads
    P = len(prompt)
    group = np.full(n0, 2)
    for start, end in prompt.image_spans:
        group[start - 1 : end + 1] = 0  # the block with its vision start/end markers
    h0, h1 = prompt.history_span
    group[h0 - 1 : h1 + 1] = 1
    coc_queries = probs[P - 1 :].numpy()
    return np.array([coc_queries[:, group == g].sum(1).mean() for g in range(3)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--models", default=str(default_models_dir()))
    parser.add_argument("--drafts", nargs="+", required=True, help="draft directories to compare")
    parser.add_argument("--scenes", type=int, default=48)
    parser.add_argument("--png", required=True)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    builder = load_planner(Path(args.models)).builder
    target = load_target_model(Path(args.models)).eval()
    table = load_split(args.data, "test", limit=args.scenes)
    cocs = greedy_cocs(target, builder, table.arrays["images"], table.arrays["history_tokens"])
    results = {}
    for directory in args.drafts:
        draft = EagleDraft.from_pretrained(directory, target.decoder).eval()
        masses = []
        for i in range(len(table)):
            prompt = builder.build(table.arrays["images"][i], table.arrays["history_tokens"][i])
            ids = torch.tensor([prompt.input_ids.tolist() + cocs[i] + [builder.cot_end_id]])
            features, _ = target_features(target, prompt, ids, torch.from_numpy(prompt.images), draft.cfg.feature_layers)
            masses.append(attention_mass(draft, prompt, ids, features))
        label = f"{Path(directory).name} ({draft.cfg.position_mode}, rope theta {draft.cfg.rope_theta:g})"
        results[label] = dict(zip(GROUPS, np.mean(masses, 0).round(4).tolist()))
        print(label, results[label])

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2))
    width = 0.8 / len(results)
    for j, (label, mass) in enumerate(results.items()):
        ax.bar(np.arange(3) + j * width, [mass[g] for g in GROUPS], width, label=label)
    ax.set_xticks(np.arange(3) + width * (len(results) - 1) / 2, [f"{g} tokens" for g in GROUPS])
    ax.set_ylabel("share of the draft's attention\nfrom CoC queries")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(args.png, dpi=110)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
