"""DisDiff nodes (Yang et al. 2023): train factor codes and per-factor gradient fields on a frozen
MODEL, encode images to FACTORS, swap factors, and patch a MODEL for partial-condition sampling
(eq. 6) with stock KSampler / SamplerCustom. The maths lives in ``core/disdiff.py``; this module
turns ComfyUI objects into its callables.

The frozen DPM. ComfyUI samples in σ-space (x_σ = x0 + σ·ε); core works in the VP form
(x_t = x_σ/√(1+σ²), ᾱ = 1/(1+σ²)), with the model's own discrete schedule ``model_sampling.sigmas``
(t ↔ σ_t). One call of the model gives ε (from its denoised output: ε = (x_σ − x̂0)/σ, for ε- and
v-prediction alike), and two ComfyUI UNet patches hooked for that call record the input-block
features (``input_block_patch``) and the time embedding (``emb_patch``). So training and sampling
read the features in exactly the same way, and sampling costs one UNet call plus one batched
decoder pass (B·|S| rows) per model call.
"""
from __future__ import annotations

import os

import torch

import comfy.model_management as mm
import comfy.model_sampling
import comfy.utils
import folder_paths

from ..core import disdiff as dd
from .common import CATEGORY, InputError, check_conditioning

DISDIFF = "DISDIFF"
FACTORS = "FACTORS"
DISDIFF_FOLDER = "disdiff"
MAX_TOGGLES = 10
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


# --------------------------------------------------------------------------------------------
# The frozen model as core callables
# --------------------------------------------------------------------------------------------

class FeatureCapture:
    """UNet patches that record, for one model call, the input-block outputs and the time embedding."""

    def __init__(self):
        self.features, self.emb = [], None

    def block(self, h, transformer_options):
        self.features.append(h)
        return h

    def embedding(self, emb, model_channels, transformer_options):
        self.emb = emb
        return emb

    def attach(self, transformer_options: dict | None) -> dict:
        """A copy of ``transformer_options`` with the two patches appended (the original untouched)."""
        options = dict(transformer_options or {})
        patches = {k: list(v) for k, v in options.get("patches", {}).items()}
        patches.setdefault("input_block_patch", []).append(self.block)
        patches.setdefault("emb_patch", []).append(self.embedding)
        options["patches"] = patches
        return options

    def output(self, eps=None) -> dd.FrozenOutput:
        if not self.features or self.emb is None:
            raise InputError("model: DisDiff needs a UNet with input blocks (SD1.x / SD2.x / SDXL-type models); "
                             "this model did not report its UNet features")
        return dd.FrozenOutput(eps, list(self.features), self.emb)


def check_unet_model(model) -> None:
    sampling = model.get_model_object("model_sampling")
    if isinstance(sampling, comfy.model_sampling.CONST):
        raise InputError("model: DisDiff needs an ε- or v-prediction diffusion model; this is a flow-matching model")
    if not hasattr(model.model, "diffusion_model") or not hasattr(model.model.diffusion_model, "input_blocks"):
        raise InputError("model: DisDiff needs a UNet model (SD1.x / SD2.x / SDXL-type)")


def alphas_cumprod(model) -> torch.Tensor:
    """ᾱ_t = 1/(1+σ_t²) of the model's own discrete schedule."""
    sigmas = model.get_model_object("model_sampling").sigmas.float().cpu()
    return 1.0 / (1.0 + sigmas ** 2)


def make_frozen(model, positive) -> dd.Frozen:
    """``frozen(x_t, t)`` for core: one call of the loaded model with the fixed CONDITIONING's text
    context, at σ_t of its own schedule. Models that need extra conditioning vectors (SDXL's ADM)
    are refused for training."""
    base = model.model
    if getattr(base.diffusion_model, "num_classes", None) is not None:
        raise InputError("model: training DisDiff supports models conditioned by text context only (SD1.x / SD2.x / "
                         "the toy world); SDXL-type models need ADM vectors")
    sigmas = model.get_model_object("model_sampling").sigmas.float()
    context = positive[0][0]

    def frozen(x_t, t):
        device = x_t.device
        sigma = sigmas.to(device)[t]
        s = sigma.view(-1, 1, 1, 1)
        x = x_t.float() * (1 + s * s).sqrt()
        capture = FeatureCapture()
        ctx = context.to(device).expand(x.shape[0], -1, -1)
        denoised = base.apply_model(x, sigma, c_crossattn=ctx, transformer_options=capture.attach({}))
        return capture.output((x - denoised.float()) / s)

    return frozen


# --------------------------------------------------------------------------------------------
# DISDIFF / FACTORS objects
# --------------------------------------------------------------------------------------------

class DisDiffModel:
    """A loaded DisDiff (type DISDIFF): core model on the CPU, moved to the device on use."""

    def __init__(self, model: dd.DisDiff, name: str = "", step: int = 0):
        self.model, self.name, self.step = model.eval(), name, step

    @property
    def config(self) -> dd.DisDiffConfig:
        return self.model.config

    def on(self, device, dtype=torch.float32) -> dd.DisDiff:
        p = next(self.model.parameters())
        if p.device != torch.device(device) or p.dtype != dtype:
            self.model.to(device=device, dtype=dtype)
        return self.model

    def latent_in(self, samples: torch.Tensor) -> torch.Tensor:
        """A LATENT's samples in the model space the encoder reads (the training model's latent format)."""
        import comfy.latent_formats
        name = self.config.extra.get("latent_format")
        fmt = getattr(comfy.latent_formats, name, None) if name else None
        if fmt is None:
            raise InputError(f"DisDiff model {self.name!r} does not name a known latent format ({name!r})")
        return fmt().process_in(samples.float())

    def __deepcopy__(self, memo):
        return self


def check_disdiff(disdiff) -> DisDiffModel:
    if not isinstance(disdiff, DisDiffModel):
        raise InputError("disdiff: not a DISDIFF model (connect Load DisDiff or Train DisDiff)")
    return disdiff


def check_factors(factors, name="factors") -> torch.Tensor:
    if not isinstance(factors, dict) or "codes" not in factors:
        raise InputError(f"{name}: not FACTORS (connect DisDiff Encode)")
    return factors["codes"]


def parse_indices(text: str, n: int, name: str) -> list[int]:
    """"all", "" (none) or a comma list of factor indices in [0, n)."""
    text = (text or "").strip().lower()
    if text == "all":
        return list(range(n))
    if text in ("", "none"):
        return []
    try:
        values = [int(v) for v in text.replace(";", ",").split(",") if v.strip()]
    except ValueError as e:
        raise InputError(f"{name}: expected 'all' or comma-separated factor indices, got {text!r}") from e
    bad = [v for v in values if not 0 <= v < n]
    if bad:
        raise InputError(f"{name}: factor indices must lie in [0, {n - 1}], got {bad}")
    return sorted(set(values))


def parse_strengths(text: str, count: int, name: str = "strengths") -> list[float]:
    """One value for all, or one per selected factor."""
    try:
        values = [float(v) for v in (text or "1.0").replace(";", ",").split(",") if v.strip()]
    except ValueError as e:
        raise InputError(f"{name}: expected numbers separated by commas, got {text!r}") from e
    if len(values) == 1:
        return values * count
    if len(values) != count:
        raise InputError(f"{name}: give one value or one per selected factor ({count}), got {len(values)}")
    return values


def encode_codes(disdiff: DisDiffModel, model_space_latents: torch.Tensor) -> torch.Tensor:
    cfg = disdiff.config
    if tuple(model_space_latents.shape[1:]) != (cfg.latent_channels, *cfg.latent_size):
        raise InputError(f"latent of shape {tuple(model_space_latents.shape[1:])} does not fit the DisDiff model, "
                         f"trained on {(cfg.latent_channels, *cfg.latent_size)}: use the same image size and VAE")
    device = mm.get_torch_device()
    model = disdiff.on(device)
    with torch.no_grad():
        codes = torch.cat([model.encode(chunk.to(device)) for chunk in model_space_latents.split(64)])
    return codes.float().to(mm.intermediate_device())


# --------------------------------------------------------------------------------------------
# Partial-condition sampling patch
# --------------------------------------------------------------------------------------------

class PartialConditionWrapper:
    """ComfyUI ``model_function_wrapper``: x̂0 ← x̂0 + σ·√(1−ᾱ)·Σ_{c∈S} w_c·G^c (eq. 6 in σ-space).

    Each model call runs the UNet once (features recorded by the capture patches) and G once, on
    all rows of the call and all factors of S together. With cfg, the cond and uncond halves each
    get G computed from their own features, so the guided prediction is shifted by
    −√(1−ᾱ)·[G_u + cfg·(G_c − G_u)]; this is eq. 6 exactly when both halves give G the same
    features (the same prompt, or cfg 1, the paper's unconditional setting). An empty S is an exact
    no-op. An existing wrapper on the MODEL is kept (called inside)."""

    def __init__(self, disdiff: DisDiffModel, codes: torch.Tensor, factors: list[int], strengths: list[float],
                 inner=None):
        self.disdiff, self.codes, self.inner = disdiff, codes, inner
        kept = [(f, w) for f, w in zip(factors, strengths) if w != 0]
        self.factors = [f for f, _ in kept]
        self.strengths = [w for _, w in kept]

    def __deepcopy__(self, memo):  # ModelPatcher.clone deep-copies model_options; this object is immutable
        return self

    def _call(self, apply_model, args):
        if self.inner is not None:
            return self.inner(apply_model, args)
        return apply_model(args["input"], args["timestep"], **args["c"])

    def __call__(self, apply_model, args):
        if not self.factors:
            return self._call(apply_model, args)
        x, sigma, c = args["input"], args["timestep"], args["c"]
        capture = FeatureCapture()
        c = dict(c)
        c["transformer_options"] = capture.attach(c.get("transformer_options"))
        denoised = self._call(apply_model, {**args, "c": c})
        out = capture.output()
        try:
            dd.check_features(self.disdiff.config, out)
        except ValueError as e:
            raise InputError(str(e)) from e
        chunks = max(1, len(args.get("cond_or_uncond") or [1]))
        per = x.shape[0] // chunks
        codes = self.codes
        if codes.shape[0] != 1:
            if codes.shape[0] != per:
                raise InputError(f"factors: {codes.shape[0]} codes for a batch of {per}: give one code or one per image")
            codes = codes.repeat(chunks, 1, 1)
        device = out.emb.device
        half = out.features[0].dtype in (torch.float16, torch.bfloat16) and device.type == "cuda"
        model = self.disdiff.on(device)
        with torch.no_grad(), torch.autocast(device.type, dtype=out.features[0].dtype, enabled=half):
            g = model.gradients(out, codes.to(device), self.factors)
        return dd.partial_condition_denoised(denoised, sigma.to(device), g.float(), self.strengths)


def patch_model(model, disdiff: DisDiffModel, codes: torch.Tensor, factors: list[int], strengths: list[float]):
    """A clone of ``model`` with the partial-condition wrapper; ``model`` itself stays unpatched."""
    patched = model.clone()
    inner = patched.model_options.get("model_function_wrapper")
    patched.set_model_unet_function_wrapper(PartialConditionWrapper(disdiff, codes, factors, strengths, inner))
    return patched


# --------------------------------------------------------------------------------------------
# Data and training
# --------------------------------------------------------------------------------------------

def load_image_folder(folder: str, size: int, limit: int = 0) -> torch.Tensor:
    """IMAGE batch [B, size, size, 3] of the images in ``folder`` (centre-cropped, resized)."""
    from PIL import Image
    import numpy as np
    if not folder or not os.path.isdir(folder):
        raise InputError(f"image_folder: {folder!r} is not a folder")
    names = sorted(n for n in os.listdir(folder) if n.lower().endswith(IMAGE_EXTS))
    if limit > 0:
        names = names[:limit]
    if not names:
        raise InputError(f"image_folder: no images ({', '.join(IMAGE_EXTS)}) in {folder}")
    images = []
    for n in names:
        with Image.open(os.path.join(folder, n)) as im:
            im = im.convert("RGB")
            w, h = im.size
            side = min(w, h)
            im = im.crop(((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side))
            im = im.resize((size, size), Image.BICUBIC)
            images.append(torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0))
    return torch.stack(images)


def encode_images(model, vae, images: torch.Tensor, batch: int = 32) -> torch.Tensor:
    """Model-space latents (``process_latent_in`` of the VAE encoding) of IMAGE-layout images."""
    chunks = []
    for i in range(0, images.shape[0], batch):
        mm.throw_exception_if_processing_interrupted()
        chunks.append(vae.encode(images[i:i + batch, :, :, :3]).float().cpu())
    return model.model.process_latent_in(torch.cat(chunks))


def default_checkpoint_path(save_name: str) -> str:
    name = save_name.strip() or "disdiff"
    if os.path.sep in name or (os.path.altsep and os.path.altsep in name) or name.startswith("."):
        raise InputError(f"save_name: a plain file name, got {save_name!r}")
    if not name.endswith(".safetensors"):
        name += ".safetensors"
    return os.path.join(folder_paths.get_folder_paths(DISDIFF_FOLDER)[0], name)


def train_from_latents(model, positive, latents: torch.Tensor, *, num_factors, code_dim, steps, batch_size,
                       learning_rate, seed, checkpoint_path, checkpoint_every, resume, log_every=10,
                       callback=None, train_kw: dict | None = None, **kw):
    """Train on model-space ``latents`` on top of the loaded MODEL (the node's and the CLI's path).
    ``kw`` goes to the config (encoder_width, decoder_width, ...), ``train_kw`` to core's
    train_disdiff (dis_weight, warmup, loss_type, ...)."""
    check_unet_model(model)
    check_conditioning(positive, "positive")
    mm.load_models_gpu([model])
    device = model.load_device
    frozen = make_frozen(model, positive)
    autocast = torch.bfloat16 if device.type == "cuda" else None
    with torch.inference_mode(False), torch.enable_grad():
        data = latents.clone().float().to(device)
        ab = alphas_cumprod(model).clone()
        config = None
        if not (resume and checkpoint_path and os.path.exists(checkpoint_path)):
            extra = {"latent_format": type(model.get_model_object("latent_format")).__name__,
                     "model": type(model.model).__name__}
            config = dd.make_config(data, frozen, num_factors=num_factors, code_dim=code_dim, extra=extra, **kw)
        net, history = dd.train_disdiff(data, frozen, ab, config=config, steps=steps, batch_size=batch_size,
                                        lr=learning_rate, seed=seed, device=device, autocast_dtype=autocast,
                                        log_every=log_every, checkpoint_path=checkpoint_path,
                                        checkpoint_every=checkpoint_every, resume=resume, callback=callback,
                                        **(train_kw or {}))
    net = net.float().cpu().eval()
    return DisDiffModel(net, os.path.basename(checkpoint_path or ""), steps), history


# --------------------------------------------------------------------------------------------
# Nodes
# --------------------------------------------------------------------------------------------

class TrainDisDiff:
    DESCRIPTION = (
        "Learns N factor codes (encoder) and one gradient field per factor (decoder) on top of a frozen MODEL "
        "from a folder of images (DisDiff, Yang et al. 2023). For small jobs; bench/train_disdiff.py runs long "
        "ones with the same code. Saves safetensors checkpoints to models/disdiff and can resume."
    )
    CATEGORY = f"{CATEGORY}/disdiff"
    RETURN_TYPES = (DISDIFF,)
    RETURN_NAMES = ("disdiff",)
    OUTPUT_TOOLTIPS = ("The trained DisDiff (factor encoder E and gradient fields G^c), for DisDiff Encode and Partial-Condition Sampling.",)
    FUNCTION = "train"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The frozen diffusion model (ε or v prediction, UNet)."}),
                "vae": ("VAE", {"tooltip": "Encodes the training images into the model's latent space."}),
                "positive": ("CONDITIONING", {"tooltip": "The fixed prompt of the frozen model (the empty prompt = its "
                                                         "unconditional model, the paper's setting)."}),
                "image_folder": ("STRING", {"default": "", "tooltip": "Folder of training images (png/jpg/webp)."}),
                "size": ("INT", {"default": 128, "min": 64, "max": 1024, "step": 8,
                                 "tooltip": "Images are centre-cropped and resized to this many pixels."}),
                "num_factors": ("INT", {"default": 6, "min": 1, "max": 64, "tooltip": "N, the number of factor codes z^1…z^N."}),
                "code_dim": ("INT", {"default": 32, "min": 1, "max": 512, "tooltip": "Channels of each factor code."}),
                "steps": ("INT", {"default": 1000, "min": 1, "max": 1000000, "tooltip": "Adam steps of training."}),
                "batch_size": ("INT", {"default": 32, "min": 1, "max": 1024, "tooltip": "Images per training step."}),
                "learning_rate": ("FLOAT", {"default": 2e-4, "min": 1e-7, "max": 1e-1, "step": 1e-5, "tooltip": "Adam's learning rate."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFF, "tooltip": "Initial weights, data order and noise."}),
                "save_name": ("STRING", {"default": "disdiff", "tooltip": "Checkpoint file in models/disdiff."}),
                "checkpoint_every": ("INT", {"default": 500, "min": 0, "max": 1000000,
                                             "tooltip": "Save every that many steps (0: only at the end)."}),
                "resume": ("BOOLEAN", {"default": False, "tooltip": "Continue from the checkpoint of that name."}),
            },
            "optional": {
                "images": ("IMAGE", {"tooltip": "Training images instead of the folder."}),
            },
        }

    def train(self, model, vae, positive, image_folder, size, num_factors, code_dim, steps, batch_size,
              learning_rate, seed, save_name, checkpoint_every, resume, images=None):
        check_unet_model(model)
        if images is None:
            images = load_image_folder(image_folder, size)
        latents = encode_images(model, vae, images)
        path = default_checkpoint_path(save_name)
        bar = comfy.utils.ProgressBar(steps)

        def callback(step, total, logs):
            mm.throw_exception_if_processing_interrupted()
            bar.update_absolute(step, total)

        try:
            disdiff, history = train_from_latents(
                model, positive, latents, num_factors=num_factors, code_dim=code_dim, steps=steps,
                batch_size=batch_size, learning_rate=learning_rate, seed=seed, checkpoint_path=path,
                checkpoint_every=checkpoint_every, resume=resume, log_every=min(10, steps), callback=callback)
        except dd.CheckpointError as e:
            raise InputError(str(e)) from e
        except ValueError as e:
            if "do not match" in str(e):
                raise InputError(str(e)) from e
            raise
        last = history[-1] if history else {}
        summary = (f"{os.path.basename(path)}: step {steps}, loss {last.get('loss', float('nan')):.4f}, "
                   f"reconstruction {last.get('recon', float('nan')):.4f}")
        return {"ui": {"text": [summary]}, "result": (disdiff,)}


class LoadDisDiff:
    DESCRIPTION = "A trained DisDiff model (factor encoder and gradient fields) from models/disdiff."
    CATEGORY = f"{CATEGORY}/disdiff"
    RETURN_TYPES = (DISDIFF,)
    RETURN_NAMES = ("disdiff",)
    OUTPUT_TOOLTIPS = ("The DisDiff model, for DisDiff Encode and Partial-Condition Sampling.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        # the pack's weights/ folder is on this list for its toy-world DisDiff; hide its other files
        names = [n for n in folder_paths.get_filename_list(DISDIFF_FOLDER)
                 if not (n.startswith("toy_world_") and "disdiff" not in n)]
        return {"required": {"disdiff_name": (names,
                                              {"tooltip": "A .safetensors file written by Train DisDiff."})}}

    def load(self, disdiff_name):
        path = folder_paths.get_full_path_or_raise(DISDIFF_FOLDER, disdiff_name)
        try:
            loaded = dd.load_checkpoint(path)
        except dd.CheckpointError as e:
            raise InputError(str(e)) from e
        return (DisDiffModel(loaded.model, disdiff_name, loaded.step),)


class DisDiffEncode:
    DESCRIPTION = "The factor codes of images (IMAGE with its VAE, or a LATENT): one code per factor, type FACTORS."
    CATEGORY = f"{CATEGORY}/disdiff"
    RETURN_TYPES = (FACTORS,)
    RETURN_NAMES = ("factors",)
    OUTPUT_TOOLTIPS = ("z^1…z^N of each image (FACTORS), for Swap Factors and Partial-Condition Sampling.",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"disdiff": (DISDIFF, {"tooltip": "Load DisDiff or Train DisDiff output (its encoder E)."})},
                "optional": {"latent": ("LATENT", {"tooltip": "VAE Encode output of the model's VAE."}),
                             "image": ("IMAGE", {"tooltip": "Alternatively an image, with the vae."}),
                             "vae": ("VAE", {"tooltip": "The model's VAE, to encode the image input."})}}

    def encode(self, disdiff, latent=None, image=None, vae=None):
        disdiff = check_disdiff(disdiff)
        if latent is not None:
            if not isinstance(latent, dict) or "samples" not in latent:
                raise InputError("latent: not a LATENT")
            samples = latent["samples"]
        elif image is not None:
            if vae is None:
                raise InputError("vae: needed to encode the image")
            samples = vae.encode(image[:, :, :, :3])
        else:
            raise InputError("connect a latent, or an image and its vae")
        codes = encode_codes(disdiff, disdiff.latent_in(samples))
        return ({"codes": codes, "num_factors": disdiff.config.num_factors},)


class DisDiffSwapFactors:
    DESCRIPTION = "Takes the chosen factors' codes from a second image (other), the rest from the first."
    CATEGORY = f"{CATEGORY}/disdiff"
    RETURN_TYPES = (FACTORS,)
    RETURN_NAMES = ("factors",)
    OUTPUT_TOOLTIPS = ("The first image's codes with the chosen factors' codes from other.",)
    FUNCTION = "swap"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"factors": (FACTORS, {"tooltip": "The codes to change (DisDiff Encode of the first image)."}),
                             "other": (FACTORS, {"tooltip": "Gives the swapped factors."}),
                             "swap": ("STRING", {"default": "0", "tooltip": "Factor indices to take from other, e.g. '2' "
                                                                             "or '0,3' or 'all'."})}}

    def swap(self, factors, other, swap):
        a, b = check_factors(factors), check_factors(other, "other")
        if a.shape[1:] != b.shape[1:]:
            raise InputError(f"factors {tuple(a.shape[1:])} and other {tuple(b.shape[1:])} come from different DisDiff models")
        if b.shape[0] not in (1, a.shape[0]):
            if a.shape[0] != 1:
                raise InputError(f"other has {b.shape[0]} codes for {a.shape[0]}: give one or as many")
            a = a.expand(b.shape[0], -1, -1)
        idx = parse_indices(swap, a.shape[1], "swap")
        out = a.clone()
        out[:, idx] = b.expand(a.shape[0], -1, -1)[:, idx] if b.shape[0] == 1 else b[:, idx]
        return ({**factors, "codes": out},)


class DisDiffFactorToggles:
    DESCRIPTION = "A factor index list (for Partial-Condition Sampling or Swap Factors) from on/off toggles."
    CATEGORY = f"{CATEGORY}/disdiff"
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("factor_list",)
    OUTPUT_TOOLTIPS = ("The switched-on factor indices, e.g. '0,2': connect to condition_on or swap (as an input).",)
    FUNCTION = "select"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {f"factor_{k}": ("BOOLEAN", {"default": k == 0, "tooltip": f"Include factor {k} (z^{k}) in the list."})
                             for k in range(MAX_TOGGLES)}}

    def select(self, **toggles):
        on = [k for k in range(MAX_TOGGLES) if toggles.get(f"factor_{k}")]
        return (",".join(str(k) for k in on),)


class DisDiffPartialCondition:
    DESCRIPTION = (
        "Patches a MODEL so that stock samplers draw images conditioned on the chosen factors only (DisDiff eq. 6): "
        "ε = ε_θ − Σ_{c∈S} w_c·√(1−ᾱ_t)·G^c(x_t, z^c, t). All factors reconstruct the image; one factor keeps "
        "just that factor (e.g. the object colour) and lets the rest vary with the seed."
    )
    CATEGORY = f"{CATEGORY}/disdiff"
    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("A patched clone of the MODEL (the input stays unpatched), for a stock KSampler / SamplerCustom.",)
    FUNCTION = "patch"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The frozen model the DisDiff was trained on."}),
            "disdiff": (DISDIFF, {"tooltip": "The DisDiff model whose gradient fields G^c are imposed."}),
            "factors": (FACTORS, {"tooltip": "Codes from DisDiff Encode (one, or one per image of the batch)."}),
            "condition_on": ("STRING", {"default": "all", "tooltip": "Factor subset S: 'all', '' (none: the unpatched "
                                                                     "model), or indices such as '0,2'."}),
            "strengths": ("STRING", {"default": "1.0", "tooltip": "w_c, the weight of each imposed field: one value, or one per selected factor."}),
        }}

    def patch(self, model, disdiff, factors, condition_on, strengths):
        disdiff = check_disdiff(disdiff)
        check_unet_model(model)
        codes = check_factors(factors)
        cfg = disdiff.config
        if tuple(codes.shape[1:]) != (cfg.num_factors, cfg.code_dim):
            raise InputError(f"factors {tuple(codes.shape[1:])} do not come from this DisDiff model "
                             f"({cfg.num_factors} × {cfg.code_dim})")
        idx = parse_indices(condition_on, cfg.num_factors, "condition_on")
        weights = parse_strengths(strengths, len(idx))
        return (patch_model(model, disdiff, codes, idx, weights),)


NODE_CLASS_MAPPINGS = {
    "DisentangleTrainDisDiff": TrainDisDiff,
    "DisentangleLoadDisDiff": LoadDisDiff,
    "DisentangleDisDiffEncode": DisDiffEncode,
    "DisentangleDisDiffSwapFactors": DisDiffSwapFactors,
    "DisentangleDisDiffFactorToggles": DisDiffFactorToggles,
    "DisentangleDisDiffPartialCondition": DisDiffPartialCondition,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "DisentangleTrainDisDiff": "Train DisDiff",
    "DisentangleLoadDisDiff": "Load DisDiff",
    "DisentangleDisDiffEncode": "DisDiff Encode",
    "DisentangleDisDiffSwapFactors": "DisDiff Swap Factors",
    "DisentangleDisDiffFactorToggles": "DisDiff Factor Toggles",
    "DisentangleDisDiffPartialCondition": "DisDiff Partial-Condition Sampling",
}
