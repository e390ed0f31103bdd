"""Where the GPU memory of Optimize λ Schedule goes, and what the memory options save (issue 15).

Random-weight models as in bench/lambda_optim.py (fp16 UNet, SD VAE, open_clip ViT-B-32 + LPIPS-VGG),
50 steps ddim_uniform, cfg 7.5. For SD1.5 at 512² (and SDXL at 1024² with --sdxl) it prints:

- a table by component: ComfyUI's loaded weights; the differentiable copies (deep copies) or views
  (shared weights); the CUDA graphs' memory pool (two pools or one shared); one sampler step's VJP
  (UNet batch 2: its activations); the decoder + CLIP + LPIPS forward and backward (blocks stored
  or recomputed); the stored latents x_0..x_N;
- one iteration and the full 10-iteration edit through the node, each with the peak of
  ``torch.cuda.max_memory_allocated`` (tensors alive) and ``max_memory_reserved`` (what the caching
  allocator holds, graphs' pools included, ~what nvidia-smi shows), for the old settings ("copies")
  and the node's defaults ("views"), and one iteration's time against one stock sampling;
- ``--card-gib G``: the process may use only G GiB of the GPU (``set_per_process_memory_fraction``) and
  ComfyUI is told the rest is taken (``--reserve-vram``): a G GiB card, for the full node edit only.
  ``--comfy-args "--lowvram"`` / ``"--novram"``: ComfyUI's low-memory modes.

    COMFYUI_PATH=/path/to/ComfyUI python bench/lambda_memory.py [--sdxl]
    COMFYUI_PATH=/path/to/ComfyUI python bench/lambda_memory.py --card-gib 8            # SD1.5 on an 8 GiB card
    COMFYUI_PATH=/path/to/ComfyUI python bench/lambda_memory.py --sdxl-only --card-gib 20
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import statistics
import sys
import time

import _pack_alias  # noqa: E402,F401  (registers comfyui_disentangle: harness/alias.py)
from common import median_ratio, print_table, timed_rounds  # noqa: E402
from comfyui_disentangle.harness import (device_name, random_sd1_clip, random_sd15, random_sd_vae, random_sdxl,  # noqa: E402
                                         random_sdxl_clip, start_comfy)

GIB = 2**30
COPIES = {"share_weights": False, "recompute_decoder": False, "recompute_loss": False}
VIEWS = {}  # the node's defaults
VIEWS_UNET = {"recompute_unet": True}


def cuda():
    import torch
    return torch.cuda


def settle() -> tuple[float, float]:
    """(allocated, reserved) GiB after freeing what is unreferenced; resets the peaks to them."""
    gc.collect()
    cuda().synchronize()
    cuda().empty_cache()
    cuda().reset_peak_memory_stats()
    return cuda().memory_allocated() / GIB, cuda().memory_reserved() / GIB


def peaks() -> tuple[float, float]:
    cuda().synchronize()
    return cuda().max_memory_allocated() / GIB, cuda().max_memory_reserved() / GIB


def module_gib(module) -> float:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()]) / GIB


@contextlib.contextmanager
def node_options(node_module, objective_options: dict, share_graph_pool: bool):
    """Run the node with other LambdaObjective / LambdaEdit settings (the memory options are not inputs)."""
    objective_cls, edit_cls = node_module.LambdaObjective, node_module.LambdaEdit

    class Objective(objective_cls):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, **objective_options})

    class Edit(edit_cls):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "share_graph_pool": share_graph_pool})

    node_module.LambdaObjective, node_module.LambdaEdit = Objective, Edit
    try:
        yield
    finally:
        node_module.LambdaObjective, node_module.LambdaEdit = objective_cls, edit_cls


class Rows(list):
    """Table rows, each also printed as soon as it is measured (a later failure loses nothing)."""

    def append(self, row):
        print("  measured:", " | ".join(f"{c:.4g}" if isinstance(c, float) else str(c) for c in row), flush=True)
        super().append(row)


def components(case, options: dict, share_pool: bool, label: str) -> tuple[list[list], object]:
    """Component rows for one setting; returns (rows, the edit, for timing)."""
    import torch
    node = case.node
    rows = Rows()
    base, _ = settle()
    with torch.inference_mode(False):
        objective = node.LambdaObjective(case.model, case.vae, case.loss_model, 0.05, case.perceptual, **options)
    made, _ = settle()
    rows.append([f"{label}: differentiable {'views' if options.get('share_weights', True) else 'copies'} "
                 "of UNet, VAE, CLIP, LPIPS", made - base, "", ""])
    case.objective = objective
    before_alloc, before_res = settle()
    edit = case.edit(share_graph_pool=share_pool)  # captures the graphs on its first step
    after_alloc, after_res = settle()
    pool = (after_res - before_res) - (after_alloc - before_alloc)
    rows.append([f"{label}: CUDA graphs' pool ({'one shared' if share_pool else 'two'}), held", "", pool])

    # One step's VJP, eager (what the graphs' pool holds in the graphed path).
    r = edit.runner
    eager = node.lo.MixedStepRunner(r.denoise, r.sigmas, r.c0, r.c1, r.uncond, r.cfg, r.y0, r.y1, r.y_uncond)
    x = edit.x_T.clone()
    base, _ = settle()
    with torch.inference_mode(False):
        eager.vjp(0, x, torch.tensor(0.5, device=x.device), torch.ones_like(x))
    peak, _ = peaks()
    rows.append([f"{label}: one sampler step's VJP (UNet batch 2), eager", peak - base, "", ""])

    base, _ = settle()
    with torch.inference_mode(False), torch.enable_grad():
        x0 = x.detach().clone().requires_grad_(True) / 10
        objective.loss(x0).backward()
    peak, _ = peaks()
    rows.append([f"{label}: decode + CLIP + LPIPS, forward and backward", peak - base, "", ""])
    rows.append([f"{label}: stored latents x_0..x_{edit.steps}", (edit.steps + 1) * x.numel() * 4 / GIB, "", ""])

    base, base_res = settle()
    case.iteration(edit)
    peak, peak_res = peaks()
    rows.append([f"{label}: one iteration, peak (weights included)", peak, peak_res, ""])
    return rows, edit


def full_edit(pack, case, args, size, options=None, share_pool=True):
    """(seconds, peak allocated GiB, peak reserved GiB) of a whole node edit from a clean state."""
    import torch
    import comfy.model_management as mm
    node_module = pack.nodes.lambda_optim
    node = node_module.OptimizeLambdaSchedule()
    case.objective = None
    mm.unload_all_models()
    settle()
    t0 = time.perf_counter()
    with node_options(node_module, options or {}, share_pool), torch.inference_mode():
        out = node.optimize(case.model, case.vae, case.clip, case.loss_model, "a photo of a person",
                            "a photo of a smiling person", "", 0, args.steps, 7.5, args.iterations, 0.05, 0.05,
                            20 * args.steps // 50, 1.0, size, size, perceptual_model=case.perceptual)
    seconds = time.perf_counter() - t0
    finite = bool(torch.isfinite(out["result"][1]["samples"]).all())
    return seconds, *peaks(), finite


def weights_rows(case, title):
    import comfy.model_management as mm
    mm.load_models_gpu([case.model, case.vae.patcher])
    return [[f"{title}: ComfyUI's UNet weights (loaded)", case.model.model_size() / GIB, "", ""],
            [f"{title}: ComfyUI's VAE weights (loaded)", case.vae.patcher.model_size() / GIB, "", ""],
            [f"{title}: CLIP ViT-B-32 + LPIPS-VGG weights", module_gib(case.loss_model.model)
             + module_gib(case.perceptual.net), "", ""]]


def family_rows(pack, args, case, title, size, target, full_copies=True):
    import comfy.model_management as mm
    rows = Rows()
    for row in weights_rows(case, title):
        rows.append(row)
    for label, options, share_pool in (("copies", COPIES, False), ("views", VIEWS, True),
                                       ("views + UNet recomputed", VIEWS_UNET, True)):
        part, edit = components(case, options, share_pool, f"{title}, {label}")
        fallback = getattr(edit.runner, "fallback_reason", None)
        if fallback:
            part[-1][0] += f" (no CUDA graphs: {fallback[:80]})"
        rows += part
        if label != "copies":  # time one iteration against stock sampling, interleaved rounds
            t = timed_rounds({"stock": case.stock, "iteration": lambda: case.iteration(edit)}, args.repeats)
            ratio = median_ratio(t["iteration"], t["stock"])
            rows.append([f"{title}, {label}: one iteration {statistics.median(t['iteration']):.2f} s, stock "
                         f"sampling {statistics.median(t['stock']):.2f} s", f"{ratio:.2f}× stock", "",
                         "≤ 1.5× stock" if label == "views" else ""])
        edit = part = None  # free its graphs before the next setting
        case.objective = None
    estimate = pack.nodes.lambda_optim.optimisation_memory(
        case.model, case.vae, (1, 4, size // 8, size // 8), 7.5, case.loss_model, case.perceptual) / GIB
    rows.append([f"{title}: the node's request to ComfyUI (optimisation_memory)", estimate, "", ""])
    for label, options, share_pool in (("copies", COPIES, False), ("views", VIEWS, True))[1 - full_copies:]:
        seconds, peak, peak_res, finite = full_edit(pack, case, args, size, options, share_pool)
        rows.append([f"{title}: full {args.iterations}-iteration edit through the node, {label}: {seconds:.1f} s"
                     + ("" if finite else " (NaN!)"), peak, peak_res, target if label == "views" else ""])
    mm.unload_all_models()
    return rows


def make_case(pack, family, size, args, loss_model, perceptual):
    from lambda_optim import Case
    if family == "sd15":
        case = Case(pack, random_sd15("fp16"), random_sd_vae(), loss_model, perceptual, size, args.steps, 7.5)
        case.clip = random_sd1_clip()
    else:
        case = Case(pack, random_sdxl(), random_sd_vae(), loss_model, perceptual, size, args.steps, 7.5,
                    pooled=1280, ctx=2048)
        case.clip = random_sdxl_clip()
    return case


@contextlib.contextmanager
def node_log():
    """The node's log messages while it runs (which path it chose: UNet recomputed, CUDA graphs or not)."""
    import logging
    messages = []

    class Keep(logging.Handler):
        def emit(self, record):
            if "Optimize λ Schedule" in record.getMessage():
                messages.append(record.getMessage())

    root, handler = logging.getLogger(), Keep(logging.INFO)
    level = root.level
    root.addHandler(handler)
    root.setLevel(min(level, logging.INFO))
    try:
        yield messages
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def card_rows(pack, args, loss_model, perceptual):
    """The full node edit on an emulated smaller card."""
    rows = []
    for family, size, flag in (("sd15", args.size, not args.sdxl_only), ("sdxl", args.sdxl_size, args.sdxl or args.sdxl_only)):
        if not flag:
            continue
        case = make_case(pack, family, size, args, loss_model, perceptual)
        with node_log() as messages:
            seconds, peak, peak_res, finite = full_edit(pack, case, args, size)
        for m in messages:
            print("  the node logged:", m)
        name = "SD1.5" if family == "sd15" else "SDXL"
        partial = getattr(case.model.model, "model_lowvram", False)
        rows.append([f"{name} {size}²: full edit, {args.card_gib:g} GiB card {args.comfy_args} "
                     f"({'UNet partly offloaded' if partial else 'UNet fully loaded'}): {seconds:.1f} s"
                     + ("" if finite else " (NaN!)"), peak, peak_res])
        import comfy.model_management as mm
        mm.unload_all_models()
        del case
    return rows


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--sdxl-size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sdxl", action="store_true", help="add the SDXL rows")
    parser.add_argument("--sdxl-only", action="store_true")
    parser.add_argument("--card-gib", type=float, default=0, help="emulate a card of this size (full edits only)")
    parser.add_argument("--comfy-args", default="", help="extra ComfyUI arguments, e.g. --lowvram")
    args = parser.parse_args()
    import torch
    extra = args.comfy_args.split()
    if args.card_gib:
        total = torch.cuda.get_device_properties(0).total_memory / GIB
        torch.cuda.set_per_process_memory_fraction(args.card_gib / total)
        extra += ["--reserve-vram", f"{total - args.card_gib:.2f}"]
    pack = start_comfy(extra_args=extra)
    import comfyui_disentangle.nodes.clip_loss  # noqa: F401  (pack.nodes.* attributes)
    from lambda_optim import loss_models
    t0 = time.time()
    loss_model, perceptual = loss_models(pack)
    title = (f"λ-optimisation memory: random-weight models, fp16 UNet, 50 steps, cfg 7.5, ViT-B-32 + LPIPS-VGG, "
             f"{device_name()}, torch {torch.__version__}")
    if args.card_gib or args.comfy_args:
        print_table(title, ["run", "peak allocated GiB", "peak reserved GiB"], card_rows(pack, args, loss_model, perceptual))
    else:
        header = ["component / run", "allocated GiB", "reserved GiB", "target"]
        if not args.sdxl_only:  # each family's table as soon as it is measured
            case = make_case(pack, "sd15", args.size, args, loss_model, perceptual)
            print_table(title, header, family_rows(pack, args, case, f"SD1.5 {args.size}²", args.size, "≤ 6 GiB"))
            del case
            sys.stdout.flush()
        if args.sdxl or args.sdxl_only:
            case = make_case(pack, "sdxl", args.sdxl_size, args, loss_model, perceptual)
            print_table(title, header, family_rows(pack, args, case, f"SDXL {args.sdxl_size}²", args.sdxl_size,
                                                   "≤ 20 GiB", full_copies=False))  # copies: ~2 min more
    print(f"{time.time() - t0:.0f} s in all")


if __name__ == "__main__":
    main()
