"""TensorRT backend: the exported graphs compiled to engines, run on one CUDA stream.

Engines are built from MODELS/onnx by `chain-spec-build-engines` (engines/build.py) into
MODELS/onnx/trt/, with one optimisation profile per call shape: prefill (any length), decode
(1 token), verify (k + 1 tokens); the draft's chain step (1 token); the expert (fixed). The
runtime here deserialises them, keeps one execution context per profile, binds every tensor by
address (`set_tensor_address`) once per call shape, and enqueues with `execute_async_v3` on the
engine's single CUDA stream. A fixed-shape step (decode, verify, draft step, expert) is run
once, then captured as a CUDA graph together with the embedding gather and the KV append
around it, and replayed from then on: one launch per decoding step.

The engine logic (buffers, KV cache, rollback, the Euler loop) is `GraphTargetEngine` /
`GraphDraftEngine` of graph_engine.py; only the runner and the launch differ.

NOT VERIFIED in this project: TensorRT does not install on the development and CI machines, and
the GPU machines available for checks have none either. This module is written against the
TensorRT 10 Python API (also 11, whose build path differs only in fp16, see build.py);
`import tensorrt` happens lazily, and its tests skip with the reason.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable, ContextManager

import torch
from torch import Tensor

from ..models.config import TargetConfig
from ..models.draft import DraftConfig
from .graph_engine import Call, GraphDraftEngine, GraphTargetEngine, load_configs
from .manifest import ExportError, load_manifest, required_graphs

TRT_DIR = "trt"
ENGINES_MANIFEST = "engines.json"
MIN_VERSION = (10, 0)  # int64 I/O, name-based tensor API, execute_async_v3


def trt_unavailable_reason() -> str | None:
    """Why the tensorrt backend cannot run on this machine, or None."""
    try:
        import tensorrt as trt
    except ImportError as error:
        return f"tensorrt is not importable ({error})"
    version = tuple(int(v) for v in trt.__version__.split(".")[:2])
    if version < MIN_VERSION:
        return f"tensorrt {trt.__version__} is older than {'.'.join(map(str, MIN_VERSION))}"
    if not torch.cuda.is_available():
        return "no CUDA device visible to torch"
    return None


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


_LOGGER = None


def trt_logger():
    global _LOGGER
    if _LOGGER is None:
        import tensorrt as trt

        _LOGGER = trt.Logger(trt.Logger.WARNING)
    return _LOGGER


def torch_dtype(trt_dtype) -> torch.dtype:
    import tensorrt as trt

    return {trt.float32: torch.float32, trt.float16: torch.float16, trt.int64: torch.int64, trt.int32: torch.int32,
            trt.uint8: torch.uint8, trt.bool: torch.bool}[trt_dtype]


def choose_profile(profiles: list[dict[str, tuple]], shapes: dict[str, tuple]) -> tuple[int | None, bool]:
    """The narrowest optimisation profile ({input: (min, opt, max)} each) that admits `shapes`,
    and whether it admits nothing else (then its steps can be replayed as CUDA graphs)."""
    best = None
    for index, profile in enumerate(profiles):
        width = 0
        for name, (low, _, high) in profile.items():
            shape = shapes[name]
            if len(shape) != len(low) or not all(a <= s <= b for s, a, b in zip(shape, low, high)):
                break
            width += sum(b - a for a, b in zip(low, high))
        else:
            if best is None or width < best[0]:
                best = (width, index)
    return (None, False) if best is None else (best[1], best[0] == 0)


class TrtHandle:
    """A call's tensors as bound to one profile's context."""

    def __init__(self, profile: int, fixed: bool, inputs: dict[str, Tensor], outputs: dict[str, Tensor]):
        self.profile, self.fixed, self.inputs, self.outputs = profile, fixed, inputs, outputs


class TrtGraph:
    """One deserialised engine with one execution context per optimisation profile (a context
    is tied to a profile; switching would cost a set_optimization_profile_async per step)."""

    def __init__(self, path: Path, stream: torch.cuda.Stream):
        import tensorrt as trt

        self.path, self.stream = path, stream
        self.engine = trt.Runtime(trt_logger()).deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise ExportError(f"TensorRT could not load {path}; rebuild it with chain-spec-build-engines")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.output_names = [n for n in names if n not in self.input_names]
        self.contexts = []
        for profile in range(self.engine.num_optimization_profiles):
            context = self.engine.create_execution_context()
            context.set_optimization_profile_async(profile, stream.cuda_stream)
            self.contexts.append(context)
        stream.synchronize()
        self._applied: list[TrtHandle | None] = [None] * len(self.contexts)
        self.profiles = [{name: self._profile_shape(name, p) for name in self.input_names}
                         for p in range(len(self.contexts))]

    def _profile_shape(self, name: str, profile: int) -> tuple[tuple, tuple, tuple]:
        static = tuple(self.engine.get_tensor_shape(name))
        if -1 not in static:
            return static, static, static
        return tuple(tuple(d) for d in self.engine.get_tensor_profile_shape(name, profile))

    def bind(self, inputs: dict[str, Tensor], outputs: dict[str, Tensor]) -> TrtHandle:
        shapes = {n: tuple(inputs[n].shape) for n in self.input_names}
        profile, fixed = choose_profile(self.profiles, shapes)
        if profile is None:
            raise ExportError(f"no optimisation profile of {self.path} admits {shapes}; rebuild with "
                              f"chain-spec-build-engines (--max-len, --k)")
        for name, t in {**inputs, **outputs}.items():
            want = torch_dtype(self.engine.get_tensor_dtype(name))
            if t.dtype != want or not t.is_cuda or not t.is_contiguous():
                raise TypeError(f"{self.path.name}: tensor {name} must be a contiguous CUDA {want}, got {t.dtype} on {t.device}")
        return TrtHandle(profile, fixed, {n: inputs[n] for n in self.input_names},
                         {n: outputs[n] for n in self.output_names})

    def run(self, handle: TrtHandle) -> None:
        context = self.contexts[handle.profile]
        if self._applied[handle.profile] is not handle:  # another shape used this profile since
            for name, t in handle.inputs.items():
                context.set_input_shape(name, tuple(t.shape))
            for name, t in {**handle.inputs, **handle.outputs}.items():
                context.set_tensor_address(name, t.data_ptr())
            self._applied[handle.profile] = handle
        if not context.execute_async_v3(torch.cuda.current_stream().cuda_stream):
            raise RuntimeError(f"TensorRT execution of {self.path.name} failed")


class CudaGraphLauncher:
    """Mixin for the graph engines: all device work on one stream, and each fixed-shape step
    (the embedding gather, the engine, the KV append) captured once as a CUDA graph and replayed.

    The first run of a step is also the warm-up TensorRT needs before capture (it flushes
    deferred work); capture records without executing, so that run's results stand.
    """

    stream: torch.cuda.Stream
    use_cuda_graphs = True

    def _init_launcher(self, stream: torch.cuda.Stream, cache_len: int) -> None:
        self.stream, self.cache_len = stream, cache_len
        self._cuda_graphs: dict[tuple, torch.cuda.CUDAGraph] = {}

    def start(self, max_len: int) -> None:
        """The engines were built for one cache length: allocate exactly that, once."""
        if max_len > self.cache_len:
            raise ValueError(f"a request of {max_len} tokens exceeds the {self.cache_len} cache slots the TensorRT "
                             f"engines were built for (chain-spec-build-engines --max-len)")
        super().start(self.cache_len)

    def _stream_context(self) -> ContextManager:
        return torch.cuda.stream(self.stream)

    def _allocate(self, *args) -> None:
        self._cuda_graphs.clear()  # captured addresses die with the old buffers
        super()._allocate(*args)

    def _launch(self, key: tuple, call: Call, step: Callable[[], None]) -> None:
        if not (self.use_cuda_graphs and call.fixed):
            step()
            return
        graph = self._cuda_graphs.get(key)
        if graph is not None:
            graph.replay()
            return
        step()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=self.stream):
            step()
        self._cuda_graphs[key] = graph


class TrtTargetEngine(CudaGraphLauncher, GraphTargetEngine):
    def __init__(self, graphs: dict[str, TrtGraph], manifest: dict, config: TargetConfig, feature_layers: list[int],
                 stream: torch.cuda.Stream, cache_len: int):
        GraphTargetEngine.__init__(self, graphs, manifest, config, feature_layers, "cuda", "tensorrt")
        self._init_launcher(stream, cache_len)


class TrtDraftEngine(CudaGraphLauncher, GraphDraftEngine):
    def __init__(self, graphs: dict[str, TrtGraph], manifest: dict, config: DraftConfig, stream: torch.cuda.Stream,
                 cache_len: int):
        GraphDraftEngine.__init__(self, graphs, manifest, config, "cuda", "tensorrt")
        self._init_launcher(stream, cache_len)


def load_engines_manifest(models: Path, manifest: dict) -> dict:
    """MODELS/onnx/trt/engines.json, checked against the ONNX files and this TensorRT."""
    import tensorrt as trt

    directory = Path(manifest["dir"]) / TRT_DIR
    command = f"chain-spec-build-engines --models {models}"
    path = directory / ENGINES_MANIFEST
    if not path.is_file():
        raise ExportError(f"no TensorRT engines at {directory}; run: {command}")
    built = json.loads(path.read_text())
    if built["tensorrt"] != trt.__version__:
        raise ExportError(f"the engines in {directory} were built with TensorRT {built['tensorrt']}, this is "
                          f"{trt.__version__} (engines are not portable); run: {command}")
    for name, graph in built["graphs"].items():
        onnx_file = Path(manifest["dir"]) / manifest["graphs"][name]["file"]
        if file_sha256(onnx_file) != graph["onnx_sha256"]:
            raise ExportError(f"stale TensorRT engine {graph['engine']}: {onnx_file.name} changed since it was built; "
                              f"run: {command}")
    built["dir"] = str(directory)
    return built


def load_trt_engines(models: str | Path, draft_dir: str | Path | None = None
                     ) -> tuple[TrtTargetEngine, TrtDraftEngine | None]:
    """TensorRT engines for the target (and the draft), checked against weights, ONNX and TensorRT."""
    models = Path(models)
    manifest = load_manifest(models, draft_dir)
    built = load_engines_manifest(models, manifest)
    needed = required_graphs(manifest, draft_dir is not None)
    missing = [name for name in needed if name not in built["graphs"]]
    if missing:
        raise ExportError(f"no TensorRT engines for {missing} in {built['dir']}; run: chain-spec-build-engines --models {models}")
    stream = torch.cuda.Stream()

    def graphs(*names: str) -> dict[str, TrtGraph]:
        return {name: TrtGraph(Path(built["dir"]) / built["graphs"][name]["engine"], stream) for name in names}

    config, draft_config, layers = load_configs(models, draft_dir)
    target = TrtTargetEngine(graphs(*[n for n in needed if n.startswith("target_")]), manifest, config, layers, stream,
                             built["cache_len"])
    draft = None
    if draft_config is not None:
        draft = TrtDraftEngine(graphs("draft_step", "draft_fuse"), manifest, draft_config, stream, built["cache_len"])
    return target, draft
