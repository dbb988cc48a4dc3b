"""Sampling as Alpamayo samples (temperature, top-p, suppressed trajectory tokens), and
speculative sampling keeping exactly that distribution, also with a draft restricted to a
vocabulary."""
import numpy as np
import pytest
import torch

from chain_spec_ros.metrics import bootstrap_ratio, chi_square_p_value
from chain_spec_ros.sampling import Sampling
from chain_spec_ros.speculative import verify_sampled


def test_top_p_keeps_the_set_transformers_keeps():
    transformers = pytest.importorskip("transformers")
    generator = torch.Generator().manual_seed(0)
    for trial in range(20):
        logits = torch.randn(1, 50, generator=generator) * 3
        sampling = Sampling(0.6, 0.9)
        processed = transformers.TopPLogitsWarper(0.9)(None, transformers.TemperatureLogitsWarper(0.6)(None, logits))
        expected = torch.softmax(processed, dim=-1)
        torch.testing.assert_close(sampling.distribution(logits), expected, atol=1e-6, rtol=0)


def test_suppressed_tokens_are_never_chosen():
    logits = torch.zeros(20)
    logits[5:9] = 10.0
    sampling = Sampling(1.0, 1.0, range(5, 9))
    assert sampling.distribution(logits)[5:9].sum() == 0
    assert Sampling(0.0, 1.0, range(5, 9)).choose(logits)[0] not in range(5, 9)
    with pytest.raises(ValueError):
        Sampling(-1.0)


def test_greedy_argmax_equals_the_masked_argmax():
    """`Sampling.argmax` (a masked copy only when the plain argmax is suppressed) chooses what the
    argmax of the masked logits chooses, ties included, for one row and for a block of rows."""
    generator = torch.Generator().manual_seed(0)
    sampling = Sampling(0.0, 1.0, range(5, 9))
    for _ in range(200):
        logits = torch.randint(0, 4, (6, 12), generator=generator).float()  # many ties, some in the range
        expected = sampling.masked(logits).argmax(-1).tolist()
        assert sampling.argmax(logits) == expected
        assert [sampling.argmax(row) for row in logits] == expected
        assert all(c not in range(5, 9) for c in expected)
    assert Sampling().argmax(torch.tensor([0.0, 2.0, 2.0])) == 1


@pytest.mark.parametrize("top_p", [1.0, 0.98, 0.8])
def test_speculative_sampling_keeps_the_target_distribution_with_a_restricted_draft(top_p):
    """Two drafts per pass; the draft proposes only from 6 of the 12 tokens (q is zero outside,
    as with EAGLE-3's draft vocabulary). The law of the first two emitted tokens must be the
    target's p(a) p(b | a) under temperature 0.6 and top-p: a chi-square test over the 144 pairs."""
    generator = torch.Generator().manual_seed(1)
    V = 12
    sampling = Sampling(0.6, top_p)
    logits = torch.randn(V, V + 1, V, generator=generator) * 1.5  # [first token?, position, vocab] tables
    first_logits = torch.randn(V, generator=generator)
    vocab = torch.tensor([0, 2, 3, 5, 8, 11])
    q_raw = torch.zeros(V)
    q_raw[vocab] = torch.rand(len(vocab), generator=generator) + 0.2
    q = q_raw / q_raw.sum()
    p_first = sampling.distribution(first_logits)
    expected = torch.stack([p_first[a] * sampling.distribution(logits[a, 0]) for a in range(V)]).flatten()
    counts = torch.zeros(V * V)
    n = 20000
    for _ in range(n):
        drafts = [int(torch.multinomial(q, 1, generator=generator)) for _ in range(2)]
        # The target's logits for [pending, d1, d2]: row 0 decides token 1, row 1 token 2 given d1.
        target_logits = torch.stack([first_logits, logits[drafts[0], 0], logits[drafts[0], 1]])
        accepted, next_token = verify_sampled(drafts, q[None].repeat(2, 1), target_logits, sampling, generator)
        if accepted == 0:
            first, second = next_token, int(sampling.choose(logits[next_token, 0], generator)[0])
        elif accepted == 1:
            first, second = drafts[0], next_token
        else:
            first, second = drafts
        counts[first * V + second] += 1
    seen = expected > 0
    assert counts[~seen].sum() == 0  # nothing outside the top-p sets
    assert chi_square_p_value(counts[seen], expected[seen] * n) > 1e-3


def test_bootstrap_interval_separates_a_real_difference_from_noise():
    """The ablation's intervals: tau as a ratio of sums over scenes; a paired difference is
    called one only when its interval excludes zero."""
    rng = np.random.default_rng(0)
    passes = rng.integers(3, 8, 150)
    produced = passes * 6 + rng.integers(-3, 4, 150)  # tau about 6
    tau, low, high = bootstrap_ratio(produced, passes)
    assert low < tau < high and high - low < 0.5 and tau == pytest.approx(produced.sum() / passes.sum())
    noise = produced + rng.integers(-1, 2, 150)  # another draft, same scenes, no real difference
    better = produced + passes  # one more token per pass on every scene
    _, low, high = bootstrap_ratio(noise, passes, produced, passes)
    assert low < 0 < high
    difference, low, high = bootstrap_ratio(better, passes, produced, passes)
    assert difference == pytest.approx(1.0) and low > 0.9
    with pytest.raises(ValueError, match="same scenes"):
        bootstrap_ratio(produced, passes, produced[:10], passes[:10])
