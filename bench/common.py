"""Shared set-up for the benchmarks: start ComfyUI from COMFYUI_PATH, load the pack, build models.

Benchmarks run on a GPU machine (see README, "Benchmarks"); they print a table and need no weights:
the SD1.5-architecture model gets seeded random weights (cost does not depend on the values).
"""
from __future__ import annotations

import importlib.util
import math
import os
import statistics
import sys
import time

PACK_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACK_NAME = "comfyui_disentangle"


def start_comfy(cpu: bool = False, extra_args: list[str] | None = None):
    """Import ComfyUI from COMFYUI_PATH (its own GPU management, with ``extra_args`` as main.py's
    arguments, e.g. --lowvram) and the pack as a package."""
    path = os.environ.get("COMFYUI_PATH")
    if not path or not os.path.isfile(os.path.join(path, "comfy", "model_management.py")):
        sys.exit("set COMFYUI_PATH to a ComfyUI work tree")
    if path not in sys.path:
        sys.path.insert(0, path)
    sys.argv = [sys.argv[0]] + (["--cpu"] if cpu else []) + list(extra_args or [])
    import comfy.options
    comfy.options.enable_args_parsing()
    if PACK_NAME not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            PACK_NAME, os.path.join(PACK_ROOT, "__init__.py"), submodule_search_locations=[PACK_ROOT])
        module = importlib.util.module_from_spec(spec)
        sys.modules[PACK_NAME] = module
        spec.loader.exec_module(module)
    return sys.modules[PACK_NAME]


def init_random_weights(module, seed: int) -> None:
    """Seeded random weights: N(0, 1/fan_in) for matrices and kernels, 1/0 for norms, small biases."""
    import torch
    g = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        for mod in module.modules():
            for name, p in mod.named_parameters(recurse=False):
                if isinstance(mod, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
                    p.fill_(1.0 if name == "weight" else 0.0)
                    continue
                std = 1.0 / math.sqrt(max(1, p[0].numel())) if p.ndim >= 2 else 0.02
                p.copy_((torch.randn(p.shape, generator=g) * std).to(p.dtype))


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


def conditioning(tokens: int = 77, dim: int = 768, seed: int = 0, pooled: int = 0):
    import torch
    g = torch.Generator().manual_seed(seed)
    meta = {"pooled_output": torch.randn(1, pooled, generator=g)} if pooled else {}
    return [[torch.randn(1, tokens, dim, generator=g), meta]]


def timed_rounds(fns: dict, repeats: int = 7, warmup: int = 1) -> dict[str, list[float]]:
    """Wall times of several functions measured in interleaved rounds (A B C, A B C, ...), so that
    clock and host drift hit all of them alike. Returns {name: [seconds per round]}."""
    import torch
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t0)
    return times


def median_ratio(a: list[float], b: list[float]) -> float:
    """Median over rounds of a_i / b_i."""
    return statistics.median(x / y for x, y in zip(a, b))


def device_name() -> str:
    import torch
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"


def print_table(title: str, header: list[str], rows: list[list]) -> None:
    rows = [list(r) + [""] * (len(header) - len(r)) for r in rows]
    cells = [header] + [[f"{c:.4g}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    print(f"\n{title}")
    for k, r in enumerate(cells):
        print("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |")
        if k == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
