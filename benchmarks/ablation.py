"""The paper's ablation in one table: {flat, mrope} x {SFT, SFT+AARL} drafts and the n-gram baseline.

    .venv/bin/python benchmarks/ablation.py --data DATA --limit 150 \
        --draft "flat, SFT=runs/draft_flat" --draft "flat, SFT+AARL=runs/draft_flat_aarl" ... \
        --ngram --compare "flat, SFT|mrope, SFT" --json runs/ablation.json --markdown runs/ablation.md

Every row is measured like benchmarks/speculative.py: target-only and speculative decoding on
the same scenes, same backend, in one run, so each speedup is a ratio measured in that run.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.speculative import run  # noqa: E402
from chain_spec_ros.constants import DEFAULT_K  # noqa: E402
from chain_spec_ros.data.dataset import load_split  # noqa: E402
from chain_spec_ros.evaluate import load_planner  # noqa: E402
from chain_spec_ros.metrics import bootstrap_ratio  # noqa: E402
from chain_spec_ros.paths import default_models_dir  # noqa: E402
from chain_spec_ros.planner import Planner  # noqa: E402

COLUMNS = ("tau", "drafted_share", "speedup", "cost_ratio", "identical", "total")


def plot_taus(results: dict, title: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(results)
    taus = [results[label]["tau"] for label in labels]
    errors = [[t - results[label]["tau_interval"][0] for label, t in zip(labels, taus)],
              [results[label]["tau_interval"][1] - t for label, t in zip(labels, taus)]]
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(labels) + 1.2))
    ax.barh(range(len(labels)), taus, xerr=errors, capsize=3, color="tab:blue", alpha=0.8)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("tau (tokens decided per target pass)")
    ax.set_title(title, fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _sums(runs: list[dict]) -> tuple[list[int], list[int]]:
    return [r["produced"] for r in runs], [r["passes"] for r in runs]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--split", default="test")
    parser.add_argument("--models", default=str(default_models_dir()))
    parser.add_argument("--draft", action="append", default=[], help='"label=directory" of an EAGLE draft')
    parser.add_argument("--ngram", action="store_true", help="add the n-gram baseline row")
    parser.add_argument("--k", type=int, default=DEFAULT_K)
    parser.add_argument("--limit", type=int, default=150)
    parser.add_argument("--compare", action="append", default=[],
                        help='"label A|label B": paired bootstrap interval of tau(A) - tau(B) over the same scenes')
    parser.add_argument("--json")
    parser.add_argument("--markdown")
    parser.add_argument("--png", help="bar chart of tau with its bootstrap interval per row")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    table = load_split(args.data, args.split, limit=args.limit)
    rows = [(spec.split("=", 1)[0], "eagle", spec.split("=", 1)[1]) for spec in args.draft]
    if args.ngram:
        rows.append(("n-gram (no training)", "ngram", None))
    results, per_run = {}, {}
    for label, kind, directory in rows:
        speculative = load_planner(Path(args.models), drafter=kind, draft_dir=directory, data=args.data, k=args.k)
        report = run(Planner(speculative.target, speculative.builder), speculative, table, args.limit)
        results[label] = {key: report[key] for key in COLUMNS}
        per_run[label] = report["per_run"]
        _, low, high = bootstrap_ratio(*_sums(per_run[label]))
        results[label]["tau_interval"] = [low, high]
        print(label, json.dumps(results[label]), flush=True)
    lines = ["| draft | tau (95% bootstrap) | drafted share | speedup | cost ratio c | identical |",
             "|---|---|---|---|---|---|"]
    for label, r in results.items():
        lines.append(f"| {label} | {r['tau']:.2f} [{r['tau_interval'][0]:.2f}, {r['tau_interval'][1]:.2f}] | "
                     f"{r['drafted_share']:.3f} | {r['speedup']:.2f}x | {r['cost_ratio']:.3f} | "
                     f"{r['identical']}/{r['total']} |")
    differences = {}
    for spec in args.compare:
        a, b = spec.split("|")
        d = bootstrap_ratio(*_sums(per_run[a]), *_sums(per_run[b]))
        differences[f"{a} - {b}"] = {"tau_difference": d[0], "interval": [d[1], d[2]],
                                     "significant": not d[1] <= 0.0 <= d[2]}
        lines.append(f"\ntau({a}) - tau({b}) = {d[0]:+.3f}, 95% paired bootstrap [{d[1]:+.3f}, {d[2]:+.3f}]"
                     f"{'' if differences[f'{a} - {b}']['significant'] else ' (within the noise)'}")
    print("\n".join(lines))
    if args.png:
        plot_taus(results, f"tau on {args.limit} {args.split} scenes, k = {args.k} (95% bootstrap intervals)", args.png)
    if args.json:
        Path(args.json).write_text(json.dumps({"k": args.k, "scenes": args.limit, "rows": results,
                                               "differences": differences}, indent=1))
    if args.markdown:
        Path(args.markdown).write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
