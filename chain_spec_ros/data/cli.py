"""`chain-spec-data`: generate the scene dataset, its statistics, the tokeniser, a demo bag and a contact sheet."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from ..constants import IMAGE_HEIGHT, IMAGE_WIDTH
from ..paths import default_tokenizer_path


def cmd_generate(args) -> None:
    from .dataset import generate

    start = time.time()
    meta = generate(args.out, args.num, args.seed, args.width, args.height, args.workers)
    elapsed = time.time() - start
    print(json.dumps({"out": args.out, "splits": meta["splits"], "seconds": round(elapsed, 1),
                      "scenes_per_second": round(args.num / elapsed, 1), "workers": args.workers}))


def cmd_stats(args) -> None:
    from ..models.tokenizer import ChainTokenizer
    from .stats import dataset_stats

    stats = dataset_stats(args.dir, ChainTokenizer.load(args.tokenizer))
    text = json.dumps(stats, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text)


def tokenizer_corpus(num: int = 4000, seed: int = 424242) -> list[str]:
    """CoC sentences of text-only scenes plus the prompt's fixed text; fixed seeds make the
    trained tokeniser reproducible."""
    from ..prompt import INSTRUCTION_TEXT, SYSTEM_TEXT
    from ..scenarios.scene import make_scene

    fixed = [SYSTEM_TEXT, INSTRUCTION_TEXT] * 50
    return fixed + [make_scene(seed * 10_000 + i, render=False).coc for i in range(num)]


def cmd_tokenizer(args) -> None:
    from ..models.tokenizer import train_tokenizer

    tokenizer = train_tokenizer(tokenizer_corpus(args.num))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(args.out)
    print(json.dumps({"out": args.out, "vocab_size": tokenizer.vocab_size}))


def cmd_bag(args) -> None:
    from .bag import write_drive_bag

    info = write_drive_bag(args.out, args.seconds, args.seed, storage=args.storage)
    print(json.dumps(info, default=str))


def cmd_sheet(args) -> None:
    from .sheet import draw_contact_sheet

    draw_contact_sheet(args.out, args.seed, args.rows)
    print(json.dumps({"out": args.out}))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="chain-spec-data", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="write a sharded scene dataset with train/val/test splits")
    p.add_argument("--out", required=True)
    p.add_argument("--num", type=int, default=20000)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--width", type=int, default=IMAGE_WIDTH)
    p.add_argument("--height", type=int, default=IMAGE_HEIGHT)
    p.add_argument("--workers", type=int, default=2)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("stats", help="print dataset statistics as JSON")
    p.add_argument("dir")
    p.add_argument("--tokenizer", default=str(default_tokenizer_path()))
    p.add_argument("--json", help="also write the JSON here")
    p.set_defaults(func=cmd_stats)

    p = sub.add_parser("tokenizer", help="train the BPE tokeniser on generated CoC text")
    p.add_argument("--out", default=str(default_tokenizer_path()))
    p.add_argument("--num", type=int, default=4000)
    p.set_defaults(func=cmd_tokenizer)

    p = sub.add_parser("bag", help="write a continuous drive as a rosbag2 bag")
    p.add_argument("--out", required=True)
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--storage", choices=("mcap", "sqlite3"), default="mcap")
    p.set_defaults(func=cmd_bag)

    p = sub.add_parser("sheet", help="draw a contact sheet of scenes (PNG)")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=3)
    p.add_argument("--rows", type=int, default=8)
    p.set_defaults(func=cmd_sheet)

    args = parser.parse_args(argv)
    try:
        args.func(args)
    except (FileNotFoundError, ValueError) as error:
        print(f"chain-spec-data: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    sys.exit(main())
