"""Our Decoder loaded with a tiny random transformers Qwen3-VL's weights reproduces its logits."""
import pytest
import torch

pytest.importorskip("transformers")
from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration  # noqa: E402

from chain_spec_ros.models.config import DecoderConfig  # noqa: E402
from chain_spec_ros.models.decoder import Decoder, load_hf_text_weights  # noqa: E402
from chain_spec_ros.models.kv_cache import KVCache  # noqa: E402
from chain_spec_ros.models.rope import mrope_position_ids, text_position_ids  # noqa: E402

TOL = dict(atol=1e-4, rtol=0)
# 21 prompt tokens: text, a 2x3 image, text, a 3x2 image, text.
PROMPT = [("text", 3), ("image", 1, 2, 3), ("text", 4), ("image", 1, 3, 2), ("text", 2)]
N_NEW = 7


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    text = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6,
                rope_parameters=dict(rope_type="default", rope_theta=10000.0,
                                     mrope_section=[4, 2, 2]))
    vision = dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=64,
                  patch_size=4, spatial_merge_size=2, num_position_embeddings=16,
                  deepstack_visual_indexes=[0])
    cfg = Qwen3VLConfig(text_config=text, vision_config=vision)
    hf = Qwen3VLForConditionalGeneration(cfg).eval()
    # HF initialises norms to one; randomise them so a q_norm/k_norm mix-up cannot pass.
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    ours = Decoder(DecoderConfig.from_hf_text_config(hf.config.text_config)).eval()
    load_hf_text_weights(ours, hf.state_dict())
    return hf, ours


def sequence(batch: int = 2):
    """Prompt M-RoPE positions followed by N_NEW decoded text positions, and random token ids."""
    pos, delta = mrope_position_ids(PROMPT)
    P = pos.shape[1]
    new = text_position_ids(P, N_NEW, delta)[0].expand(3, -1)
    full = torch.cat([pos, new], dim=1)[:, None].expand(-1, batch, -1)
    ids = torch.randint(0, 128, (batch, P + N_NEW), generator=torch.Generator().manual_seed(1))
    return ids, full, P, delta


@torch.no_grad()
def hf_logits(hf, ids, pos, layer_out: dict | None = None):
    hooks = []
    if layer_out is not None:
        for i, layer in enumerate(hf.model.language_model.layers):
            hook = lambda module, args, out, i=i: layer_out.__setitem__(i, out)  # noqa: E731
            hooks.append(layer.register_forward_hook(hook))
    out = hf.model.language_model(input_ids=ids, position_ids=pos)
    for h in hooks:
        h.remove()
    return hf.lm_head(out.last_hidden_state)


def test_config_from_hf(models):
    hf, ours = models
    cfg = ours.cfg
    shape = (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim)
    assert shape == (2, 64, 4, 2, 16)
    assert cfg.mrope_section == [4, 2, 2] and cfg.rope_theta == 10000.0


@torch.no_grad()
def test_full_pass(models):
    hf, ours = models
    ids, pos, _, _ = sequence()
    layer_out: dict = {}
    ref = hf_logits(hf, ids, pos, layer_out)
    logits, hidden = ours(ours.embed(ids), pos, return_hidden_layers=[0, -1])
    torch.testing.assert_close(logits, ref, **TOL)
    torch.testing.assert_close(hidden[0], layer_out[0], **TOL)
    torch.testing.assert_close(hidden[1], layer_out[1], **TOL)
    assert (logits - ref).abs().max() < 1e-4 < logits.std()  # not trivially zero


@torch.no_grad()
def test_prefill_decode_and_verify_after_rollback(models):
    hf, ours = models
    ids, pos, P, delta = sequence()
    ref = hf_logits(hf, ids, pos)
    cache = KVCache.for_config(ours.cfg, batch_size=2, max_len=64)

    logits, _ = ours(ours.embed(ids[:, :P]), pos[:, :, :P], cache)
    torch.testing.assert_close(logits, ref[:, :P], **TOL)
    for j in range(P, P + N_NEW):  # one token at a time, text positions cache.length + delta
        step_pos = text_position_ids(cache.length, 1, delta).expand(2, -1)
        logits, _ = ours(ours.embed(ids[:, j:j + 1]), step_pos, cache)
        torch.testing.assert_close(logits[:, 0], ref[:, j], **TOL)
    assert cache.length == P + N_NEW

    # Roll back 5 tokens, write a wrong draft over the slots, roll back again, then verify the
    # true 4 tokens in one pass: stale cache entries must not leak into the result.
    start = P + 2
    cache.crop(start)
    verify_pos = text_position_ids(start, 4, delta).expand(2, -1)
    ours(ours.embed(torch.randint(0, 128, (2, 4))), verify_pos, cache)
    cache.crop(start)
    logits, _ = ours(ours.embed(ids[:, start:start + 4]), verify_pos, cache)
    torch.testing.assert_close(logits, ref[:, start:start + 4], **TOL)
    assert cache.length == start + 4


def test_tied_lm_head_when_missing(models):
    hf, _ = models
    state = {k: v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    ours = Decoder(DecoderConfig.from_hf_text_config(hf.config.text_config))
    load_hf_text_weights(ours, state)
    assert torch.equal(ours.lm_head.weight, ours.embed_tokens.weight)
    with pytest.raises(KeyError):
        load_hf_text_weights(ours, {k: v for k, v in state.items() if "layers.1.mlp" not in k})
