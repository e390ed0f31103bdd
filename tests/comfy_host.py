"""Run the pack inside a real, headless ComfyUI (CPU) from pytest.

Nothing here imports ComfyUI at module import time: the pure-core tests import this package
without ComfyUI installed. Everything ComfyUI-related happens in :func:`start_host` and later.

ComfyUI is found through the ``COMFYUI_PATH`` environment variable (a ComfyUI work tree). No
ComfyUI code lives in this repository; it is imported from there at run time.

What :func:`start_host` does mirrors ``ComfyUI/main.py`` (minus the HTTP server):

* ``sys.argv`` = ``main.py --cpu --preview-method none --dont-print-server`` (plus the words in the
  optional env var ``COMFYUI_TEST_ARGS``), then ``comfy.options.enable_args_parsing()`` and the
  imports, so ``comfy.cli_args.args`` is what ``python main.py --cpu`` would give;
* ``nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False)`` (the stock
  ``comfy_extras`` nodes: SamplerCustom, KSamplerSelect, FlipSigmas, ...);
* input/output/temp/user directories of ``folder_paths`` point into a fresh temp dir;
* the pack is loaded exactly as ComfyUI loads a custom node folder:
  ``await nodes.load_custom_node(PACK_ROOT, ignore=<stock node names>)`` between
  ``hook_breaker_ac10a0.save_functions()`` and ``restore_functions()``;
* the progress-bar hook of ``main.hijack_progress`` is installed against a server stub.

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
"""
from __future__ import annotations

import asyncio
import copy
import functools
import logging
import math
import os
import re
import shutil
import sys
import tempfile
import uuid
from pathlib import Path

PACK_ROOT = str(Path(__file__).resolve().parent.parent)

SKIP_REASON = (
    "ComfyUI integration tests SKIPPED: set COMFYUI_PATH to a ComfyUI work tree "
    "(a folder with nodes.py, execution.py, folder_paths.py and comfy/) to run the pack inside "
    "real headless ComfyUI, e.g. COMFYUI_PATH=/path/to/ComfyUI pytest"
)

# ComfyUI command line used by start_host (what `python main.py <these>` would parse).
BASE_ARGS = ["--cpu", "--preview-method", "none", "--dont-print-server"]

KINDS = ("sd1", "sd1_v", "sdxl")

_STATE: dict = {}          # filled by start_host
_MODEL_CACHE: dict = {}    # (kind, seed) -> (MODEL, CLIP, VAE)
LAST_RUN: dict = {}        # executor, prompt, prompt_id, server of the latest run_prompt


# --------------------------------------------------------------------------------------------
# Locating ComfyUI
# --------------------------------------------------------------------------------------------

def comfyui_path() -> str | None:
    """The ComfyUI work tree named by the COMFYUI_PATH env var (absolute), or None if unset."""
    p = os.environ.get("COMFYUI_PATH", "").strip()
    return os.path.abspath(os.path.expanduser(p)) if p else None


def host_problem() -> str | None:
    """Why the host cannot run (a sentence), or None if COMFYUI_PATH looks like ComfyUI."""
    p = comfyui_path()
    if p is None:
        return "COMFYUI_PATH is not set"
    missing = [n for n in ("nodes.py", "execution.py", "folder_paths.py", "comfy") if not os.path.exists(os.path.join(p, n))]
    if missing:
        return f"COMFYUI_PATH={p} is not a ComfyUI work tree (missing {', '.join(missing)})"
    return None


def host_available() -> bool:
    """True when COMFYUI_PATH points at something that looks like a ComfyUI work tree."""
    return host_problem() is None


def comfyui_version() -> str | None:
    """ComfyUI's version string read from COMFYUI_PATH/comfyui_version.py (without importing)."""
    p = comfyui_path()
    if p is None:
        return None
    try:
        text = Path(p, "comfyui_version.py").read_text()
    except OSError:
        return None
    m = re.search(r"__version__\s*=\s*['\"]([^'\"]+)['\"]", text)
    return m.group(1) if m else None


def require_host() -> None:
    """pytest.skip the calling test, with a loud reason, when no usable COMFYUI_PATH is set."""
    problem = host_problem()
    if problem is not None:
        import pytest
        pytest.skip(f"{SKIP_REASON} [{problem}]")


def host_started() -> bool:
    """True once start_host() has completed in this process."""
    return "pack" in _STATE


# --------------------------------------------------------------------------------------------
# Starting ComfyUI
# --------------------------------------------------------------------------------------------

class ServerStub:
    """The part of ``server.PromptServer`` that PromptExecutor, the progress handlers and stock
    nodes use. Every message is recorded in ``messages`` as (event, data)."""

    def __init__(self):
        self.client_id = None
        self.last_node_id = None
        self.last_prompt_id = None
        self.sockets_metadata = {}
        self.messages = []

    def send_sync(self, event, data, sid=None):
        self.messages.append((event, data))

    def send_progress_text(self, text, node_id, sid=None):
        self.messages.append(("progress_text", {"node_id": node_id, "text": text}))

    def queue_updated(self):
        pass


class _Capture(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.records = []

    def emit(self, record):
        try:
            self.records.append(record.getMessage())
        except Exception:  # pragma: no cover
            self.records.append(str(record.msg))


def start_host():
    """Start headless ComfyUI once per process and load the pack; return the pack's module.

    Idempotent (cached). Raises RuntimeError (with ComfyUI's logged traceback) if the pack fails
    to load, and if COMFYUI_PATH is unusable.
    """
    if "pack" in _STATE:
        return _STATE["pack"]
    if "error" in _STATE:
        raise RuntimeError(_STATE["error"])
    problem = host_problem()
    if problem is not None:
        raise RuntimeError(f"{SKIP_REASON} [{problem}]")
    try:
        return _start_host()
    except Exception as e:
        _STATE["error"] = f"start_host() failed: {type(e).__name__}: {e}"
        raise


def _start_host():
    root = comfyui_path()
    for k, v in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"), ("HF_HUB_DISABLE_TELEMETRY", "1"),
                 ("DO_NOT_TRACK", "1"), ("TOKENIZERS_PARALLELISM", "false")):
        os.environ.setdefault(k, v)

    gpu = os.environ.get("DISENTANGLE_HOST_GPU") == "1"  # benches on a GPU machine; tests always use the CPU
    base_args = [a for a in BASE_ARGS if a != "--cpu"] if gpu else BASE_ARGS
    if "comfy.cli_args" in sys.modules and not gpu:
        mod = sys.modules["comfy.cli_args"]
        if not getattr(mod.args, "cpu", False):
            raise RuntimeError("comfy was imported before start_host() without --cpu; start_host() must do "
                               "the first ComfyUI import of the process")
    if root in sys.path:
        sys.path.remove(root)
    sys.path.insert(0, root)

    saved_argv = sys.argv
    extra = os.environ.get("COMFYUI_TEST_ARGS", "").split()
    sys.argv = [os.path.join(root, "main.py"), *base_args, *extra]
    try:
        import comfy.options
        comfy.options.enable_args_parsing()
        import comfy.cli_args  # noqa: F401  (parses sys.argv)
        import folder_paths
        import comfy.utils
        import comfy.model_management
        import execution
        import nodes
    finally:
        sys.argv = saved_argv

    if not os.path.realpath(nodes.__file__).startswith(os.path.realpath(root)):
        raise RuntimeError(f"'import nodes' resolved to {nodes.__file__}, not ComfyUI's nodes.py in {root}")

    tmp = tempfile.mkdtemp(prefix="comfyui_disentangle_host_")
    dirs = {n: os.path.join(tmp, n) for n in ("input", "output", "temp", "user")}
    for d in dirs.values():
        os.makedirs(d, exist_ok=True)
    folder_paths.set_input_directory(dirs["input"])
    folder_paths.set_output_directory(dirs["output"])
    folder_paths.set_temp_directory(dirs["temp"])
    folder_paths.set_user_directory(dirs["user"])
    import atexit
    if not os.environ.get("COMFYUI_TEST_KEEP_TMP"):
        atexit.register(shutil.rmtree, tmp, True)
    atexit.register(_shutdown)

    server = ServerStub()
    _install_progress_hook(server)

    import hook_breaker_ac10a0
    hook_breaker_ac10a0.save_functions()
    try:
        asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
        stock = set(nodes.NODE_CLASS_MAPPINGS)

        cap = _Capture()
        root_logger = logging.getLogger()
        root_logger.addHandler(cap)
        try:
            ok = asyncio.run(nodes.load_custom_node(PACK_ROOT, ignore=stock, module_parent="custom_nodes"))
        finally:
            root_logger.removeHandler(cap)
    finally:
        hook_breaker_ac10a0.restore_functions()

    sys_module_name = PACK_ROOT.replace(".", "_x_")  # how nodes.load_custom_node names a folder module
    pack = sys.modules.get(sys_module_name)
    if not ok or pack is None:
        logged = "\n".join(cap.records) or "(nothing logged)"
        raise RuntimeError(f"ComfyUI failed to load the pack {PACK_ROOT} through nodes.load_custom_node "
                           f"(returned {ok!r}). ComfyUI logged:\n{logged}")

    # Stock nodes that import `server` (not importable in every test venv) read PromptServer.instance.
    srv_mod = sys.modules.get("server")
    if srv_mod is not None and getattr(srv_mod, "PromptServer", None) is not None \
            and not hasattr(srv_mod.PromptServer, "instance"):
        srv_mod.PromptServer.instance = server

    _STATE.update(root=root, tmp=tmp, dirs=dirs, server=server, pack=pack, pack_module_name=sys_module_name,
                  load_log=list(cap.records), version=comfyui_version())
    register_test_nodes()
    return pack


def _shutdown():
    """Drop every model reference while modules are still intact (ModelPatcher.__del__ needs them)."""
    import gc
    _MODEL_CACHE.clear()
    LAST_RUN.clear()
    try:
        import comfy.model_management
        comfy.model_management.unload_all_models()
    except Exception:  # pragma: no cover
        pass
    gc.collect()


def pack_module(relname: str = ""):
    """The pack's (sub)module as ComfyUI loaded it, e.g. pack_module("nodes.inversion").

    Use these (or nodes.NODE_CLASS_MAPPINGS) in host tests: ``comfyui_disentangle.nodes.x`` is a
    second copy of the same file under another name, with different class identities."""
    import importlib
    start_host()
    name = _STATE["pack_module_name"] + ("." + relname if relname else "")
    return importlib.import_module(name)


def _install_progress_hook(server):
    """Same hook as ComfyUI main.hijack_progress, against the stub server."""
    import comfy.utils
    import comfy.model_management
    from comfy_execution.progress import get_progress_state
    from comfy_execution.utils import get_executing_context

    def hook(value, total, preview_image, prompt_id=None, node_id=None):
        ctx = get_executing_context()
        if prompt_id is None and ctx is not None:
            prompt_id = ctx.prompt_id
        if node_id is None and ctx is not None:
            node_id = ctx.node_id
        comfy.model_management.throw_exception_if_processing_interrupted()
        if prompt_id is None:
            prompt_id = server.last_prompt_id
        if node_id is None:
            node_id = server.last_node_id
        get_progress_state().update_progress(node_id, value, total, preview_image)
        server.send_sync("progress", {"value": value, "max": total, "prompt_id": prompt_id, "node": node_id},
                         server.client_id)

    comfy.utils.set_progress_bar_global_hook(hook)


def host_info() -> dict:
    """root, tmp dir, folder dirs, version, pack module name, warnings logged while loading the pack."""
    start_host()
    return {k: v for k, v in _STATE.items() if k not in ("pack", "server")}


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


def init_random_weights(module, seed: int) -> None:
    """Seeded, deterministic random init of every parameter (ComfyUI's ops skip torch's init and
    leave weights uninitialised): norms 1/0, matrices/kernels N(0, 1/fan_in), other vectors N(0, 0.02²)."""
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
                else:
                    std = 0.02
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
    pixels = torch.from_numpy(_test_pattern(64)).permute(2, 0, 1)[None] * 2.0 - 1.0
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
                   seed=0, init_std=0.1, modules=None):
    """An untrained DisDiff (type DISDIFF) fitting ``model``'s UNet features for latents of
    ``latent_shape`` (C, H, W), with its zero-initialised layers randomised so that G ≠ 0. Built on
    the CPU (the DISDIFF object moves itself to the model's device on use); the feature probe runs
    on the model's device in inference mode, so it works for models loaded inside or outside it.
    ``modules``: (core.disdiff, nodes.disdiff) of a process that started ComfyUI itself (a bench)."""
    import torch
    import comfy.model_management as mm
    dd, node = modules or (pack_module("core.disdiff"), pack_module("nodes.disdiff"))
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


# --------------------------------------------------------------------------------------------
# UI workflow -> API prompt
# --------------------------------------------------------------------------------------------

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
UI_ONLY_TYPES = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}
UPLOAD_FLAGS = ("image_upload", "video_upload", "animated_image_upload", "audio_upload")
MODE_MUTED, MODE_BYPASS = 2, 4
_PRIMITIVE = object()


def _is_widget(typ, opts) -> bool:
    if opts.get("forceInput") or opts.get("rawLink"):
        return False
    return isinstance(typ, (list, tuple)) or typ in WIDGET_TYPES


def _has_control(name, typ, opts) -> bool:
    cag = opts.get("control_after_generate")
    if cag is None:  # frontend: `spec.control_after_generate ?? ['seed','noise_seed'].includes(name)` for INT
        return typ == "INT" and name in ("seed", "noise_seed")
    return bool(cag)


def _norm_links(workflow) -> dict:
    links = {}
    for link in workflow.get("links", []) or []:
        if isinstance(link, dict):
            lid, o, os_, t, ts, typ = (link["id"], link["origin_id"], link["origin_slot"], link["target_id"],
                                       link["target_slot"], link.get("type"))
        else:
            lid, o, os_, t, ts, typ = link[:6]
        links[lid] = (o, os_, t, ts, typ)
    return links


def ui_to_api(workflow: dict, input_types: dict | None = None) -> dict:
    """Convert a frontend-saved (UI format) workflow to an API prompt {id: {class_type, inputs}}.

    ``input_types``: class_type → its INPUT_TYPES dict (e.g. each node's "input" of a server's
    /object_info), to convert without starting the host; default: the host's node classes.

    Widget values are matched to INPUT_TYPES order (required then optional, link-only types
    skipped), skipping the control_after_generate value stored after seed-like widgets and the
    value of the synthetic image-upload widget (end of the required widgets). Links override
    widget values. Muted (mode 2) nodes are dropped, bypassed (mode 4) nodes pass a same-type
    input through (same slot first, then the first input of that type), Reroutes resolve to their
    source, PrimitiveNode links keep the target's widget value, Note/MarkdownNote are ignored.
    Subgraphs and group nodes are not supported.
    """
    if input_types is None:
        start_host()
        import nodes as comfy_nodes
        classes = comfy_nodes.NODE_CLASS_MAPPINGS
        input_types = {name: cls.INPUT_TYPES() for name, cls in classes.items()
                       if name in {n.get("type") for n in workflow.get("nodes", [])}}

    by_id = {n["id"]: n for n in workflow.get("nodes", [])}
    links = _norm_links(workflow)
    subgraph_ids = {sg.get("id") for sg in (workflow.get("definitions", {}) or {}).get("subgraphs", []) or []}

    def resolve(link_id, want_type, depth=0):
        if depth > 1000:
            raise ValueError("link cycle in workflow")
        if link_id is None or link_id not in links:
            return None
        o, os_, _, _, _ = links[link_id]
        src = by_id.get(o)
        if src is None:
            return None
        stype, mode = src.get("type"), src.get("mode", 0)
        if stype == "Reroute":
            ins = src.get("inputs") or []
            return resolve(ins[0].get("link") if ins else None, want_type, depth + 1)
        if stype == "PrimitiveNode":
            return _PRIMITIVE
        if stype in UI_ONLY_TYPES or mode == MODE_MUTED:
            return None
        if mode == MODE_BYPASS:
            ins = src.get("inputs") or []
            for i in [os_] + list(range(len(ins))):
                if 0 <= i < len(ins) and ins[i].get("type") == want_type:
                    return resolve(ins[i].get("link"), want_type, depth + 1)
            return None
        return [str(o), os_]

    prompt = {}
    for node in workflow.get("nodes", []):
        ntype, mode = node.get("type"), node.get("mode", 0)
        if ntype in UI_ONLY_TYPES or mode in (MODE_MUTED, MODE_BYPASS):
            continue
        if ntype in subgraph_ids:
            raise NotImplementedError(f"node {node['id']}: subgraph nodes are not supported by ui_to_api")
        spec = input_types.get(ntype)
        if spec is None:
            raise KeyError(f"node {node['id']}: unknown node type {ntype!r} (not in nodes.NODE_CLASS_MAPPINGS)")
        values = node.get("widgets_values", [])
        if values is None:
            values = []
        ui_inputs = {i["name"]: i for i in node.get("inputs", []) or []}
        inputs, idx, done = {}, 0, set()
        for section in ("required", "optional"):
            sec = spec.get(section, {}) or {}
            for name, s in sec.items():
                typ = s[0]
                opts = s[1] if len(s) > 1 and isinstance(s[1], dict) else {}
                if _is_widget(typ, opts):
                    if isinstance(values, dict):
                        if name in values:
                            inputs[name] = values[name]
                    else:
                        if idx < len(values):
                            inputs[name] = values[idx]
                        idx += 1 + (1 if _has_control(name, typ, opts) else 0)
                ui_in = ui_inputs.get(name)
                if ui_in is not None and ui_in.get("link") is not None:
                    src = resolve(ui_in["link"], ui_in.get("type"))
                    if src is _PRIMITIVE or src is None:
                        pass  # keep the widget value (if any)
                    else:
                        inputs[name] = src
                done.add(name)
            if section == "required" and not isinstance(values, dict) and \
                    any(len(s) > 1 and isinstance(s[1], dict) and any(s[1].get(f) for f in UPLOAD_FLAGS) for s in sec.values()):
                idx += 1
        for name, ui_in in ui_inputs.items():  # dynamic inputs not declared in INPUT_TYPES
            if name not in done and ui_in.get("link") is not None:
                src = resolve(ui_in["link"], ui_in.get("type"))
                if src is not None and src is not _PRIMITIVE:
                    inputs[name] = src
        prompt[str(node["id"])] = {"class_type": ntype, "inputs": inputs}
    return prompt


# --------------------------------------------------------------------------------------------
# Running prompts
# --------------------------------------------------------------------------------------------

def _format_validation(error, node_errors) -> str:
    lines = []
    if error:
        lines.append(f"{error.get('type')}: {error.get('message')}: {error.get('details')}")
    for nid, ne in (node_errors or {}).items():
        for r in ne.get("errors", []):
            extra = dict(r.get("extra_info") or {})
            tb = extra.pop("traceback", None)
            lines.append(f"  node {nid} ({ne.get('class_type')}): {r.get('message')}: {r.get('details')} {extra}")
            if tb:
                lines.append("".join(tb))
    return "\n".join(lines)


def run_prompt(prompt: dict, outputs: list | None = None, extra_data: dict | None = None) -> dict:
    """Validate and execute an API prompt in the headless host; return executor.history_result.

    ``outputs``: node ids to execute (default: every output node, as ComfyUI's queue does). Listing
    non-output nodes is allowed (each is validated with execution.validate_inputs). A fresh
    PromptExecutor (classic cache) runs each call. Raises AssertionError with ComfyUI's validation
    text, or with the failing node id/type, exception and traceback. Must not be called from a
    running asyncio loop (PromptExecutor.execute uses asyncio.run).
    """
    start_host()
    import execution
    import hook_breaker_ac10a0

    prompt = copy.deepcopy(prompt)
    prompt_id = str(uuid.uuid4())
    if outputs is None:
        valid, error, good, node_errors = asyncio.run(execution.validate_prompt(prompt_id, prompt, None))
        if not valid or node_errors:
            raise AssertionError("ComfyUI rejected the prompt:\n" + _format_validation(error, node_errors))
        execute_outputs = list(good)
    else:
        execute_outputs = [str(o) for o in outputs]
        missing = [o for o in execute_outputs if o not in prompt]
        if missing:
            raise AssertionError(f"outputs {missing} are not nodes of the prompt")

        async def _validate():
            validated, errs = {}, {}
            for o in execute_outputs:
                await execution.validate_inputs(prompt_id, prompt, o, validated)
            for nid, res in validated.items():
                if res[0] is not True and len(res[1]) > 0:
                    errs[nid] = {"errors": res[1], "class_type": prompt[nid]["class_type"]}
            return errs
        node_errors = asyncio.run(_validate())
        if node_errors:
            raise AssertionError("ComfyUI rejected the prompt:\n" + _format_validation(None, node_errors))

    server = _STATE["server"]
    server.messages = []
    server.last_prompt_id = prompt_id
    executor = execution.PromptExecutor(server)
    LAST_RUN.clear()
    LAST_RUN.update(executor=executor, prompt=prompt, prompt_id=prompt_id, server=server,
                    outputs=execute_outputs)
    try:
        executor.execute(prompt, prompt_id, extra_data=dict(extra_data or {}), execute_outputs=execute_outputs)
    finally:
        hook_breaker_ac10a0.restore_functions()  # the prompt worker does this after each prompt

    events = {e for e, _ in executor.status_messages}
    for event, data in executor.status_messages:
        if event == "execution_error":
            tb = "".join(data.get("traceback") or [])
            raise AssertionError(
                f"node {data.get('node_id')} ({data.get('node_type')}) failed: "
                f"{data.get('exception_type')}: {str(data.get('exception_message', '')).strip()}\n"
                f"Traceback (ComfyUI):\n{tb}")
        if event == "execution_interrupted":
            raise AssertionError(f"execution interrupted at node {data.get('node_id')} ({data.get('node_type')})")
    if not executor.success or "execution_success" not in events:
        raise AssertionError(f"execution did not succeed; status messages: {executor.status_messages}")
    return executor.history_result


def last_outputs() -> dict:
    """node id -> tuple of output values of the latest run_prompt (nodes that ran or were cached).

    ComfyUI stores each output as a list over the node's internal list-mapping; singletons are
    unwrapped, outputs flagged in OUTPUT_IS_LIST (or mapped over several items) stay lists."""
    if not LAST_RUN:
        raise RuntimeError("no prompt has been run")
    import nodes
    ex, prompt = LAST_RUN["executor"], LAST_RUN["prompt"]
    result = {}
    for nid, node in prompt.items():
        data = ex.caches.outputs.get(nid)
        if data is None:
            continue
        cls = nodes.NODE_CLASS_MAPPINGS.get(node["class_type"])
        is_list = getattr(cls, "OUTPUT_IS_LIST", None) or ()
        vals = []
        for i, v in enumerate(data):
            flagged = i < len(is_list) and bool(is_list[i])
            vals.append(v[0] if (not flagged and isinstance(v, list) and len(v) == 1) else v)
        result[nid] = tuple(vals)
    return result


def run_prompt_outputs(prompt: dict, outputs: list | None = None, extra_data: dict | None = None) -> dict:
    """run_prompt, then return every node's output values: {node id: tuple of outputs}."""
    run_prompt(prompt, outputs=outputs, extra_data=extra_data)
    return last_outputs()


def output_images(history: dict) -> list:
    """Absolute paths of the images listed in a history_result (SaveImage/PreviewImage 'images')."""
    import folder_paths
    paths = []
    for out in history.get("outputs", {}).values():
        for img in out.get("images", []) or []:
            base = folder_paths.get_directory_by_type(img.get("type", "output")) or folder_paths.get_output_directory()
            paths.append(os.path.join(base, img.get("subfolder", ""), img["filename"]))
    return paths


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------

def _test_pattern(size: int = 64):
    """float32 [size, size, 3] in [0, 1]: gradient background, red square, blue disc."""
    import numpy as np
    h = w = int(size)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack([xx / max(1, w - 1), yy / max(1, h - 1), 0.5 * np.ones_like(xx)], axis=-1)
    img[h // 8: h // 8 + h // 3, w // 8: w // 8 + w // 3] = [0.9, 0.1, 0.1]
    disc = (xx - 0.68 * w) ** 2 + (yy - 0.65 * h) ** 2 <= (0.2 * min(h, w)) ** 2
    img[disc] = [0.1, 0.2, 0.9]
    return img.astype(np.float32)


def write_test_image(name: str = "disentangle_test.png", size: int = 64) -> str:
    """Write a deterministic RGB PNG (the _test_pattern) into ComfyUI's input directory so stock
    LoadImage finds it; return ``name`` (the LoadImage ``image`` value)."""
    start_host()
    import numpy as np
    from PIL import Image
    import folder_paths
    path = os.path.join(folder_paths.get_input_directory(), name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray((_test_pattern(size) * 255).round().astype(np.uint8), "RGB").save(path)
    return name
