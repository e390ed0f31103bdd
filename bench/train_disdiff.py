"""Train DisDiff on the factor world on top of the toy world's frozen model (issue 6).

Renders ``--images`` factor-world scenes (128 px), encodes them with the toy VAE, and calls the same
training function as the Train DisDiff node (``nodes.disdiff.train_from_latents`` → core's
``train_disdiff``) with the empty prompt as the frozen unconditional model. bf16 autocast on CUDA;
no host sync per step except at log points. Prints images/s. Writes the checkpoint (``--out``,
with optimizer state: ``--resume`` continues it) and the codes of ``--eval-images`` held-out scenes
with their ground-truth factors (``<out stem>_codes.safetensors``: ``codes`` [M, N, D],
``factors`` [M, 6]) for the FactorVAE / DCI bench.

    COMFYUI_PATH=/path/to/ComfyUI python bench/train_disdiff.py --seed 0 --minutes 8 --out out/disdiff/seed0.safetensors
    COMFYUI_PATH=/path/to/ComfyUI python bench/train_disdiff.py --cpu --steps 20 --batch 8 --images 256 --out /tmp/dd.safetensors
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import device_name, start_comfy  # noqa: E402


def render_and_encode(fw, vae, model, factors, batch=512):
    """Model-space latents of the scenes of ``factors`` (rendered at 128 px, the toy model's size)."""
    import torch
    out = []
    for i in range(0, len(factors), batch):
        images = fw.render_at(factors[i:i + batch], 128).movedim(1, -1).contiguous()
        out.append(vae.encode(images).float().cpu())
    return model.model.process_latent_in(torch.cat(out))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=20000, help="step limit (the time budget usually ends it first)")
    p.add_argument("--minutes", type=float, default=8.0, help="training time budget (0: none)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--images", type=int, default=50000, help="training scenes rendered (of 480,000 combinations)")
    p.add_argument("--eval-images", type=int, default=10000, help="held-out scenes whose codes are saved")
    p.add_argument("--num-factors", type=int, default=6)
    p.add_argument("--code-dim", type=int, default=32)
    p.add_argument("--encoder-width", type=int, default=128)
    p.add_argument("--decoder-width", type=float, default=1.0)
    p.add_argument("--dis-weight", type=float, default=0.05, help="λ of eq. 13")
    p.add_argument("--detach-codes", action="store_true", help="disentangling loss reaches G only, on every path")
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--checkpoint-every", type=int, default=1000)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--release", default="", help="also write a float16 copy without optimizer state here")
    p.add_argument("--out", required=True, help="checkpoint path (.safetensors)")
    p.add_argument("--codes-at", type=int, nargs="*", default=[],
                   help="also dump the held-out codes at these steps (<out stem>_codes_s<step>.safetensors): the "
                        "training curve of FactorVAE / DCI")
    p.add_argument("--cpu", action="store_true")
    args = p.parse_args()

    start_comfy(cpu=args.cpu)
    import torch
    import comfy.model_management as mm
    import nodes as comfy_nodes  # noqa: F401  (ComfyUI's node registry, for CLIPTextEncode)
    from comfyui_disentangle.core import disdiff as dd
    from comfyui_disentangle.core import factor_world as fw
    from comfyui_disentangle.nodes import disdiff as node
    from comfyui_disentangle.nodes.toy_world import load_toy_world

    t_start = time.perf_counter()
    with torch.inference_mode():
        model, clip, vae = load_toy_world("toy_world")
        empty = comfy_nodes.CLIPTextEncode().encode(clip, "")[0]
        g = torch.Generator().manual_seed(1000 + args.seed)
        train_factors = fw.sample_factors(args.images, generator=g)
        eval_factors = fw.sample_factors(args.eval_images, generator=torch.Generator().manual_seed(999_999))
        latents = render_and_encode(fw, vae, model, train_factors)
    print(f"{args.images} training scenes encoded in {time.perf_counter() - t_start:.1f} s on {device_name()}")

    budget = args.minutes * 60
    t0 = time.perf_counter()
    log = []

    def callback(step, total, entry):
        log.append(entry)
        print(f"step {step}: loss {entry['loss']:.4f} recon {entry['recon']:.4f} L_in {entry['invariant']:.3f} "
              f"L_va {entry['variant']:.3f} γ {entry['weight']:.2e}  {entry['images_per_s']:.0f} images/s", flush=True)
        return budget > 0 and time.perf_counter() - t0 > budget

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    stem = os.path.splitext(args.out)[0]
    with torch.inference_mode():
        eval_latents = render_and_encode(fw, vae, model, eval_factors)
    from safetensors.torch import save_file

    def dump_codes(disdiff, step, path):
        with torch.inference_mode():
            codes = node.encode_codes(disdiff, eval_latents)
        meta = {"seed": str(args.seed), "step": str(step), "factor_names": json.dumps(list(fw.FACTOR_NAMES)),
                "factor_sizes": json.dumps(list(fw.FACTOR_SIZES))}
        save_file({"codes": codes.float().contiguous(), "factors": eval_factors.contiguous()}, path, metadata=meta)

    stages = sorted(s for s in set(args.codes_at) if 0 < s < args.steps) + [args.steps]
    history, resume, disdiff = [], args.resume, None
    for stage in stages:   # each stage resumes the checkpoint of the previous one (model, optimizer, data order)
        with torch.inference_mode():
            disdiff, part = node.train_from_latents(
                model, empty, latents, num_factors=args.num_factors, code_dim=args.code_dim, steps=stage,
                batch_size=args.batch, learning_rate=args.lr, seed=args.seed, checkpoint_path=args.out,
                checkpoint_every=args.checkpoint_every, resume=resume, log_every=args.log_every, callback=callback,
                encoder_width=args.encoder_width, decoder_width=args.decoder_width,
                train_kw={"dis_weight": args.dis_weight, "warmup": args.warmup, "detach_codes": args.detach_codes})
        history += part
        resume = True
        reached = history[-1]["step"] if history else 0
        if stage != args.steps and reached == stage:
            dump_codes(disdiff, reached, f"{stem}_codes_s{reached}.safetensors")
        if reached < stage or (budget > 0 and time.perf_counter() - t0 > budget):
            break
    seconds = time.perf_counter() - t0
    step = history[-1]["step"] if history else 0
    rates = [h["images_per_s"] for h in history[1:]] or [h["images_per_s"] for h in history]
    rate = sorted(rates)[len(rates) // 2] if rates else float("nan")

    dump_codes(disdiff, step, f"{stem}_codes.safetensors")
    if args.release:
        dd.save_checkpoint(args.release, disdiff.model, step=step, info={"seed": args.seed, "images": args.images},
                           dtype=torch.float16)
    summary = {"seed": args.seed, "steps": step, "train_seconds": round(seconds, 1), "images_per_s": round(rate, 1),
               "batch": args.batch, "final": history[-1] if history else None, "device": device_name(),
               "checkpoint": args.out, "codes": f"{stem}_codes.safetensors"}
    with open(f"{stem}_log.json", "w") as f:
        json.dump({"summary": summary, "history": history}, f, indent=1)
    print(json.dumps(summary))
    print(f"training throughput: {rate:.0f} images/s (batch {args.batch}, {step} steps in {seconds:.0f} s, {device_name()})")
    mm.soft_empty_cache()


if __name__ == "__main__":
    main()
