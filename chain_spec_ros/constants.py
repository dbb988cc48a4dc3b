"""Constants shared across the package, defined once.

Anything that two rooms of the house must agree on lives here: the inference backends a
user can choose, the default draft length, nanoseconds per second of ROS stamps, the
evaluation horizons and the latency percentiles that every report prints.
"""
from __future__ import annotations

NS = 1_000_000_000  # nanoseconds per second (ROS stamps)

# Camera frames of the scenario world and the bundled models: a multiple of Qwen3-VL's 32-pixel
# merged patch, 4 x 2 merged tokens per frame.
IMAGE_WIDTH, IMAGE_HEIGHT = 128, 64

# Inference backends, fastest first: `auto` picks the first one that is available.
BACKENDS = ("tensorrt", "onnxruntime", "torch")
# Tokens the draft proposes per target pass (chain drafting). The bundled draft keeps ~44% of
# its 16th proposals, so long blocks pay: on 30 test scenes, PyTorch CPU, the speedup went 2.65x
# (k=7), 3.29x (12), 3.73x (16), 3.81x (20), the verify pass growing slower than the tokens it
# decides. 16 keeps the verify width (and TensorRT's verify profile) moderate.
DEFAULT_K = 16

# Horizons (s) of the ADE/FDE trajectory metrics.
HORIZONS_S = (1.0, 2.0, 3.0, 6.4)
# Latency percentiles reported on /diagnostics, in the replay report and by benchmarks.
PERCENTILES = (50, 95, 99)
