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

import json
import math
import os

import torch

import comfy.model_management as mm
import comfy.model_sampling
import comfy.utils
import folder_paths
from safetensors import SafetensorError

from ..core import disdiff as dd
from ..core.ddim import vp_to_sigma_space
from ..core.disdiff_train import train_disdiff
from .comfy_boundary import alphas_cumprod, check_unet_model
from .common import (CATEGORY, PACK_WEIGHTS, InputError, check_conditioning, check_file_name, check_finite,
                     check_int, check_tensors_match, core_input_errors, json_metadata, meta_shapes,
                     read_safetensors_header, shipped_first, short)
from .plot import draw_loss_curve, image_tensor

DISDIFF = "DISDIFF"
FACTORS = "FACTORS"
DISDIFF_FOLDER = "disdiff"
MAX_TOGGLES = 10
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
NO_FOLDER = "(none: use the images input)"
MAX_FOLDER_DEPTH = 3            # subfolders of ComfyUI's input folder listed for image_folder
MAX_LISTED_FOLDERS = 1000
MAX_TRAINING_BYTES = 2 << 30    # float32 pixels Train DisDiff holds in memory (images × size² × 3 × 4 bytes)
RESERVED_PREFIX = "toy_world_"  # the pack's shipped files; a user's checkpoint never takes such a name


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


def load_frozen(model) -> None:
    """Load the MODEL onto its device in inference mode, whatever mode the caller is in: ComfyUI
    wraps weights it moves in new Parameters, and Parameters made from the (inference-mode) loaded
    weights outside inference mode fail on the GPU ("Inference tensors do not track version counter")."""
    with torch.inference_mode():
        mm.load_models_gpu([model])


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
    on_device: dict = {}   # σ table and text context per device, copied once (then a call never syncs)

    def frozen(x_t, t):
        device = x_t.device
        if device not in on_device:
            on_device[device] = (sigmas.to(device), context.to(device))
        sigma_table, ctx = on_device[device]
        sigma = sigma_table[t]
        s = sigma.view(-1, 1, 1, 1)
        x = vp_to_sigma_space(x_t.float(), s)
        capture = FeatureCapture()
        denoised = base.apply_model(x, sigma, c_crossattn=ctx.expand(x.shape[0], -1, -1),
                                    transformer_options=capture.attach({}))
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

    def latent_format(self):
        """The training model's latent format (a ``comfy.latent_formats`` object)."""
        import comfy.latent_formats
        name = self.config.extra.get("latent_format")
        fmt = getattr(comfy.latent_formats, name, None) if name else None
        if fmt is None:
            raise InputError(f"DisDiff model {self.name!r} does not name a known latent format ({name!r})")
        return fmt()

    def latent_in(self, samples: torch.Tensor) -> torch.Tensor:
        """A LATENT's samples in the model space the encoder reads (the training model's latent format)."""
        return self.latent_format().process_in(samples.float())

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
        raise InputError(f"{name}: expected numbers separated by commas, got {short(text)}") from e
    if not all(math.isfinite(v) for v in values):
        raise InputError(f"{name}: every strength must be a finite number, got {short(text)}")
    if len(values) == 1:
        return values * count
    if len(values) != count:
        raise InputError(f"{name}: give one value or one per selected factor ({count}), got {len(values)}")
    return values


class VAEImageDecoder(torch.nn.Module):
    """core's image decoder (``core.disdiff.ImageDecoder``) from a ComfyUI VAE: model-space latent →
    ``first_stage_model.decode(latent_format.process_out(x))``, the image in [-1, 1] that VAEDecode
    turns into ``clamp((y + 1)/2, 0, 1)`` (no clamp here, so gradients reach every pixel's latent)."""

    def __init__(self, first_stage: torch.nn.Module, latent_format):
        super().__init__()
        self.first_stage, self.latent_format = first_stage, latent_format

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        weight = next(self.first_stage.parameters())   # the VAE's own device and dtype (as VAE.decode casts)
        image = self.first_stage.decode(self.latent_format.process_out(x0).to(weight.device, weight.dtype))
        return image.to(x0.device, torch.float32)


def vae_image_decoder(vae, latent_format, device=None, trainable_copy: bool = False) -> VAEImageDecoder:
    """The VAE's differentiable decoder with frozen weights. ``trainable_copy``: a float32 copy of
    ``vae.first_stage_model`` on ``device`` made outside inference mode (for training: autograd
    refuses the inference tensors ComfyUI loads, and the VAE object itself stays untouched); else
    the VAE's own module, loaded on its device (for no-grad encoding)."""
    if trainable_copy:
        import copy
        with torch.inference_mode(False):
            module = copy.deepcopy(vae.first_stage_model).float().to(device).eval().requires_grad_(False)
    else:
        mm.load_models_gpu([vae.patcher])
        module = vae.first_stage_model
    return VAEImageDecoder(module, latent_format)


NEEDS_VAE = ("vae: this DisDiff model's encoder reads decoded images (encoder_input 'image'): connect the VAE of "
             "the model it was trained on")


def encode_codes(disdiff: DisDiffModel, model_space_latents: torch.Tensor, image_decoder=None) -> torch.Tensor:
    """Codes [B, N, D] of model-space latents, in chunks of 64 on the torch device; ``image_decoder``
    (core.disdiff.ImageDecoder on that device) for an ``encoder_input="image"`` model without one attached."""
    cfg = disdiff.config
    if tuple(model_space_latents.shape[1:]) != (cfg.latent_channels, *cfg.latent_size):
        raise InputError(f"latent of shape {tuple(model_space_latents.shape[1:])} does not fit the DisDiff model, "
                         f"trained on {(cfg.latent_channels, *cfg.latent_size)}: use the same image size and VAE")
    device = mm.get_torch_device()
    model = disdiff.on(device)
    if cfg.encoder_input == "image" and image_decoder is None and model.image_decoder is None:
        raise InputError(NEEDS_VAE)
    with torch.no_grad():
        codes = torch.cat([model.encode(chunk.to(device), image_decoder) for chunk in model_space_latents.split(64)])
    return codes.float().to(mm.intermediate_device())


# --------------------------------------------------------------------------------------------
# Partial-condition sampling patch
# --------------------------------------------------------------------------------------------

class PartialConditionWrapper:
    """ComfyUI ``model_function_wrapper``: x̂0 ← x̂0 + σ·√(1−ᾱ)·Σ_{c∈S} w_c·G^c (eq. 6 in σ-space).

    Each model call runs the UNet once (features recorded by the capture patches) and G once. G is
    evaluated on the rows of ONE chunk of the call, the unconditional one when the call has it (the
    empty prompt, i.e. the frozen model DisDiff was trained on), else the first, and the same shift is
    added to every chunk. With cfg the guided prediction u + w·(c − u) then moves by exactly
    −√(1−ᾱ)·Σ w_c·G^c: eq. 6 for the guided model, for any cfg, at the cost of one decoder pass of
    batch·|S| rows (half of what both halves would cost). An empty S is an exact no-op. An existing
    wrapper on the MODEL is kept (called inside)."""

    UNCOND = 1   # ComfyUI's cond_or_uncond code of the negative / unconditional chunk

    def __init__(self, disdiff: DisDiffModel, codes: torch.Tensor, factors: list[int], strengths: list[float],
                 inner=None):
        self.disdiff, self.codes, self.inner = disdiff, codes, inner
        kept = [(f, w) for f, w in zip(factors, strengths) if w != 0]
        self.factors = [f for f, _ in kept]
        self.strengths = [w for _, w in kept]
        self._per_device = {}   # device → (codes, factor indices, exp(A − Aᵀ)): made once, not at every model call

    def _device_inputs(self, model: dd.DisDiff, device):
        """The codes, S as a LongTensor and G's positional table on ``device``, computed at the first model
        call of a sampling and reused (the weights do not change while sampling)."""
        key = str(device)
        if key not in self._per_device:
            with torch.no_grad():
                self._per_device[key] = (self.codes.to(device),
                                         torch.tensor(self.factors, dtype=torch.long, device=device),
                                         model.decoder.positional_embeddings())
        return self._per_device[key]

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
        with core_input_errors("model"):
            dd.check_features(self.disdiff.config, out)
        kinds = list(args.get("cond_or_uncond") or [0])
        chunks = len(kinds)
        per = x.shape[0] // chunks
        k = kinds.index(self.UNCOND) if self.UNCOND in kinds else 0
        rows = slice(k * per, (k + 1) * per)
        chunk = dd.FrozenOutput(None, [f[rows] for f in out.features], out.emb[rows])
        device = out.emb.device
        half = out.features[0].dtype in (torch.float16, torch.bfloat16) and device.type == "cuda"
        model = self.disdiff.on(device)
        codes, factors, positional = self._device_inputs(model, device)
        with torch.no_grad(), torch.autocast(device.type, dtype=out.features[0].dtype, enabled=half), \
                core_input_errors("factors"):   # one code, or one per image: core's check
            g = model.gradients(chunk, codes, factors, positional)
        g = g.float().repeat(chunks, *([1] * (g.ndim - 1)))
        return dd.partial_condition_denoised(denoised, sigma.to(device), g, self.strengths)


def patch_model(model, disdiff: DisDiffModel, codes: torch.Tensor, factors: list[int], strengths: list[float]):
    """A clone of ``model`` with the partial-condition wrapper; ``model`` itself stays unpatched."""
    patched = model.clone()
    inner = patched.model_options.get("model_function_wrapper")
    patched.set_model_unet_function_wrapper(PartialConditionWrapper(disdiff, codes, factors, strengths, inner))
    return patched


# --------------------------------------------------------------------------------------------
# Data and training
# --------------------------------------------------------------------------------------------

def _inside(path: str, root: str) -> bool:
    real, root = os.path.realpath(path), os.path.realpath(root)
    return real == root or real.startswith(root + os.sep)


def image_folders() -> list[str]:
    """Subfolders of ComfyUI's input folder (relative, '/'-separated, at most MAX_FOLDER_DEPTH deep), the
    choices of Train DisDiff's image_folder; links that lead outside the input folder are left out."""
    root = folder_paths.get_input_directory()
    found = []
    for current, dirs, _ in os.walk(root):
        rel = os.path.relpath(current, root)
        depth = 0 if rel == "." else rel.count(os.sep) + 1
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and _inside(os.path.join(current, d), root))
        if depth >= MAX_FOLDER_DEPTH:
            dirs[:] = []
        for d in dirs:
            found.append(os.path.join(rel, d).replace(os.sep, "/") if depth else d)
            if len(found) >= MAX_LISTED_FOLDERS:
                return found
    return found


def folder_images(image_folder: str) -> list[str]:
    """Paths of the images in ``image_folder``, one of :func:`image_folders`. Every refusal (not in the
    list, outside the input folder, no images) gets the same message, which does not echo the value: a prompt
    cannot probe the disk."""
    refusal = InputError(f"image_folder: not a folder of images ({', '.join(IMAGE_EXTS)}) inside ComfyUI's input "
                         "folder; choose one from the list, or connect images")
    root = folder_paths.get_input_directory()
    if not isinstance(image_folder, str) or image_folder not in image_folders():
        raise refusal
    folder = os.path.join(root, *image_folder.split("/"))
    if not (os.path.isdir(folder) and _inside(folder, root)):
        raise refusal
    paths = [os.path.join(folder, n) for n in sorted(os.listdir(folder)) if n.lower().endswith(IMAGE_EXTS)]
    paths = [p for p in paths if os.path.isfile(p) and _inside(p, root)]
    if not paths:
        raise refusal
    return paths


def check_training_size(count: int, size: int) -> None:
    """Refuse before loading when the images would not fit the memory budget as float32."""
    per_image = int(size) * int(size) * 3 * 4
    if count * per_image > MAX_TRAINING_BYTES:
        raise InputError(f"image_folder: {count} images at {size} px take {count * per_image / 2**30:.1f} GiB as float32; "
                         f"Train DisDiff holds at most {MAX_TRAINING_BYTES >> 30} GiB ({MAX_TRAINING_BYTES // per_image} "
                         "images at this size): use fewer or smaller images, or bench/train_disdiff.py")


def load_image_folder(image_folder: str, size: int, limit: int = 0) -> torch.Tensor:
    """IMAGE batch [B, size, size, 3] of the images in ``image_folder``, a subfolder of ComfyUI's input folder
    (centre-cropped, resized)."""
    from PIL import Image
    import numpy as np
    paths = folder_images(image_folder)
    if limit > 0:
        paths = paths[:limit]
    check_training_size(len(paths), size)
    images = []
    for path in paths:
        mm.throw_exception_if_processing_interrupted()
        try:
            with Image.open(path) as im:
                im = im.convert("RGB")
                w, h = im.size
                side = min(w, h)
                im = im.crop(((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side))
                im = im.resize((size, size), Image.BICUBIC)
        except (OSError, ValueError, Image.DecompressionBombError):
            raise InputError(f"image_folder: {image_folder}/{os.path.basename(path)} is not a readable image") from None
        images.append(torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0))
    return torch.stack(images)


def encode_images(model, vae, images: torch.Tensor, batch: int = 32) -> torch.Tensor:
    """Model-space latents (``process_latent_in`` of the VAE encoding) of IMAGE-layout images."""
    chunks = []
    for i in range(0, images.shape[0], batch):
        mm.throw_exception_if_processing_interrupted()
        chunks.append(vae.encode(images[i:i + batch, :, :, :3]).float().cpu())
    return model.model.process_latent_in(torch.cat(chunks))


def checkpoint_name(save_name: str) -> str:
    """``save_name`` as a checkpoint file name, checked before any work: a plain name (no folder, NUL or
    control character, at most 120 characters) that is no shipped file's name."""
    name = (save_name.strip() if isinstance(save_name, str) else save_name) or "disdiff"
    name = check_file_name("save_name", name)
    if not name.endswith(".safetensors"):
        name += ".safetensors"
    shipped = os.path.isfile(os.path.join(PACK_WEIGHTS, name))
    if name.startswith(RESERVED_PREFIX) or shipped:
        raise InputError(f"save_name: {name} is a name of the pack's shipped files (names starting with "
                         f"{RESERVED_PREFIX!r} are reserved); choose another")
    return name


def default_checkpoint_path(save_name: str, resume: bool = False) -> str:
    """Where Train DisDiff writes: ``models/disdiff/<save_name>.safetensors``, or with ``resume`` off and that
    file taken, the first free ``<save_name>_NNNNN.safetensors``: training never overwrites another run. A name
    that another registered disdiff folder already holds is refused (it would shadow, or be shadowed by, it)."""
    name = checkpoint_name(save_name)
    folders = folder_paths.get_folder_paths(DISDIFF_FOLDER)
    target = folders[0]
    for other in folders[1:]:
        if os.path.isfile(os.path.join(other, name)) and os.path.realpath(other) != os.path.realpath(target):
            raise InputError(f"save_name: another models folder already holds {name}; choose another name")
    path = os.path.join(target, name)
    if resume or not os.path.exists(path):
        return path
    stem = name[: -len(".safetensors")]
    counter = 1
    while os.path.exists(os.path.join(target, f"{stem}_{counter:05}.safetensors")):
        counter += 1
    return os.path.join(target, f"{stem}_{counter:05}.safetensors")


def check_checkpoint_file(path: str, shown: str) -> None:
    """Refuse a crafted or foreign DisDiff file with a message naming it, before any tensor is allocated:
    the header, the metadata's JSON, ``step``, and the networks its config describes (built on the meta
    device) against the tensors the file holds. A deliberate parallel of core.disdiff.load_checkpoint's checks,
    which run once the tensors are loaded: these run on the header alone."""
    header = read_safetensors_header(path, shown)
    try:
        fmt = json.loads(header.metadata.get("format", "null"))
    except (ValueError, RecursionError):
        fmt = None
    if fmt != dd.FORMAT or "config" not in header.metadata:
        raise InputError(f"{shown} is not a DisDiff checkpoint (no {dd.FORMAT!r} format in its metadata)")
    json_metadata(header, "config", shown)
    json_metadata(header, "info", shown, default={})
    optimizer = json_metadata(header, "optimizer", shown, default={"param_groups": [], "scalars": {}})
    if not isinstance(optimizer.get("param_groups"), list) or not isinstance(optimizer.get("scalars"), dict):
        raise InputError(f"{shown}: its 'optimizer' metadata has no param_groups list and scalars table")
    if not header.metadata.get("step", "0").strip().isdigit():
        raise InputError(f"{shown}: its 'step' metadata must be a whole number, got {short(header.metadata['step'])}")
    try:
        config = dd.DisDiffConfig.from_json(header.metadata["config"])
    except (ValueError, TypeError, KeyError, RecursionError) as e:
        raise InputError(f"{shown}: unreadable DisDiff config ({type(e).__name__})") from None
    check_tensors_match(meta_shapes(lambda: dd.DisDiff(config), shown), header, shown, prefix="model.")


def train_from_latents(model, positive, latents: torch.Tensor, *, num_factors, code_dim, steps, batch_size,
                       learning_rate, seed, checkpoint_path, checkpoint_every, resume, log_every=10,
                       callback=None, on_step=None, train_kw: dict | None = None, **kw):
    """Train on model-space ``latents`` on top of the loaded MODEL (the node's and the CLI's path).
    ``kw`` goes to the config (encoder_width, decoder_width, ...), ``train_kw`` to core's
    train_disdiff (dis_weight, warmup, loss_type, weighting, cuda_graph, ...)."""
    check_unet_model(model)
    check_conditioning(positive, "positive")
    load_frozen(model)
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
        net, history = train_disdiff(data, frozen, ab, config=config, steps=steps, batch_size=batch_size,
                                     lr=learning_rate, seed=seed, device=device, autocast_dtype=autocast,
                                     log_every=log_every, checkpoint_path=checkpoint_path,
                                     checkpoint_every=checkpoint_every, resume=resume, callback=callback,
                                     on_step=on_step, **(train_kw or {}))
    net = net.float().cpu().eval()
    return DisDiffModel(net, os.path.basename(checkpoint_path or ""), steps), history


# --------------------------------------------------------------------------------------------
# Nodes
# --------------------------------------------------------------------------------------------

class TrainDisDiff:
    DESCRIPTION = (
        "Learns N factor codes (encoder) and one gradient field per factor (decoder) on top of a frozen MODEL "
        "from a folder of images (DisDiff, Yang et al. 2023). For small jobs; scripts/train_disdiff.py runs long "
        "ones with the same code. Saves safetensors checkpoints to models/disdiff and can resume."
    )
    CATEGORY = f"{CATEGORY}/disdiff"
    RETURN_TYPES = (DISDIFF, "IMAGE")
    RETURN_NAMES = ("disdiff", "loss_plot")
    OUTPUT_TOOLTIPS = ("The trained DisDiff (factor encoder E and gradient fields G^c), for DisDiff Encode and Partial-Condition Sampling.",
                       "The training loss (eq. 14) over the steps of this run, one point per log interval.")
    FUNCTION = "train"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The frozen diffusion model (ε or v prediction, UNet)."}),
                "vae": ("VAE", {"tooltip": "Encodes the training images into the model's latent space."}),
                "positive": ("CONDITIONING", {"tooltip": "The fixed prompt of the frozen model (the empty prompt = its "
                                                         "unconditional model, the paper's setting)."}),
                "image_folder": ([NO_FOLDER, *image_folders()], {
                    "tooltip": "A subfolder of ComfyUI's input folder holding the training images (png/jpg/webp/bmp), "
                               f"or none with the images input. All images are held as float32: at most "
                               f"{MAX_TRAINING_BYTES >> 30} GiB (e.g. {MAX_TRAINING_BYTES // (128 * 128 * 12)} images at 128 px)."}),
                "size": ("INT", {"default": 128, "min": 64, "max": 1024, "step": 8,
                                 "tooltip": "Images are centre-cropped and resized to this many pixels."}),
                "num_factors": ("INT", {"default": 6, "min": 1, "max": 64, "tooltip": "N, the number of factor codes z^1…z^N."}),
                "code_dim": ("INT", {"default": 32, "min": 1, "max": 512, "tooltip": "Channels of each factor code."}),
                "steps": ("INT", {"default": 1000, "min": 1, "max": 1000000, "tooltip": "Adam steps of training."}),
                "batch_size": ("INT", {"default": 32, "min": 1, "max": 1024, "tooltip": "Images per training step."}),
                "learning_rate": ("FLOAT", {"default": 1e-3, "min": 1e-7, "max": 1e-1, "step": 1e-5, "tooltip": (
                    "AdamW's learning rate (after a linear warm-up). 1e-3: on the factor world the paper-like 2e-4 left "
                    "the fields unlearned after 5,000 steps, 1e-3 and 2e-3 learned them (README, DisDiff).")}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFF, "tooltip": "Initial weights, data order and noise."}),
                "save_name": ("STRING", {"default": "disdiff", "tooltip": (
                    "Checkpoint file in models/disdiff (a plain name, at most 120 characters). Never overwrites: "
                    "a taken name gets _00001, ... unless resume is on; names of the pack's shipped files are refused.")}),
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
        size, num_factors, code_dim = (check_int(n, v, lo, hi) for n, v, lo, hi in (
            ("size", size, 8, 1024), ("num_factors", num_factors, 1, 64), ("code_dim", code_dim, 1, 512)))
        steps, batch_size, checkpoint_every = (check_int(n, v, lo) for n, v, lo in (
            ("steps", steps, 1), ("batch_size", batch_size, 1), ("checkpoint_every", checkpoint_every, 0)))
        learning_rate = check_finite("learning_rate", learning_rate, 0.0)
        path = default_checkpoint_path(save_name, resume)  # checked before any work, never overwriting
        if resume and os.path.exists(path):
            check_checkpoint_file(path, os.path.basename(path))
        if images is None:
            images = load_image_folder(image_folder, size)
        latents = encode_images(model, vae, images)
        bar = comfy.utils.ProgressBar(steps)

        def on_step(step, total):   # every step, host only: progress and cancel
            mm.throw_exception_if_processing_interrupted()
            bar.update_absolute(step, total)

        try:   # core's typed errors only: any other ValueError comes from the host's models
            with core_input_errors("save_name", errors=dd.CheckpointError), \
                    core_input_errors("model", errors=dd.FeatureMismatchError):
                disdiff, history = train_from_latents(
                    model, positive, latents, num_factors=num_factors, code_dim=code_dim, steps=steps,
                    batch_size=batch_size, learning_rate=learning_rate, seed=seed, checkpoint_path=path,
                    checkpoint_every=checkpoint_every, resume=resume, log_every=max(1, min(50, steps // 20)),
                    on_step=on_step)
        except (OSError, SafetensorError) as e:  # writing a checkpoint (disk full, ...): its name, not its server path
            reason = getattr(e, "strerror", None) or str(e).split(": ")[-1][:80]
            raise InputError(f"save_name: could not write {os.path.basename(path)} in models/{DISDIFF_FOLDER} "
                             f"({reason})") from None
        history = [h for h in history if "step" in h]
        last = history[-1] if history else {}
        summary = (f"{os.path.basename(path)}: step {steps}, loss {last.get('loss', float('nan')):.4f}, "
                   f"reconstruction {last.get('recon', float('nan')):.4f}")
        every = history[1]["step"] - history[0]["step"] if len(history) > 1 else 1
        plot = image_tensor(draw_loss_curve([h["loss"] for h in history],
                                            f"Train DisDiff: loss (eq. 14), one point per {every} steps", "log point"))
        return {"ui": {"text": [summary]}, "result": (disdiff, plot)}


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
        path = shipped_first(DISDIFF_FOLDER, disdiff_name)
        check_checkpoint_file(path, disdiff_name)
        try:
            loaded = dd.load_checkpoint(path, require_decoder=False)   # an image-input model: DisDiff Encode's vae
        except (ValueError, TypeError, KeyError) as e:  # CheckpointError, or what the checks above did not foresee
            raise InputError(f"disdiff_name: {disdiff_name} is not a readable DisDiff checkpoint "
                             f"({str(e).replace(path, disdiff_name)})") from None
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
                             "vae": ("VAE", {"tooltip": "The model's VAE, to encode the image input (and to decode, for "
                                                             "a DisDiff whose encoder reads images)."})}}

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
        decoder = None   # an image-input model without a vae: encode_codes refuses it (NEEDS_VAE)
        if disdiff.config.encoder_input == "image" and vae is not None:
            decoder = vae_image_decoder(vae, disdiff.latent_format())
        codes = encode_codes(disdiff, disdiff.latent_in(samples), decoder)
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
