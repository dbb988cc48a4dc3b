"""The target's Qwen3-VL part against transformers 5.x on a tiny random model written by
`save_pretrained`: image preprocessing, vision and deepstack features, and logits with pixel
inputs for prefill, decode and verify after a rollback."""
import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
from transformers import Qwen2VLImageProcessor, Qwen3VLConfig, Qwen3VLForConditionalGeneration  # noqa: E402

from chain_spec_ros.models.checkpoint import load_target  # noqa: E402
from chain_spec_ros.models.hf_format import preprocessor_config  # noqa: E402
from chain_spec_ros.models.rope import mrope_position_ids  # noqa: E402
from chain_spec_ros.models.vision import patchify  # noqa: E402

TOL = dict(atol=1e-4, rtol=0)
HEIGHT, WIDTH = 64, 96  # 4 x 6 patches of 16 -> 2 x 3 merged tokens
IMAGE, START, END = 5, 7, 8  # image pad, vision start / end ids


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    torch.manual_seed(0)
    text = dict(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16,
                rope_parameters=dict(rope_type="default", rope_theta=5e6, mrope_section=[4, 2, 2], mrope_interleaved=True))
    vision = dict(depth=3, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=64,
                  num_position_embeddings=36, deepstack_visual_indexes=[0, 1])
    cfg = Qwen3VLConfig(text_config=text, vision_config=vision, image_token_id=IMAGE, video_token_id=6,
                        vision_start_token_id=START, vision_end_token_id=END)
    hf = Qwen3VLForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # HF sets norms to one and biases to zero: randomise so mix-ups show
        for name, p in hf.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.uniform_(0.5, 1.5) if name.endswith("weight") else p.normal_(0, 0.1)
    directory = tmp_path_factory.mktemp("qwen3vl")
    hf.save_pretrained(directory)
    ours = load_target(directory, image_size=(HEIGHT, WIDTH)).eval()
    return hf, ours


def frames(n: int) -> np.ndarray:
    return np.random.default_rng(3).integers(0, 256, (n, HEIGHT, WIDTH, 3), dtype=np.uint8)


def test_preprocessing_equals_the_image_processor(models):
    _, ours = models
    bgr = frames(2)
    processor = Qwen2VLImageProcessor(**{k: v for k, v in preprocessor_config(ours.cfg.vision).items()
                                         if k != "image_processor_type"})
    out = processor(images=[image[..., ::-1].copy() for image in bgr], return_tensors="pt")
    assert out["image_grid_thw"].tolist() == [[1, 4, 6]] * 2
    patches = patchify(torch.from_numpy(bgr), ours.cfg.vision)
    torch.testing.assert_close(patches.reshape(-1, patches.shape[-1]), out["pixel_values"], atol=1e-5, rtol=0)


@torch.no_grad()
def test_vision_and_deepstack_features(models):
    hf, ours = models
    images = torch.from_numpy(frames(2))
    patches = patchify(images, ours.cfg.vision)
    grid = torch.tensor([[1, 4, 6]] * 2)
    reference = hf.model.visual(patches.reshape(-1, patches.shape[-1]), grid_thw=grid)
    features = ours.encode_images(images)
    torch.testing.assert_close(features.embeds.reshape(-1, 64), reference.pooler_output, **TOL)
    assert features.deepstack.shape[0] == 2
    for ours_layer, theirs in zip(features.deepstack, reference.deepstack_features):
        torch.testing.assert_close(ours_layer.reshape(-1, 64), theirs, **TOL)


def prompt_ids() -> tuple[torch.Tensor, list]:
    """text 4, image (2 x 3), text 3, image (2 x 3), text 4 (vision start/end tokens are text)."""
    ids = [1, 2, 3, START] + [IMAGE] * 6 + [END, 9, START] + [IMAGE] * 6 + [END, 10, 11, 12]
    segments = [("text", 4), ("image", 1, 2, 3), ("text", 3), ("image", 1, 2, 3), ("text", 4)]
    return torch.tensor([ids]), segments


@torch.no_grad()
def test_logits_prefill_decode_and_verify_after_rollback(models):
    hf, ours = models
    images = torch.from_numpy(frames(2))
    patches = patchify(images, ours.cfg.vision)
    ids, segments = prompt_ids()
    continuation = torch.randint(12, 64, (1, 9), generator=torch.Generator().manual_seed(2))
    full = torch.cat([ids, continuation], dim=1)
    reference = hf(input_ids=full, pixel_values=patches.reshape(-1, patches.shape[-1]),
                   image_grid_thw=torch.tensor([[1, 4, 6]] * 2), mm_token_type_ids=(full == IMAGE).long()).logits
    positions, delta = mrope_position_ids(segments)
    P = ids.shape[1]
    cache = ours.new_cache(1, 64)
    logits, _ = ours.prefill(ids, ours.encode_images(images), positions, cache)
    torch.testing.assert_close(logits, reference[:, :P], **TOL)
    step, _ = ours.decode(continuation[:, :1], cache, delta)  # one decode step
    torch.testing.assert_close(step, reference[:, P:P + 1], **TOL)
    wrong = continuation[:, 1:5].flip(1)  # a verify pass whose drafts are then rejected
    ours.decode(wrong, cache, delta)
    cache.crop(P + 1)
    verify, _ = ours.decode(continuation[:, 1:], cache, delta)
    torch.testing.assert_close(verify, reference[:, P + 1:], **TOL)
