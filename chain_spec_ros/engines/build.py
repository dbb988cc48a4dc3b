"""`chain-spec-build-engines`: TensorRT engines from the exported ONNX graphs.

    chain-spec-build-engines --models MODELS [--max-len 512] [--k 16] [--fp32]

Reads MODELS/onnx (run chain-spec-export first) and writes MODELS/onnx/trt/<graph>.engine plus
engines.json (TensorRT version, GPU, cache length, profiles, and the sha256 of each source ONNX
file, so the runtime refuses stale engines). A timing cache (MODELS/onnx/trt/timing.cache) is
loaded and saved back, so rebuilding after a re-export skips most kernel timing.

Optimisation profiles, one per call shape the planner makes (S = --max-len cache slots, fixed:
the runtime allocates exactly S per layer):
  target_decoder  prefill T in [1, S] (1 logit row) | decode T = 1 | verify T = k + 1
  draft_step      any T in [1, S] (the prompt pass and the accepted tokens) | chain step T = 1
  draft_fuse      T in [1, S];  target_vision  N images in [1, --max-images];  target_expert  fixed
(the decoder's deepstack input follows its token count; no expert graph for a VLM-only target)
The fixed profiles are what the runtime replays as CUDA graphs.

Precision: fp16 by default. TensorRT 10 lowers the fp32 graphs with BuilderFlag.FP16 (I/O stays
fp32); TensorRT 11 removed that flag (strong typing only), so there the graphs are converted to
mixed precision with NVIDIA ModelOpt's AutoCast when `modelopt` is installed, and built in fp32
otherwise (with a warning). --fp32 builds fp32 engines with TF32 off: the parity configuration.

NOT VERIFIED here: TensorRT does not install on the development and CI machines, and the GPU
machines available for checks have none either.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from ..constants import DEFAULT_K
from ..models.checkpoint import load_target_config
from ..models.config import TargetConfig
from .manifest import EXPERT_GRAPH, ExportError, load_manifest
from .trt_engine import ENGINES_MANIFEST, TRT_DIR, file_sha256, trt_logger, trt_unavailable_reason

Shape = tuple[int, ...]
Profile = dict[str, tuple[Shape, Shape, Shape]]  # input -> (min, opt, max)


def _fixed(shape: Shape) -> tuple[Shape, Shape, Shape]:
    return shape, shape, shape


def _ranged(make, low: int, opt: int, high: int) -> tuple[Shape, Shape, Shape]:
    return make(low), make(opt), make(high)


def profiles(manifest: dict, config: TargetConfig, cache_len: int, k: int, max_images: int, prefill_opt: int
             ) -> dict[str, list[Profile]]:
    """The optimisation profiles of every graph in the export (see the module docstring)."""
    t = manifest["target"]
    n, kv, hd, d = t["num_layers"], t["num_kv_heads"], t["head_dim"], t["hidden_size"]
    opt = min(prefill_opt, cache_len)
    past = {f"past_{kind}_{i}": _fixed((1, kv, cache_len, hd)) for kind in ("key", "value") for i in range(n)}

    def decoder(low: int, mid: int, high: int, rows: tuple[int, int, int]) -> Profile:
        profile = {"inputs_embeds": _ranged(lambda x: (1, x, d), low, mid, high),
                   "positions": _ranged(lambda x: (3, x), low, mid, high),
                   "past_length": _fixed((1,)), "logit_index": _ranged(lambda x: (x,), *rows), **past}
        if t["deepstack_layers"]:
            profile["deepstack"] = _ranged(lambda x: (t["deepstack_layers"], 1, x, d), low, mid, high)
        return profile

    v = config.vision
    out: dict[str, list[Profile]] = {
        "target_vision": [{"images": _ranged(lambda x: (x, v.image_height, v.image_width, 3), 1, min(8, max_images),
                                             max_images)}],
        "target_decoder": [decoder(1, opt, cache_len, (1, 1, cache_len)), decoder(1, 1, 1, (1, 1, 1)),
                           decoder(k + 1, k + 1, k + 1, (k + 1, k + 1, k + 1))],
    }
    expert = t["expert"]
    if expert is not None:
        out[EXPERT_GRAPH] = [{"actions": _fixed((1, expert["horizon"], expert["action_dim"])), "flow_time": _fixed((1,)),
                              "valid_length": _fixed((1,)), "rope_delta": _fixed((1,)), **past}]
    draft = manifest.get("draft")
    if draft is not None:
        dpast = {f"past_{kind}_0": _fixed((1, draft["num_kv_heads"], cache_len, draft["head_dim"])) for kind in ("key", "value")}

        def step(low: int, mid: int, high: int) -> Profile:
            return {"token_ids": _ranged(lambda x: (1, x), low, mid, high),
                    "features": _ranged(lambda x: (1, x, d), low, mid, high),
                    "positions": _ranged(lambda x: (3, x), low, mid, high), "past_length": _fixed((1,)), **dpast}

        out["draft_step"] = [step(1, opt, cache_len), step(1, 1, 1)]
        out["draft_fuse"] = [{f"feature_{j}": _ranged(lambda x: (1, x, d), 1, opt, cache_len)
                              for j in range(len(draft["feature_layers"]))}]
    return out


def _mixed_precision_onnx(onnx_path: Path, scratch: Path) -> Path | None:
    """TensorRT >= 11: an fp16 mixed-precision copy via ModelOpt AutoCast (I/O types kept)."""
    try:
        import onnx
        from modelopt.onnx.autocast import convert_to_mixed_precision
    except ImportError:
        return None
    converted = convert_to_mixed_precision(onnx_path=str(onnx_path), low_precision_type="fp16", keep_io_types=True)
    path = scratch / onnx_path.name
    onnx.save(converted, str(path))
    return path


def build_engine(onnx_path: Path, graph_profiles: list[Profile], engine_path: Path, fp16: bool, timing_cache: Path,
                 workspace_gb: float = 4.0) -> str:
    """Build and serialise one engine; returns the precision actually used."""
    import tensorrt as trt

    builder = trt.Builder(trt_logger())
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    precision, flags, source = "fp32", 0, onnx_path
    with tempfile.TemporaryDirectory() as scratch:
        if fp16 and hasattr(trt.BuilderFlag, "FP16"):  # TensorRT 10: weak typing
            config.set_flag(trt.BuilderFlag.FP16)
            precision = "fp16"
        elif fp16:  # TensorRT 11: strong typing, precision lives in the graph
            converted = _mixed_precision_onnx(onnx_path, Path(scratch))
            if converted is None:
                print(f"warning: {onnx_path.name}: TensorRT {trt.__version__} needs an fp16 graph for fp16 engines; "
                      f"install nvidia-modelopt for AutoCast. Building fp32.", file=sys.stderr)
            else:
                source, precision = converted, "fp16"
                flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
        if precision == "fp32" and hasattr(trt.BuilderFlag, "TF32"):
            config.clear_flag(trt.BuilderFlag.TF32)  # true fp32, for parity
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, trt_logger())
        if not parser.parse_from_file(str(source)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise ExportError(f"TensorRT could not parse {onnx_path}: {errors}")
        cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file() else b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
        for profile in graph_profiles:
            p = builder.create_optimization_profile()
            for name, (low, opt, high) in profile.items():
                p.set_shape(name, low, opt, high)
            config.add_optimization_profile(p)
        serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError(f"TensorRT failed to build an engine from {onnx_path}")
    engine_path.write_bytes(bytes(serialized))
    timing_cache.write_bytes(bytes(config.get_timing_cache().serialize()))
    return precision


def build_all(models: str | Path, fp16: bool = True, max_len: int | None = None, k: int = DEFAULT_K, max_images: int = 32,
              prefill_opt: int = 256, workspace_gb: float = 4.0, verbose: bool = False) -> dict:
    """Build an engine for every graph of MODELS/onnx; returns what engines.json records."""
    problem = trt_unavailable_reason()
    if problem is not None:
        raise RuntimeError(f"cannot build TensorRT engines: {problem}")
    import tensorrt as trt
    import torch

    models = Path(models)
    manifest = load_manifest(models)
    config = load_target_config(models / "target")
    cache_len = max_len or config.decoder.max_positions
    onnx_dir = Path(manifest["dir"])
    out = onnx_dir / TRT_DIR
    out.mkdir(exist_ok=True)
    (out / ENGINES_MANIFEST).unlink(missing_ok=True)
    record = {"tensorrt": trt.__version__, "gpu": torch.cuda.get_device_name(), "cache_len": cache_len, "k": k,
              "graphs": {}}
    for name, graph_profiles in profiles(manifest, config, cache_len, k, max_images, prefill_opt).items():
        onnx_path = onnx_dir / manifest["graphs"][name]["file"]
        started = time.time()
        precision = build_engine(onnx_path, graph_profiles, out / f"{name}.engine", fp16, out / "timing.cache",
                                 workspace_gb)
        record["graphs"][name] = {"engine": f"{name}.engine", "onnx_sha256": file_sha256(onnx_path),
                                  "precision": precision, "profiles": graph_profiles}
        if verbose:
            print(f"{name:15s} {precision}  {len(graph_profiles)} profile(s)  {time.time() - started:6.1f} s")
    (out / ENGINES_MANIFEST).write_text(json.dumps(record, indent=1) + "\n")
    return record


def main(argv: list[str] | None = None) -> int:
    from ..paths import default_models_dir

    parser = argparse.ArgumentParser(prog="chain-spec-build-engines", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=str(default_models_dir()))
    parser.add_argument("--max-len", type=int, help="KV cache slots (default: the decoder's max_positions); the "
                        "planner needs prompt + 64 + k + 4")
    parser.add_argument("--k", type=int, default=DEFAULT_K, help="draft length: the verify profile is k + 1 tokens")
    parser.add_argument("--max-images", type=int, default=32)
    parser.add_argument("--fp32", action="store_true", help="fp32 engines (TF32 off), for parity checks")
    parser.add_argument("--workspace-gb", type=float, default=4.0)
    args = parser.parse_args(argv)
    try:
        record = build_all(args.models, not args.fp32, args.max_len, args.k, args.max_images,
                           workspace_gb=args.workspace_gb, verbose=True)
    except (RuntimeError, FileNotFoundError, ValueError) as error:
        print(f"chain-spec-build-engines: error: {error}", file=sys.stderr)
        return 2
    print(f"engines for {record['gpu']} (TensorRT {record['tensorrt']}, {record['cache_len']} cache slots) in "
          f"{Path(args.models) / 'onnx' / TRT_DIR}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
