"""The draft trainers run unchanged under torchrun: two CPU processes (gloo), each rank its own
batches, one shared result."""
import json
import math
import os
import subprocess
import sys

import pytest

from chain_spec_ros.data.dataset import generate
from chain_spec_ros.paths import default_tokenizer_path
from conftest import tiny_target


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    generate(root / "data", num=40, seed=3, workers=1)
    target, _ = tiny_target(seed=0)
    target.save_pretrained(root / "models" / "target")
    (root / "models" / "tokenizer.json").write_bytes(default_tokenizer_path().read_bytes())
    return root


def _torchrun(module: str, *args: str) -> None:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", module, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}  # a native abort shows its stack
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]


def test_sft_and_aarl_under_torchrun(workspace):
    data, target = str(workspace / "data"), str(workspace / "models" / "target")
    sft, aarl = workspace / "runs" / "draft", workspace / "runs" / "aarl"
    _torchrun("chain_spec_ros.training.draft", "--data", data, "--target", target, "--out", str(sft),
              "--train-scenes", "16", "--val-scenes", "4", "--steps", "4", "--batch-size", "2", "--evals", "1")
    summary = json.loads((sft / "training_summary.json").read_text())
    assert summary["processes"] == 2 and (sft / "model.safetensors").is_file()
    config = json.loads((sft / "config.json").read_text())  # the speculators eagle3 layout
    assert config["speculators_model_type"] == "eagle3" and 1 < config["draft_vocab_size"] < 1801
    _torchrun("chain_spec_ros.training.aarl", "--data", data, "--target", target, "--draft", str(sft),
              "--out", str(aarl), "--train-scenes", "16", "--val-scenes", "4", "--updates", "2", "--samples", "4",
              "--evals", "1")
    summary = json.loads((aarl / "aarl_summary.json").read_text())
    assert summary["processes"] == 2 and (aarl / "model.safetensors").is_file()
    assert json.loads((aarl / "config.json").read_text())["draft_vocab_size"] == config["draft_vocab_size"]
    # Rewards (action MSE, token match) and the KL anchor stay finite on the draft vocabulary.
    curves = json.loads((aarl / "aarl_curves.json").read_text())
    assert curves["reward"] and all(math.isfinite(v) for points in curves.values() for _, v in points)
    cache = list((workspace / "runs" / "greedy_cache").glob("greedy_*.jsonl"))
    assert len(cache) == 2 and not list((workspace / "runs" / "greedy_cache").glob("*.partial"))


@pytest.mark.parametrize("native", [False, True])
def test_bf16_autocast_only_where_the_cpu_computes_bf16(monkeypatch, native):
    """On an AVX2-only CPU bf16 autocast is emulated (a draft SFT step 4x slower than fp32, measured):
    the trainers then compute in fp32."""
    import torch

    from chain_spec_ros.training.common import setup_runtime

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    threads = torch.get_num_threads()
    try:
        assert setup_runtime(0).amp is native
        assert setup_runtime(0, amp=False).amp is False
    finally:
        torch.set_num_threads(threads)
