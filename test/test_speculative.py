"""The draft-verify loop is lossless: token-for-token equal to target-only greedy decoding."""
import numpy as np
import pytest
import torch

from chain_spec_ros.drafters import EagleDrafter, NgramDrafter
from chain_spec_ros.engines.torch_engine import TorchDraftEngine, TorchTargetEngine
from chain_spec_ros.models.draft import DraftConfig, EagleDraft
from chain_spec_ros.planner import target_decode
from chain_spec_ros.sampling import Sampling
from chain_spec_ros.speculative import speculative_decode, verify_sampled
from conftest import random_scene, tiny_target

MAX_NEW = 40


@pytest.fixture(scope="module")
def setup():
    target, builder = tiny_target(seed=0)
    # A near-uniform random model rarely emits the stop token; make a few tokens likely so
    # CoCs end at varied lengths, some inside drafted blocks.
    with torch.no_grad():
        target.decoder.lm_head.weight[builder.cot_end_id] *= 2.0
    return target, builder


def _prompt(builder, seed):
    return builder.build(*random_scene(seed))


def _prefill(model, prompt, layers):
    engine = TorchTargetEngine(model, layers, device="cpu")
    engine.start(len(prompt) + MAX_NEW + 16)
    logits, features = engine.prefill(prompt.input_ids, engine.encode_images(prompt.images), prompt.mrope_positions)
    return engine, logits, features


def _greedy(target, builder, prompt):
    engine, logits, _ = _prefill(target, prompt, [])
    tokens = target_decode(engine, logits, prompt.rope_delta, MAX_NEW, builder.cot_end_id)
    return tokens, engine.length


def _drafter(drafter, max_len=400):
    drafter.start(max_len)
    return drafter


class OracleDrafter:
    """Proposes the true greedy continuation, corrupted at random: exercises long acceptances,
    rejections at every depth and stops inside a drafted block."""

    feature_layers: list[int] = []

    def start(self, max_len):
        pass

    def __init__(self, truth, stop_id, corrupt, seed):
        self.truth, self.stop_id, self.corrupt = truth + [stop_id] + [5] * 20, stop_id, corrupt
        self.rng = np.random.default_rng(seed)

    def begin(self, prompt, features, first_token):
        self.position = 1  # truth[0] is the pending token

    def propose(self, k, temperature, generator=None):
        drafts = list(self.truth[self.position:self.position + k])
        for j in range(len(drafts)):
            if self.rng.random() < self.corrupt:
                drafts[j] = int(self.rng.integers(0, 1000))
        return drafts, None

    def accept(self, num_accepted, next_token, features):
        self.position += num_accepted + 1


@pytest.mark.parametrize("mode", ["flat", "mrope"])
def test_eagle_draft_is_lossless(setup, mode):
    target, builder = setup
    draft = EagleDraft(DraftConfig.for_target(target.cfg.decoder, position_mode=mode), target.decoder.embed_tokens)
    draft.init_head_from(target.decoder.lm_head)
    draft.eval()
    for seed in range(8):
        prompt = _prompt(builder, seed)
        expected, expected_length = _greedy(target, builder, prompt)
        engine, logits, features = _prefill(target, prompt, draft.cfg.feature_layers)
        drafter = _drafter(EagleDrafter(TorchDraftEngine(draft, device="cpu"), stop_id=builder.cot_end_id))
        tokens, stats = speculative_decode(engine, drafter, prompt, logits, features, builder.cot_end_id, MAX_NEW, k=5)
        assert tokens == expected
        assert engine.length == expected_length  # the expert sees the same cache
        assert len(stats.token_sources) == len(tokens)


@pytest.mark.parametrize("corrupt", [0.0, 0.15, 0.5])
def test_oracle_drafts_are_lossless_and_accepted(setup, corrupt):
    target, builder = setup
    taus = []
    for seed in range(12):
        prompt = _prompt(builder, 100 + seed)
        expected, expected_length = _greedy(target, builder, prompt)
        engine, logits, features = _prefill(target, prompt, [])
        drafter = OracleDrafter(expected, builder.cot_end_id, corrupt, seed)
        tokens, stats = speculative_decode(engine, drafter, prompt, logits, features, builder.cot_end_id, MAX_NEW, k=7)
        assert tokens == expected
        assert engine.length == expected_length
        taus.append(stats.tau)
        # Every pass starts from the target's own pending token; the rest came from drafts.
        assert stats.token_sources.count("target") == stats.target_passes + (stats.target_passes == 0 and len(tokens) > 0) or len(tokens) == MAX_NEW
        if corrupt == 0.0 and len(tokens) < MAX_NEW:
            # Perfect drafts: each pass decides k + 1 tokens (the stop token included).
            assert stats.target_passes == -(-len(tokens) // 8)
    if corrupt > 0:
        assert 1.0 <= np.mean(taus) < 8.0


def test_ngram_drafter_is_lossless(setup):
    target, builder = setup
    corpus = [_greedy(target, builder, _prompt(builder, 200 + s))[0] for s in range(6)]
    drafter = NgramDrafter(corpus, target.cfg.decoder.vocab_size)
    drafted = 0
    for seed in range(6):
        prompt = _prompt(builder, 200 + seed)
        engine, logits, features = _prefill(target, prompt, [])
        tokens, stats = speculative_decode(engine, drafter, prompt, logits, features, builder.cot_end_id, MAX_NEW, k=4)
        assert tokens == corpus[seed]
        drafted += stats.token_sources.count("draft")
    assert drafted > 0  # it has seen these very CoCs


def test_speculative_sampling_keeps_the_target_distribution():
    """First emitted token after one draft: its law must be p whatever q is."""
    generator = torch.Generator().manual_seed(0)
    p = torch.tensor([0.5, 0.3, 0.15, 0.05])
    q = torch.tensor([0.1, 0.1, 0.2, 0.6])
    logits = torch.log(p)[None].repeat(2, 1)
    counts = torch.zeros(4)
    n = 20000
    for _ in range(n):
        draft = int(torch.multinomial(q, 1, generator=generator))
        accepted, next_token = verify_sampled([draft], q[None], logits, Sampling(temperature=1.0), generator)
        counts[draft if accepted else next_token] += 1
    assert torch.allclose(counts / n, p, atol=0.015)
