"""Alpamayo-R1's layout: our save/load round trip, transformers loading the VLM folder, the
release's single-file layout, the expert against a transformers Qwen3-VL text model on the same
cache, and clear refusals of malformed directories."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

pytest.importorskip("transformers")
from transformers import Qwen3VLForConditionalGeneration, Qwen3VLTextConfig, Qwen3VLTextModel  # noqa: E402
from transformers.cache_utils import DynamicCache  # noqa: E402

from chain_spec_ros.models.alpamayo import save_alpamayo  # noqa: E402
from chain_spec_ros.models.checkpoint import load_target  # noqa: E402
from chain_spec_ros.models.config import TargetConfig  # noqa: E402
from chain_spec_ros.models.hf_format import CheckpointError  # noqa: E402
from chain_spec_ros.models.rope import mrope_position_ids, text_position_ids  # noqa: E402
from chain_spec_ros.models.target import TargetVLA  # noqa: E402
from chain_spec_ros.replay.fixtures import to_release_layout  # noqa: E402

TOKEN_IDS = {"image_token_id": 4, "video_token_id": 4, "vision_start_token_id": 3, "vision_end_token_id": 5}
TOL = dict(atol=1e-4, rtol=0)


def randomised(model: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    model.expert.action_space.set_stats([0.1, 0.001], [0.7, 0.03])
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    model = randomised(TargetVLA(TargetConfig.tiny(vocab_size=96, image_pad_id=4))).eval()
    directory = tmp_path_factory.mktemp("alpamayo")
    save_alpamayo(model, directory, TOKEN_IDS, {"do_sample": True, "temperature": 0.6, "top_p": 0.98})
    return model, directory


def same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        torch.testing.assert_close(sa[key], sb[key], atol=0, rtol=0, msg=key)


def test_round_trip(saved):
    model, directory = saved
    same_state(model, load_target(directory))


def test_transformers_loads_the_vlm_folder_as_qwen3_vl(saved):
    model, directory = saved
    hf = Qwen3VLForConditionalGeneration.from_pretrained(directory / "vlm", output_loading_info=True)
    hf, info = hf
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    ids = torch.tensor([[1, 2, 3] + [4] * 8 + [5, 6, 7]])
    images = torch.randint(0, 256, (1, 64, 128, 3), dtype=torch.uint8)
    from chain_spec_ros.models.vision import patchify
    patches = patchify(images, model.cfg.vision)
    with torch.no_grad():
        reference = hf(input_ids=ids, pixel_values=patches[0], image_grid_thw=torch.tensor([[1, 4, 8]]),
                       mm_token_type_ids=(ids == 4).long()).logits
        positions, _ = mrope_position_ids([("text", 3), ("image", 1, 2, 4), ("text", 3)])
        ours, _ = model.prefill(ids, model.encode_images(images), positions, None)
    torch.testing.assert_close(ours, reference, **TOL)


def test_release_layout_in_one_file(saved, tmp_path):
    """The release keeps the VLM's tensors under `vlm.` beside the expert's, in shards."""
    model, directory = saved
    release = to_release_layout(shutil.copytree(directory, tmp_path / "release"))
    assert not (release / "vlm" / "model.safetensors").exists()
    same_state(model, load_target(release))


@torch.no_grad()
def test_expert_equals_a_transformers_text_model_on_the_same_cache(saved):
    model, directory = saved
    cfg = model.cfg
    ids = torch.randint(10, 96, (1, 20))
    positions, delta = mrope_position_ids([("text", 20)])
    cache = model.new_cache(1, 100)
    model.prefill(ids, None, positions, cache)
    vlm_text = json.loads((directory / "vlm" / "config.json").read_text())["text_config"]
    expert_cfg = json.loads((directory / "config.json").read_text())["expert_cfg"]
    hf = Qwen3VLTextModel(Qwen3VLTextConfig(**{**vlm_text, **expert_cfg})).eval()
    del hf.embed_tokens
    hf.load_state_dict({k[len("expert."):]: v for k, v in model.state_dict().items()
                        if k.startswith("expert.layers.") or k == "expert.norm.weight"})
    x_t, t = torch.randn(2, cfg.expert.horizon, 2), torch.tensor([0.3, 0.7])
    ours = model.expert(x_t, t, cache, delta)
    past = DynamicCache()
    for layer in range(cfg.decoder.num_layers):
        k, v = cache.get(layer)
        past.update(k.expand(2, -1, -1, -1).clone(), v.expand(2, -1, -1, -1).clone(), layer)
    H = cfg.expert.horizon
    pos = text_position_ids(cache.length, H, delta)[0]
    mask = torch.zeros(2, 1, H, cache.length + H)  # non-causal: every action token sees everything
    out = hf(inputs_embeds=model.expert.action_in_proj(x_t, t), position_ids=pos.expand(3, 2, H),
             attention_mask=mask, cache=past, use_cache=True)
    torch.testing.assert_close(ours, model.expert.action_out_proj(out.last_hidden_state), **TOL)


@pytest.mark.parametrize("breakage, message", [
    (lambda d: (d / "config.json").write_text(json.dumps({**json.loads((d / "config.json").read_text()),
                                                          "model_type": "llama"})), "model_type 'llama'"),
    (lambda d: (d / "config.json").write_text(json.dumps({**json.loads((d / "config.json").read_text()),
                                                          "vlm_name_or_path": "nvidia/Cosmos-Reason2-8B"})),
     "not a local Qwen3-VL folder"),
    (lambda d: (d / "config.json").write_text(json.dumps({**json.loads((d / "config.json").read_text()),
                                                          "expert_cfg": {"num_key_value_heads": 1}})),
     "expert_cfg.num_key_value_heads"),
    (lambda d: save_file({k: v for k, v in load_file(str(d / "model.safetensors")).items()
                          if k != "action_out_proj.weight"}, str(d / "model.safetensors")),
     "'action_out_proj.weight' missing"),
    (lambda d: save_file({**load_file(str(d / "model.safetensors")), "expert.extra.weight": torch.zeros(1)},
                         str(d / "model.safetensors")), "unexpected tensor 'expert.extra.weight'"),
    (lambda d: save_file({**load_file(str(d / "vlm" / "model.safetensors")),
                          "model.language_model.norm.weight": torch.ones(3)}, str(d / "vlm" / "model.safetensors")),
     "'vlm.model.language_model.norm.weight' has shape (3,)"),
    (lambda d: (d / "vlm" / "model.safetensors").unlink(), "neither model.safetensors"),
])
def test_malformed_directories_are_refused_by_name(saved, tmp_path, breakage, message):
    _, directory = saved
    broken = tmp_path / "broken"
    shutil.copytree(directory, broken)
    breakage(broken)
    with pytest.raises(CheckpointError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_target(broken)
