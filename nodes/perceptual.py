"""Load Perceptual Loss (LPIPS): the content term of Wu et al.'s λ optimisation, VGG-16 LPIPS
(Zhang et al. 2018) through the ``lpips`` package.

``lpips`` ships its linear calibration layers; the VGG-16 backbone comes from torchvision, which
downloads it. Offline, put the backbone in ``models/lpips`` as safetensors (a torchvision
``vgg16`` state dict: its ``features.*`` keys are used).
"""
from __future__ import annotations

import os

import folder_paths
import torch

from .common import CATEGORY, InputError, load_safetensors

LPIPS_FOLDER = "lpips"
TORCHVISION_CACHE = "torchvision cache (downloads if missing)"
VGG_SLICES = ((0, 4), (4, 9), (9, 16), (16, 23), (23, 30))  # lpips' five VGG-16 feature slices


def vgg_features_to_lpips(state: dict) -> dict:
    """torchvision ``features.{i}.*`` keys → lpips' ``slice{k}.{i}.*`` (k: the slice holding layer i)."""
    out = {}
    for key, value in state.items():
        if not key.startswith("features."):
            continue
        _, index, rest = key.split(".", 2)
        i = int(index)
        for k, (start, stop) in enumerate(VGG_SLICES, 1):
            if start <= i < stop:
                out[f"slice{k}.{i}.{rest}"] = value
    return out


class PerceptualModel:
    """An LPIPS network; ``distance`` takes IMAGE-layout tensors [B, H, W, 3] in [0, 1]."""

    def __init__(self, net: torch.nn.Module):
        self.net = net

    def distance(self, images: torch.Tensor, reference: torch.Tensor, per_item: bool = False) -> torch.Tensor:
        """LPIPS(images, reference): the batch mean, or one value per item."""
        a, b = (x.movedim(-1, 1) * 2 - 1 for x in (images, reference))
        d = self.net(a, b).flatten(1).mean(1)
        return d if per_item else d.mean()


def torchvision_vgg16_cached() -> bool:
    """Whether torchvision's own cache holds its VGG-16 weights (what lpips would otherwise download)."""
    from torchvision.models import VGG16_Weights
    name = os.path.basename(VGG16_Weights.IMAGENET1K_V1.url)
    return os.path.isfile(os.path.join(torch.hub.get_dir(), "checkpoints", name))


def load_lpips(weights_path: str | None, shown: str | None = None) -> PerceptualModel:
    try:
        import lpips  # optional: only the λ optimisation needs it
    except ImportError as e:
        raise InputError("the perceptual loss needs the lpips package: pip install lpips") from e
    if weights_path is not None:  # the file is checked before the network is built
        shown = shown or os.path.basename(weights_path)
        tensors, _ = load_safetensors(weights_path, shown, "vgg_weights")
    elif not torchvision_vgg16_cached():
        raise InputError(f"vgg_weights: VGG-16 weights are not in torchvision's cache, and this node never downloads; "
                         f"put a vgg16 state dict as safetensors in models/{LPIPS_FOLDER}")
    try:
        net = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=weights_path is not None, verbose=False)
    except Exception as e:  # torchvision could not fetch the backbone
        raise InputError(f"vgg_weights: torchvision could not build VGG-16 ({type(e).__name__}); "
                         f"put a vgg16 state dict as safetensors in models/{LPIPS_FOLDER}") from e
    if weights_path is not None:
        try:
            mapped = vgg_features_to_lpips(tensors)
            missing, _ = net.net.load_state_dict(mapped, strict=False)
        except (ValueError, RuntimeError):  # a features.<not a number> key, or shapes of another network
            missing = ["features.*"]
        if missing:
            raise InputError(f"vgg_weights: {shown} is not a VGG-16 state dict (missing {missing[:3]})")
    return PerceptualModel(net.eval())


class LoadPerceptualLoss:
    DESCRIPTION = "LPIPS-VGG, the perceptual (content-preservation) term of the λ optimisation."
    CATEGORY = f"{CATEGORY}/lambda"
    RETURN_TYPES = ("PERCEPTUAL_MODEL",)
    OUTPUT_TOOLTIPS = ("LPIPS-VGG, the content term weighted by β in Optimize λ Schedule (its perceptual_model input).",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        files = folder_paths.get_filename_list(LPIPS_FOLDER)
        return {"required": {"vgg_weights": (files + [TORCHVISION_CACHE], {
            "tooltip": f"A torchvision vgg16 state dict (safetensors) in models/{LPIPS_FOLDER}, or torchvision's own cache "
                       "when it already holds VGG-16 (this node never downloads, whatever the label says)."})}}

    def load(self, vgg_weights):
        path = None if vgg_weights == TORCHVISION_CACHE else folder_paths.get_full_path_or_raise(LPIPS_FOLDER, vgg_weights)
        return (load_lpips(path, vgg_weights),)


NODE_CLASS_MAPPINGS = {"DisentangleLoadPerceptualLoss": LoadPerceptualLoss}
NODE_DISPLAY_NAME_MAPPINGS = {"DisentangleLoadPerceptualLoss": "Load Perceptual Loss (LPIPS)"}
