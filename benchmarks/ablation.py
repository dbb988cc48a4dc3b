"""The paper's ablation in one table: {flat, mrope} x {SFT, SFT+AARL} drafts and the n-gram baseline.

    .venv/bin/python benchmarks/ablation.py --data DATA --limit 150 \
        --draft "flat, SFT=runs/draft_flat" --draft "flat, SFT+AARL=runs/draft_flat_aarl" ... \
        --ngram --json runs/ablation.json --markdown runs/ablation.md

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
from chain_spec_ros.paths import default_models_dir  # noqa: E402
from chain_spec_ros.planner import Planner  # noqa: E402

COLUMNS = ("tau", "drafted_share", "speedup", "cost_ratio", "identical", "total")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--split", default="test")
    parser.add_argument("--models", default=str(default_models_dir()))
    parser.add_argument("--draft", action="append", default=[], help='"label=directory" of an EAGLE draft')
    parser.add_argument("--ngram", action="store_true", help="add the n-gram baseline row")
    parser.add_argument("--k", type=int, default=DEFAULT_K)
    parser.add_argument("--limit", type=int, default=150)
    parser.add_argument("--json")
    parser.add_argument("--markdown")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    table = load_split(args.data, args.split, limit=args.limit)
    rows = [(spec.split("=", 1)[0], "eagle", spec.split("=", 1)[1]) for spec in args.draft]
    if args.ngram:
        rows.append(("n-gram (no training)", "ngram", None))
    results = {}
    for label, kind, directory in rows:
        speculative = load_planner(Path(args.models), drafter=kind, draft_dir=directory, data=args.data, k=args.k)
        report = run(Planner(speculative.target, speculative.builder), speculative, table, args.limit)
        results[label] = {key: report[key] for key in COLUMNS}
        print(label, json.dumps(results[label]), flush=True)
    lines = ["| draft | tau | drafted share | speedup | cost ratio c | identical |", "|---|---|---|---|---|---|"]
    for label, r in results.items():
        lines.append(f"| {label} | {r['tau']:.2f} | {r['drafted_share']:.3f} | {r['speedup']:.2f}x | "
                     f"{r['cost_ratio']:.3f} | {r['identical']}/{r['total']} |")
    print("\n".join(lines))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    if args.markdown:
        Path(args.markdown).write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
