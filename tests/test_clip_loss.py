"""Load CLIP Loss Model (open_clip) inside real ComfyUI: a file from models/clip_loss into a named
open_clip architecture. A tiny architecture is registered with open_clip for the test (no weights
are downloaded); the same code path loads ViT-B-32. Skipped loudly without COMFYUI_PATH."""
from __future__ import annotations

import json

import pytest
import torch

from comfyui_disentangle.harness import call

TINY = {"embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}


@pytest.fixture(scope="module")
def clip_files(host, tmp_path_factory):
    open_clip = pytest.importorskip("open_clip", reason="open_clip_torch is not installed")
    import folder_paths
    from safetensors.torch import save_file
    configs = tmp_path_factory.mktemp("open_clip_configs")
    (configs / "DisentangleTiny.json").write_text(json.dumps(TINY))
    open_clip.add_model_config(configs / "DisentangleTiny.json")
    torch.manual_seed(0)
    model = open_clip.create_model("DisentangleTiny", pretrained=None)
    folder = tmp_path_factory.mktemp("clip_loss")
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "tiny_clip.safetensors"))
    save_file({"visual.proj": torch.zeros(3, 3)}, str(folder / "not_clip.safetensors"))
    (folder / "broken.safetensors").write_bytes(b"not a safetensors file")
    folder_paths.add_model_folder_path("clip_loss", str(folder), is_default=True)
    return state


def test_file_loads_into_the_named_architecture(clip_files):
    loss_model = call("DisentangleLoadClipLoss", clip_name="tiny_clip.safetensors", model_name="DisentangleTiny",
                      pretrained="openai")[0]
    loaded = loss_model.model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in clip_files.items())
    assert loss_model.image_size == 32
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        images = loss_model.encode_images(torch.rand(2, 48, 40, 3, generator=g))
        texts = loss_model.encode_texts(["a red cube", "a blue sphere"])
    assert images.shape == texts.shape == (2, 32)
    assert torch.allclose(images.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert not torch.allclose(texts[0], texts[1])


@pytest.mark.parametrize("clip_name, model_name, message", [
    ("not_clip.safetensors", "DisentangleTiny", "not_clip.safetensors is not an open_clip DisentangleTiny state dict"),
    ("broken.safetensors", "DisentangleTiny", "broken.safetensors is not a readable safetensors file"),
    ("tiny_clip.safetensors", "No-Such-Arch", "open_clip has no architecture 'No-Such-Arch'"),
    ("tiny_clip.safetensors", "ViT-B-32", "not an open_clip ViT-B-32 state dict"),
])
def test_wrong_files_and_names_give_clear_errors(clip_files, clip_name, model_name, message):
    with pytest.raises(ValueError, match=message):
        call("DisentangleLoadClipLoss", clip_name=clip_name, model_name=model_name, pretrained="openai")


def test_cache_failure_explains_the_offline_route(clip_files, monkeypatch):
    import open_clip
    from comfyui_disentangle.harness import pack_module
    node = pack_module("nodes.clip_loss")

    def offline(*args, **kwargs):
        raise RuntimeError("no internet")
    monkeypatch.setattr(open_clip, "create_model", offline)
    with pytest.raises(ValueError, match="put the weights as safetensors in models/clip_loss"):
        call("DisentangleLoadClipLoss", clip_name=node.OPEN_CLIP_CACHE, model_name="ViT-B-32", pretrained="openai")


def test_loaded_model_drives_the_optimisation(clip_files):
    """The file-loaded model is a CLIP_LOSS_MODEL the λ optimisation accepts and uses."""
    import nodes
    model, clip, vae = call("DisentangleLoadToyWorld", checkpoint="toy_world")
    loss_model = call("DisentangleLoadClipLoss", clip_name="tiny_clip.safetensors", model_name="DisentangleTiny",
                      pretrained="openai")[0]
    node = nodes.NODE_CLASS_MAPPINGS["DisentangleOptimizeLambda"]()
    with torch.inference_mode():
        out = node.optimize(model=model, vae=vae, clip=clip, clip_loss_model=loss_model,
                            neutral_text="a large red cube on a green floor in front of a blue wall",
                            styled_text="a large blue cube on a green floor in front of a blue wall", negative_text="",
                            seed=1, steps=6, cfg=5.0, iterations=2, learning_rate=0.1, beta=0.05, neutral_steps=2,
                            styled_weight=1.0, width=128, height=128)
    losses = [float(v) for v in out["ui"]["text"][0].split(": ")[1].split(", ")]
    assert len(losses) == 2 and all(0.0 <= v <= 2.5 for v in losses)
