"""Every backend behind the engine interface computes what the PyTorch reference computes.

A tiny random target + EAGLE draft is saved to a temporary models directory and exported with
`chain-spec-export`; each available backend (ONNX Runtime on CPU always; ONNX Runtime CUDA and
TensorRT where the machine has them) is compared with the torch engine on the same device:
image embeddings and deepstack features; logits (fp32) within 1e-3 for prefill, decode, and a
k+1 verify after a rollback; features; the expert's trajectory within 1e-3 of its scale; the
draft's hidden states and logits; and the greedy CoC from the Planner, target-only and
speculative, token for token. A VLM-only target (no expert) exports and decodes without an expert graph and refuses
trajectories.
"""
import json
import shutil

import numpy as np
import pytest
import torch

from chain_spec_ros.constants import DEFAULT_K
from chain_spec_ros.drafters import EagleDrafter
from chain_spec_ros.engines import auto_export, export, manifest
from chain_spec_ros.engines.base import DraftEngine
from chain_spec_ros.engines.factory import build_engines
from chain_spec_ros.engines.graph_engine import GraphTargetEngine
from chain_spec_ros.models.checkpoint import load_target_config
from chain_spec_ros.models.config import TargetConfig
from chain_spec_ros.models.draft import DraftConfig, EagleDraft
from chain_spec_ros.models.target import TargetVLA
from chain_spec_ros.models.tokenizer import ChainTokenizer
from chain_spec_ros.paths import default_tokenizer_path
from chain_spec_ros.planner import Planner
from chain_spec_ros.prompt import PromptBuilder
from chain_spec_ros.replay.fixtures import write_tiny_models
from chain_spec_ros.sampling import Sampling
from conftest import random_scene

TOL = 1e-3
# Trajectories, relative to their scale: the expert's Fourier features (max_freq 100) turn float32
# rounding of its inputs (1e-7 relative) into velocity differences of 1e-5..1e-4 relative,
# which ten Euler steps and the unicycle carry along a path of tens of metres.
PATH_RTOL = 1e-3
MAX_NEW = 40  # planner.MAX_COC_TOKENS is 64; a random model rarely stops earlier


def _tensorrt_skip_reason() -> str | None:
    from chain_spec_ros.engines.trt_engine import trt_unavailable_reason

    reason = trt_unavailable_reason()
    return None if reason is None else f"{reason} (TensorRT does not install on the CPU development and CI machines)"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("models")
    tok = ChainTokenizer.load(default_tokenizer_path())
    shutil.copy(default_tokenizer_path(), root / "tokenizer.json")
    cfg = TargetConfig.tiny(tok.vocab_size, tok.id("<|image_pad|>"))
    target = TargetVLA(cfg).eval()
    with torch.no_grad():  # CoCs of varied length (some stop inside a drafted block); non-trivial action scale
        target.decoder.lm_head.weight[tok.id("<|cot_end|>")] *= 1.8
        target.expert.action_space.set_stats([0.3, -0.01], [1.5, 0.02])
    target.save_pretrained(root / "target")
    vocab = sorted({tok.id("<|cot_end|>"), *torch.randperm(tok.vocab_size)[:400].tolist()})
    draft = EagleDraft(DraftConfig.for_target(cfg.decoder, vocab), target.decoder.embed_tokens)  # a reduced vocabulary
    draft.init_head_from(target.decoder.lm_head)
    draft.save_pretrained(root / "draft")
    assert export.main(["--models", str(root), "--draft", str(root / "draft")]) == 0  # the CLI, as a user runs it
    return root


def _backends():
    """(backend, build_engines keyword arguments) of every non-torch backend this machine has."""
    import onnxruntime as ort

    # The CPU provider's int8 draft rounds its weights: the parity pair runs its fp32 draft
    # (test_int8_draft_changes_proposals_not_the_output covers the int8 one).
    found = [pytest.param(("onnxruntime", {"providers": ["CPUExecutionProvider"], "draft_int8": False}), id="ort-cpu")]
    if "CUDAExecutionProvider" in ort.get_available_providers() and torch.cuda.is_available():
        found.append(pytest.param(("onnxruntime", {"providers": ["CUDAExecutionProvider"]}), id="ort-cuda"))
    found.append(pytest.param(("tensorrt", {}), id="tensorrt",
                              marks=pytest.mark.skipif(_tensorrt_skip_reason() is not None,
                                                       reason=str(_tensorrt_skip_reason()))))
    return found


@pytest.fixture(scope="module", params=_backends())
def pair(request, models):
    """(engines under test, torch reference engines on the same device)."""
    backend, kwargs = request.param
    if backend == "tensorrt":
        from chain_spec_ros.engines.build import build_all

        build_all(models, fp16=False)  # fp32 engines: the 1e-3 parity bound holds for fp32 only
    engines = build_engines(models, backend, models / "draft", **kwargs)
    assert engines[0].backend == backend and engines[0].fallback_reason is None and not engines[1].int8_weights
    reference = build_engines(models, "torch", models / "draft", device=engines[0].device.type)
    return engines, reference


@pytest.fixture(scope="module")
def builder(models):
    tok = ChainTokenizer.load(models / "tokenizer.json")
    return PromptBuilder(tok, *load_target_config(models / "target").vision.grid)


def _prompt(builder, seed):
    return builder.build(*random_scene(seed))


def _diff(a, b) -> float:
    """Largest absolute difference; equal infinities (tokens outside the draft vocabulary) count as 0."""
    if isinstance(a, (list, tuple)):
        return max(_diff(x, y) for x, y in zip(a, b))
    a, b = a.detach().cpu(), b.detach().cpu()
    return float(torch.where(a == b, torch.zeros_like(a), a - b).abs().max())


def _assert_paths_close(got, want) -> None:
    error, scale = np.abs(got - want).max(), np.abs(want).max()
    assert error < TOL + PATH_RTOL * scale, f"largest difference {error:.3g} on a path of scale {scale:.3g}"


def _target_trace(engine, prompt):
    """Vision, prefill, two decodes, a 6-token verify, a rollback and another verify."""
    engine.start(len(prompt) + 64)
    out = {"vision": engine.encode_images(prompt.images)}
    out["prefill"] = engine.prefill(prompt.input_ids, out["vision"], prompt.mrope_positions)
    out["decode1"] = engine.decode([int(out["prefill"][0].argmax())], prompt.rope_delta)
    out["decode2"] = engine.decode([17], prompt.rope_delta)
    out["verify"] = engine.decode([21, 22, 23, 24, 25, 26], prompt.rope_delta)
    engine.crop(len(prompt) + 3)  # keep 1 of the 6 verified tokens
    out["verify_after_rollback"] = engine.decode([31, 32, 33, 34, 35, 36], prompt.rope_delta)
    out["length"] = engine.length
    return out


def test_export_writes_checked_graphs_and_manifest(models):
    import onnx

    written = json.loads((models / "onnx" / "manifest.json").read_text())
    verify = manifest.fixed_name("target_decoder", DEFAULT_K + 1)
    assert set(written["graphs"]) == {*manifest.GRAPHS, "target_decoder_t1", verify, "draft_step_t1"}
    assert written["target"]["feature_layers"] == [0, 1]  # the draft's [1, 0, 0] (EAGLE-3 on 3 layers), one output per layer
    assert written["target"]["fingerprint"] == manifest.fingerprint(models / "target")
    assert written["draft"]["fingerprint"] == manifest.fingerprint(models / "draft")
    assert written["target"]["deepstack_layers"] == 2 and written["target"]["expert"]["horizon"] == 64
    vision = written["graphs"]["target_vision"]  # 2 x 4 merged tokens per 64 x 128 frame, 2 deepstack layers
    assert vision["inputs"]["images"] == {"shape": ["num_images", 64, 128, 3], "dtype": "uint8"}
    assert vision["outputs"]["image_embeds"]["shape"] == ["num_images", 8, 64]
    assert vision["outputs"]["deepstack"]["shape"] == [2, "num_images", 8, 64]
    decoder = written["graphs"]["target_decoder"]
    assert decoder["inputs"]["deepstack"]["shape"] == [2, 1, "tokens", 64]
    assert written["graphs"][verify]["inputs"]["deepstack"]["shape"] == [2, 1, DEFAULT_K + 1, 64]
    assert decoder["inputs"]["positions"]["shape"] == [3, "tokens"]
    assert decoder["inputs"]["past_key_0"]["shape"] == [1, 2, "cache_len", 16]
    assert decoder["outputs"]["new_value_2"]["shape"] == [1, 2, "tokens", 16]
    assert written["graphs"]["draft_step"]["inputs"]["positions"]["shape"] == [3, "tokens"]
    for name, graph in written["graphs"].items():
        model = onnx.load(str(models / "onnx" / graph["file"]))
        onnx.checker.check_model(model)
        if "kv_update" not in graph:
            continue
        # The fixed-size steps attend with GroupQueryAttention and write the cache in place; the
        # dynamic ones (prefill, TensorRT) are plain ONNX and return the new keys/values.
        in_place = graph["tokens"] is not None
        assert graph["kv_update"] == (manifest.KV_IN_PLACE if in_place else manifest.KV_APPEND), name
        fused = sum(node.op_type == "GroupQueryAttention" for node in model.graph.node)
        layers = 1 if name.startswith("draft") else written["target"]["num_layers"]
        assert fused == (layers if in_place else 0), name
        kv = [o for o in graph["outputs"] if o.startswith(("present_", "new_"))]
        assert len(kv) == 2 * layers and all(o.startswith("present_" if in_place else "new_") for o in kv), name


@pytest.mark.parametrize("mask", ["none", "causal", "keys"])
def test_export_attention_equals_sdpa(mask):
    """The attention the graphs are exported with is SDPA's maths, grouped-query included."""
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 4, 5, 16), torch.randn(1, 2, 9, 16), torch.randn(1, 2, 9, 16)
    attn_mask = {"none": None, "causal": export.cache_mask(torch.tensor([4]), 5, 4),
                 "keys": (torch.arange(9) < 6)[None, None, None]}[mask]
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, enable_gqa=True)
    assert torch.allclose(export.grouped_attention(q, k, v, attn_mask=attn_mask, enable_gqa=True), want, atol=1e-6)


def test_target_logits_and_features_match_torch(pair, builder):
    (engine, _), (reference, _) = pair
    for seed in (0, 1):
        prompt = _prompt(builder, seed)
        got, want = _target_trace(engine, prompt), _target_trace(reference, prompt)
        assert got["length"] == want["length"] == len(prompt) + 9
        assert got["vision"].embeds.shape == want["vision"].embeds.shape == (8, 8, 64)
        assert got["vision"].deepstack.shape == want["vision"].deepstack.shape == (2, 8, 8, 64)
        assert _diff(got["vision"], want["vision"]) < TOL
        for stage in ("prefill", "decode1", "decode2", "verify", "verify_after_rollback"):
            (logits, features), (ref_logits, ref_features) = got[stage], want[stage]
            assert logits.shape == ref_logits.shape, stage
            assert _diff(logits, ref_logits) < TOL, stage
            assert len(features) == len(ref_features) == 3 and _diff(features, ref_features) < TOL, stage


@pytest.mark.parametrize("steps", [None, 5])
def test_trajectory_matches_torch(pair, builder, steps):
    (engine, _), (reference, _) = pair
    prompt = _prompt(builder, 2)
    for e in (engine, reference):
        _target_trace(e, prompt)
    got = engine.trajectory(prompt.rope_delta, 7.5, steps, seed=11)
    want = reference.trajectory(prompt.rope_delta, 7.5, steps, seed=11)
    _assert_paths_close(got.xy, want.xy)
    _assert_paths_close(got.controls, want.controls)


@pytest.mark.parametrize("mode", ["flat", "mrope"])
def test_draft_hidden_and_logits_match_torch(pair, builder, mode):
    """Prompt pass, a chain of 1-token steps, a rollback, an accept; FlatRoPE or the target's
    3-D positions (the graph takes positions [3, T] either way)."""
    (target, draft), (ref_target, ref_draft) = pair
    prompt = _prompt(builder, 3)
    runs = []
    for t, d in ((target, draft), (ref_target, ref_draft)):
        out = _target_trace(t, prompt)
        d.start(len(prompt) + 64)
        fused = d.fuse(out["prefill"][1])
        pending = prompt.input_ids[1:].tolist() + [5]
        trace = [fused, *d.step(pending, fused, prompt.positions(0, len(pending), mode))]
        hidden = trace[-2]
        committed = d.length
        for j in range(3):  # a chain of single-token steps fed with the draft's own hidden state
            hidden, logits = d.step([40 + j], hidden, prompt.positions(committed + j, 1, mode))
            trace += [hidden, logits]
        d.crop(committed)  # reject the chain; accept two tokens with the target's features
        fused = d.fuse([f[:, :2] for f in out["verify"][1]])
        trace += [fused, *d.step([40, 9], fused, prompt.positions(committed, 2, mode)), d.length]
        runs.append(trace)
    got, want = runs
    assert got[-1] == want[-1] == len(prompt) + 2
    for a, b in zip(got[:-1], want[:-1]):
        assert a.shape == b.shape and _diff(a, b) < TOL


def test_draft_chain_from_an_empty_cache_matches_torch(pair):
    """The 1-token draft step from slot 0 on (the in-place graph's first-prompt case)."""
    (_, draft), (_, ref_draft) = pair
    torch.manual_seed(4)
    start = torch.randn(1, 1, draft.config.hidden_size)
    runs = []
    for d in (draft, ref_draft):
        d.start(32)
        hidden, trace = start, []
        for j in range(4):
            hidden, logits = d.step([10 + j], hidden, torch.full((3, 1), j, dtype=torch.long))
            trace += [hidden, logits]
        runs.append(trace)
    assert all(_diff(a, b) < TOL for a, b in zip(*runs))


@pytest.mark.parametrize("sampling", [Sampling(), Sampling(temperature=0.6, top_p=0.98, suppressed=range(300, 400))],
                         ids=["greedy", "sampled"])
def test_engine_chain_equals_chained_steps(pair, sampling):
    """A graph engine's `chain_steps` (the 1-token call's buffers reused in place) proposes exactly
    what chaining `step` calls proposes: tokens, distributions, cache length, stop."""
    (_, draft), _ = pair
    torch.manual_seed(5)
    prefix = torch.randn(1, 6, draft.config.hidden_size) * 3

    def run(steps, stop_id=None):
        draft.start(64)
        hidden, logits = draft.step(list(range(10, 16)), prefix, torch.arange(6).expand(3, 6))
        generator = torch.Generator(device=draft.device).manual_seed(0)
        draft.chain_steps = steps.__get__(draft)
        try:
            tokens, distributions = draft.chain(logits, hidden, torch.arange(6, 15).expand(3, 9),
                                                lambda chain_logits: sampling.choose(chain_logits, generator), stop_id)
        finally:
            del draft.chain_steps
        return tokens, distributions, draft.length

    (tokens, distributions, length), (got, got_distributions, got_length) = (run(DraftEngine.chain_steps),
                                                                             run(type(draft).chain_steps))
    assert got == tokens and len(tokens) == 10 and got_length == length == 6 + 9
    assert not any(t in sampling.suppressed for t in tokens)
    for a, b in zip(distributions, got_distributions):
        assert (a is None and b is None) or torch.equal(a, b)
    until_stop = tokens[:tokens.index(tokens[-1]) + 1]  # nothing after the stop token's first occurrence
    stopped = run(type(draft).chain_steps, stop_id=tokens[-1])
    assert stopped[0] == until_stop and stopped[2] == 6 + len(until_stop) - 1


class _OracleDrafter:
    """Proposes the true greedy continuation with random corruptions: verify passes of every
    acceptance length, rollbacks at every depth, stops inside a drafted block."""

    feature_layers: list = []

    def __init__(self, truth, stop_id, seed):
        self.truth = truth + [stop_id] + [5] * 20
        self.rng = np.random.default_rng(seed)

    def start(self, max_len):
        pass

    def begin(self, prompt, features, first_token):
        self.position = 1

    def propose(self, k, temperature, generator=None):
        drafts = list(self.truth[self.position:self.position + k])
        return [int(self.rng.integers(0, 1000)) if self.rng.random() < 0.2 else t for t in drafts], None

    def accept(self, num_accepted, next_token, features):
        self.position += num_accepted + 1


def test_planner_greedy_coc_is_identical(pair, builder, monkeypatch):
    """Target-only and speculative (EAGLE draft, and an oracle draft that gets long acceptances)
    CoCs equal the torch engine's, token for token; the trajectories agree within 1e-3 of their scale."""
    import chain_spec_ros.planner as planner_module

    monkeypatch.setattr(planner_module, "MAX_COC_TOKENS", MAX_NEW)
    (target, draft), (ref_target, ref_draft) = pair
    stats, lengths = [], []
    for seed in range(4):
        images, history = random_scene(100 + seed)
        results = {}
        for name, t, d in (("engine", target, draft), ("torch", ref_target, ref_draft)):
            plain = Planner(t, builder).plan(images, history, 6.0)
            eagle = Planner(t, builder, EagleDrafter(d), k=5).plan(images, history, 6.0)
            oracle = Planner(t, builder, _OracleDrafter(plain.coc_ids, builder.cot_end_id, seed), k=7).plan(images, history, 6.0)
            assert eagle.coc_ids == plain.coc_ids == oracle.coc_ids
            results[name] = (plain, eagle, oracle)
            stats.append(oracle.stats["tau"])
            lengths.append(len(plain.coc_ids))
        for got, want in zip(results["engine"], results["torch"]):
            assert got.coc_ids == want.coc_ids
            _assert_paths_close(got.trajectory_xy, want.trajectory_xy)
    assert max(stats) > 2.0  # the oracle's verify passes accepted several drafts at once


def test_int8_draft_changes_proposals_not_the_output(models, builder, monkeypatch):
    """ONNX Runtime's CPU provider runs the draft's int8 twins by default (export.quantize_int8):
    their MatMuls are integer products, the draft's logits stay near the fp32 draft's, and
    speculative greedy CoCs still equal target-only decoding token for token."""
    import onnx

    import chain_spec_ros.planner as planner_module

    monkeypatch.setattr(planner_module, "MAX_COC_TOKENS", MAX_NEW)
    manifest = json.loads((models / "onnx" / "manifest.json").read_text())
    for name in ("draft_step", "draft_step_t1", "draft_fuse"):
        graph = onnx.load(str(models / "onnx" / manifest["graphs"][name]["int8_file"])).graph
        weights = {w.name for w in graph.initializer}
        assert any(node.op_type == "MatMulInteger" for node in graph.node), name
        assert not any(node.op_type == "MatMul" and weights & set(node.input) for node in graph.node), name
    assert all("int8_file" not in entry for name, entry in manifest["graphs"].items() if name.startswith("target_"))
    cpu = {"providers": ["CPUExecutionProvider"]}
    target, int8 = build_engines(models, "onnxruntime", models / "draft", **cpu)
    _, fp32 = build_engines(models, "onnxruntime", models / "draft", **cpu, draft_int8=False)
    assert int8.int8_weights and not fp32.int8_weights
    torch.manual_seed(6)
    prefix = torch.randn(1, 6, int8.config.hidden_size) * 3
    logits = []
    for draft in (int8, fp32):
        draft.start(32)
        hidden, first = draft.step(list(range(10, 16)), prefix, torch.arange(6).expand(3, 6))
        logits += [first, draft.step([20], hidden, torch.full((3, 1), 6, dtype=torch.long))[1]]
    for got, want in zip(logits[:2], logits[2:]):
        inside = torch.isfinite(want)
        assert torch.equal(inside, torch.isfinite(got))
        spread = float(want[inside].max() - want[inside].min())
        assert 0 < _diff(got, want) < 0.05 * spread  # rounded, not broken
    for seed in range(4):
        images, history = random_scene(200 + seed)
        plain = Planner(target, builder).plan(images, history, 6.0)
        assert Planner(target, builder, EagleDrafter(int8), k=5).plan(images, history, 6.0).coc_ids == plain.coc_ids


def test_decoding_steps_reuse_preallocated_buffers(pair, builder):
    (engine, draft), _ = pair
    assert isinstance(engine, GraphTargetEngine)
    prompt = _prompt(builder, 4)
    engine.start(len(prompt) + 64)
    cache = engine.cache.data_ptr()
    engine.prefill(prompt.input_ids, engine.encode_images(prompt.images), prompt.mrope_positions)
    logits, _ = engine.decode([7], prompt.rope_delta)
    engine.decode([7, 8, 9], prompt.rope_delta)
    calls = dict(engine._calls)
    if "target_decoder_t1" in engine.graphs:  # ONNX Runtime CPU: decode runs the fixed 1-token graph
        assert ("target_decoder_t1", 1, 1, False) in calls.keys()
    buffers = {key: call.outputs["logits"].data_ptr() for key, call in calls.items() if key[0].startswith("target_decoder")}
    for _ in range(5):
        returned, _ = engine.decode([7], prompt.rope_delta)
        engine.decode([7, 8, 9], prompt.rope_delta)
        engine.crop(engine.length - 2)
    assert engine.cache.data_ptr() == cache  # appended in place, rolled back without a copy
    for key, call in calls.items():  # fixed-size steps write the cache themselves: their outputs alias it
        if key[0].startswith("target_decoder_"):
            assert "new_kv" not in call.extra
            assert call.outputs["present_key_0"].data_ptr() == call.inputs["past_key_0"].data_ptr()
    decoder_calls = {key: call for key, call in calls.items() if key[0].startswith("target_decoder")}
    prefill, = (call for key, call in decoder_calls.items() if key[-1])
    is_pad = torch.from_numpy(prompt.input_ids == engine.config.image_pad_id)
    assert (prefill.inputs["deepstack"][:, 0, is_pad] != 0).any(-1).all()  # the image features at the pads
    assert (prefill.inputs["deepstack"][:, 0, ~is_pad] == 0).all()
    steps = [call for key, call in decoder_calls.items() if not key[-1]]
    assert steps and all((call.inputs["deepstack"] == 0).all() for call in steps)  # text steps add nothing
    assert engine._calls.keys() == calls.keys()  # no new binding per step
    assert {key: calls[key].outputs["logits"].data_ptr() for key in buffers} == buffers
    assert returned.data_ptr() not in buffers.values()  # the caller owns what it gets
    engine.start(len(prompt) + 32)  # a smaller request reuses the same buffer
    assert engine.cache.data_ptr() == cache
    draft.start(len(prompt) + 64)
    cache = draft.cache.data_ptr()
    hidden = torch.zeros(1, 1, draft.config.hidden_size)
    for j in range(4):
        hidden, _ = draft.step([j], hidden, prompt.positions(j, 1, "flat"))
    draft.crop(1)
    assert draft.cache.data_ptr() == cache and draft.length == 1


def test_prefill_rewrites_the_deepstack_input(pair, builder):
    """A prompt without images after one with images, of the same length (so the same bound
    call): its deepstack input is zero again, and its logits are torch's."""
    (engine, _), (reference, _) = pair
    prompt = _prompt(builder, 8)
    text_only = np.where(prompt.input_ids == engine.config.image_pad_id, builder.ids["<|vision_start|>"],
                         prompt.input_ids)
    results = []
    for e in (engine, reference):
        e.start(len(prompt) + 8)
        e.prefill(prompt.input_ids, e.encode_images(prompt.images), prompt.mrope_positions)
        e.start(len(prompt) + 8)
        results.append(e.prefill(text_only, None, prompt.mrope_positions))
    assert _diff(results[0][0], results[1][0]) < TOL and _diff(results[0][1], results[1][1]) < TOL


def test_verify_without_room_for_padding_runs_the_dynamic_graph(pair, builder, monkeypatch):
    """A short verify is padded to the k + 1 graph only when the cache has room for the padding;
    near the end of the buffer it runs the dynamic graph, with the same logits either way."""
    (engine, _), (reference, _) = pair
    prompt = _prompt(builder, 5)
    engine.start(len(prompt) + 8)  # the buffer may be larger: start keeps a bigger one
    slots = engine.cache.shape[4] if isinstance(engine, GraphTargetEngine) else len(prompt) + 8
    results = []
    for e in (engine, reference):
        e.start(slots)
        e.prefill(prompt.input_ids, e.encode_images(prompt.images), prompt.mrope_positions)
        while e.length < slots - 6:  # 6 slots left: room for a 4-token verify, not for its padding to k + 1
            e.decode([11], prompt.rope_delta)
        widths = []
        if e is engine and isinstance(e, GraphTargetEngine):
            dynamic = e.graphs["target_decoder"]
            monkeypatch.setattr(dynamic, "run", lambda handle, run=dynamic.run: widths.append(handle) or run(handle))
        results.append(e.decode([12, 13, 14, 15], prompt.rope_delta))
        assert e.length == slots - 2
        if e is engine and isinstance(e, GraphTargetEngine):
            assert len(widths) == 1  # the verify ran the dynamic graph
    assert _diff(results[0][0], results[1][0]) < TOL and _diff(results[0][1], results[1][1]) < TOL


def test_tensorrt_profiles_cover_every_graph_input(models):
    """The build's optimisation profiles (pure Python; the build itself needs TensorRT) match the
    exported graphs, and each planner call shape selects the profile meant for it."""
    from chain_spec_ros.engines.build import profiles
    from chain_spec_ros.engines.trt_engine import choose_profile

    exported = manifest.load_manifest(models, models / "draft")
    config = load_target_config(models / "target")
    built = profiles(exported, config, cache_len=400, k=7, max_images=32, prefill_opt=256)
    assert set(built) == set(manifest.GRAPHS)
    for name, graph_profiles in built.items():
        inputs = exported["graphs"][name]["inputs"]
        for profile in graph_profiles:
            assert set(profile) == set(inputs), name
            for input_name, (low, opt, high) in profile.items():
                dims = inputs[input_name]["shape"]
                assert len(low) == len(opt) == len(high) == len(dims), (name, input_name)
                assert all(a <= b <= c for a, b, c in zip(low, opt, high))
                assert all(isinstance(d, str) or a == c == d for d, a, c in zip(dims, low, high)), (name, input_name)

    def shapes(tokens, rows):
        by_tokens = {"inputs_embeds": (1, tokens, 64), "positions": (3, tokens), "logit_index": (rows,),
                     "deepstack": (2, 1, tokens, 64)}
        return {name: by_tokens.get(name, low) for name, (low, _, _) in built["target_decoder"][0].items()}

    decoder = built["target_decoder"]
    assert choose_profile(decoder, shapes(249, 1)) == (0, False)  # prefill
    assert choose_profile(decoder, shapes(1, 1)) == (1, True)  # decode: a CUDA graph
    assert choose_profile(decoder, shapes(8, 8)) == (2, True)  # verify k + 1: a CUDA graph
    assert choose_profile(decoder, shapes(5, 5)) == (0, False)  # a shorter verify: the dynamic profile
    assert choose_profile(decoder, shapes(401, 1))[0] is None  # longer than the cache


def _copy_models(models, tmp_path):
    copy = tmp_path / "models"
    shutil.copytree(models, copy)
    return copy


def test_stale_or_missing_export_is_reported(models, tmp_path):
    copy = _copy_models(models, tmp_path)
    target = TargetVLA.from_pretrained(copy / "target")
    with torch.no_grad():
        target.decoder.norm.weight.add_(0.1)
    target.save_pretrained(copy / "target")
    with pytest.raises(manifest.StaleExportError, match="stale ONNX export.*re-run: chain-spec-export --models"):
        build_engines(copy, "onnxruntime", copy / "draft")
    shutil.rmtree(copy / "onnx")
    with pytest.raises(manifest.ExportError, match="no ONNX export .* run: chain-spec-export"):
        build_engines(copy, "onnxruntime")


def test_stale_draft_export_is_reported(models, tmp_path):
    copy = _copy_models(models, tmp_path)
    target = TargetVLA.from_pretrained(copy / "target")
    draft = EagleDraft.from_pretrained(copy / "draft", target.decoder)
    with torch.no_grad():
        draft.fc.weight.mul_(2.0)
    draft.save_pretrained(copy / "draft")
    build_engines(copy, "onnxruntime")  # the target alone is still current
    with pytest.raises(manifest.StaleExportError, match="draft graphs .* re-run: chain-spec-export .* --draft"):
        build_engines(copy, "onnxruntime", copy / "draft")


def test_export_of_an_older_format_is_stale_and_auto_reexports_it(models, tmp_path):
    """An export from before the deepstack input (format 3, no deepstack layer count) is refused
    by a named backend with the command that fixes it, and backend auto exports afresh."""
    copy = _copy_models(models, tmp_path)
    path = copy / "onnx" / "manifest.json"
    old = json.loads(path.read_text())
    old["format"] = 3
    del old["target"]["deepstack_layers"]
    path.write_text(json.dumps(old))
    with pytest.raises(manifest.StaleExportError, match="export format 3, this code reads .*re-run: chain-spec-export"):
        build_engines(copy, "onnxruntime", copy / "draft")
    engine, _ = build_engines(copy, "auto", copy / "draft", providers=["CPUExecutionProvider"])
    assert engine.backend == "onnxruntime" and f"exported the graphs to {copy / 'onnx'}" in engine.fallback_reason
    assert engine.spec["deepstack_layers"] == 2


def test_vlm_only_target_exports_no_expert_graph_and_refuses_trajectories(models, tmp_path, builder):
    """A bare Qwen3-VL checkpoint (the target's VLM folder on its own): no expert graph in the
    export, ONNX Runtime decodes as torch does, and both engines refuse a trajectory, saying why."""
    vlm_only = tmp_path / "vlm_only"
    shutil.copytree(models / "target" / "vlm", vlm_only / "target")
    shutil.copy(models / "tokenizer.json", vlm_only / "tokenizer.json")
    assert export.main(["--models", str(vlm_only)]) == 0
    written = manifest.load_manifest(vlm_only)
    assert written["target"]["expert"] is None and manifest.EXPERT_GRAPH not in written["graphs"]
    assert not (vlm_only / "onnx" / f"{manifest.EXPERT_GRAPH}.onnx").exists()
    engine, _ = build_engines(vlm_only, "onnxruntime", providers=["CPUExecutionProvider"])
    reference, _ = build_engines(vlm_only, "torch", device="cpu")
    prompt = _prompt(builder, 9)
    got, want = _target_trace(engine, prompt), _target_trace(reference, prompt)
    for stage in ("prefill", "decode1", "verify_after_rollback"):
        assert _diff(got[stage][0], want[stage][0]) < TOL, stage
    for e in (engine, reference):
        with pytest.raises(ValueError, match="no trajectory expert"):
            e.trajectory(prompt.rope_delta, 5.0, None, 0)


def test_auto_exports_on_first_use_and_matches_torch(tmp_path, builder):
    """`auto` on a models directory without an export: exports into MODELS/onnx, runs ONNX
    Runtime, says why not TensorRT, computes what torch computes; the next start reuses the export."""
    models = write_tiny_models(tmp_path / "models", draft=True)
    target, draft = build_engines(models, "auto", models / "draft", providers=["CPUExecutionProvider"])
    assert target.backend == draft.backend == "onnxruntime"
    assert (models / "onnx" / "manifest.json").is_file()
    reason = target.fallback_reason
    assert reason.startswith("auto: tensorrt unavailable: ") and reason.endswith("; chose onnxruntime")
    assert f"no ONNX export at {models / 'onnx'}" in reason and f"exported the graphs to {models / 'onnx'}" in reason
    reference, _ = build_engines(models, "torch", models / "draft", device="cpu")
    prompt = _prompt(builder, 6)
    got, want = _target_trace(target, prompt), _target_trace(reference, prompt)
    for stage in ("prefill", "decode1", "verify", "verify_after_rollback"):
        assert _diff(got[stage][0], want[stage][0]) < TOL and _diff(got[stage][1], want[stage][1]) < TOL, stage
    _assert_paths_close(target.trajectory(prompt.rope_delta, 5.0, None, 3).xy,
                        reference.trajectory(prompt.rope_delta, 5.0, None, 3).xy)
    again, _ = build_engines(models, "auto", models / "draft", providers=["CPUExecutionProvider"])
    assert again.backend == "onnxruntime" and "exported the graphs" not in again.fallback_reason


def test_auto_reexports_stale_graphs_into_the_user_cache_when_models_is_read_only(tmp_path, monkeypatch):
    models = write_tiny_models(tmp_path / "models")
    build_engines(models, "auto")  # exports into MODELS/onnx
    target = TargetVLA.from_pretrained(models / "target")
    with torch.no_grad():
        target.decoder.norm.weight.add_(0.1)
    target.save_pretrained(models / "target")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(auto_export, "_writable", lambda directory: False)  # root ignores permission bits
    cache = auto_export.export_cache_dir(models, None)
    assert cache.parent == tmp_path / "cache" / "chain_spec_ros" / "onnx"
    engine, _ = build_engines(models, "auto")
    assert engine.backend == "onnxruntime" and engine.manifest["dir"] == str(cache)
    assert "stale ONNX export" in engine.fallback_reason and f"exported the graphs to {cache}" in engine.fallback_reason
    engine, _ = build_engines(models, "auto")  # the cache holds the export of these weights now
    assert f"using the export in {cache}" in engine.fallback_reason
    with pytest.raises(manifest.StaleExportError, match="re-run: chain-spec-export"):
        build_engines(models, "onnxruntime")  # a named backend never exports behind the user's back


@pytest.mark.skipif(_tensorrt_skip_reason() is None, reason="tensorrt is installed here: nothing to fall back from")
def test_tensorrt_falls_back_to_onnxruntime_and_says_why(models):
    target, draft = build_engines(models, "tensorrt", models / "draft")
    assert target.backend == draft.backend == "onnxruntime"
    assert "tensorrt backend unavailable" in target.fallback_reason


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present: the provider may not be missing")
def test_missing_execution_provider_falls_back_to_cpu(models):
    target, _ = build_engines(models, "onnxruntime", providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert target.backend == "onnxruntime" and target.providers == ["CPUExecutionProvider"]
    assert "CUDAExecutionProvider" in target.fallback_reason and "CPUExecutionProvider" in target.fallback_reason
    target, _ = build_engines(models, "onnxruntime")  # the default asks for nothing in particular
    assert target.fallback_reason is None


def test_unknown_backend_is_rejected(models):
    with pytest.raises(ValueError, match="unknown backend"):
        build_engines(models, "tvm")


def test_onnxruntime_thread_pool_is_sized_once():
    import warnings

    from chain_spec_ros.engines import ort_engine

    ort_engine.use_shared_thread_pool()  # made here, or kept from an earlier load
    size = ort_engine._shared_pool_threads
    assert size >= 1 and torch.get_num_threads() == 1  # torch only glues
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ort_engine.use_shared_thread_pool()  # the default accepts the pool there is
        ort_engine.use_shared_thread_pool(size)
    with pytest.warns(RuntimeWarning, match=f"already has {size} threads"):
        ort_engine.use_shared_thread_pool(size + 1)
    assert ort_engine._shared_pool_threads == size
