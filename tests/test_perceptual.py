"""Load Perceptual Loss (LPIPS) and its use by Optimize λ Schedule, inside real ComfyUI. The VGG-16
backbone is a random torchvision vgg16 written as safetensors (no download). Skipped loudly without
COMFYUI_PATH; skipped if lpips is not installed."""
from __future__ import annotations

import pytest
import torch

from comfyui_disentangle.harness import call


@pytest.fixture(scope="module")
def vgg_file(host, tmp_path_factory):
    pytest.importorskip("lpips", reason="lpips is not installed")
    import folder_paths
    import torchvision
    from safetensors.torch import save_file
    folder = tmp_path_factory.mktemp("lpips")
    torch.manual_seed(0)
    state = {k: v.contiguous() for k, v in torchvision.models.vgg16(weights=None).state_dict().items()}
    save_file(state, str(folder / "vgg16_random.safetensors"))
    save_file({"classifier.0.weight": torch.zeros(2, 2)}, str(folder / "not_vgg.safetensors"))
    folder_paths.add_model_folder_path("lpips", str(folder), is_default=True)
    return state


def test_loader_maps_the_vgg_backbone_and_measures_distance(vgg_file):
    model = call("DisentangleLoadPerceptualLoss", vgg_weights="vgg16_random.safetensors")[0]
    assert torch.equal(model.net.net.slice3._modules["10"].weight,
                       vgg_file["features.10.weight"])
    assert torch.equal(model.net.net.slice5._modules["28"].bias, vgg_file["features.28.bias"])
    g = torch.Generator().manual_seed(1)
    a, b = torch.rand(2, 64, 64, 3, generator=g), torch.rand(2, 64, 64, 3, generator=g)
    with torch.no_grad():
        assert float(model.distance(a, a)) == pytest.approx(0.0, abs=1e-6)
        assert float(model.distance(a, b)) > 0


def test_loader_rejects_a_file_that_is_not_vgg(vgg_file):
    with pytest.raises(ValueError, match="not_vgg.safetensors is not a VGG-16 state dict"):
        call("DisentangleLoadPerceptualLoss", vgg_weights="not_vgg.safetensors")


def test_optimisation_uses_lpips_when_given(vgg_file):
    pytest.importorskip("open_clip", reason="open_clip_torch is not installed")
    import nodes
    model, clip, vae = call("DisentangleLoadToyWorld", checkpoint="toy_world")
    loss_model = call("DisentangleLoadToyClipLoss", clip_name="toy_world_clip.safetensors")[0]
    perceptual = call("DisentangleLoadPerceptualLoss", vgg_weights="vgg16_random.safetensors")[0]
    node = nodes.NODE_CLASS_MAPPINGS["DisentangleOptimizeLambda"]()
    inputs = dict(model=model, vae=vae, clip=clip, clip_loss_model=loss_model,
                  neutral_text="a large red cube on a green floor in front of a blue wall",
                  styled_text="a large yellow cube on a green floor in front of a blue wall", negative_text="", seed=3,
                  steps=10, cfg=5.0, iterations=2, learning_rate=0.1, beta=1.0, neutral_steps=4, styled_weight=1.0,
                  width=128, height=128)
    with torch.inference_mode():
        with_lpips = node.optimize(**inputs, perceptual_model=perceptual)["ui"]["text"][0]
        without = node.optimize(**inputs)["ui"]["text"][0]
        with pytest.raises(ValueError, match="perceptual_model: not a PERCEPTUAL_MODEL"):
            node.optimize(**inputs, perceptual_model="vgg")
    assert with_lpips != without  # same first-iteration direction term, another content term
