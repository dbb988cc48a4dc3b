"""The ROS 2 demo: the node on the bundled models, fed by a replayed drive, then the report.

    python -m chain_spec_ros.replay.demo [--bag data/demo_drive] [--seconds 30] [--out runs/ros_demo]

1. writes the demo bag (a simulated drive, MCAP) when it is missing;
2. starts `chain_spec_node` on the models (use_sim_time true) in a child process;
3. plays the bag with `chain-spec-replay`, recording the node's outputs;
4. stops the node and prints the `chain-spec-report` summary; report.json, report.png and
   node.log land in --out.

Discovery stays on this host (ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST unless set) and the
caller's ROS_DOMAIN_ID is kept, so RViz on the same domain can watch (config/chain_spec.rviz).
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from ..constants import BACKENDS
from ..paths import default_models_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="chain-spec-ros-demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bag", type=Path, default=Path("data/demo_drive"), help="demo bag (written if missing)")
    parser.add_argument("--seconds", type=float, default=30.0, help="length of a newly written demo bag")
    parser.add_argument("--seed", type=int, default=7, help="seed of a newly written demo bag")
    parser.add_argument("--models", type=Path, default=default_models_dir())
    parser.add_argument("--tiny", action="store_true", help="use a tiny random model instead (a smoke test)")
    parser.add_argument("--out", type=Path, default=Path("runs/ros_demo"))
    parser.add_argument("--rate", type=float, default=1.0, help="replay rate")
    parser.add_argument("--plan-rate", type=float, default=2.0, help="planning rate of the node (Hz, bag time)")
    parser.add_argument("--backend", choices=("auto", *BACKENDS), default="auto",
                        help="the node's engines (auto: the fastest available, as the node's default)")
    args = parser.parse_args(argv)

    from .fixtures import NodeProcess, write_tiny_models
    from .report import build_report, draw_report, summary_lines

    args.out.mkdir(parents=True, exist_ok=True)
    if not args.bag.exists():
        from ..data.bag import write_drive_bag

        print(f"writing the demo bag {args.bag} ({args.seconds:g} s, seed {args.seed})", flush=True)
        args.bag.parent.mkdir(parents=True, exist_ok=True)
        write_drive_bag(args.bag, args.seconds, args.seed, progress=False)
    models = write_tiny_models(args.out / "tiny_models") if args.tiny else args.models
    outputs = args.out / "outputs"
    if outputs.exists():
        shutil.rmtree(outputs)

    env = dict(os.environ)
    env.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    env["PYTHONUNBUFFERED"] = "1"
    node_args = ["--ros-args", "-p", f"models_dir:={Path(models).resolve()}", "-p", "use_sim_time:=true",
                 "-p", f"plan_rate_hz:={args.plan_rate}", "-p", f"backend:={args.backend}"]
    print(f"starting chain_spec_node on {models} (log: {args.out / 'node.log'})", flush=True)
    node = NodeProcess(node_args, env, args.out / "node.log")
    started = time.monotonic()
    try:
        replay = subprocess.Popen([sys.executable, "-m", "chain_spec_ros.replay.replay", str(args.bag), "--record",
                                   str(outputs), "--rate", str(args.rate), "--wait-timeout", "300"], env=env)
        while replay.poll() is None:
            if not node.alive():
                replay.terminate()
                replay.wait(10)
                print(f"chain_spec_node exited ({node.process.returncode}):\n{node.output()[-3000:]}", file=sys.stderr)
                return 2
            time.sleep(0.2)
        if replay.returncode != 0:
            print(f"replay failed ({replay.returncode}); node log:\n{node.output()[-3000:]}", file=sys.stderr)
            return 2
    finally:
        node.stop()
    report, recorded, drive = build_report(outputs, args.bag)
    png = args.out / "report.png"
    draw_report(report, recorded, drive, png)
    import json

    (args.out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    print("\n".join(summary_lines(report)))
    print(f"report: {args.out / 'report.json'}, {png} ({time.monotonic() - started:.0f} s)")
    return 0 if report["plans"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
