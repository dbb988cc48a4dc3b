"""Helpers for replay tests and smoke runs: a tiny random model directory and an isolated
ROS environment for child processes."""
from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path

from ..paths import default_tokenizer_path


def write_tiny_models(out: str | Path, seed: int = 0, tokenizer: str | Path | None = None,
                      vocab_size: int | None = None, draft: bool = False) -> Path:
    """A models directory (tokenizer.json + target/) holding a tiny, randomly initialised target.

    Its CoCs are gibberish, but it has the real shapes, so the node, replay and report run
    end to end in seconds on a CPU. `vocab_size` different from the tokenizer's makes a
    mismatched pair (for start-up error tests).
    """
    import torch

    from ..models.config import TargetConfig
    from ..models.target import TargetVLA
    from ..models.tokenizer import ChainTokenizer

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    source = Path(tokenizer) if tokenizer else default_tokenizer_path()
    tok = ChainTokenizer.load(source)
    torch.manual_seed(seed)
    config = TargetConfig.tiny(vocab_size or tok.vocab_size, tok.id("<|image_pad|>"))
    target = TargetVLA(config)
    target.save_pretrained(out / "target")
    if draft:
        from ..models.draft import DraftConfig, EagleDraft

        EagleDraft(DraftConfig.for_target(config.decoder), target.decoder.embed_tokens).save_pretrained(out / "draft")
    shutil.copyfile(source, out / "tokenizer.json")
    return out


def to_release_layout(target_dir: str | Path) -> Path:
    """Rewrite a target saved by `TargetVLA.save_pretrained` into the layout of Alpamayo-R1's
    release: every tensor in two shards beside an index, the VLM's under `vlm.`, the VLM folder
    holding only its config.json (the release names its VLM by `vlm_name_or_path`), and the
    release's other config fields. Returns the directory."""
    import json

    from safetensors.torch import load_file, save_file

    target = Path(target_dir)
    vlm = load_file(str(target / "vlm" / "model.safetensors"))
    rest = load_file(str(target / "model.safetensors"))
    for path in (target / "vlm" / "model.safetensors", target / "model.safetensors"):
        path.unlink()
    tensors = {**{"vlm." + k: v for k, v in vlm.items()}, **rest}
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for shard, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(target / shard), metadata={"format": "pt"})
    (target / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
         "weight_map": {k: shard for shard, keys in shards.items() for k in keys}}, indent=1))
    config = json.loads((target / "config.json").read_text())
    config.update(traj_vocab_size=4000, tokens_per_history_traj=48, tokens_per_future_traj=128, min_pixels=163840,
                  max_pixels=196608, add_special_tokens=True, attn_implementation="sdpa", model_dtype="float32")
    (target / "config.json").write_text(json.dumps(config, indent=2))
    return target


def poison_target_weights(models: str | Path) -> Path:
    """Overwrite one weight tensor of the target's VLM (MODELS/target/vlm) with NaN: a corrupt
    checkpoint that still loads (for the start-up self-test's tests)."""
    from safetensors.torch import load_file, save_file

    path = Path(models) / "target" / "vlm" / "model.safetensors"
    weights = load_file(path)
    name = next(n for n in sorted(weights) if "embed_tokens" in n)  # NaN reaches every hidden state
    weights[name][:] = float("nan")
    save_file(weights, path)
    return Path(models)


def jpeg_claiming(width: int, height: int) -> bytes:
    """A tiny, valid-looking JPEG whose frame header claims width x height pixels: the shape of a
    decompression bomb, for the input guards' tests and the soak benchmark's fault cases."""
    import cv2
    import numpy as np

    data = bytearray(cv2.imencode(".jpg", np.zeros((8, 8, 3), np.uint8))[1].tobytes())
    i = 2
    while data[i + 1] not in (0xC0, 0xC1, 0xC2):  # the start-of-frame marker
        i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    data[i + 5:i + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(data)


def ros_env(domain_id: int | None = None, **extra: str) -> dict[str, str]:
    """os.environ for a child ROS process on its own DDS domain, discovery on this host only."""
    env = dict(os.environ)
    if domain_id is None:
        domain_id = 100 + os.getpid() % 100
    env.update(ROS_DOMAIN_ID=str(domain_id), ROS_AUTOMATIC_DISCOVERY_RANGE="LOCALHOST", PYTHONUNBUFFERED="1",
               PYTHONFAULTHANDLER="1", RCUTILS_COLORIZED_OUTPUT="0")  # a native crash, even at import, shows its stack
    env.update(extra)
    return env


@contextmanager
def spinning_node(domain_id: int, name: str):
    """A helper node on its own context and DDS domain, spun by a background executor; torn down
    on exit. For tests and benchmarks that publish to or listen to chain_spec_node."""
    import threading

    import rclpy
    from rclpy.executors import SingleThreadedExecutor

    context = rclpy.Context()
    rclpy.init(context=context, domain_id=domain_id)
    node = rclpy.create_node(name, context=context)
    executor = SingleThreadedExecutor(context=context)
    executor.add_node(node)
    spinner = threading.Thread(target=executor.spin, daemon=True)
    spinner.start()
    try:
        yield node
    finally:
        executor.shutdown()
        node.destroy_node()
        rclpy.try_shutdown(context=context)
        spinner.join(2.0)


class NodeProcess:
    """`chain_spec_node` (or any module) in a child process with its output in a log file."""

    def __init__(self, args: list[str], env: dict[str, str], log_path: str | Path,
                 module: str = "chain_spec_ros.node"):
        import subprocess
        import sys

        self.log_path = Path(log_path)
        self._log = open(self.log_path, "w")
        self.process = subprocess.Popen([sys.executable, "-m", module, *args], env=env, stdout=self._log,
                                        stderr=subprocess.STDOUT)

    def alive(self) -> bool:
        return self.process.poll() is None

    def wait(self, timeout: float) -> int:
        return self.process.wait(timeout)

    def stop(self, timeout: float = 10.0) -> int:
        """SIGINT (a clean rclpy shutdown), then SIGKILL if it does not exit in time."""
        import signal
        import subprocess

        if self.alive():
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self._log.close()
        return self.process.returncode

    def output(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def __enter__(self) -> "NodeProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
