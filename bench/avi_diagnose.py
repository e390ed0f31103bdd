"""Why AVI does not reach the target hue on the toy world: when does the world commit each factor?

    COMFYUI_PATH=/path/to/ComfyUI python bench/avi_diagnose.py [--edits 32] [--steps 50]

AVI (Wang et al. 2024) replaces the original prompt's latent x at T_x by ŷ and then denoises with the
*original* prompt. So the edit can only survive if a latent at T_x can still carry the attribute through the
remaining steps under the original prompt. This script measures that ceiling directly: it takes the *target*
prompt's own latent at step s (same seed; at s = 0 that is the shared noise) and resumes it from s with the
original prompt. No latent built from x and z at T_x can be expected to beat the target trajectory's own latent
there, so the row at the AVI step bounds what AVI can reach on this world. For comparison, the AVI rows at ρ = 1
(S from z's own singular values, and from Φ trained per seed as the paper sets it), for every factor.

Judged by the shipped factor classifiers: target hue reached / the other five factors preserved, against the
unedited generation of the same seed (as in bench/quality.py).
"""
from __future__ import annotations

import argparse
import sys
import time

import _pack_alias  # noqa: E402,F401  (registers comfyui_disentangle: harness/alias.py)
from comfyui_disentangle import harness as comfy_host  # noqa: E402
from comfyui_disentangle.harness import call  # noqa: E402
from quality import (encode_batch, generate, integrate_per_seed, load_yardstick,  # noqa: E402
                    print_table, resume, train_phi_per_seed)


def partial(model, latent, positive, negative, seed, end, steps, cfg):
    return call("KSamplerAdvanced", model=model, add_noise="enable", noise_seed=seed, steps=steps, cfg=cfg,
                sampler_name="ddim", scheduler="ddim_uniform", positive=positive, negative=negative,
                latent_image=latent, start_at_step=0, end_at_step=end, return_with_leftover_noise="enable")[0]


def rates(judge, original, edited, col, target):
    """(target value reached, every other factor kept) against the unedited generation."""
    p0, p1 = judge.predict(original), judge.predict(edited)
    keep = [k for k in range(p0.shape[1]) if k != col]
    return float((p1[:, col] == target).float().mean()), float((p1[:, keep] == p0[:, keep]).all(1).float().mean())


def factor_rows(model, clip, vae, judge, fw, col, n, seed, steps, cfg, commit_steps, rhos, t_x=0.8, delta_tau=-0.3):
    import torch
    g = torch.Generator().manual_seed(seed)
    factors = fw.sample_factors(n, generator=g)
    size = fw.FACTOR_SIZES[col]
    target = (factors[:, col] + torch.randint(1, size, (n,), generator=g)) % size
    edited = factors.clone()
    edited[:, col] = target
    neutral = encode_batch(clip, fw.full_caption(factors))
    styled = encode_batch(clip, fw.full_caption(edited))
    negative = encode_batch(clip, [""] * n)
    decode = lambda lat: call("VAEDecode", samples=lat, vae=vae)[0].movedim(-1, 1).clamp(0, 1)  # noqa: E731
    original = generate(model, vae, neutral, negative, n, seed, steps=steps, cfg=cfg)
    naive = generate(model, vae, styled, negative, n, seed, steps=steps, cfg=cfg)
    name = fw.FACTOR_NAMES[col]
    rows = [[name, "target prompt throughout (naive)", *rates(judge, original, naive, col, target)]]
    empty = call("EmptyLatentImage", width=128, height=128, batch_size=n)[0]
    for s in commit_steps:
        lat = partial(model, empty, styled, negative, seed, s, steps, cfg)
        images = decode(resume(model, lat, neutral, negative, s, steps, cfg))
        rows.append([name, f"target prompt to step {s}/{steps}, original prompt after (ceiling for a latent at step {s})",
                     *rates(judge, original, images, col, target)])
    x, z, start = call("DisentangleAVICapture", model=model, positive=neutral, target=styled, negative=negative,
                       latent_image=empty, seed=seed, steps=steps, cfg=cfg, sampler_name="ddim",
                       scheduler="ddim_uniform", t_x=t_x, delta_tau=delta_tau, z_source="seed (paper)")
    y = call("DisentangleAVIIntegrate", x=x, z=z, rho=1.0, k=0, singular_values="z's own (no Φ)", avi_model=None)[0]
    images = decode(resume(model, {"samples": y["samples"]}, neutral, negative, start, steps, cfg))
    rows.append([name, f"AVI ρ = 1, z's own S (x at step {start}, z at {z['avi_capture']['step']})",
                 *rates(judge, original, images, col, target)])
    phis = train_phi_per_seed(x, z)
    for rho in rhos:
        images = decode(resume(model, integrate_per_seed(x, z, phis, rho), neutral, negative, start, steps, cfg))
        rows.append([name, f"AVI ρ = {rho}, Φ per seed (paper), T_x {t_x}", *rates(judge, original, images, col, target)])
    return rows


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--edits", type=int, default=32)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--cfg", type=float, default=5.0)
    parser.add_argument("--factors", nargs="*", default=None, help="factor names (default: all six)")
    parser.add_argument("--commit-steps", type=int, nargs="*", default=[5, 10, 20, 30, 40])
    parser.add_argument("--rhos", type=float, nargs="*", default=[0.5, 1.0])
    parser.add_argument("--t-x", type=float, default=0.8, help="AVI's T_x (the paper: 0.8)")
    parser.add_argument("--delta-tau", type=float, default=-0.3, help="AVI's Δτ (the paper: −0.3)")
    args = parser.parse_args()
    if not comfy_host.host_available():
        sys.exit(comfy_host.SKIP_REASON)
    comfy_host.start_host()
    import torch
    from comfyui_disentangle.toy_world import factor_world as fw
    t0 = time.time()
    judge, model, clip, vae = load_yardstick()
    names = args.factors or list(fw.FACTOR_NAMES)
    rows = []
    with torch.inference_mode():
        for name in names:
            rows += factor_rows(model, clip, vae, judge, fw, fw.FACTOR_NAMES.index(name), args.edits, 3, args.steps,
                                args.cfg, args.commit_steps, args.rhos, args.t_x, args.delta_tau)
    import comfy.model_management as mm
    print_table(f"When does the toy world commit each factor, and what AVI reaches: {args.edits} seeds per factor, "
                f"{args.steps} steps ddim, cfg {args.cfg}; target value reached / all five other factors kept vs the "
                f"unedited generation; {mm.get_torch_device_name(mm.get_torch_device())}, {time.time() - t0:.0f} s",
                ["factor edited", "row", "target reached", "others kept"], rows)


if __name__ == "__main__":
    main()
