"""Load CLIP Loss Model: the image/text model of Wu et al.'s directional CLIP loss, through open_clip.

The paper uses OpenAI's ViT-B/32. Weights come from a safetensors file in ``models/clip_loss``
(an open_clip state dict, e.g. ``open_clip_model.safetensors`` of an open_clip repository on the
Hugging Face hub; OpenAI's weights need ``model_name`` ViT-B-32-quickgelu), or from open_clip's own
cache when that already holds the weights of one of open_clip's own pretrained tags as safetensors. The
node never downloads and never reads a path given in a prompt (every input can come from an HTTP
prompt): ``pretrained`` must be one of open_clip's tags for the architecture. open_clip is imported
only when a node runs.
"""
from __future__ import annotations

import os

import folder_paths
import torch
import torch.nn.functional as F

from .common import CATEGORY, InputError, load_safetensors

CLIP_LOSS_FOLDER = "clip_loss"
OPEN_CLIP_CACHE = "open_clip cache (downloads if missing)"  # label kept for saved workflows; it never downloads
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


class ClipLossModel:
    """An open_clip model with its tokenizer and input normalisation (type CLIP_LOSS_MODEL)."""

    def __init__(self, model, tokenizer, image_size: int, mean, std):
        self.model, self.tokenizer, self.image_size, self.mean, self.std = model, tokenizer, image_size, mean, std

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Unit-norm embeddings of IMAGE-layout tensors [B, H, W, 3] in [0, 1]."""
        x = images.movedim(-1, 1)
        x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", antialias=True)
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        return F.normalize(self.model.encode_image((x - mean) / std), dim=-1)

    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(texts).to(next(self.model.parameters()).device)  # the tokenizer makes CPU tensors
        return F.normalize(self.model.encode_text(tokens), dim=-1)


def import_open_clip():
    try:
        import open_clip  # optional: only the λ-optimisation losses need it
    except ImportError as e:
        raise InputError("the CLIP loss model needs the open_clip_torch package: pip install open_clip_torch ftfy") from e
    return open_clip


def wrap_open_clip(model, model_name: str) -> ClipLossModel:
    """A ClipLossModel of an open_clip model, with its own image size and normalisation."""
    open_clip = import_open_clip()
    cfg = open_clip.get_model_preprocess_cfg(model) if hasattr(open_clip, "get_model_preprocess_cfg") else {}
    size = cfg.get("size", 224)
    size = size[0] if isinstance(size, (tuple, list)) else int(size)
    return ClipLossModel(model.eval(), open_clip.get_tokenizer(model_name), size,
                         tuple(cfg.get("mean", OPENAI_MEAN)), tuple(cfg.get("std", OPENAI_STD)))


def open_clip_architecture(model_name: str, quick_gelu: bool = False):
    """An open_clip model of architecture ``model_name`` with random weights (to load a file into)."""
    open_clip = import_open_clip()
    if model_name not in open_clip.list_models():
        raise InputError(f"model_name: open_clip has no architecture {model_name[:60]!r} "
                         f"(e.g. ViT-B-32, ViT-B-32-quickgelu, ViT-L-14)")
    return open_clip.create_model(model_name, pretrained=None, force_quick_gelu=quick_gelu)


def load_open_clip_file(path: str, model_name: str, shown: str | None = None, quick_gelu: bool = False) -> ClipLossModel:
    """An open_clip state dict from a safetensors file, into the architecture ``model_name``."""
    shown = shown or os.path.basename(path)
    state, _ = load_safetensors(path, shown)
    model = open_clip_architecture(model_name, quick_gelu)
    wrong = f"{shown} is not an open_clip {model_name} state dict"
    try:
        missing, unexpected = model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    except RuntimeError as e:  # shapes of another architecture
        raise InputError(f"{wrong} ({(str(e).splitlines()[1:] or [str(e)])[0].strip()[:160]} ...); pick the model_name it was made for") from None
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise InputError(f"{wrong} (missing {missing[:3]}, unexpected {unexpected[:3]}); pick the model_name it was made for")
    return wrap_open_clip(model, model_name)


def cached_pretrained_file(model_name: str, tag: str) -> str | None:
    """The safetensors file open_clip's cache (the Hugging Face hub cache) already holds for an open_clip
    pretrained tag, or None; looks only, never downloads."""
    open_clip = import_open_clip()
    hub = open_clip.get_pretrained_cfg(model_name, tag).get("hf_hub", "")
    if not hub:
        return None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    repo, filename = os.path.split(hub)
    names = [filename[:-4] + ".safetensors"] if filename.endswith((".bin", ".pth")) else [filename] if filename else []
    for name in names + ["open_clip_model.safetensors", "open_clip_pytorch_model.safetensors"]:
        found = try_to_load_from_cache(repo, name)
        if isinstance(found, str) and found.endswith(".safetensors") and os.path.isfile(found):
            return found
    return None


def load_open_clip_pretrained(model_name: str, pretrained: str) -> ClipLossModel:
    """open_clip's pretrained weights for one of its own tags, from its cache only (never a download)."""
    open_clip = import_open_clip()
    if model_name not in open_clip.list_models():
        raise InputError(f"model_name: open_clip has no architecture {model_name!r}")
    tags = open_clip.list_pretrained_tags_by_model(model_name)
    if pretrained not in tags:
        listed = ", ".join(tags[:8]) + (", ..." if len(tags) > 8 else "") if tags else "none"
        raise InputError(f"pretrained: not one of open_clip's pretrained tags for {model_name} ({listed}); never a "
                         "path or a hub address")
    path = cached_pretrained_file(model_name, pretrained)
    if path is None:
        raise InputError(f"pretrained: open_clip's cache holds no safetensors weights for {model_name} / {pretrained}, and "
                         f"this node never downloads: put the weights as safetensors in models/{CLIP_LOSS_FOLDER} "
                         "and pick that file")
    quick_gelu = bool(open_clip.get_pretrained_cfg(model_name, pretrained).get("quick_gelu", False))
    return load_open_clip_file(path, model_name, f"open_clip's {model_name} / {pretrained}", quick_gelu)


class LoadClipLossModel:
    DESCRIPTION = ("The image/text model of the directional CLIP loss (Wu et al. use OpenAI's ViT-B/32), "
                   "through open_clip: a safetensors file in models/clip_loss or open_clip's own cache.")
    CATEGORY = f"{CATEGORY}/lambda"
    RETURN_TYPES = ("CLIP_LOSS_MODEL",)
    OUTPUT_TOOLTIPS = ("E_I / E_T of the directional CLIP loss, for Optimize λ Schedule's clip_loss_model.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        files = folder_paths.get_filename_list(CLIP_LOSS_FOLDER)
        return {"required": {
            "clip_name": (files + [OPEN_CLIP_CACHE], {
                "tooltip": f"An open_clip state dict (safetensors) in models/{CLIP_LOSS_FOLDER}, or open_clip's cache."}),
            "model_name": ("STRING", {"default": "ViT-B-32", "tooltip": (
                "open_clip architecture of the weights: ViT-B-32 for LAION weights, ViT-B-32-quickgelu for OpenAI's "
                "weights in a file.")}),
            "pretrained": ("STRING", {"default": "openai", "tooltip": (
                "One of open_clip's own pretrained tags for model_name (e.g. openai, laion2b_s34b_b79k), used only with "
                "the cache, and only when the cache already holds its safetensors weights: never a path, never a download.")}),
        }}

    def load(self, clip_name, model_name, pretrained):
        if clip_name == OPEN_CLIP_CACHE:
            return (load_open_clip_pretrained(str(model_name).strip(), str(pretrained).strip()),)
        path = folder_paths.get_full_path_or_raise(CLIP_LOSS_FOLDER, clip_name)
        return (load_open_clip_file(path, str(model_name).strip(), clip_name),)


NODE_CLASS_MAPPINGS = {"DisentangleLoadClipLoss": LoadClipLossModel}
NODE_DISPLAY_NAME_MAPPINGS = {"DisentangleLoadClipLoss": "Load CLIP Loss Model (open_clip)"}
