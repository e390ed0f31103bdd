"""DisDiff benchmark (issue 6): cost of partial-condition sampling vs stock sampling, and the swap and
partial-condition grids of a trained checkpoint, judged by the toy world's factor classifiers.

Speed: stock KSampler (ddim, ddim_uniform) vs the same sampling through the DisDiff patch with one
factor and with all factors, at the toy size (toy world model, 128 px) and at SD1.5 size (random
SD1.5-architecture UNet, 512 px, a DisDiff with random weights built for its features: cost does not
depend on the values). Also counts decoder passes per UNet call (must be 1).

Grids (with --checkpoint, a DisDiff trained on the toy world by bench/train_disdiff.py):
* swap: rows = source, target, reconstruction (all factors of the source), then one row per learned
  factor c (the source's codes with z^c taken from the target); columns = image pairs;
* partial condition: rows = learned factor c, sampled with S = {c} from the target's codes;
  columns = seeds.
Each is judged per ground-truth factor by the classifiers (tables), and saved as a PNG.

    COMFYUI_PATH=/path/to/ComfyUI python bench/disdiff.py --checkpoint out/disdiff/seed0.safetensors
    COMFYUI_PATH=/path/to/ComfyUI python bench/disdiff.py --cpu --skip-sd15 --steps 4 --repeats 1 --pairs 2
"""
from __future__ import annotations

import argparse
import os
import statistics

import _pack_alias  # noqa: E402,F401  (registers comfyui_disentangle: harness/alias.py)
from common import median_ratio, print_table, timed_rounds  # noqa: E402
from comfyui_disentangle import harness  # noqa: E402
from comfyui_disentangle.harness import PACK_ROOT, conditioning, device_name, random_sd15, start_comfy  # noqa: E402


def random_disdiff(model, positive, latent_shape, num_factors=6, code_dim=32, decoder_width=1.0, seed=0):
    """A DisDiff with random weights (zero-initialised layers too) fitting ``model``'s UNet features."""
    return harness.random_disdiff(model, positive, latent_shape, num_factors=num_factors, code_dim=code_dim,
                                  encoder_width=128, decoder_width=decoder_width, seed=seed, init_std=0.02)


class Counter:
    """Counts forward calls of a module (UNet calls, decoder passes)."""

    def __init__(self, module):
        self.n = 0
        self.handle = module.register_forward_pre_hook(self._hook)

    def _hook(self, *_):
        self.n += 1


def speed_rows(label, model, disdiff, positive, negative, latent_shape, batch, steps, cfg, repeats, node):
    import torch
    import nodes as comfy_nodes
    codes = torch.randn(1, disdiff.config.num_factors, disdiff.config.code_dim)
    one = node.patch_model(model, disdiff, codes, [0], [1.0])
    every = node.patch_model(model, disdiff, codes, list(range(disdiff.config.num_factors)), [1.0] * disdiff.config.num_factors)
    latent = {"samples": torch.zeros(batch, *latent_shape)}

    def run(m):
        return comfy_nodes.common_ksampler(m, 0, steps, cfg, "ddim", "ddim_uniform", positive, negative, latent,
                                           disable_noise=False)[0]

    unet_calls = Counter(model.model.diffusion_model)
    g_calls = Counter(disdiff.model.decoder)
    with torch.inference_mode():
        run(every)  # warm-up and call count
        per_call = g_calls.n / max(1, unet_calls.n)
        def channels_last_one():
            disdiff.model.use_channels_last(True)
            try:
                return run(one)
            finally:
                disdiff.model.use_channels_last(False)

        t = timed_rounds({"stock": lambda: run(model), "one": lambda: run(one), "all": lambda: run(every),
                          "one_cl": channels_last_one}, repeats)
    unet_calls.handle.remove()
    g_calls.handle.remove()
    med = {k: statistics.median(v) for k, v in t.items()}
    n = disdiff.config.num_factors
    return [
        [label, f"stock, cfg {cfg}", batch, med["stock"], 1.0, ""],
        [label, "DisDiff, |S| = 1", batch, med["one"], median_ratio(t["one"], t["stock"]), f"{per_call:.2f}"],
        [label, f"DisDiff, |S| = {n}", batch, med["all"], median_ratio(t["all"], t["stock"]), f"{per_call:.2f}"],
        [label, "DisDiff, |S| = 1, G channels-last", batch, med["one_cl"], median_ratio(t["one_cl"], t["stock"]),
         f"{per_call:.2f}"],
    ]


def to_grid(rows, pad=2):
    """rows: list of [K, 3, H, W] tensors in [0, 1] → one PIL image."""
    import numpy as np
    import torch
    from PIL import Image
    k, _, h, w = rows[0].shape
    canvas = torch.ones(3, len(rows) * (h + pad) + pad, k * (w + pad) + pad)
    for r, imgs in enumerate(rows):
        for c in range(k):
            y, x = pad + r * (h + pad), pad + c * (w + pad)
            canvas[:, y:y + h, x:x + w] = imgs[c].float().cpu().clamp(0, 1)
    return Image.fromarray((canvas.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))


def generate(model, disdiff, codes, factors, empty, steps, seed, node):
    """Images [K, 3, 128, 128] sampled by stock KSampler through the partial-condition patch."""
    import torch
    import nodes as comfy_nodes
    patched = node.patch_model(model, disdiff, codes, factors, [1.0] * len(factors)) if factors else model
    latent = {"samples": torch.zeros(codes.shape[0], 4, 16, 16)}
    out = comfy_nodes.common_ksampler(patched, seed, steps, 1.0, "ddim", "ddim_uniform", empty, empty, latent)[0]
    return comfy_nodes.VAEDecode().decode(grids_vae(), out)[0].movedim(-1, 1).clamp(0, 1)


_VAE = {}


def grids_vae():
    return _VAE["vae"]


def grids(args, node, dd):
    """Swap and partial-condition grids of a trained checkpoint; prints tables, writes PNGs."""
    import torch
    import nodes as comfy_nodes
    from comfyui_disentangle.toy_world import factor_judges
    from comfyui_disentangle.toy_world import factor_world as fw
    from comfyui_disentangle.nodes.toy_world import load_toy_world
    loaded = dd.load_checkpoint(args.checkpoint)
    disdiff = node.DisDiffModel(loaded.model, os.path.basename(args.checkpoint), loaded.step)
    judge, _ = factor_judges.load_factor_classifier(os.path.join(PACK_ROOT, "weights", "toy_world_factor_classifier.safetensors"))
    n = disdiff.config.num_factors
    with torch.inference_mode():
        model, clip, vae = load_toy_world("toy_world")
        _VAE["vae"] = vae
        empty = comfy_nodes.CLIPTextEncode().encode(clip, "")[0]
        g = torch.Generator().manual_seed(args.seed)
        src_f, tgt_f = fw.sample_factors(args.pairs, generator=g), fw.sample_factors(args.pairs, generator=g)
        src, tgt = fw.render_at(src_f, 128), fw.render_at(tgt_f, 128)
        enc = lambda imgs: node.encode_codes(disdiff, model.model.process_latent_in(vae.encode(imgs.movedim(1, -1))))  # noqa: E731
        z_src, z_tgt = enc(src), enc(tgt)
        recon = generate(model, disdiff, z_src, list(range(n)), empty, args.steps, args.seed, node)
        p_src, p_tgt, p_rec = judge.predict(src), judge.predict(tgt), judge.predict(recon)
        rows_img, table = [src, tgt, recon], []
        table.append(["reconstruction (all factors)"] + [f"{float((p_rec[:, k] == p_src[:, k]).float().mean()):.2f}"
                                                         for k in range(fw.NUM_FACTORS)])
        for c in range(n):
            z = z_src.clone()
            z[:, c] = z_tgt[:, c]
            img = generate(model, disdiff, z, list(range(n)), empty, args.steps, args.seed, node)
            rows_img.append(img)
            p = judge.predict(img)
            to_target = [float((p[:, k] == p_tgt[:, k]).float().mean()) for k in range(fw.NUM_FACTORS)]
            kept = [float((p[:, k] == p_rec[:, k]).float().mean()) for k in range(fw.NUM_FACTORS)]
            best = max(range(fw.NUM_FACTORS), key=lambda k: to_target[k] - kept[k])
            others = statistics.mean(kept[k] for k in range(fw.NUM_FACTORS) if k != best)
            table.append([f"swap z^{c} (≈ {fw.FACTOR_NAMES[best]}; others kept {others:.2f})"]
                         + [f"{a:.2f}/{b:.2f}" for a, b in zip(to_target, kept)])
        os.makedirs(args.out_dir, exist_ok=True)
        to_grid(rows_img).save(os.path.join(args.out_dir, "disdiff_swap_grid.png"))
        print_table(f"Swap grid ({args.pairs} pairs, {args.steps} ddim steps): per ground-truth factor, "
                    "'reconstruction' = judged equal to the source; swap rows = judged equal to the target / equal to "
                    "the reconstruction", ["row"] + list(fw.FACTOR_NAMES), table)

        # partial condition: one target, seeds as columns
        target = tgt[:1]
        z_t = z_tgt[:1].expand(args.pairs, -1, -1).contiguous()
        p_t = p_tgt[:1]
        rows_img, table = [target.expand(args.pairs, -1, -1, -1)], []
        free = generate(model, disdiff, z_t, [], empty, args.steps, args.seed + 1, node)
        rows_img.append(free)
        pf = judge.predict(free)
        table.append(["unconditional (S = ∅)"] + [f"{float((pf[:, k] == p_t[:, k]).float().mean()):.2f}"
                                                  for k in range(fw.NUM_FACTORS)])
        for c in range(n):
            img = generate(model, disdiff, z_t, [c], empty, args.steps, args.seed + 1, node)
            rows_img.append(img)
            p = judge.predict(img)
            table.append([f"S = {{{c}}}"] + [f"{float((p[:, k] == p_t[:, k]).float().mean()):.2f}"
                                             for k in range(fw.NUM_FACTORS)])
        to_grid(rows_img).save(os.path.join(args.out_dir, "disdiff_partial_condition_grid.png"))
        print_table(f"Partial-condition grid (one target, {args.pairs} seeds): per ground-truth factor, the fraction "
                    "of samples judged equal to the target", ["row"] + list(fw.FACTOR_NAMES), table)
    print(f"grids written to {args.out_dir}/disdiff_swap_grid.png and disdiff_partial_condition_grid.png "
          "(rows: source, target, reconstruction, swap z^0..; and target, S = ∅, S = {0}, ...)")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--checkpoint", default="", help="trained toy-world DisDiff (grids); speed runs without it")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--toy-batch", type=int, default=8)
    p.add_argument("--dtype", default="fp16", choices=["fp16", "bf16", "fp32"], help="SD1.5 UNet dtype")
    p.add_argument("--sd-decoder-width", type=float, default=1.0)
    p.add_argument("--sd-size", type=int, default=512, help="SD1.5 image side in pixels")
    p.add_argument("--skip-sd15", action="store_true")
    p.add_argument("--skip-speed", action="store_true")
    p.add_argument("--pairs", type=int, default=8, help="grid columns")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", default=os.path.join(PACK_ROOT, "out", "disdiff"))
    p.add_argument("--cpu", action="store_true")
    args = p.parse_args()

    start_comfy(cpu=args.cpu)
    import torch
    import nodes as comfy_nodes
    from comfyui_disentangle.core import disdiff as dd
    from comfyui_disentangle.nodes import disdiff as node
    from comfyui_disentangle.nodes.toy_world import load_toy_world

    if not args.skip_speed:
        rows = []
        with torch.inference_mode():
            model, clip, _ = load_toy_world("toy_world")
            empty = comfy_nodes.CLIPTextEncode().encode(clip, "")[0]
            caption = comfy_nodes.CLIPTextEncode().encode(clip, "a large red cube on a green floor in front of a blue wall")[0]
        if args.checkpoint:
            disdiff = node.DisDiffModel(dd.load_checkpoint(args.checkpoint).model, "trained")
        else:
            disdiff = random_disdiff(model, empty, (4, 16, 16))
        rows += speed_rows("toy world 128 px", model, disdiff, empty, empty, (4, 16, 16), args.toy_batch, args.steps,
                           1.0, args.repeats, node)
        rows += speed_rows("toy world 128 px", model, disdiff, caption, empty, (4, 16, 16), args.toy_batch, args.steps,
                           5.0, args.repeats, node)
        if not args.skip_sd15:
            sd = random_sd15(args.dtype)
            pos, neg = conditioning(seed=1), conditioning(seed=2)
            side = args.sd_size // 8
            sd_dd = random_disdiff(sd, neg, (4, side, side), decoder_width=args.sd_decoder_width)
            rows += speed_rows(f"SD1.5 arch {args.sd_size} px {args.dtype}", sd, sd_dd, pos, neg, (4, side, side), 1,
                               args.steps, 7.5, args.repeats, node)
        print_table(f"Partial-condition sampling cost, {args.steps} ddim steps, {device_name()} (median of {args.repeats} "
                    "interleaved rounds); ratio = time / stock time; last column: decoder passes per UNet call",
                    ["model", "sampling", "batch", "seconds", "ratio", "G passes/UNet call"], rows)
    if args.checkpoint:
        grids(args, node, dd)


if __name__ == "__main__":
    main()
