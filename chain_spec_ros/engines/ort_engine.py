"""The ONNX Runtime runner of the graph engines (graph_engine.py): sessions, providers, threads.

`OrtGraph` runs one exported graph with IO binding over the engines' torch buffers;
`load_ort_engines` opens every graph of an export (manifest.py) on the best execution provider
this machine has and returns the graph engines over them.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from .graph_engine import GraphDraftEngine, GraphTargetEngine, load_configs
from .manifest import KV_IN_PLACE, load_manifest

GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")
DEFAULT_PROVIDERS = ("CUDAExecutionProvider", "CPUExecutionProvider")  # the best this machine has
_NUMPY = {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64, torch.int32: np.int32,
          torch.uint8: np.uint8, torch.bool: np.bool_}


@dataclass
class OrtOptions:
    """How ONNX Runtime runs (node / benchmark configuration).

    providers: in order of preference; None = CUDA when this onnxruntime build and torch can use
    it, else CPU. An explicitly requested provider that is missing is dropped and reported as the
    engine's `fallback_reason`. intra_op_threads: the size of the process's one ONNX Runtime
    thread pool (see `use_shared_thread_pool`); 0 = torch.get_num_threads() when the pool is
    made, so one --threads setting governs both backends. fp16 applies to the TensorRT provider only.
    draft_int8: on the CPU provider, run the draft's int8 graphs (export.quantize_int8) when the
    export has them; False runs the fp32 draft (the parity tests compare it with PyTorch's).
    """

    providers: Sequence[str] | None = None
    intra_op_threads: int = 0
    fp16: bool = False
    draft_int8: bool = True
    trt_cache_dir: str | None = None  # default <the export's directory>/ort_trt_cache


class OrtGraph:
    """One ONNX Runtime session, run with IO binding over caller-owned torch tensors: inputs are
    read and outputs written in place, so a bound call copies and allocates nothing."""

    def __init__(self, path: str | Path, session_options, providers: list, device: torch.device):
        import onnxruntime as ort

        self.session = ort.InferenceSession(str(path), session_options, providers=providers)
        self.device = device
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def bind(self, inputs: dict[str, Tensor], outputs: dict[str, Tensor]):
        binding = self.session.io_binding()
        kind, index = self.device.type, self.device.index or 0
        for names, tensors, bind in ((self.input_names, inputs, binding.bind_input),
                                     (self.output_names, outputs, binding.bind_output)):
            for name in names:
                t = tensors[name]
                assert t.is_contiguous() and t.device == self.device, name
                bind(name, kind, index, _NUMPY[t.dtype], tuple(t.shape), t.data_ptr())
        return binding

    def run(self, binding) -> None:
        if self.device.type == "cuda":  # inputs were written by torch on its current stream
            torch.cuda.current_stream(self.device).synchronize()
        self.session.run_with_iobinding(binding)
        if self.device.type == "cuda":
            binding.synchronize_outputs()


def ort_unavailable_reason() -> str | None:
    try:
        import onnxruntime  # noqa: F401
    except ImportError as error:
        return f"onnxruntime is not importable ({error})"
    return None


def resolve_providers(options: OrtOptions, onnx_dir: Path) -> tuple[list, torch.device, str | None]:
    """(providers with their options, the device of the engines' buffers, why a requested
    provider was dropped or None)."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    wanted = list(options.providers or DEFAULT_PROVIDERS)
    chosen, dropped = [], []
    for name in wanted:
        if name not in available:
            dropped.append(f"{name} is not in this onnxruntime build (it has {', '.join(available)})")
        elif name in GPU_PROVIDERS and not torch.cuda.is_available():
            dropped.append(f"{name} needs a CUDA device, and torch sees none")
        elif name not in chosen:
            chosen.append(name)
    if "CPUExecutionProvider" not in chosen:
        chosen.append("CPUExecutionProvider")
    device = torch.device("cuda", 0) if chosen[0] in GPU_PROVIDERS else torch.device("cpu")
    if device.type == "cuda" and hasattr(ort, "preload_dlls"):  # CUDA/cuDNN from the nvidia-* wheels torch uses
        try:
            ort.preload_dlls()
        except Exception:  # noqa: BLE001 - missing libraries show up as ProviderInitError below
            pass
    cache = str(options.trt_cache_dir or onnx_dir / "ort_trt_cache")
    provider_options = {
        "TensorrtExecutionProvider": {"device_id": 0, "trt_fp16_enable": options.fp16, "trt_engine_cache_enable": True,
                                      "trt_engine_cache_path": cache, "trt_timing_cache_enable": True},
        "CUDAExecutionProvider": {"device_id": 0, "use_tf32": 0},  # true fp32, as the torch reference
        "CPUExecutionProvider": {},
    }
    providers = [(name, provider_options[name]) for name in chosen]
    reason = None
    if options.providers is not None and dropped:
        reason = "; ".join(dropped) + f"; running on {chosen[0]}"
    return providers, device, reason


_shared_pool_threads: int | None = None


def use_shared_thread_pool(threads: int = 0) -> None:
    """Run every ONNX Runtime session of this process on one intra-op thread pool of `threads`
    threads (0: torch's thread count at the first call), and torch on one thread. The pool is
    sized once per process: a later call asking for another size gets a warning and the first.

    Why: the engines hold eight sessions (vision, decoder and its fixed-size variants, expert,
    draft step, fusion) and call them in turn. With a pool per session, and torch's own OpenMP
    pool for the glue (embedding gather, cache append), every pool keeps its workers spinning
    after its last operator and they steal the cores from the pool that runs next. Measured on
    the 2-core development machine, 30 test scenes: target-only CoC decoding 61.7 ms with
    per-session pools and torch on 2 threads, 33.3 ms with one shared pool and torch on 1.
    """
    import onnxruntime as ort

    global _shared_pool_threads
    if _shared_pool_threads is None:
        _shared_pool_threads = threads or torch.get_num_threads()
        ort.set_global_thread_pool_sizes(_shared_pool_threads, 1)
    elif threads and threads != _shared_pool_threads:
        warnings.warn(f"ONNX Runtime's thread pool already has {_shared_pool_threads} threads in this process; "
                      f"{threads} were asked for", RuntimeWarning, stacklevel=2)
    torch.set_num_threads(1)


def session_options():
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.use_per_session_threads = False  # the shared pool of `use_shared_thread_pool`
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    return so


class ProviderInitError(RuntimeError):
    """A GPU execution provider is listed by onnxruntime but did not load (e.g. CUDA or cuDNN
    libraries missing): ONNX Runtime would silently run the graph on the CPU instead."""


def load_ort_engines(models: str | Path, draft_dir: str | Path | None = None, options: OrtOptions | None = None,
                     onnx_dir: str | Path | None = None) -> tuple[GraphTargetEngine, GraphDraftEngine | None]:
    """ONNX Runtime engines on the export in `onnx_dir` (default MODELS/onnx), checked against
    the weights (manifest.load_manifest)."""
    models, options = Path(models), options or OrtOptions()
    manifest = load_manifest(models, draft_dir, onnx_dir)
    try:
        return _load_ort_engines(models, draft_dir, options, manifest)
    except ProviderInitError as error:
        target, draft = _load_ort_engines(models, draft_dir, OrtOptions(**{**vars(options), "providers": ["CPUExecutionProvider"]}),
                                          manifest)
        for engine in (target, draft):
            if engine is not None:
                engine.fallback_reason = f"{error}; running on CPUExecutionProvider"
        return target, draft


def _load_ort_engines(models: Path, draft_dir, options: OrtOptions, manifest: dict
                      ) -> tuple[GraphTargetEngine, GraphDraftEngine | None]:
    onnx_dir = Path(manifest["dir"])
    providers, device, reason = resolve_providers(options, onnx_dir)
    use_shared_thread_pool(options.intra_op_threads)
    so = session_options()

    def graphs(*names: str, int8: bool = False) -> dict[str, OrtGraph]:
        files = {name: manifest["graphs"][name]["int8_file" if int8 else "file"] for name in names}
        loaded = {name: OrtGraph(onnx_dir / file, so, providers, device) for name, file in files.items()}
        for graph in loaded.values():
            if device.type == "cuda" and graph.session.get_providers()[0] not in GPU_PROVIDERS:
                raise ProviderInitError(f"{providers[0][0]} did not initialise (CUDA/cuDNN libraries missing?)")
        return loaded

    config, draft_config, layers = load_configs(models, draft_dir)
    names = list(manifest["graphs"])  # the core graphs and their fixed-size variants
    if device.type == "cuda":  # GroupQueryAttention (the in-place steps) has fp16/bf16 CUDA kernels only
        names = [n for n in names if manifest["graphs"][n].get("kv_update") != KV_IN_PLACE]
    target = GraphTargetEngine(graphs(*[n for n in names if n.startswith("target_")]), manifest, config, layers,
                               device, "onnxruntime")
    draft = None
    if draft_config is not None:
        draft_names = [n for n in names if n.startswith("draft_")]
        int8 = (options.draft_int8 and device.type == "cpu"
                and all("int8_file" in manifest["graphs"][n] for n in draft_names))
        draft = GraphDraftEngine(graphs(*draft_names, int8=int8), manifest, draft_config, device, "onnxruntime")
        draft.int8_weights = int8
    for engine in (target, draft):
        if engine is not None:
            engine.providers = [name for name, _ in providers]
            engine.fallback_reason = reason
    return target, draft
