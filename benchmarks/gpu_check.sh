#!/usr/bin/env bash
# Parity and timing of the CUDA backends on a machine with an NVIDIA GPU, in under 8 minutes.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]        (default OUT_DIR: /tmp/chain_spec_gpu_check)
#
# Needs Python with the CUDA build of torch and the project's requirements (pip install -r
# requirements.txt style; $PYTHON, else .venv/bin/python, else python3). Steps, each with its own
# time budget inside an overall 8-minute deadline:
#   1. ONNX Runtime with CUDA: when the installed onnxruntime has no CUDAExecutionProvider,
#      onnxruntime-gpu is pip-installed into OUT_DIR/ort_gpu (not over the environment's
#      onnxruntime; the two share one import name). No network: the ORT-CUDA rows are skipped.
#   2. TensorRT, when `import tensorrt` works: engines are built by the tests and the benchmark.
#   3. Parity: test/test_engines.py on every backend present (ONNX Runtime CPU and CUDA,
#      TensorRT), each against the torch engine on the same device: logits within 1e-3 (fp32),
#      trajectories within 1e-3, the same greedy CoC.
#   4. Timing: benchmarks/backends.py on random models of the bundled size (or copies of the
#      bundled models when models/target and models/draft exist): per-stage latency per backend
#      and the speculative speedup; prints the table and writes OUT_DIR/backends.json.
set -u
cd "$(dirname "$0")/.."
OUT=${1:-/tmp/chain_spec_gpu_check}
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
mkdir -p "$OUT"
DEADLINE=$((SECONDS + 470))
budget() {  # seconds for the next step: its own budget, capped by what the deadline leaves
  local left=$((DEADLINE - SECONDS))
  if [ "$left" -lt "$1" ]; then echo $((left > 10 ? left : 10)); else echo "$1"; fi
}
note() { echo "[gpu_check $(date +%H:%M:%S)] $*"; }

CPU_REHEARSAL=${CHAIN_SPEC_GPU_CHECK_CPU:-0}  # 1: run the CPU rows only (to test this script without a GPU)
if [ "$CPU_REHEARSAL" = 1 ]; then
  note "CPU rehearsal: GPU rows skipped"
elif ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  note "torch sees no CUDA device: nothing to check here (CHAIN_SPEC_GPU_CHECK_CPU=1 rehearses the CPU rows)"
  exit 1
else
  "$PY" -c "import torch; print('GPU:', torch.cuda.get_device_name(), '| torch', torch.__version__, '| CUDA', torch.version.cuda)"
fi

# 1. ONNX Runtime with the CUDA execution provider.
ort_cuda() {  # torch first: its nvidia-* wheels provide the CUDA and cuDNN libraries
  "$PY" - <<'EOF'
import sys
import torch  # noqa: F401
import onnxruntime as ort
if hasattr(ort, "preload_dlls"):
    try:
        ort.preload_dlls()
    except Exception:
        pass
sys.exit(0 if "CUDAExecutionProvider" in ort.get_available_providers() else 1)
EOF
}
ORT_NOTE="onnxruntime CUDA provider present"
if [ "$CPU_REHEARSAL" = 1 ]; then
  ORT_NOTE="ORT-CUDA skipped: CPU rehearsal"
elif ! ort_cuda 2>/dev/null; then
  note "installing onnxruntime-gpu into $OUT/ort_gpu"
  if timeout "$(budget 150)" "$PY" -m pip install --quiet --disable-pip-version-check --no-deps \
       --target "$OUT/ort_gpu" onnxruntime-gpu >"$OUT/pip.log" 2>&1; then
    export PYTHONPATH="$OUT/ort_gpu${PYTHONPATH:+:$PYTHONPATH}"
  fi
  if ort_cuda 2>/dev/null; then
    ORT_NOTE="onnxruntime-gpu installed in $OUT/ort_gpu"
  else
    ORT_NOTE="ORT-CUDA skipped: onnxruntime-gpu not available (pip: $(tail -n 1 "$OUT/pip.log" 2>/dev/null || echo 'no log'))"
  fi
fi
note "$ORT_NOTE"
BACKENDS="torch:cpu,onnxruntime:cpu"
if [ "$CPU_REHEARSAL" != 1 ]; then
  BACKENDS="torch:cuda,$BACKENDS"
  if ort_cuda 2>/dev/null; then BACKENDS="$BACKENDS,onnxruntime:cuda"; fi
fi

# 2. TensorRT.
if "$PY" -c "import tensorrt" 2>/dev/null; then
  TRT_NOTE="TensorRT $("$PY" -c 'import tensorrt; print(tensorrt.__version__)')"
  BACKENDS="$BACKENDS,tensorrt"
else
  TRT_NOTE="TensorRT skipped: tensorrt is not importable"
fi
note "$TRT_NOTE"

# 3. Parity.
note "parity: test/test_engines.py"
timeout "$(budget 180)" "$PY" -m pytest -q -rs -p no:cacheprovider test/test_engines.py >"$OUT/parity.log" 2>&1
PARITY_RC=$?
grep -E "passed|failed|SKIPPED|Error" "$OUT/parity.log" | tail -n 12

# 4. Timing.
MODELS_ARGS=(--random-models "$OUT/random_models")
if [ -f models/target/model.safetensors ] && [ -f models/draft/model.safetensors ]; then
  rm -rf "$OUT/bundled" && mkdir -p "$OUT/bundled" && cp -r models/tokenizer.json models/target models/draft "$OUT/bundled/"
  MODELS_ARGS=(--models "$OUT/bundled" --export)
fi
if [[ "$BACKENDS" == *tensorrt* ]]; then
  note "building TensorRT engines (fp16)"
  if [ "${MODELS_ARGS[0]}" = "--random-models" ]; then  # make and export the random models first
    timeout "$(budget 60)" "$PY" benchmarks/backends.py "${MODELS_ARGS[@]}" --backends torch:cpu --synthetic 1 \
      --repeats 1 --no-speedup >/dev/null 2>&1
    ENGINE_MODELS="$OUT/random_models"
  else
    timeout "$(budget 60)" "$PY" -m chain_spec_ros.engines.export --models "$OUT/bundled" --draft "$OUT/bundled/draft" >/dev/null
    ENGINE_MODELS="$OUT/bundled"; MODELS_ARGS=(--models "$OUT/bundled")
  fi
  timeout "$(budget 200)" "$PY" -m chain_spec_ros.engines.build --models "$ENGINE_MODELS" --max-len 400 \
    >"$OUT/trt_build.log" 2>&1 || note "TensorRT build failed: $(tail -n 2 "$OUT/trt_build.log")"
fi
note "timing: benchmarks/backends.py ($BACKENDS)"
timeout "$(budget 200)" "$PY" benchmarks/backends.py "${MODELS_ARGS[@]}" --synthetic 8 --repeats 10 --threads 4 \
  --backends "$BACKENDS" --json "$OUT/backends.json" 2>"$OUT/backends.log"
TIMING_RC=$?

echo
echo "== gpu_check summary ($((SECONDS)) s) =="
echo "parity:  $(grep -E '[0-9]+ (passed|failed)' "$OUT/parity.log" | tail -n 1) (exit $PARITY_RC; log $OUT/parity.log)"
echo "ort:     $ORT_NOTE"
echo "trt:     $TRT_NOTE"
echo "timing:  exit $TIMING_RC; table above, JSON $OUT/backends.json"
[ "$PARITY_RC" -eq 0 ] && [ "$TIMING_RC" -eq 0 ]
