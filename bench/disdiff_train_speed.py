"""DisDiff training throughput on the factor world (issue 11): images/s of core's ``train_disdiff``
on the toy world's frozen model, eager steps vs the CUDA-graphed step, G in the NCHW and NHWC (channels-last) layouts, at several batch sizes; and the
FLOPs of one step (torch's FLOP counter) against the time, so the gap to the GPU's rate is visible.

    COMFYUI_PATH=/path/to/ComfyUI python bench/disdiff_train_speed.py [--steps 300] [--batches 128 256 512]
"""
from __future__ import annotations

import argparse
import json

import _pack_alias  # noqa: E402,F401  (registers comfyui_disentangle: harness/alias.py)
from common import print_table  # noqa: E402
from comfyui_disentangle.harness import device_name, start_comfy  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batches", type=int, nargs="+", default=[128, 256, 512])
    p.add_argument("--images", type=int, default=20000)
    p.add_argument("--eager", action="store_true", help="also time eager steps (on CUDA)")
    p.add_argument("--json", default="", help="write the rows here")
    p.add_argument("--cpu", action="store_true")
    args = p.parse_args()
    start_comfy(cpu=args.cpu)
    import torch
    import nodes as comfy_nodes
    from comfyui_disentangle.core import disdiff as dd
    from comfyui_disentangle.core import disdiff_train as dtrain
    from comfyui_disentangle.toy_world import factor_world as fw
    from comfyui_disentangle.nodes import disdiff as node
    from comfyui_disentangle.nodes.comfy_boundary import alphas_cumprod
    from comfyui_disentangle.nodes.toy_world import load_toy_world, scene_latents

    with torch.inference_mode():
        model, clip, vae = load_toy_world("toy_world")
        empty = comfy_nodes.CLIPTextEncode().encode(clip, "")[0]
        latents = scene_latents(vae, model, fw.sample_factors(args.images, torch.Generator().manual_seed(0)))
    node.load_frozen(model)
    device = model.load_device
    frozen = node.make_frozen(model, empty)
    with torch.inference_mode():
        config = dd.make_config(latents[:1].to(device), frozen, extra={"latent_format": "SD15"})
    rows, results = [], []
    with torch.inference_mode(False), torch.enable_grad():
        data = latents.clone().to(device)
        ab = alphas_cumprod(model).clone().to(device)
        autocast = torch.bfloat16 if device.type == "cuda" else None
        # FLOPs of one step at batch 128 (forward + backward of everything, the frozen pass included)
        from torch.utils.flop_counter import FlopCounterMode
        net = dd.DisDiff(config).to(device)
        b = dtrain.draw_batch(torch.Generator(device=device).manual_seed(0), data.shape[0], 128, ab.shape[0], 6,
                              tuple(data.shape[1:]), device)
        with FlopCounterMode(display=False) as counter:
            with torch.autocast(device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
                terms = dd.disdiff_losses(net, frozen, data[b.index], b.t, b.noise, b.c, ab)
            terms.total.backward()
        flops_per_image = counter.get_total_flops() / 128
        variants = [("eager", False, False, args.batches[0])] if args.eager or device.type != "cuda" else []
        if device.type == "cuda":
            variants += [("CUDA graph", True, False, b) for b in args.batches]
            variants += [("CUDA graph, channels-last G", True, True, b) for b in args.batches]
        for label, graphed, nhwc, batch in variants:
            _, history = dtrain.train_disdiff(data, frozen, ab, config=config, steps=args.steps, batch_size=batch,
                                              device=device, autocast_dtype=autocast, log_every=args.steps // 3,
                                              cuda_graph=graphed, channels_last=nhwc)
            notes = [h["note"] for h in history if "note" in h]
            rate = [h["images_per_s"] for h in history if "step" in h][-1]   # the last third: warm
            rows.append([label + (" (capture failed: eager)" if notes else ""), batch, round(rate),
                         round(rate * flops_per_image / 1e12, 1), "; ".join(notes)[:80]])
            results.append({"variant": label, "graphed": graphed and not notes, "channels_last": nhwc,
                            "batch": batch, "images_per_s": rate})
            print(rows[-1], flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device_name(), "gflop_per_image": flops_per_image / 1e9, "rows": results}, f, indent=1)
    print_table(f"DisDiff training on the factor world ({device_name()}, toy world 16×16×4 latents, N 6, D 32, "
                f"bf16 autocast; {flops_per_image / 1e9:.2f} GFLOP per image per step)",
                ["step", "batch", "images/s", "TFLOP/s", "note"], rows)


if __name__ == "__main__":
    main()
