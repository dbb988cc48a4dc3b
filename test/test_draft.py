"""The draft's training-time-test rollout computes exactly what chained drafting computes."""
import copy
import dataclasses

import numpy as np
import pytest
import torch

from chain_spec_ros.drafters import EagleDrafter
from chain_spec_ros.engines.torch_engine import TorchDraftEngine
from chain_spec_ros.models.draft import DraftConfig, EagleDraft
from chain_spec_ros.training.draft import draft_vocabulary, target_features, ttt_loss, ttt_rollout
from conftest import tiny_target


@pytest.fixture(scope="module")
def pair():
    return tiny_target(seed=1)


@pytest.mark.parametrize("mode", ["flat", "mrope"])
def test_rollout_matches_chained_drafting(pair, mode):
    target, builder = pair
    draft = EagleDraft(DraftConfig.for_target(target.cfg.decoder, mode), target.decoder.embed_tokens,
                       target.decoder.lm_head).eval()
    rng = np.random.default_rng(0)
    prompt = builder.build(rng.integers(0, 255, (2, 4, 64, 128, 3), dtype=np.uint8), rng.integers(0, 1000, 48))
    coc = rng.integers(0, 600, 12).tolist()
    ids = torch.tensor([prompt.input_ids.tolist() + coc])
    images = torch.from_numpy(prompt.images)
    with torch.no_grad():
        features = target_features(target, prompt, ids, images, draft.cfg.feature_layers)
        rollout = ttt_rollout(draft, prompt, ids, features, steps=4)
        P = len(prompt)
        for base in (P - 1, P + 3):  # chains starting at the first CoC token and inside the CoC
            drafter = EagleDrafter(TorchDraftEngine(draft, device="cpu"))
            drafter.start(400)
            drafter.begin(prompt, [f[:, :base + 1] for f in features], int(ids[0, base + 1]))
            drafter.pending_tokens = ids[0, 1 : base + 2].tolist()  # the sequence up to the pending token
            # Feed the true continuation as drafts: position base+s gets token base+1+s.
            hidden, _ = drafter._step(drafter.pending_tokens, drafter.pending_features, 0)
            assert torch.allclose(hidden[0, 0], rollout[0][0, base - (P - 1)], atol=1e-5)
            for s in range(1, 4):
                hidden, _ = drafter._step([int(ids[0, base + 1 + s])], hidden, base + s)
                assert torch.allclose(hidden[0, 0], rollout[s][0, base - (P - 1)], atol=1e-5), (base, s)


def test_ttt_loss_trains_the_draft(pair):
    target, builder = pair
    target = copy.deepcopy(target)
    with torch.no_grad():  # a trained LM head has large logits; a random one needs a push
        target.decoder.lm_head.weight *= 25
    draft = EagleDraft(DraftConfig.for_target(target.cfg.decoder, "flat"), target.decoder.embed_tokens,
                       target.decoder.lm_head)
    rng = np.random.default_rng(2)
    prompt = builder.build(rng.integers(0, 255, (2, 4, 64, 128, 3), dtype=np.uint8), rng.integers(0, 1000, 48))
    coc = [5, 9, 14, 5, 9, 14, 5, 9, 14, 5, 9, 14, builder.cot_end_id]  # a learnable pattern
    ids = torch.tensor([prompt.input_ids.tolist() + coc])
    valid = torch.ones_like(ids, dtype=torch.bool)
    features = target_features(target, prompt, ids, torch.from_numpy(prompt.images), draft.cfg.feature_layers)
    optimiser = torch.optim.AdamW(draft.parameters(), lr=1e-2)
    first = None
    for _ in range(150):
        loss, accuracies = ttt_loss(draft, prompt, ids, valid, features, steps=3)
        first = first if first is not None else float(loss)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    assert float(loss) < 0.3 * first and min(accuracies) > 0.9


def test_last_only_pass_matches_the_full_pass(pair):
    """Ingesting a block with last_only computes the last position's hidden state and writes
    every position's keys and values, exactly as the full pass does."""
    target, _ = pair
    draft = EagleDraft(DraftConfig.for_target(target.cfg.decoder), target.decoder.embed_tokens,
                       target.decoder.lm_head).eval()
    torch.manual_seed(2)
    tokens = torch.randint(0, 500, (1, 9))
    features = torch.randn(1, 9, draft.cfg.hidden_size)
    positions = torch.arange(3, 12).expand(3, 1, 9)
    full_cache, last_cache = draft.new_cache(32), draft.new_cache(32)
    with torch.no_grad():
        for cache in (full_cache, last_cache):  # three entries already cached
            draft(tokens[:, :3], features[:, :3], positions[..., :3] - 3, cache)
        full = draft(tokens, features, positions, full_cache)
        last = draft(tokens, features, positions, last_cache, last_only=True)
    assert last.shape == (1, 1, draft.cfg.hidden_size)
    torch.testing.assert_close(last, full[:, -1:], atol=1e-5, rtol=1e-5)
    assert full_cache.length == last_cache.length == 12
    for mine, theirs in zip(last_cache.get(0), full_cache.get(0)):
        torch.testing.assert_close(mine, theirs, atol=0, rtol=0)


def test_proposals_come_from_the_draft_vocabulary(pair, tmp_path):
    """`proposal_logits` are the full logits on the draft vocabulary and -inf outside it, so
    drafting proposes vocabulary tokens only; the vocabulary travels with the saved draft."""
    target, _ = pair
    assert draft_vocabulary([[5, 9, 7, 2], [9, 3, 2]]) == [2, 3, 5, 7, 9]
    config = DraftConfig.for_target(target.cfg.decoder)
    config.vocab = [2, 3, 5, 7, 9, 120, 301]
    draft = EagleDraft(config, target.decoder.embed_tokens, target.decoder.lm_head).eval()
    draft.save_pretrained(tmp_path / "draft")
    draft = EagleDraft.from_pretrained(tmp_path / "draft", target.decoder.embed_tokens, target.decoder.lm_head).eval()
    assert draft.cfg.vocab == config.vocab
    torch.manual_seed(0)
    hidden = torch.randn(2, 3, config.hidden_size)
    with torch.no_grad():
        full, proposal = draft.logits(hidden), draft.proposal_logits(hidden)
    inside = torch.zeros(full.shape[-1], dtype=torch.bool)
    inside[config.vocab] = True
    torch.testing.assert_close(proposal[..., inside], full[..., inside])
    assert torch.all(proposal[..., ~inside] == float("-inf"))
    assert set(proposal.argmax(-1).flatten().tolist()) <= set(config.vocab)
    for wrong in ([], [3, target.cfg.decoder.vocab_size]):  # a draft made for another target
        with pytest.raises(ValueError, match="draft vocabulary"):
            EagleDraft(dataclasses.replace(config, vocab=wrong), target.decoder.embed_tokens, target.decoder.lm_head)
    engine = TorchDraftEngine(draft, "cpu")
    engine.start(16)
    _, logits = engine.step([5, 7], torch.randn(1, 2, config.hidden_size), torch.arange(2).expand(3, 2))
    assert int(logits.argmax()) in config.vocab and torch.isinf(logits[~inside]).all()
