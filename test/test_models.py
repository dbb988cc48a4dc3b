"""KV cache, vision, expert, unicycle integration and save/load of the TargetVLA."""
import math

import pytest
import torch

from chain_spec_ros.models.config import DecoderConfig, ExpertConfig, TargetConfig, VisionConfig
from chain_spec_ros.models.expert import integrate_unicycle
from chain_spec_ros.models.kv_cache import KVCache
from chain_spec_ros.models.rope import mrope_position_ids
from chain_spec_ros.models.target import TargetVLA
from chain_spec_ros.models.vision import VisionTower, VisualFeatures

PAD = 63


def tiny_config(**decoder) -> TargetConfig:
    dec = dict(vocab_size=64, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
               head_dim=16, intermediate_size=128, max_positions=128)
    dec.update(decoder)
    return TargetConfig(
        decoder=DecoderConfig(**dec),
        vision=VisionConfig(image_height=32, image_width=64, depth=1, hidden_size=32, num_heads=2,
                            intermediate_size=64, deepstack_visual_indexes=[0]),
        expert=ExpertConfig(hidden_size=32, num_heads=2, intermediate_size=64, horizon=16),
        image_pad_id=PAD,
    )


@pytest.fixture(scope="module")
def model() -> TargetVLA:
    torch.manual_seed(0)
    return TargetVLA(tiny_config()).eval()


def prompt(model: TargetVLA, n_images: int = 2):
    """A prompt with n images (text between), its ids, visual features and M-RoPE positions."""
    vision = model.cfg.vision
    rows, cols = vision.grid
    g = torch.Generator().manual_seed(3)
    segments, ids = [], []
    for _ in range(n_images):
        segments += [("text", 3), ("image", 1, rows, cols)]
        ids += torch.randint(0, PAD, (3,), generator=g).tolist() + [PAD] * (rows * cols)
    segments.append(("text", 4))
    ids += torch.randint(0, PAD, (4,), generator=g).tolist()
    images = torch.randint(0, 256, (n_images, vision.image_height, vision.image_width, 3), dtype=torch.uint8,
                           generator=g)
    pos, delta = mrope_position_ids(segments)
    return torch.tensor([ids]), model.encode_images(images), pos, delta


def test_kv_cache_append_crop_views():
    cache = KVCache(num_layers=2, batch_size=1, num_kv_heads=2, max_len=8, head_dim=4)
    k = torch.randn(1, 2, 3, 4)
    k_all, v_all = cache.append(0, k, k + 1)
    assert k_all.shape == (1, 2, 3, 4) and torch.equal(k_all, k)
    assert k_all.data_ptr() == cache.keys[0].data_ptr()  # a view, not a copy
    assert cache.length == 0  # the decoder advances once per forward, after all layers
    cache.advance(3)
    cache.crop(1)
    k2 = torch.randn(1, 2, 2, 4)
    k_all, _ = cache.append(0, k2, k2)
    assert torch.equal(k_all[:, :, :1], k[:, :, :1]) and torch.equal(k_all[:, :, 1:], k2)
    cache.advance(2)
    assert cache.get(0)[0].shape[2] == 3
    with pytest.raises(ValueError):
        cache.crop(4)
    with pytest.raises(RuntimeError):
        cache.append(1, torch.randn(1, 2, 6, 4), torch.randn(1, 2, 6, 4))


def test_vision_tokens_are_row_major_merged_cells():
    cfg = VisionConfig(image_height=64, image_width=96, depth=0, deepstack_visual_indexes=[], hidden_size=16,
                       num_heads=2, out_hidden_size=24)
    enc = VisionTower(cfg).eval()
    rows, cols = cfg.grid
    img = torch.randint(0, 256, (1, 64, 96, 3), dtype=torch.uint8)
    base = enc(img).embeds
    assert base.shape == (1, rows * cols, 24)
    # Without vision blocks each merged token sees only its own 32x32 cell (2 x 2 patches of 16).
    img2 = img.clone()
    img2[0, 32:64, 64:96] = 255 - img2[0, 32:64, 64:96]  # cell (row 1, col 2)
    changed = (enc(img2).embeds - base).abs().amax(-1)[0] > 0
    assert changed.nonzero().flatten().tolist() == [1 * cols + 2]


def test_build_inputs_embeds_fills_pads_in_order(model):
    ids, visual, _, _ = prompt(model)
    embeds, deepstack = model.build_inputs_embeds(ids, visual)
    d = embeds.shape[-1]
    pads = (ids[0] == PAD).nonzero().flatten()
    torch.testing.assert_close(embeds[0, pads], visual.embeds.reshape(-1, d))
    text = (ids[0] != PAD).nonzero().flatten()
    torch.testing.assert_close(embeds[0, text], model.decoder.embed(ids[0, text]))
    # Deepstack features [L, B, T, D]: the image tokens' at the pads, zero at the text.
    torch.testing.assert_close(deepstack[:, 0, pads], visual.deepstack.reshape(len(visual.deepstack), -1, d))
    assert (deepstack[:, 0, text] == 0).all()
    with pytest.raises(ValueError):
        model.build_inputs_embeds(ids, VisualFeatures(visual.embeds[:1], visual.deepstack[:, :1]))


@torch.no_grad()
def test_prefill_then_decode_equals_one_pass(model):
    ids, visual, pos, delta = prompt(model)
    P = ids.shape[1]
    new = torch.randint(0, PAD, (1, 5))
    # One pass over prompt + new text, with the new text at positions P + j + delta.
    full_pos = torch.cat([pos, (P + torch.arange(5) + delta).expand(3, -1)], dim=1)
    ref, _ = model.prefill(torch.cat([ids, new], 1), visual, full_pos, model.new_cache())
    cache = model.new_cache()
    model.prefill(ids, visual, pos, cache)
    step, _ = model.decode(new[:, :2], cache, delta)  # a 2-token verify pass
    torch.testing.assert_close(step, ref[:, P:P + 2], atol=1e-5, rtol=0)
    for j in range(2, 5):
        step, hidden = model.decode(new[:, j:j + 1], cache, delta, return_hidden_layers=[0, 1])
        torch.testing.assert_close(step[:, 0], ref[:, P + j], atol=1e-5, rtol=0)
    assert len(hidden) == 2 and cache.length == P + 5


def test_expert_shapes_loss_and_conditioning(model):
    ids, visual, pos, delta = prompt(model)
    cache = model.new_cache(batch_size=1)
    with torch.no_grad():
        model.prefill(ids, visual, pos, cache)
    length = cache.length
    expert = model.expert
    H = model.cfg.expert.horizon
    x = torch.randn(3, H, 2)
    t = torch.rand(3)
    v = expert(x, t, cache, delta)
    assert v.shape == (3, H, 2) and cache.length == length  # the expert only reads the cache
    # The action queries must actually read the prefix: changing the cached values changes v.
    saved = cache.values[0].clone()
    cache.values[0][:, :, :length] += 1.0
    assert not torch.allclose(expert(x, t, cache, delta), v)
    cache.values[0].copy_(saved)

    target = torch.randn(3, H, 2)
    g = torch.Generator().manual_seed(0)
    loss = expert.flow_matching_loss(cache, delta, target, generator=g)
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    grad = expert.action_in_proj.encoder.trunk[0].weight.grad
    assert grad is not None and grad.abs().sum() > 0
    expert.zero_grad()

    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    a = expert.sample(cache, delta, steps=3, generator=g1, batch_size=2)
    b = expert.sample(cache, delta, steps=3, generator=g2, batch_size=2)
    assert a.shape == (2, H, 2) and torch.equal(a, b)
    traj = model.trajectory(cache, delta, v0=4.0, steps=2)
    assert traj.x.shape == (1, H) and torch.isfinite(traj.x).all()


def test_flow_matching_learns_a_fixed_target():
    torch.manual_seed(0)
    model = TargetVLA(tiny_config())
    cache = model.new_cache()
    with torch.no_grad():
        model.decode(torch.randint(0, PAD, (1, 6)), cache, 0)
    target = torch.linspace(-1, 1, 16).repeat(2, 1).T[None].contiguous()  # [1, 16, 2]
    opt = torch.optim.Adam(model.expert.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(150):
        loss = model.expert.flow_matching_loss(cache, 0, target.expand(8, -1, -1), generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-10:]) / 10 < 0.5 * sum(losses[:10]) / 10
    sample = model.expert.sample(cache, 0, steps=10, generator=g, batch_size=4)
    assert (sample - target).abs().mean() < 0.35


def test_unicycle_straight_line_and_braking():
    H, dt = 64, 0.1
    x, y, yaw, speed = integrate_unicycle(torch.zeros(H), torch.zeros(H), 5.0, dt)
    torch.testing.assert_close(x, 5.0 * dt * torch.arange(1, H + 1))
    assert y.abs().max() == 0 and yaw.abs().max() == 0 and torch.all(speed == 5.0)
    # Braking at -2 m/s^2 from 3 m/s for 1.5 s, then holding: stops at v^2 / 2a. Like the
    # release's, the integration does not clamp: braking on would reverse.
    brake = torch.cat([torch.full((15,), -2.0), torch.zeros(H - 15)])
    x, _, _, speed = integrate_unicycle(brake, torch.zeros(H), torch.tensor(3.0), dt)
    assert speed[14].abs() < 1e-6 and speed[13] > 0
    torch.testing.assert_close(x[-1], torch.tensor(3.0 ** 2 / (2 * 2.0)))
    _, _, _, speed = integrate_unicycle(torch.full((H,), -2.0), torch.zeros(H), torch.tensor(3.0), dt)
    assert speed[-1] < 0


def test_unicycle_constant_curvature_traces_a_circle():
    H, v, dt = 64, 4.0, 0.1
    kappa = (math.pi / 2) / (40 * v * dt)  # a quarter turn after exactly 40 steps (left turn)
    R = 1.0 / kappa
    curv = torch.full((2, H), kappa)
    x, y, yaw, speed = integrate_unicycle(torch.zeros(2, H), curv, torch.tensor([v, v]), dt)
    radius2 = x ** 2 + (y - R) ** 2  # the trapezoid rule's chords stay within a few mm of the circle
    torch.testing.assert_close(radius2, torch.full((2, H), R ** 2), atol=0.02 * R, rtol=0)
    torch.testing.assert_close(yaw[0], kappa * v * dt * torch.arange(1, H + 1))
    quarter = torch.stack([x[0, 39], y[0, 39]])
    torch.testing.assert_close(quarter, torch.tensor([R, R]), atol=0.02, rtol=0)
    assert torch.all(speed == v)


@pytest.mark.parametrize("tie", [False, True])
def test_save_load_round_trip(tmp_path, tie):
    torch.manual_seed(1)
    model = TargetVLA(tiny_config(tie_word_embeddings=tie)).eval()
    model.expert.action_space.fit(torch.randn(100, 2) * torch.tensor([2.0, 0.05]))
    model.save_pretrained(tmp_path)
    assert (tmp_path / "config.json").exists() and (tmp_path / "vlm" / "model.safetensors").exists()
    loaded = TargetVLA.from_pretrained(tmp_path).eval()
    assert loaded.cfg == model.cfg
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k
    if tie:
        assert loaded.decoder.lm_head.weight is loaded.decoder.embed_tokens.weight
    with torch.no_grad():
        ids, visual, pos, delta = prompt(model)
        a, _ = model.prefill(ids, visual, pos, model.new_cache())
        ids, visual, pos, delta = prompt(loaded)  # same images, encoded by the loaded model
        b, _ = loaded.prefill(ids, visual, pos, loaded.new_cache())
    torch.testing.assert_close(a, b, atol=0, rtol=0)
