"""Tokeniser, history encoding, dataset schema and the data CLI."""
import json

import numpy as np
import pytest
import torch

from chain_spec_ros.data import cli
from chain_spec_ros.data.dataset import ARRAYS, TEXT_FIELDS, load_split, split_of
from chain_spec_ros.models.tokenizer import BIN_TOKENS, SPECIAL_TOKENS, ChainTokenizer
from chain_spec_ros.paths import default_tokenizer_path
from chain_spec_ros.prompt import PromptBuilder
from chain_spec_ros.scenarios.scene import make_scene
from chain_spec_ros.trajectory import DELTA_RANGE, NUM_BINS, dequantise, history_bins, history_deltas_from_bins, quantise


@pytest.fixture(scope="module")
def tokenizer():
    return ChainTokenizer.load(default_tokenizer_path())


def test_tokenizer_round_trip_and_specials(tokenizer):
    for seed in range(200):
        coc = make_scene(seed, render=False).coc
        assert tokenizer.decode(tokenizer.encode(coc)) == coc
    for token in SPECIAL_TOKENS:
        assert tokenizer.encode(token) == [tokenizer.id(token)]
    ids = [tokenizer.id(t) for t in BIN_TOKENS]
    assert ids == list(range(ids[0], ids[0] + NUM_BINS))


def test_bundled_tokenizer_is_reproducible(tmp_path):
    """The committed tokenizer.json is exactly what `chain-spec-data tokenizer` rebuilds."""
    out = tmp_path / "tokenizer.json"
    assert cli.main(["tokenizer", "--out", str(out)]) == 0
    rebuilt, bundled = ChainTokenizer.load(out), ChainTokenizer.load(default_tokenizer_path())
    assert rebuilt.tokenizer.get_vocab() == bundled.tokenizer.get_vocab()


def test_quantisation_round_trip():
    values = np.random.default_rng(0).uniform(-DELTA_RANGE, DELTA_RANGE, 1000)
    assert np.abs(dequantise(quantise(values, DELTA_RANGE), DELTA_RANGE) - values).max() <= DELTA_RANGE / NUM_BINS
    assert quantise(np.array([-99.0, 99.0]), DELTA_RANGE).tolist() == [0, NUM_BINS - 1]


def test_history_tokens_encode_the_motion():
    poses = np.zeros((17, 3))
    poses[:, 0] = np.linspace(-16.0, 0.0, 17)  # 10 m/s straight ahead
    deltas = history_deltas_from_bins(history_bins(poses))
    assert deltas[0, 0] == -DELTA_RANGE  # the oldest pose, 15 m behind, clamps as in Alpamayo's tokenizer
    assert np.allclose(deltas[1:, 0], 1.0, atol=0.005)
    assert np.allclose(deltas[:, 1], 0.0, atol=0.005) and np.allclose(deltas[:, 2], 0.0, atol=0.011)
    with pytest.raises(ValueError):
        history_bins(np.zeros((16, 3)))


def test_prompt_layout(tokenizer):
    scene = make_scene(3)
    builder = PromptBuilder(tokenizer, 3, 6)
    prompt = builder.build(scene.images, scene.history_tokens)
    ids = prompt.input_ids
    assert (ids == tokenizer.id("<|image_pad|>")).sum() == 8 * 18
    start, end = prompt.history_span
    assert ids[start - 1] == tokenizer.id("<|traj_history_start|>") and ids[end] == tokenizer.id("<|traj_history_end|>")
    assert (ids[start:end] - tokenizer.bin_offset == scene.history_tokens).all()
    assert ids[-1] == tokenizer.id("<|cot_start|>")
    assert prompt.mrope_positions.shape == (3, len(ids))
    flat = prompt.positions(0, len(ids) + 5, "flat")
    assert (flat == torch.arange(len(ids) + 5)).all()
    mrope = prompt.positions(len(ids) - 3, 6, "mrope")
    assert (mrope[:, :3] == prompt.mrope_positions[:, -3:]).all()
    assert mrope[:, 3:].tolist() == [[len(ids) + prompt.rope_delta + j for j in range(3)]] * 3
    # Under M-RoPE each 3x6 image block spans only max(3, 6) = 6 positions, 12 fewer than its tokens.
    assert int(prompt.mrope_positions.max()) + 1 == len(ids) + prompt.rope_delta
    assert prompt.rope_delta == -8 * (18 - 6)
    with pytest.raises(ValueError):
        builder.build(scene.images[0], scene.history_tokens)


def test_split_is_a_function_of_the_seed():
    splits = [split_of(s) for s in range(20000)]
    shares = {k: splits.count(k) / len(splits) for k in ("train", "val", "test")}
    assert 0.87 < shares["train"] < 0.93 and 0.03 < shares["test"] < 0.07
    assert splits == [split_of(s) for s in range(20000)]


def test_generate_schema_and_stats(tmp_path, capsys):
    out = tmp_path / "ds"
    assert cli.main(["generate", "--out", str(out), "--num", "120", "--seed", "4", "--workers", "1"]) == 0
    meta = json.loads((out / "meta.json").read_text())
    assert sum(meta["splits"].values()) == 120 and meta["schema_version"] == 1
    table = load_split(out, "train")
    assert len(table) == meta["splits"]["train"]
    for name, (dtype, shape, _) in ARRAYS.items():
        assert table.arrays[name].dtype == np.dtype(dtype), name
        if all(isinstance(d, int) for d in shape):
            assert table.arrays[name].shape[1:] == tuple(shape), name
    assert set(TEXT_FIELDS) <= set(table.records[0])
    assert all(split_of(r["seed"]) == "train" for r in table.records)
    # Regenerating is deterministic.
    again = tmp_path / "again"
    cli.main(["generate", "--out", str(again), "--num", "120", "--seed", "4", "--workers", "1"])
    assert np.array_equal(load_split(again, "train").arrays["images"], table.arrays["images"])
    capsys.readouterr()
    assert cli.main(["stats", str(out)]) == 0
    stats = json.loads(capsys.readouterr().out)
    for key in ("num_scenes", "decision_histogram", "coc_tokens_median", "routine_token_share",
                "history_only_decision_accuracy", "speed_state_shares", "motion_case_shares",
                "decisions_by_speed_case"):
        assert key in stats
    assert stats["num_scenes"] == 120 and 0.0 < stats["routine_token_share"] < 1.0
    assert set(stats["motion_case_shares"]) == {"stopped", "starting", "creeping", "mid-turn"}
    assert sum(stats["speed_state_shares"].values()) == pytest.approx(1.0)
    # The stored (float32) histories still show what the world stated.
    assert stats["malformed_coc_share"] == 0.0 and stats["speed_statement_mismatch_share"] == 0.0


def test_missing_dataset_is_a_clear_error(tmp_path, capsys):
    assert cli.main(["stats", str(tmp_path / "nothing")]) == 2
    assert "no meta.json" in capsys.readouterr().err
