"""Helpers for replay tests and smoke runs: a tiny random model directory and an isolated
ROS environment for child processes."""
from __future__ import annotations

import os
import shutil
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

        EagleDraft(DraftConfig.for_target(config.decoder), target.decoder.embed_tokens,
                   target.decoder.lm_head).save_pretrained(out / "draft")
    shutil.copyfile(source, out / "tokenizer.json")
    return out


def ros_env(domain_id: int | None = None, **extra: str) -> dict[str, str]:
    """os.environ for a child ROS process on its own DDS domain, discovery on this host only."""
    env = dict(os.environ)
    if domain_id is None:
        domain_id = 100 + os.getpid() % 100
    env.update(ROS_DOMAIN_ID=str(domain_id), ROS_AUTOMATIC_DISCOVERY_RANGE="LOCALHOST", PYTHONUNBUFFERED="1",
               RCUTILS_COLORIZED_OUTPUT="0")
    env.update(extra)
    return env


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
