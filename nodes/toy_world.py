"""Load Toy World Checkpoint: the pack's own small text-to-image model as MODEL, CLIP and VAE.

The toy world (toy_world/factor_world.py) lets every method run offline and be judged against ground
truth. Its model is made of ComfyUI's own SD1 classes at small width, so every stock node works on
it. ComfyUI's checkpoint detection only knows full-size architectures, so the configs travel in
each file's safetensors metadata; loading then follows the tail of ComfyUI's own loaders
(``comfy.sd.load_diffusion_model_state_dict``, ``comfy.sd.VAE``, ``comfy.sd.CLIP.load_sd``):
same model classes, dtype choice, ModelPatcher and device management as a user's checkpoint.
"""
from __future__ import annotations

import json
import os

import comfy.model_management as mm
import comfy.model_patcher
import comfy.sd
import comfy.sd1_clip
import comfy.supported_models
import comfy.supported_models_base
import comfy.utils
import folder_paths

import torch

from ..toy_world import factor_world as fw
from .clip_loss import OPENAI_MEAN, OPENAI_STD, ClipLossModel, import_open_clip
from .common import (CATEGORY, PACK_WEIGHTS, InputError, check_config_fits_file, check_int, core_input_errors,
                     json_metadata, load_safetensors, read_safetensors_header, shipped_first, short)
# PACK_WEIGHTS is re-exported: nodes/__init__.py registers it for the toy world and the DisDiff folders

TOY_WORLD_FOLDER = "toy_world"
FORMAT = "comfyui-disentangle/toy-world"
PARTS = {"unet": "unet_config", "vae": "vae_config", "text_encoder": "text_config"}


def read_part(path: str, config_key: str, shown: str | None = None):
    """(state dict, config, metadata) of one toy-world file, with clear errors naming the file (by its name,
    never its server path) for truncated, foreign or crafted files."""
    shown = shown or os.path.basename(path)
    header = read_safetensors_header(path, shown)
    try:
        fmt = json.loads(header.metadata.get("format", "null"))
    except (ValueError, RecursionError):
        fmt = None
    if fmt != FORMAT or config_key not in header.metadata:
        raise InputError(f"{shown} is not a toy-world file with a {config_key!r} (format {FORMAT})")
    config = json_metadata(header, config_key, shown)
    builder = CONFIG_BUILDERS.get(config_key)
    if builder is not None:
        check_config_fits_file(lambda: builder(config), header, shown)
    sd, metadata = load_safetensors(path, shown, header=header)
    return sd, config, metadata


def load_unet(sd: dict, unet_config: dict):
    model_config = comfy.supported_models.SD15(dict(unet_config))
    model_config.unet_config.update(unet_config)  # SD15's extra config would reset the head layout
    load_device = mm.get_torch_device()
    params = comfy.utils.calculate_parameters(sd)
    unet_dtype = mm.unet_dtype(model_params=params, supported_dtypes=model_config.supported_inference_dtypes)
    manual_cast = mm.unet_manual_cast(unet_dtype, load_device, model_config.supported_inference_dtypes)
    model_config.set_inference_dtype(unet_dtype, manual_cast)
    model = model_config.get_model(sd, "")
    model.load_model_weights(sd, "")
    return comfy.model_patcher.ModelPatcher(model, load_device=load_device, offload_device=mm.unet_offload_device())


def load_vae(sd: dict, vae_config: dict, metadata: dict):
    return comfy.sd.VAE(sd=sd, config={"params": vae_config}, metadata=metadata)


def load_text_encoder(sd: dict, text_config: dict):
    target = comfy.supported_models_base.ClipTarget(comfy.sd1_clip.SD1Tokenizer, comfy.sd1_clip.SD1ClipModel)
    clip = comfy.sd.CLIP(target, embedding_directory=folder_paths.get_folder_paths("embeddings"),
                         parameters=comfy.utils.calculate_parameters(sd),
                         model_options={"clip_l_model_config": dict(text_config)})
    missing, unexpected = clip.load_sd(sd)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise InputError(f"text encoder weights do not fit its config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return clip


def _unet_module(unet_config: dict):
    model_config = comfy.supported_models.SD15(dict(unet_config))
    model_config.unet_config.update(unet_config)
    model_config.set_inference_dtype(torch.float32, None)
    return model_config.get_model({}, "")


def _vae_module(vae_config: dict):
    from comfy.ldm.models.autoencoder import AutoencoderKL
    return AutoencoderKL(**vae_config)


def _text_module(text_config: dict):
    return comfy.sd1_clip.SD1ClipModel(model_options={"clip_l_model_config": dict(text_config)})


def _open_clip_module(config: dict):
    return import_open_clip().CLIP(**config)


CONFIG_BUILDERS = {"unet_config": _unet_module, "vae_config": _vae_module, "text_config": _text_module,
                   "open_clip_config": _open_clip_module}


def toy_world_files() -> list[str]:
    return sorted({n[: -len("_unet.safetensors")] for n in folder_paths.get_filename_list(TOY_WORLD_FOLDER)
                   if n.endswith("_unet.safetensors")})


def load_toy_world(name: str):
    """(MODEL, CLIP, VAE) of the toy world ``name`` (files ``<name>_unet/_vae/_text_encoder.safetensors``)."""
    parts = {}
    for part, key in PARTS.items():
        filename = f"{name}_{part}.safetensors"
        try:
            path = shipped_first(TOY_WORLD_FOLDER, filename)
        except FileNotFoundError:
            raise InputError(f"checkpoint: {filename} is missing from models/{TOY_WORLD_FOLDER} and the pack's weights/") from None
        parts[part] = read_part(path, key, filename)
    try:
        model = load_unet(*parts["unet"][:2])
        vae = load_vae(*parts["vae"])
        clip = load_text_encoder(*parts["text_encoder"][:2])
    except (TypeError, ValueError, KeyError, RuntimeError) as e:
        if isinstance(e, InputError):
            raise
        raise InputError(f"checkpoint: the {name} files do not load as a toy world ({type(e).__name__}: "
                         f"{str(e)[:120]})") from None
    return model, clip, vae


def scene_latents(vae, model, factors: torch.Tensor, batch: int = 1024) -> torch.Tensor:
    """Model-space latents of the scenes of ``factors`` (rendered at 128 px, the toy model's size),
    encoded by the toy world's VAE: the training data of DisDiff (scripts/train_disdiff.py)."""
    out = []
    for i in range(0, len(factors), batch):
        images = fw.render_at(factors[i:i + batch], 128).movedim(1, -1).contiguous()
        out.append(vae.encode(images).float().cpu())
    return model.model.process_latent_in(torch.cat(out))


class LoadToyWorldCheckpoint:
    DESCRIPTION = (
        "The pack's own small text-to-image model of the factor world (one object on a floor in front of "
        "a wall; prompts like 'a large red cylinder on a green floor in front of a blue wall'). Runs "
        "offline on a CPU in seconds; use 128×128 latents (EmptyLatentImage 128×128)."
    )
    CATEGORY = f"{CATEGORY}/toy world"
    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    OUTPUT_TOOLTIPS = (
        "The toy world's text-to-image UNet (ComfyUI's SD1 classes, ε prediction); works at 128×128 pixels.",
        "Its text encoder (ComfyUI's SD1 tokenizer): prompts like 'a large red cube on a green floor in front of a blue wall'.",
        "Its 8× KL autoencoder (4-channel latents, as SD1's).",
    )
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"checkpoint": (toy_world_files(), {"tooltip": f"Toy worlds in the pack's weights/ or models/{TOY_WORLD_FOLDER}."})}}

    def load(self, checkpoint):
        return load_toy_world(checkpoint)


class FactorWorldScene:
    DESCRIPTION = (
        "Renders one factor-world scene with known factors, and its full caption: a real image with "
        "ground truth, for inversion and editing experiments with the toy world."
    )
    CATEGORY = f"{CATEGORY}/toy world"
    RETURN_TYPES = ("IMAGE", "STRING")
    RETURN_NAMES = ("image", "caption")
    OUTPUT_TOOLTIPS = ("The rendered scene (IMAGE, size × size).",
                       "Its full caption in the toy world's words, e.g. for CLIP Text Encode.")
    FUNCTION = "render"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "floor_hue": (list(fw.HUE_NAMES), {"default": "green", "tooltip": "Factor 1 of 6: the floor's colour (10 values)."}),
            "wall_hue": (list(fw.HUE_NAMES), {"default": "blue", "tooltip": "Factor 2 of 6: the wall's colour (10 values)."}),
            "object_hue": (list(fw.HUE_NAMES), {"default": "red", "tooltip": "Factor 3 of 6: the object's colour (10 values)."}),
            "scale": (list(fw.SCALE_WORDS), {"default": "large", "tooltip": "Factor 4 of 6: the object's size (8 values)."}),
            "shape": (list(fw.SHAPE_NAMES), {"default": "cube", "tooltip": "Factor 5 of 6: the object's shape (4 values)."}),
            "orientation": (list(fw.ORIENTATION_WORDS), {"default": "facing front", "tooltip": "Factor 6 of 6: how far the object is turned (15 values)."}),
            "size": ("INT", {"default": 128, "min": 64, "max": 1024, "step": 64,
                             "tooltip": "Output side in pixels (nearest upscaling of the 64×64 render); the toy world model works at 128."}),
        }}

    def render(self, floor_hue, wall_hue, object_hue, scale, shape, orientation, size):
        size = check_int("size", size, 64, 1024)  # a linked INT skips the widget's limits
        names = (fw.HUE_NAMES, fw.HUE_NAMES, fw.HUE_NAMES, fw.SCALE_WORDS, fw.SHAPE_NAMES, fw.ORIENTATION_WORDS)
        values = (floor_hue, wall_hue, object_hue, scale, shape, orientation)
        for name, allowed, value in zip(fw.FACTOR_NAMES, names, values):   # a linked combo skips ComfyUI's check
            if value not in allowed:
                raise InputError(f"{name}: unknown value {short(value)}, expected one of {', '.join(allowed)}")
        factors = torch.tensor([[list(n).index(v) for n, v in zip(names, values)]])
        with core_input_errors("size"):
            image = fw.render_at(factors, size)
        return (image.permute(0, 2, 3, 1).contiguous(), fw.full_caption(factors[0]))


def load_clip_loss_model(path: str) -> ClipLossModel:
    """The toy open_clip model from a safetensors file whose metadata holds its open_clip config."""
    open_clip = import_open_clip()
    shown = os.path.basename(path)
    sd, config, _ = read_part(path, "open_clip_config")
    try:
        model = open_clip.CLIP(**config)
        model.load_state_dict({k: v.float() for k, v in sd.items()})
        image_size = int(config["vision_cfg"]["image_size"])
    except (TypeError, ValueError, KeyError, RuntimeError) as e:
        raise InputError(f"{shown} does not load as the toy CLIP loss model ({type(e).__name__})") from None
    return ClipLossModel(model.eval(), open_clip.get_tokenizer("ViT-B-32"), image_size,
                         OPENAI_MEAN, OPENAI_STD)


class LoadToyClipLossModel:
    DESCRIPTION = "The toy world's small open_clip model (image and text towers) for the directional CLIP loss."
    CATEGORY = f"{CATEGORY}/toy world"
    RETURN_TYPES = ("CLIP_LOSS_MODEL",)
    OUTPUT_TOOLTIPS = ("E_I / E_T of the directional CLIP loss on the toy world, for Optimize λ Schedule.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        names = [n for n in folder_paths.get_filename_list(TOY_WORLD_FOLDER) if n.endswith("_clip.safetensors")]
        return {"required": {"clip_name": (names, {"tooltip": f"The toy CLIP model (*_clip.safetensors) in the pack's weights/ or models/{TOY_WORLD_FOLDER}."})}}

    def load(self, clip_name):
        return (load_clip_loss_model(shipped_first(TOY_WORLD_FOLDER, clip_name)),)


NODE_CLASS_MAPPINGS = {
    "DisentangleLoadToyWorld": LoadToyWorldCheckpoint,
    "DisentangleFactorWorldScene": FactorWorldScene,
    "DisentangleLoadToyClipLoss": LoadToyClipLossModel,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "DisentangleLoadToyWorld": "Load Toy World Checkpoint",
    "DisentangleFactorWorldScene": "Factor World Scene",
    "DisentangleLoadToyClipLoss": "Load Toy CLIP Loss Model",
}
