"""Per-backend, per-stage latency and the speculative speedup, each measured in one run.

    .venv/bin/python benchmarks/backends.py --data DATA --limit 20 --json OUT          # bundled models
    .venv/bin/python benchmarks/backends.py --random-models /tmp/rm --synthetic 8      # no trained models

Backends are `name[:device]`: torch, torch:cpu, torch:cuda, onnxruntime, onnxruntime:cpu,
onnxruntime:cuda, tensorrt (default: torch,onnxruntime,tensorrt). A backend this machine lacks
is listed as skipped with the reason (the factory's fallback is not measured twice); a missing
or stale ONNX export is an error unless --export re-exports first.

Per backend, on the same scenes:
- stage latency (median ms over scenes x repeats, each stage timed alone on the engines):
  vision (all frames), prefill, decode of 1 token, verify of k+1 tokens, one draft step, a
  greedy k-token draft chain (`DraftEngine.chain`: k-1 chain steps), the expert (all Euler
  steps); plus the ratios verify/decode and c = draft step/decode;
- the speculative speedup: the planner decodes every scene's CoC twice on the same engines,
  target-only and speculative (EAGLE draft, k), alternating which goes first; speedup =
  summed target-only CoC time / summed speculative CoC time; tau and the count of identical CoCs.
With random models (--random-models) the draft never agrees with the target (tau ~ 1), so
only the stage latencies mean anything; the speedup needs the trained draft.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from chain_spec_ros.constants import DEFAULT_K  # noqa: E402
from chain_spec_ros.drafters import EagleDrafter  # noqa: E402
from chain_spec_ros.engines.export import export_models  # noqa: E402
from chain_spec_ros.engines.factory import build_engines  # noqa: E402
from chain_spec_ros.engines.manifest import ExportError  # noqa: E402
from chain_spec_ros.models.checkpoint import load_target_config  # noqa: E402
from chain_spec_ros.models.config import DecoderConfig, TargetConfig  # noqa: E402
from chain_spec_ros.models.draft import DraftConfig, EagleDraft  # noqa: E402
from chain_spec_ros.models.target import TargetVLA  # noqa: E402
from chain_spec_ros.models.tokenizer import ChainTokenizer  # noqa: E402
from chain_spec_ros.paths import default_models_dir, default_tokenizer_path  # noqa: E402
from chain_spec_ros.planner import MAX_COC_TOKENS, Planner  # noqa: E402
from chain_spec_ros.prompt import PromptBuilder  # noqa: E402
from chain_spec_ros.sampling import GREEDY  # noqa: E402

STAGES = ("vision", "prefill", "decode", "verify", "draft_step", "draft_chain", "expert")


def make_random_models(directory: Path, hidden: int = 256, layers: int = 8) -> Path:
    """A random target + EAGLE draft at the bundled models' size (d 256, 8 layers; the default
    vision tower and frame size), for timing."""
    if (directory / "target" / "model.safetensors").is_file():
        return directory
    torch.manual_seed(0)
    tokenizer = ChainTokenizer.load(default_tokenizer_path())
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copy(default_tokenizer_path(), directory / "tokenizer.json")
    cfg = TargetConfig(decoder=DecoderConfig(vocab_size=tokenizer.vocab_size, hidden_size=hidden, num_layers=layers,
                                             intermediate_size=3 * hidden, max_positions=512),
                       image_pad_id=tokenizer.id("<|image_pad|>"))
    target = TargetVLA(cfg).eval()
    target.save_pretrained(directory / "target")
    EagleDraft(DraftConfig.for_target(cfg.decoder), target.decoder.embed_tokens).save_pretrained(directory / "draft")
    return directory


def load_scenes(args, image_size) -> list[dict]:
    if args.data:
        from chain_spec_ros.data.dataset import load_split

        table = load_split(args.data, args.split, limit=args.limit)
        return [table.scene(i) for i in range(min(len(table), args.limit or len(table)))]
    rng = np.random.default_rng(0)
    return [{"images": rng.integers(0, 255, size=(2, 4, *image_size, 3), dtype=np.uint8),
             "history_tokens": rng.integers(0, 1000, size=48), "speed": float(rng.uniform(0, 20))}
            for _ in range(args.synthetic)]


def _timed(fn) -> tuple[float, object]:
    started = time.perf_counter()
    out = fn()
    return (time.perf_counter() - started) * 1e3, out


def stage_latency(target, draft, builder: PromptBuilder, scenes: list[dict], k: int, repeats: int) -> dict:
    """Median ms of each stage, each timed alone (decode, verify and draft steps roll back after
    each repeat, so every repeat sees the same cache length)."""
    times: dict[str, list[float]] = {stage: [] for stage in STAGES}
    for scene in scenes:
        prompt = builder.build(scene["images"], scene["history_tokens"])
        max_len = len(prompt) + MAX_COC_TOKENS + k + 4
        target.start(max_len)
        ms, visual = _timed(lambda: target.encode_images(prompt.images))
        times["vision"].append(ms)
        ms, (logits, features) = _timed(lambda: target.prefill(prompt.input_ids, visual, prompt.mrope_positions))
        times["prefill"].append(ms)
        token, base = int(logits.argmax()), target.length
        for _ in range(repeats):
            times["decode"].append(_timed(lambda: target.decode([token], prompt.rope_delta))[0])
            target.crop(base)
            times["verify"].append(_timed(lambda: target.decode([token] * (k + 1), prompt.rope_delta))[0])
            target.crop(base)
        target.decode([token], prompt.rope_delta)
        times["expert"].append(_timed(lambda: target.trajectory(prompt.rope_delta, float(scene["speed"]), None, 0))[0])
        if draft is not None:
            draft.start(max_len)
            pending = prompt.input_ids[1:].tolist() + [token]
            hidden, draft_logits = draft.step(pending, draft.fuse(features), prompt.positions(0, len(pending), draft.config.position_mode))
            base = draft.length
            for _ in range(repeats):
                positions = prompt.positions(base, 1, draft.config.position_mode)
                times["draft_step"].append(_timed(lambda: draft.step([token], hidden, positions))[0])
                draft.crop(base)
                chain_positions = prompt.positions(base, k - 1, draft.config.position_mode)
                times["draft_chain"].append(_timed(lambda: draft.chain(draft_logits, hidden, chain_positions, GREEDY.choose,
                                                                       None))[0])
                draft.crop(base)
    medians = {stage: statistics.median(v) for stage, v in times.items() if v}
    ratios = {"verify_over_decode": medians["verify"] / medians["decode"]}
    if "draft_step" in medians:
        ratios["draft_over_decode"] = medians["draft_step"] / medians["decode"]
    return {"stages_ms": medians, "ratios": ratios}


def speculative_speedup(target, draft, builder: PromptBuilder, scenes: list[dict], k: int, warmup: int = 2) -> dict:
    plain, speculative = Planner(target, builder), Planner(target, builder, EagleDrafter(draft, stop_id=builder.cot_end_id), k=k)
    for scene in scenes[:warmup]:
        for planner in (plain, speculative):
            planner.plan(scene["images"], scene["history_tokens"], float(scene["speed"]))
    totals = {"target": 0.0, "speculative": 0.0}
    identical = produced = passes = tokens = 0
    for i, scene in enumerate(scenes):
        order = [("target", plain), ("speculative", speculative)][:: -1 if i % 2 else 1]
        results = {}
        for name, planner in order:
            results[name] = planner.plan(scene["images"], scene["history_tokens"], float(scene["speed"]))
            totals[name] += results[name].timings_ms["decode"]
        identical += results["target"].coc_ids == results["speculative"].coc_ids
        stats = results["speculative"].stats
        passes += stats["target_passes"]
        produced += round(stats["tau"] * stats["target_passes"])
        tokens += len(results["target"].coc_ids)
    return {"speedup": totals["target"] / totals["speculative"], "tau": produced / max(passes, 1),
            "identical_coc": identical, "scenes": len(scenes), "coc_tokens_per_scene": tokens / len(scenes),
            "coc_ms_per_scene": {name: ms / len(scenes) for name, ms in totals.items()}}


def engines_for(spec: str, models: Path, draft_dir: Path | None, threads: int):
    """(target, draft) for `name[:device]`, or a string saying why this machine cannot run it."""
    name, _, device = spec.partition(":")
    kwargs: dict = {}
    if name == "torch":
        if device == "cuda" and not torch.cuda.is_available():
            return "no CUDA device"
        kwargs["device"] = device or None
    elif name == "onnxruntime":
        kwargs["threads"] = threads
        if device:
            kwargs["providers"] = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
    target, draft = build_engines(models, name, draft_dir, **kwargs)
    if target.backend != name or target.fallback_reason:
        return target.fallback_reason
    return target, draft


def table(rows: list[dict]) -> str:
    head = (f"{'backend':18s} {'vision':>7s} {'prefill':>8s} {'decode':>7s} {'verify':>7s} {'draft':>6s} {'expert':>7s}"
            f" {'ver/dec':>7s} {'c':>5s} {'tau':>5s} {'speedup':>7s} {'same':>5s}")
    lines = [head, "-" * len(head)]
    for row in rows:
        if "skipped" in row:
            lines.append(f"{row['backend']:18s} skipped: {row['skipped']}")
            continue
        s, r = row["stages_ms"], row["ratios"]
        lines.append(f"{row['backend']:18s} {s['vision']:7.2f} {s['prefill']:8.2f} {s['decode']:7.2f} {s['verify']:7.2f} "
                     f"{s.get('draft_step', float('nan')):6.2f} {s['expert']:7.2f} {r['verify_over_decode']:7.2f} "
                     f"{r.get('draft_over_decode', float('nan')):5.2f} {row.get('tau', float('nan')):5.2f} "
                     f"{row.get('speedup', float('nan')):7.2f} {row.get('identical_coc', 0):>2d}/{row.get('scenes', 0):<2d}")
    lines.append("stage times in ms (median); decode = 1 token, verify = k+1 tokens, draft = one draft step; "
                 "speedup = target-only / speculative CoC time, same engines, same run")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=str(default_models_dir()))
    parser.add_argument("--draft-dir", help="EAGLE draft directory (default MODELS/draft)")
    parser.add_argument("--random-models", help="make (once) and use random models of the bundled size in this directory")
    parser.add_argument("--data", help="dataset directory (scenes of --split); without it, --synthetic random scenes")
    parser.add_argument("--split", default="test")
    parser.add_argument("--limit", type=int, default=20)
    parser.add_argument("--synthetic", type=int, default=8)
    parser.add_argument("--backends", default="torch,onnxruntime,tensorrt")
    parser.add_argument("--k", type=int, default=DEFAULT_K)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2, help="torch and ONNX Runtime intra-op threads")
    parser.add_argument("--export", action="store_true", help="(re-)export the ONNX graphs first")
    parser.add_argument("--no-speedup", action="store_true", help="stage latency only")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    models = make_random_models(Path(args.random_models)) if args.random_models else Path(args.models)
    draft_dir = Path(args.draft_dir) if args.draft_dir else models / "draft"
    draft_dir = draft_dir if (draft_dir / "model.safetensors").is_file() else None
    if args.export or (args.random_models and not (models / "onnx" / "manifest.json").is_file()):
        export_models(models, draft_dir)
    config = load_target_config(models / "target")
    builder = PromptBuilder(ChainTokenizer.load(models / "tokenizer.json"), *config.vision.grid)
    scenes = load_scenes(args, (config.vision.image_height, config.vision.image_width))
    rows = []
    for spec in args.backends.split(","):
        torch.set_num_threads(args.threads)  # an ONNX Runtime backend sets torch to one thread
        try:
            engines = engines_for(spec, models, draft_dir, args.threads)
        except ExportError as error:
            engines = f"{error}"
        if isinstance(engines, str) or engines is None:
            rows.append({"backend": spec, "skipped": engines})
            print(f"{spec}: skipped: {engines}", file=sys.stderr)
            continue
        target, draft = engines
        row = {"backend": spec, "device": str(getattr(target, "device", "")),
               "providers": getattr(target, "providers", None), "draft_int8": draft is not None and draft.int8_weights,
               **stage_latency(target, draft, builder, scenes, args.k, args.repeats)}
        if draft is not None and not args.no_speedup:
            row.update(speculative_speedup(target, draft, builder, scenes, args.k))
        rows.append(row)
        print(f"{spec}: done", file=sys.stderr)
    report = {"models": str(models), "draft": str(draft_dir) if draft_dir else None, "k": args.k,
              "threads": args.threads, "scenes": len(scenes), "rows": rows}
    print(table(rows))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
