"""Tiny and random models for the headless host, built from ComfyUI's own classes with ONE
seeded random-weight initialiser (:func:`init_random_weights`; ComfyUI's ops skip torch's init).

Tiny models (built from ComfyUI's own classes, seeded random weights, built under
``torch.inference_mode()`` as a real loader node does inside the executor):

===========  ====================================================================================
UNet         ``openaimodel.UNetModel``: model_channels 32, channel_mult [1, 2], 1 res block per
             level, in/out channels 4. Cross-attention (1 transformer block) at ONE level plus the
             middle block: level 0 (full latent resolution) for sd1/sd1_v, like SD1/SD2; level 1
             (half resolution) for sdxl, like SDXL.
             sd1:   ``supported_models.SD15`` config, EPS, context_dim 48, conv proj in transformer.
             sd1_v: ``supported_models.SD20`` config, ``ModelType.V_PREDICTION``, context_dim 48,
                    linear proj in transformer.
             sdxl:  ``supported_models.SDXL`` config (``model_base.SDXL``), EPS, context_dim 96,
                    adm_in_channels 1600 (= pooled 64 + 6 x 256 size embeddings).
             All: 16 channels per attention head (2 heads at 32 ch, 4 at 64 ch).
CLIP         ``comfy.sd.CLIP`` around ComfyUI's own text-encoder classes and its own bundled CLIP
             BPE tokenizer; sizes shrunk through ``model_options["<name>_model_config"]``
             (vocab 49408 and 77 positions kept, so real prompts tokenize exactly as in SD):
             sd1:   ``sd1_clip.SD1ClipModel`` (clip_l): hidden 48, 3 layers, 4 heads, mlp 96.
             sd1_v: ``text_encoders.sd2_clip.SD2ClipModel`` (clip_h, penultimate layer): same sizes.
             sdxl:  ``sdxl_clip.SDXLClipModel``: clip_l hidden 32 (2 heads, mlp 64) + clip_g hidden
                    64 (4 heads, mlp 128, projection 64), 3 layers each -> cond [1, 77, 96],
                    pooled_output [1, 64].
             Text encoders run in ComfyUI's CPU default dtype (fp16 weights, fp32 compute).
VAE          ``comfy.sd.VAE`` with an ``AutoencoderKL`` config: ch 32, ch_mult [1, 1, 1, 1],
             1 res block, z_channels 4, embed_dim 4 -> downscale factor 8 (same as SD, so
             EmptyLatentImage / VAEEncode / VAEDecode sizes agree), 4 latent channels.
             Latent formats: SD15 (scale 0.18215) for sd1/sd1_v, SDXL (0.13025) for sdxl.
===========  ====================================================================================

Random full-size models for the benches (cost does not depend on the values): :func:`random_sd15`
(the SD1.5 UNet, ε-prediction), :func:`random_sdxl`, :func:`random_sd_vae`, :func:`random_sd1_clip`,
:func:`random_sdxl_clip` and :func:`conditioning`.
"""
from __future__ import annotations

import copy
import functools
import math

from .host import pack_module, start_host

KINDS = ("sd1", "sd1_v", "sdxl")

_MODEL_CACHE: dict = {}    # (kind, seed) -> (MODEL, CLIP, VAE)


# --------------------------------------------------------------------------------------------
# Tiny models
# --------------------------------------------------------------------------------------------

UNET_BASE = {
    "use_checkpoint": False, "image_size": 32, "in_channels": 4, "out_channels": 4,
    "model_channels": 32, "channel_mult": [1, 2], "num_res_blocks": [1, 1],
    "transformer_depth_middle": 1, "use_spatial_transformer": True, "legacy": False,
    "use_temporal_attention": False, "use_temporal_resblock": False,
}
# attention at level 0 (full latent res) like SD1/SD2
UNET_SD1 = {**UNET_BASE, "transformer_depth": [1, 0], "transformer_depth_output": [1, 1, 0, 0],
            "context_dim": 48, "adm_in_channels": None, "use_linear_in_transformer": False}
UNET_SD2V = {**UNET_SD1, "use_linear_in_transformer": True}
# attention only at level 1 (half res) like SDXL; adm = pooled(64) + 6 * 256
UNET_SDXL = {**UNET_BASE, "transformer_depth": [0, 1], "transformer_depth_output": [0, 0, 1, 1],
             "context_dim": 96, "adm_in_channels": 64 + 6 * 256, "num_classes": "sequential",
             "use_linear_in_transformer": True}

CLIP_TINY_L = {"hidden_size": 48, "intermediate_size": 96, "num_attention_heads": 4,
               "num_hidden_layers": 3, "projection_dim": 48}
CLIP_TINY_H = dict(CLIP_TINY_L)
CLIP_TINY_XL_L = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2,
                  "num_hidden_layers": 3, "projection_dim": 32}
CLIP_TINY_XL_G = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
                  "num_hidden_layers": 3, "projection_dim": 64}

VAE_DDCONFIG = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3,
                "ch": 32, "ch_mult": [1, 1, 1, 1], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}
VAE_EMBED_DIM = 4
VAE_DOWNSCALE = 2 ** (len(VAE_DDCONFIG["ch_mult"]) - 1)   # 8
LATENT_CHANNELS = VAE_EMBED_DIM                             # 4


def init_random_weights(module, seed: int, vector_std: float = 0.02) -> None:
    """Seeded, deterministic random init of every parameter (ComfyUI's ops skip torch's init and
    leave weights uninitialised): norms 1/0, matrices/kernels N(0, 1/fan_in), other vectors
    N(0, vector_std²), or zero when ``vector_std`` is 0 (the toy world's training start)."""
    import torch
    g = torch.Generator().manual_seed(int(seed))
    norms = (torch.nn.GroupNorm, torch.nn.LayerNorm)
    with torch.no_grad():
        for _, mod in module.named_modules():
            for pname, p in mod.named_parameters(recurse=False):
                if isinstance(mod, norms):
                    p.fill_(1.0 if pname == "weight" else 0.0)
                    continue
                if p.ndim >= 2:
                    std = 1.0 / math.sqrt(max(1, p[0].numel()))
                elif vector_std == 0:
                    p.zero_()
                    continue
                else:
                    std = vector_std
                p.copy_((torch.randn(p.shape, generator=g, dtype=torch.float32) * std).to(p.dtype))


def _build_unet(model_config_cls, unet_config, model_type, head_channels, seed):
    import torch
    import comfy.model_management as mm
    import comfy.model_patcher

    load_device = mm.get_torch_device()
    model_config = model_config_cls(unet_config)
    if head_channels is not None:  # the class defaults (64 per head) are too wide for 32/64 channels
        model_config.unet_config["num_heads"] = -1
        model_config.unet_config["num_head_channels"] = head_channels
    # same dtype decisions as comfy.sd.load_state_dict_guess_config
    unet_dtype = mm.unet_dtype(model_params=0, supported_dtypes=list(model_config.supported_inference_dtypes))
    manual_cast_dtype = mm.unet_manual_cast(unet_dtype, load_device, model_config.supported_inference_dtypes)
    model_config.set_inference_dtype(unet_dtype, manual_cast_dtype)
    model_config.custom_operations = None
    if model_type is None:
        model = model_config.get_model({}, "", device=torch.device("cpu"))
    else:
        import comfy.model_base
        model = comfy.model_base.BaseModel(model_config, model_type=model_type, device=torch.device("cpu"))
    init_random_weights(model, seed)
    model.eval()
    return comfy.model_patcher.ModelPatcher(model, load_device=load_device, offload_device=mm.unet_offload_device())


def _build_clip(target_tokenizer, target_clip, te_options, seed):
    import comfy.sd
    import comfy.supported_models_base
    import folder_paths
    target = comfy.supported_models_base.ClipTarget(target_tokenizer, target_clip)
    clip = comfy.sd.CLIP(target, embedding_directory=folder_paths.get_folder_paths("embeddings"),
                         tokenizer_data={}, parameters=0, model_options=dict(te_options))
    init_random_weights(clip.cond_stage_model, seed)
    return clip


def _build_vae(seed, scale_factor):
    """Tiny KL VAE. The encoder's mean rows of quant_conv are rescaled so the latent of the test
    pattern has raw std 1/scale_factor, i.e. ~unit std in model space, like real SD VAEs."""
    import torch
    import comfy.sd
    from comfy.ldm.models.autoencoder import AutoencoderKL
    params = {"ddconfig": copy.deepcopy(VAE_DDCONFIG), "embed_dim": VAE_EMBED_DIM}
    ref = AutoencoderKL(**copy.deepcopy(params))
    init_random_weights(ref, seed)
    pixels = torch.from_numpy(pattern_image(64)).permute(2, 0, 1)[None] * 2.0 - 1.0
    mean = ref.quant_conv(ref.encoder(pixels))[:, :VAE_EMBED_DIM]
    gain = (1.0 / scale_factor) / float(mean.std())
    ref.quant_conv.weight[:VAE_EMBED_DIM] *= gain
    ref.quant_conv.bias[:VAE_EMBED_DIM] *= gain
    sd = {k: v.clone() for k, v in ref.state_dict().items()}
    vae = comfy.sd.VAE(sd=sd, config={"params": params})
    vae.downscale_ratio = VAE_DOWNSCALE
    vae.upscale_ratio = VAE_DOWNSCALE
    vae.latent_channels = LATENT_CHANNELS
    return vae


def _under_inference_mode(fn):
    @functools.wraps(fn)
    def wrapper(*a, **k):
        import torch
        start_host()
        with torch.inference_mode():
            return fn(*a, **k)
    return wrapper


@_under_inference_mode
def tiny_sd1(prediction: str = "eps", seed: int = 0):
    """(MODEL, CLIP, VAE) of a tiny SD1-shaped model ("eps": SD15 config + clip_l; "v": SD20 config,
    V_PREDICTION + SD2 clip_h). Fresh objects on each call; see the module docstring for sizes."""
    import comfy.model_base
    import comfy.supported_models as sm
    import comfy.sd1_clip
    from comfy.text_encoders import sd2_clip
    if prediction in ("eps", "epsilon"):
        model = _build_unet(sm.SD15, UNET_SD1, None, 16, seed)
        clip = _build_clip(comfy.sd1_clip.SD1Tokenizer, comfy.sd1_clip.SD1ClipModel,
                           {"clip_l_model_config": CLIP_TINY_L}, seed + 1)
    elif prediction in ("v", "v_prediction"):
        model = _build_unet(sm.SD20, UNET_SD2V, comfy.model_base.ModelType.V_PREDICTION, 16, seed)
        clip = _build_clip(sd2_clip.SD2Tokenizer, sd2_clip.SD2ClipModel,
                           {"clip_h_model_config": CLIP_TINY_H}, seed + 1)
    else:
        raise ValueError(f"prediction must be 'eps' or 'v', not {prediction!r}")
    return model, clip, _build_vae(seed + 2, model.model.latent_format.scale_factor)


@_under_inference_mode
def tiny_sdxl(seed: int = 0):
    """(MODEL, CLIP, VAE) of a tiny SDXL-shaped model (model_base.SDXL with adm, SDXLClipModel
    l+g so stock CLIPTextEncode gives cond [1,77,96] + pooled_output [1,64])."""
    import comfy.supported_models as sm
    import comfy.sdxl_clip
    model = _build_unet(sm.SDXL, UNET_SDXL, None, 16, seed)
    clip = _build_clip(comfy.sdxl_clip.SDXLTokenizer, comfy.sdxl_clip.SDXLClipModel,
                       {"clip_l_model_config": CLIP_TINY_XL_L, "clip_g_model_config": CLIP_TINY_XL_G}, seed + 1)
    return model, clip, _build_vae(seed + 2, model.model.latent_format.scale_factor)


def tiny_models(kind: str = "sd1", seed: int = 0):
    """Cached (MODEL, CLIP, VAE) for kind in KINDS ("sd1", "sd1_v", "sdxl"); same objects per (kind, seed)."""
    key = (kind, int(seed))
    if key not in _MODEL_CACHE:
        if kind == "sd1":
            _MODEL_CACHE[key] = tiny_sd1("eps", seed)
        elif kind == "sd1_v":
            _MODEL_CACHE[key] = tiny_sd1("v", seed)
        elif kind == "sdxl":
            _MODEL_CACHE[key] = tiny_sdxl(seed)
        else:
            raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
    return _MODEL_CACHE[key]


def random_disdiff(model, positive, latent_shape, num_factors=3, code_dim=4, encoder_width=16, decoder_width=1.0,
                   seed=0, init_std=0.1):
    """An untrained DisDiff (type DISDIFF) fitting ``model``'s UNet features for latents of
    ``latent_shape`` (C, H, W), with its zero-initialised layers randomised so that G ≠ 0. Built on
    the CPU (the DISDIFF object moves itself to the model's device on use); the feature probe runs
    on the model's device in inference mode, so it works for models loaded inside or outside it."""
    import torch
    import comfy.model_management as mm
    dd, node = pack_module("core.disdiff"), pack_module("nodes.disdiff")
    with torch.inference_mode():
        mm.load_models_gpu([model])
        probe = torch.randn(1, *latent_shape, device=model.load_device)
        config = dd.make_config(probe, node.make_frozen(model, positive), num_factors=num_factors, code_dim=code_dim,
                                encoder_width=encoder_width, decoder_width=decoder_width,
                                extra={"latent_format": type(model.get_model_object("latent_format")).__name__})
    with torch.inference_mode(False):
        torch.manual_seed(seed)
        net = dd.DisDiff(config)
        with torch.no_grad():
            for p in net.parameters():
                if p.ndim > 1 and p.abs().max() == 0:
                    p.normal_(0, init_std)
    return node.DisDiffModel(net, "random")


SD15_UNET = {
    "use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
    "adm_in_channels": None, "in_channels": 4, "out_channels": 4, "model_channels": 320,
    "num_res_blocks": [2, 2, 2, 2], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
    "channel_mult": [1, 2, 4, 4], "transformer_depth_middle": 1, "use_linear_in_transformer": False,
    "context_dim": 768, "num_heads": 8, "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    "use_temporal_resblock": False, "use_temporal_attention": False,
}


def random_sd15(dtype_name: str = "fp16", seed: int = 0):
    """A MODEL (ModelPatcher) with the SD1.5 UNet architecture, ε-prediction, random weights."""
    import torch
    import comfy.model_detection
    import comfy.model_management as mm
    import comfy.model_patcher

    config = comfy.model_detection.model_config_from_unet_config(dict(SD15_UNET))
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    config.set_inference_dtype(dtype, None)
    model = config.get_model({}, "", device=torch.device("cpu"))
    init_random_weights(model.diffusion_model, seed)
    model.diffusion_model.to(dtype)
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device())


SDXL_UNET = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
    "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4, "model_channels": 320,
    "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 10, 10], "channel_mult": [1, 2, 4],
    "transformer_depth_middle": 10, "use_linear_in_transformer": True, "context_dim": 2048, "num_head_channels": 64,
    "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10], "use_temporal_attention": False,
    "use_temporal_resblock": False,
}


def random_sdxl(seed: int = 0):
    """A MODEL with the SDXL base UNet architecture, fp16, random weights."""
    import torch
    import comfy.model_detection
    import comfy.model_management as mm
    import comfy.model_patcher
    config = comfy.model_detection.model_config_from_unet_config(dict(SDXL_UNET))
    config.set_inference_dtype(torch.float16, None)
    model = config.get_model({}, "", device=torch.device("cpu"))
    init_random_weights(model.diffusion_model, seed)
    model.diffusion_model.to(torch.float16)
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device())


def random_sd_vae(seed: int = 1):
    """The SD1/SD2/SDXL KL VAE architecture (8×, 4 channels) with random weights, as comfy.sd.VAE loads it."""
    import comfy.sd
    from comfy.ldm.models.autoencoder import AutoencoderKL
    ddconfig = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
    ref = AutoencoderKL(ddconfig=ddconfig, embed_dim=4)
    init_random_weights(ref, seed)
    return comfy.sd.VAE(sd={k: v.clone() for k, v in ref.state_dict().items()})


def random_sd1_clip(seed: int = 2):
    """SD1's CLIP-L text encoder with random weights and ComfyUI's SD1 tokenizer."""
    import comfy.sd
    import comfy.sd1_clip
    import comfy.supported_models_base
    target = comfy.supported_models_base.ClipTarget(comfy.sd1_clip.SD1Tokenizer, comfy.sd1_clip.SD1ClipModel)
    clip = comfy.sd.CLIP(target, parameters=0)
    init_random_weights(clip.cond_stage_model, seed)
    return clip


def random_sdxl_clip(seed: int = 2):
    """SDXL's two text encoders (CLIP-L + bigG) with random weights and ComfyUI's SDXL tokenizer."""
    import comfy.sd
    import comfy.sdxl_clip
    import comfy.supported_models_base
    target = comfy.supported_models_base.ClipTarget(comfy.sdxl_clip.SDXLTokenizer, comfy.sdxl_clip.SDXLClipModel)
    clip = comfy.sd.CLIP(target, parameters=0)
    init_random_weights(clip.cond_stage_model, seed)
    return clip


def conditioning(tokens: int = 77, dim: int = 768, seed: int = 0, pooled: int = 0):
    """A CONDITIONING of seeded N(0, 1) values, [1, tokens, dim] (and a pooled output when ``pooled``)."""
    import torch
    g = torch.Generator().manual_seed(seed)
    meta = {"pooled_output": torch.randn(1, pooled, generator=g)} if pooled else {}
    return [[torch.randn(1, tokens, dim, generator=g), meta]]


def compute_dtype(model):
    """The dtype a MODEL's UNet computes in, as BaseModel.apply_model picks it (manual cast first)."""
    return model.model.manual_cast_dtype or model.model.get_dtype()


def fp32_copy(model):
    """A MODEL with the same weights in float32 (its own BaseModel; the original is untouched)."""
    import copy
    import torch
    import comfy.model_patcher
    with torch.inference_mode():
        base = copy.deepcopy(model.model)
        base.diffusion_model.to(torch.float32)
    base.diffusion_model.dtype = torch.float32
    base.manual_cast_dtype = None
    return comfy.model_patcher.ModelPatcher(base, load_device=model.load_device, offload_device=model.offload_device)


def clear_model_cache() -> None:
    """Forget the cached tiny models (TinyCheckpointLoader builds new ones next time)."""
    _MODEL_CACHE.clear()


def sdxl_conditioning(seed: int = 0, tokens: int = 77, width: int = 1024, height: int = 1024):
    """Hand-made SDXL-shaped CONDITIONING for the tiny sdxl model, without a text encoder:
    [[cond [1, tokens, 96], {"pooled_output": [1, 64], "width", "height", "crop_w", "crop_h",
    "target_width", "target_height"}]] with seeded N(0,1) values."""
    import torch
    g = torch.Generator().manual_seed(int(seed))
    cond = torch.randn(1, tokens, UNET_SDXL["context_dim"], generator=g)
    pooled = torch.randn(1, CLIP_TINY_XL_G["projection_dim"], generator=g)
    return [[cond, {"pooled_output": pooled, "width": width, "height": height, "crop_w": 0, "crop_h": 0,
                    "target_width": width, "target_height": height}]]


# --------------------------------------------------------------------------------------------
# Test nodes
# --------------------------------------------------------------------------------------------

class TinyCheckpointLoader:
    """Stand-in for CheckpointLoaderSimple: returns the cached tiny (MODEL, CLIP, VAE)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {"ckpt_name": ("STRING", {"default": "tiny"})},
            "optional": {
                "kind": (list(KINDS), {"default": "sd1"}),
                "weight_seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1}),
            },
        }

    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    FUNCTION = "load"
    CATEGORY = "testing/disentangle"

    def load(self, ckpt_name, kind="sd1", weight_seed=0):
        return tiny_models(kind, weight_seed)


class TinySDXLConditioning:
    """CONDITIONING from sdxl_conditioning(seed) (for tests that want SDXL conds without CLIP)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1}),
                             "width": ("INT", {"default": 1024, "min": 8, "max": 8192}),
                             "height": ("INT", {"default": 1024, "min": 8, "max": 8192})}}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "make"
    CATEGORY = "testing/disentangle"

    def make(self, seed, width, height):
        return (sdxl_conditioning(seed, width=width, height=height),)


TEST_NODE_CLASS_MAPPINGS = {
    "TinyCheckpointLoader": TinyCheckpointLoader,
    "TinySDXLConditioning": TinySDXLConditioning,
}


def register_test_nodes() -> None:
    """Add the test nodes (TinyCheckpointLoader, TinySDXLConditioning) to nodes.NODE_CLASS_MAPPINGS."""
    import nodes
    for name, cls in TEST_NODE_CLASS_MAPPINGS.items():
        nodes.NODE_CLASS_MAPPINGS[name] = cls
        nodes.NODE_DISPLAY_NAME_MAPPINGS.setdefault(name, name)


def substitute_checkpoints(prompt: dict, kind: str = "sd1", weight_seed: int = 0) -> dict:
    """Copy of an API prompt with every CheckpointLoaderSimple replaced by TinyCheckpointLoader."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
    out = copy.deepcopy(prompt)
    for node in out.values():
        if node.get("class_type") == "CheckpointLoaderSimple":
            name = node.get("inputs", {}).get("ckpt_name", "tiny")
            node["class_type"] = "TinyCheckpointLoader"
            node["inputs"] = {"ckpt_name": name if isinstance(name, str) else "tiny", "kind": kind,
                              "weight_seed": weight_seed}
    return out


def pattern_image(size: int = 64):
    """float32 [size, size, 3] in [0, 1]: gradient background, red square, blue disc."""
    import numpy as np
    h = w = int(size)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack([xx / max(1, w - 1), yy / max(1, h - 1), 0.5 * np.ones_like(xx)], axis=-1)
    img[h // 8: h // 8 + h // 3, w // 8: w // 8 + w // 3] = [0.9, 0.1, 0.1]
    disc = (xx - 0.68 * w) ** 2 + (yy - 0.65 * h) ** 2 <= (0.2 * min(h, w)) ** 2
    img[disc] = [0.1, 0.2, 0.9]
    return img.astype(np.float32)
