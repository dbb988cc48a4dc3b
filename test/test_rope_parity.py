"""Our M-RoPE positions and rotary tables against transformers' Qwen3-VL (the reference)."""
import random

import pytest
import torch

pytest.importorskip("transformers")
from transformers import Qwen3VLConfig, Qwen3VLModel, Qwen3VLTextConfig  # noqa: E402
from transformers.models.qwen3_vl.modeling_qwen3_vl import (  # noqa: E402
    Qwen3VLTextRotaryEmbedding,
    apply_rotary_pos_emb,
)

from chain_spec_ros.models.rope import (  # noqa: E402
    RotaryEmbedding,
    mrope_position_ids,
    rotate,
    scaled_mrope_section,
    text_position_ids,
)

IMAGE, VIDEO, V_START, V_END = 120, 121, 122, 123


@pytest.fixture(scope="module")
def hf_model() -> Qwen3VLModel:
    text = dict(vocab_size=128, hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                rope_parameters=dict(rope_type="default", rope_theta=10000.0,
                                     mrope_section=[4, 2, 2]))
    vision = dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=32,
                  patch_size=4, spatial_merge_size=2, num_position_embeddings=16,
                  deepstack_visual_indexes=[0])
    cfg = Qwen3VLConfig(text_config=text, vision_config=vision, image_token_id=IMAGE,
                        video_token_id=VIDEO, vision_start_token_id=V_START,
                        vision_end_token_id=V_END)
    return Qwen3VLModel(cfg).eval()


def random_layout(rng: random.Random):
    """Segments for our function, and the equivalent input_ids + image_grid_thw for HF's."""
    segments, ids, grids = [], [], []
    for _ in range(rng.randint(1, 4)):
        pre = rng.randint(0, 6)
        t, rows, cols = rng.choice([1, 1, 1, 2]), rng.randint(1, 5), rng.randint(1, 7)
        # <|vision_start|> and <|vision_end|> are ordinary text tokens to M-RoPE.
        segments += [("text", pre + 1), ("image", t, rows, cols), ("text", 1)]
        ids += [rng.randrange(100) for _ in range(pre)]
        ids += [V_START] + [IMAGE] * (t * rows * cols) + [V_END]
        grids.append([t, 2 * rows, 2 * cols])  # grid before the 2x2 merge
    tail = rng.randint(0, 5)
    segments.append(("text", tail))
    ids += [rng.randrange(100) for _ in range(tail)]
    return segments, torch.tensor([ids]), torch.tensor(grids)


@pytest.mark.parametrize("seed", range(8))
def test_mrope_positions_match_get_rope_index(hf_model, seed):
    segments, input_ids, grid_thw = random_layout(random.Random(seed))
    mm_types = (input_ids == IMAGE).int()
    hf_pos, hf_delta = hf_model.get_rope_index(input_ids, mm_token_type_ids=mm_types,
                                               image_grid_thw=grid_thw)
    pos, delta = mrope_position_ids(segments)
    assert pos.shape == (3, input_ids.shape[1])
    assert torch.equal(pos, hf_pos[:, 0])
    assert delta == int(hf_delta[0, 0])

    # Decoding after the prompt: transformers' compute_3d_position_ids with a non-empty cache.
    class FakeCache:
        def get_seq_length(self):
            return input_ids.shape[1] + 3  # three tokens already decoded

    hf_model.rope_deltas = hf_delta
    new = torch.randint(0, 100, (1, 4))
    hf_step = hf_model.compute_3d_position_ids(new, torch.zeros(1, 4, 32), cache=FakeCache())
    ours = text_position_ids(input_ids.shape[1] + 3, 4, delta)
    assert torch.equal(hf_step, ours[None].expand(3, -1, -1))


def test_mrope_hand_example():
    # 2 text, a 2x3 still image, 2 text: text resumes at offset + max(rows, cols).
    pos, delta = mrope_position_ids([("text", 2), ("image", 1, 2, 3), ("text", 2)])
    expected = torch.tensor([
        [0, 1, 2, 2, 2, 2, 2, 2, 5, 6],
        [0, 1, 2, 2, 2, 3, 3, 3, 5, 6],
        [0, 1, 2, 3, 4, 2, 3, 4, 5, 6],
    ])
    assert torch.equal(pos, expected)
    assert delta == 7 - 10


def test_scaled_mrope_section():
    assert scaled_mrope_section(128) == [24, 20, 20]
    assert scaled_mrope_section(64) == [12, 10, 10]
    for d in (16, 32, 48, 96, 256):
        assert sum(scaled_mrope_section(d)) == d // 2


@pytest.mark.parametrize("head_dim,section",
                         [(128, [24, 20, 20]), (64, [12, 10, 10]), (16, [4, 2, 2])])
def test_rotary_matches_transformers(head_dim, section):
    rope = dict(rope_type="default", rope_theta=5e6, mrope_section=section)
    cfg = Qwen3VLTextConfig(head_dim=head_dim, hidden_size=4 * head_dim, num_attention_heads=4,
                            rope_parameters=rope)
    hf = Qwen3VLTextRotaryEmbedding(cfg)
    ours = RotaryEmbedding(head_dim, 5e6, section)
    g = torch.Generator().manual_seed(head_dim)
    pos = torch.randint(0, 3000, (3, 2, 11), generator=g)  # different value on each axis
    x = torch.zeros(2, 11, head_dim)
    hf_cos, hf_sin = hf(x, pos)
    cos, sin = ours(pos)
    torch.testing.assert_close(cos, hf_cos, atol=1e-5, rtol=0)
    torch.testing.assert_close(sin, hf_sin, atol=1e-5, rtol=0)
    # 2-D positions mean all three axes equal.
    hf_1d = hf(x, pos[0][None].expand(3, -1, -1))[0]
    torch.testing.assert_close(ours(pos[0])[0], hf_1d, atol=1e-5, rtol=0)

    q = torch.randn(2, 4, 11, head_dim, generator=g)
    k = torch.randn(2, 2, 11, head_dim, generator=g)
    hq, hk = apply_rotary_pos_emb(q, k, hf_cos, hf_sin)
    oq, ok = rotate(q, cos, sin), rotate(k, cos, sin)
    torch.testing.assert_close(oq, hq, atol=1e-5, rtol=0)
    torch.testing.assert_close(ok, hk, atol=1e-5, rtol=0)


def test_interleaving_uses_each_axis():
    # Guards against a silent fallback to 1-D RoPE: moving only the height (or width) position
    # must change exactly the pairs j % 3 == 1 (or 2) below 3 * section.
    rot = RotaryEmbedding(64, 1e4, [12, 10, 10])
    base = torch.zeros(3, 1, 1, dtype=torch.long)
    for axis in (1, 2):
        moved = base.clone()
        moved[axis] = 5
        changed = (rot(moved)[0] != rot(base)[0])[0, 0, :32].nonzero().flatten().tolist()
        assert changed == list(range(axis, 30, 3))
