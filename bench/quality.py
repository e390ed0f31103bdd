"""Quality yardstick on the toy world (issue 3): one table, judged by the shipped factor classifiers.

    COMFYUI_PATH=/path/to/ComfyUI python bench/quality.py [--samples 128] [--edits 64]

One table in three parts:
1. text control: per factor, how often a generation from a full caption shows the named value;
2. DDIM inversion: latent and pixel PSNR of invert → stock KSamplerAdvanced over data-set images
   at 10/25/50 steps, ours (plain, refined) vs the stock FlipSigmas + euler route;
3. editing methods: change the object's hue by text over many seeds; target reached, and the other
   five factors preserved (against the unedited generation of the same seed). Rows: the naive
   baseline (just change the prompt), λ mixing with the fixed switch schedule, λ mixing with a
   schedule optimised on a few of the seeds and transferred to all; AVI (one Φ per seed, ρ sweep);
   DisDiff comes later.

Everything runs through stock ComfyUI nodes on the CPU (several minutes), or on the GPU with
DISENTANGLE_HOST_GPU=1.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

import _pack_alias  # noqa: E402,F401  (registers comfyui_disentangle: harness/alias.py)
from common import print_table  # noqa: E402
from comfyui_disentangle import harness  # noqa: E402
from comfyui_disentangle.harness.reconstruction import call, latent_psnr  # noqa: E402

OTHER = {"floor_hue", "wall_hue", "scale", "shape", "orientation"}


def encode_batch(clip, texts):
    """One CONDITIONING whose tensor holds one caption per batch item."""
    import torch
    conds = [call("CLIPTextEncode", clip=clip, text=t)[0][0][0] for t in texts]
    return [[torch.cat(conds), {}]]


def generate(model, vae, positive, negative, n, seed, steps=50, cfg=5.0):
    import torch
    latent = call("EmptyLatentImage", width=128, height=128, batch_size=n)[0]
    out = call("KSampler", model=model, seed=seed, steps=steps, cfg=cfg, sampler_name="ddim", scheduler="ddim_uniform",
               positive=positive, negative=negative, latent_image=latent, denoise=1.0)[0]
    return call("VAEDecode", samples=out, vae=vae)[0].movedim(-1, 1).clamp(0, 1)


def pixel_psnr(a, b) -> float:
    mse = float(((a.double() - b.double()) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def text_control(model, clip, vae, judge, fw, n, seed):
    import torch
    factors = fw.sample_factors(n, generator=torch.Generator().manual_seed(seed))
    negative = encode_batch(clip, [""] * n)
    images = generate(model, vae, encode_batch(clip, fw.full_caption(factors)), negative, n, seed)
    predicted = judge.predict(images)
    return {name: float((predicted[:, k] == factors[:, k]).float().mean()) for k, name in enumerate(fw.FACTOR_NAMES)}


def inversion_quality(model, clip, vae, fw, n, seed):
    import torch
    from comfyui_disentangle.harness.reconstruction import reconstruction_routes
    factors = fw.sample_factors(n, generator=torch.Generator().manual_seed(seed))
    images = fw.render_at(factors, 128)
    latent = call("VAEEncode", pixels=images.movedim(1, -1), vae=vae)[0]
    positive = encode_batch(clip, fw.full_caption(factors))
    negative = encode_batch(clip, [""] * n)
    decode = lambda lat: call("VAEDecode", samples=lat, vae=vae)[0].movedim(-1, 1)  # noqa: E731
    rows = [["VAE round trip (ceiling)", "", "", "", pixel_psnr(decode(latent), images)]]
    for steps in (10, 25, 50):
        for name, calls, rec in reconstruction_routes(model, positive, negative, latent, steps, 1.0, refine=(0, 2)):
            rows.append([name, steps, calls, latent_psnr(rec["samples"], latent["samples"]), pixel_psnr(decode(rec), images)])
    return rows


def edit_rates(judge, fw, original, edited, target_col, target_values):
    """(target reached, other five preserved) rates of an edit, judged against the original generation."""
    p0, p1 = judge.predict(original), judge.predict(edited)
    reached = float((p1[:, target_col] == target_values).float().mean())
    keep = [k for k, name in enumerate(fw.FACTOR_NAMES) if name in OTHER]
    preserved = float((p1[:, keep] == p0[:, keep]).all(1).float().mean())
    per_factor = {fw.FACTOR_NAMES[k]: float((p1[:, k] == p0[:, k]).float().mean()) for k in keep}
    return reached, preserved, per_factor


def editing_methods(model, clip, vae, judge, fw, n, seed, optimise_on=8, per_seed_betas=(0.03,), disdiff=""):
    """Object-hue edits by text over n seeds (each with its own scene and target hue)."""
    import torch
    pack_ls = harness.pack_module("core.lambda_schedule")
    g = torch.Generator().manual_seed(seed)
    factors = fw.sample_factors(n, generator=g)
    target = (factors[:, fw.OBJECT_HUE] + torch.randint(1, 10, (n,), generator=g)) % 10
    edited_factors = factors.clone()
    edited_factors[:, fw.OBJECT_HUE] = target
    neutral = encode_batch(clip, fw.full_caption(factors))
    styled = encode_batch(clip, fw.full_caption(edited_factors))
    negative = encode_batch(clip, [""] * n)
    original = generate(model, vae, neutral, negative, n, seed)
    rows = []
    naive = generate(model, vae, styled, negative, n, seed)
    rows.append(["change the prompt, same seed (naive)", *edit_rates(judge, fw, original, naive, fw.OBJECT_HUE, target)])
    for switch in (10, 20):
        mixed = call("DisentangleMixConditioning", neutral=neutral, styled=styled,
                     schedule=pack_ls.switch_at_step(50, switch))[0]
        images = generate(model, vae, mixed, negative, n, seed)
        rows.append([f"λ mixing, fixed switch at {switch}/50", *edit_rates(judge, fw, original, images, fw.OBJECT_HUE, target)])
    if optimise_on:
        schedule, losses = learn_shared_schedule(model, clip, vae, fw, factors[:optimise_on], edited_factors[:optimise_on],
                                                 seed, n)
        mixed = call("DisentangleMixConditioning", neutral=neutral, styled=styled, schedule=schedule)[0]
        images = generate(model, vae, mixed, negative, n, seed)
        rows.append([f"λ mixing, optimised on {optimise_on} seeds ({len(losses)} Adam steps, loss "
                     f"{losses[0]:.3f}→{min(losses):.3f}), applied to all {n}",
                     *edit_rates(judge, fw, original, images, fw.OBJECT_HUE, target)])
    for beta in per_seed_betas:
        lam, losses = learn_per_seed_schedules(model, clip, vae, fw, factors, edited_factors, seed, beta=beta)
        images = lam_images(model, clip, vae, fw, factors, edited_factors, seed, lam)
        rows.append([f"λ mixing, optimised per seed (β {beta}, {len(losses)} Adam steps, mean loss "
                     f"{losses[0]:.3f}→{losses[-1]:.3f})", *edit_rates(judge, fw, original, images, fw.OBJECT_HUE, target)])
    rows.extend(avi_rows(model, vae, judge, fw, neutral, styled, negative, original, target, n, seed))
    if disdiff:
        rows += disdiff_rows(model, clip, vae, judge, fw, factors, target, seed, disdiff)
    else:
        rows.append(["DisDiff swap (issue 6): pass --disdiff CHECKPOINT", None, None, None])
    return rows


def avi_rows(model, vae, judge, fw, neutral, styled, negative, original, target, n, seed, steps=50, cfg=5.0,
             rhos=(0.25, 0.5, 0.75, 1.0)):
    """AVI (Wang et al. 2024) on the same edits: per seed, x (neutral prompt, T_x = 0.8T) and z (styled prompt,
    same noise, 0.5T) from AVI Capture; one Φ per seed trained on its pair as the paper sets it (N = 5000,
    batch 256, 5 epochs; 16×16 latents: r = 16, k = 8, hidden 256); ŷ for each ρ resumed by stock
    KSamplerAdvanced with the neutral prompt."""
    latent = call("EmptyLatentImage", width=128, height=128, batch_size=n)[0]
    x, z, start = call("DisentangleAVICapture", model=model, positive=neutral, target=styled, negative=negative,
                       latent_image=latent, seed=seed, steps=steps, cfg=cfg, sampler_name="ddim",
                       scheduler="ddim_uniform", t_x=0.8, delta_tau=-0.3, z_source="seed (paper)")
    t0 = time.time()
    phis = train_phi_per_seed(x, z)
    train_s = (time.time() - t0) / n
    info = phis[0].info
    rows = []
    for rho in rhos:
        resumed = resume(model, integrate_per_seed(x, z, phis, rho), neutral, negative, start, steps, cfg)
        images = call("VAEDecode", samples=resumed, vae=vae)[0].movedim(-1, 1).clamp(0, 1)
        rows.append([f"AVI, ρ = {rho} (Φ per seed: {info['steps']} Adam steps, {train_s:.1f} s; x at step {start}/"
                     f"{steps}, z at {z['avi_capture']['step']})",
                     *edit_rates(judge, fw, original, images, fw.OBJECT_HUE, target)])
    return rows


def train_phi_per_seed(x, z):
    """One Φ per batch item of AVI Capture's x/z, trained on its own pair as the paper sets it (N = 5000,
    batch 256, 5 epochs, λ = 3, 10, 10, 10)."""
    def item(latent, i):
        return dict(latent, samples=latent["samples"][i:i + 1])
    return [call("DisentangleAVITrain", x=item(x, i), z=item(z, i), k=0, hidden=0, samples_per_pair=0, epochs=5,
                 batch_size=256, learning_rate=1e-3, lambda_1=3.0, lambda_2=10.0, lambda_3=10.0, lambda_4=10.0,
                 seed=i)[0]
            for i in range(x["samples"].shape[0])]


PAPER_INTEGRATION = "Algorithm 1 (paper): x's top k + z's weakest k, reversed"


def integrate_per_seed(x, z, phis, rho):
    """ŷ of every batch item with its own Φ (S from Φ, the paper's Algorithm 1, γ 1), as one LATENT. The integration
    and γ are named: AVI Integrate's defaults are another method (x + the top direction of z − x, γ 2.25)."""
    import torch
    parts = [call("DisentangleAVIIntegrate", x=dict(x, samples=x["samples"][i:i + 1]),
                  z=dict(z, samples=z["samples"][i:i + 1]), rho=rho, k=0, singular_values="Φ: S (paper)",
                  avi_model=phi, integration=PAPER_INTEGRATION, gain=1.0)[0]["samples"]
             for i, phi in enumerate(phis)]
    return {"samples": torch.cat(parts)}


def resume(model, latent, positive, negative, start, steps, cfg):
    """Stock KSamplerAdvanced from ``start`` to the end, no noise added (ddim / ddim_uniform)."""
    return call("KSamplerAdvanced", model=model, add_noise="disable", noise_seed=0, steps=steps, cfg=cfg,
                sampler_name="ddim", scheduler="ddim_uniform", positive=positive, negative=negative,
                latent_image=latent, start_at_step=start, end_at_step=10000, return_with_leftover_noise="disable")[0]


def load_yardstick():
    """The shipped factor classifier (the judge) and the toy world's MODEL, CLIP and VAE."""
    from comfyui_disentangle.toy_world import factor_judges
    judge, _ = factor_judges.load_factor_classifier(os.path.join(harness.PACK_ROOT, "weights",
                                                                 "toy_world_factor_classifier.safetensors"))
    model, clip, vae = call("DisentangleLoadToyWorld", checkpoint="toy_world")
    return judge, model, clip, vae


def disdiff_rows(model, clip, vae, judge, fw, factors, target, seed, checkpoint, steps=50):
    """DisDiff (issue 6): the object hue swapped in from a second image. Each seed's scene and a second
    scene with the target hue (other factors random) are encoded; the learned factor that carries the
    object hue (the code that moves most between scenes differing only in object hue) is taken from the
    second image; all factors are imposed (partial-condition patch, stock KSampler, empty prompt, cfg 1).
    Judged against the reconstruction from the scene's own codes with the same seed."""
    import torch
    node = harness.pack_module("nodes.disdiff")
    if not os.path.isfile(checkpoint):
        print(f"DisDiff row skipped: no checkpoint at {checkpoint}")
        return [["DisDiff swap (issue 6): no checkpoint", None, None, None]]
    disdiff = node.DisDiffModel(harness.pack_module("core.disdiff").load_checkpoint(checkpoint).model, "bench")
    n = len(factors)
    g = torch.Generator().manual_seed(seed + 77)
    other = fw.sample_factors(n, generator=g)
    other[:, fw.OBJECT_HUE] = target

    def codes_of(f):
        latent = call("VAEEncode", pixels=fw.render_at(f, 128).movedim(1, -1).contiguous(), vae=vae)[0]
        return call("DisentangleDisDiffEncode", disdiff=disdiff, latent=latent)[0]

    # which learned factor carries the object hue: scenes that differ only in it
    probe = fw.sample_factors(32, generator=g)
    shifted = probe.clone()
    shifted[:, fw.OBJECT_HUE] = (probe[:, fw.OBJECT_HUE] + 5) % 10
    moved = (codes_of(probe)["codes"] - codes_of(shifted)["codes"]).norm(dim=-1).mean(0)
    hue_code = int(moved.argmax())
    source, second = codes_of(factors), codes_of(other)
    swapped = call("DisentangleDisDiffSwapFactors", factors=source, other=second, swap=str(hue_code))[0]
    empty = encode_batch(clip, [""] * n)
    every = ",".join(str(k) for k in range(disdiff.config.num_factors))

    def sample(f):
        patched = call("DisentangleDisDiffPartialCondition", model=model, disdiff=disdiff, factors=f,
                       condition_on=every, strengths="1.0")[0]
        return generate(patched, vae, empty, empty, n, seed, steps=steps, cfg=1.0)

    original, edited = sample(source), sample(swapped)
    return [[f"DisDiff swap of z^{hue_code} (the object-hue code) from a second image, vs its reconstruction",
             *edit_rates(judge, fw, original, edited, fw.OBJECT_HUE, target)]]



def toy_edit(model, clip, vae, fw, factors, edited_factors, seed, steps=50, cfg=5.0, beta=0.03, per_item=False, batch=None):
    """core's LambdaEdit of the object-hue edits of ``factors`` → ``edited_factors``, on the toy world's models
    (L(λ) on differentiable views of them, as Optimize λ Schedule has it; its σ schedule) and the toy CLIP loss
    model, from the noise that an evaluation batch of ``batch`` items gets from ``seed`` (its first len(factors))."""
    import torch
    lo = harness.pack_module("core.lambda_optim")
    boundary = harness.pack_module("nodes.comfy_boundary")
    host = harness.pack_module("nodes.lambda_optim")
    loss_model = call("DisentangleLoadToyClipLoss", clip_name="toy_world_clip.safetensors")[0]
    sigmas = boundary.sampling_sigmas(model, steps, "ddim", "ddim_uniform").tolist()
    neutral_texts, styled_texts = fw.full_caption(factors), fw.full_caption(edited_factors)
    conds = (encode_batch(clip, neutral_texts)[0][0], encode_batch(clip, styled_texts)[0][0], encode_batch(clip, [""])[0][0])
    with torch.inference_mode(False), torch.enable_grad():
        objective = host.LambdaObjective(model, vae, loss_model, beta)
        x_T = boundary.initial_noise(model, torch.zeros(batch or len(factors), 4, 16, 16), seed, sigmas[0])[:len(factors)]
        edit = lo.LambdaEdit(objective, objective.denoise, sigmas, cfg, conds, (None, None, None), x_T,
                             per_item=per_item, device=objective.device)
        edit.set_reference(neutral_texts, styled_texts)
    return edit


def learn_per_seed_schedules(model, clip, vae, fw, factors, edited_factors, seed, iterations=10, lr=0.05, beta=0.03):
    """Wu et al.'s use: one λ schedule optimised for each seed's own edit (all seeds in one batch,
    independent Adam optimisations); returns (λ [steps, n], mean loss per iteration)."""
    import torch
    lo = harness.pack_module("core.lambda_optim")
    edit = toy_edit(model, clip, vae, fw, factors, edited_factors, seed, beta=beta, per_item=True)
    with torch.inference_mode(False), torch.enable_grad():
        init = lo.paper_init(edit.steps, 20, 1.0)[:, None].repeat(1, len(factors))
        return lo.optimize_lambdas(edit.loss, init, iterations, lr)


def lam_images(model, clip, vae, fw, factors, edited_factors, seed, lam):
    """Images of the edits sampled with per-seed schedules λ [steps, n] (the core sampler, the same
    DDIM steps as KSampler's ddim), decoded by stock VAEDecode."""
    import torch
    edit = toy_edit(model, clip, vae, fw, factors, edited_factors, seed)
    with torch.inference_mode(False), torch.no_grad():
        x0 = edit.sample(lam)
    latent = {"samples": model.model.process_latent_out(x0).cpu()}
    return call("VAEDecode", samples=latent, vae=vae)[0].movedim(-1, 1).clamp(0, 1)


def learn_shared_schedule(model, clip, vae, fw, factors, edited_factors, seed, batch, iterations=10, lr=0.05, beta=0.03):
    """One λ schedule for several edits at once (Wu et al.'s loss averaged over the batch), from the
    same noise as the first items of the evaluation batch; returns (LAMBDA_SCHEDULE, losses)."""
    import torch
    lo = harness.pack_module("core.lambda_optim")
    ls = harness.pack_module("core.lambda_schedule")
    step_progress = harness.pack_module("nodes.comfy_boundary").step_progress_for_model
    edit = toy_edit(model, clip, vae, fw, factors, edited_factors, seed, beta=beta, batch=batch)
    with torch.inference_mode(False), torch.enable_grad():
        best, losses = lo.optimize_lambdas(edit.loss, lo.paper_init(edit.steps, 20, 1.0), iterations, lr)
    return ls.LambdaSchedule(tuple(step_progress(model, edit.sigmas[:-1])), tuple(best.tolist())), losses


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=128, help="generations for the text-control rows")
    parser.add_argument("--images", type=int, default=64, help="data-set images for the inversion rows")
    parser.add_argument("--edits", type=int, default=64, help="seeds for the editing rows")
    parser.add_argument("--optimise-on", type=int, default=8, help="seeds the shared λ schedule is learned on (0: skip)")
    parser.add_argument("--disdiff", default="", help="DisDiff checkpoint for its row (bench/train_disdiff.py); skipped if none")
    parser.add_argument("--per-seed-betas", type=float, nargs="*", default=[0.03],
                        help="β values of the per-seed optimised rows (none: skip)")
    args = parser.parse_args()
    if not harness.host_available():
        sys.exit(harness.SKIP_REASON)
    harness.start_host()
    import torch
    from comfyui_disentangle.toy_world import factor_world as fw
    t0 = time.time()
    judge, model, clip, vae = load_yardstick()
    with torch.inference_mode():
        control = text_control(model, clip, vae, judge, fw, args.samples, seed=1)
        inversion = inversion_quality(model, clip, vae, fw, args.images, seed=2)
        edits = editing_methods(model, clip, vae, judge, fw, args.edits, seed=3, optimise_on=args.optimise_on,
                                per_seed_betas=args.per_seed_betas, disdiff=args.disdiff)

    rows = [["text control", name, control[name], "", f"chance {1 / size:.2f}"]
            for name, size in zip(fw.FACTOR_NAMES, fw.FACTOR_SIZES)]
    for name, steps, calls, latent_db, pixel_db in inversion:
        label = name if steps == "" else f"{name}, {steps} steps, {calls} UNet call(s)/step"
        rows.append(["DDIM inversion", label, "" if latent_db == "" else latent_db, pixel_db, ""])
    for method, reached, preserved, per_factor in edits:
        rows.append(["edit object hue", method, "—" if reached is None else reached, "—" if preserved is None else preserved,
                     "" if per_factor is None else ", ".join(f"{k} {v:.2f}" for k, v in per_factor.items())])
    print_table(
        "Toy-world quality (judged by the shipped factor classifiers). Columns A / B: text control = accuracy of "
        f"the named value over {args.samples} generations from full captions / -; DDIM inversion = latent / pixel "
        f"PSNR dB of invert → stock KSamplerAdvanced over {args.images} data-set images, cfg 1; edit object hue = "
        f"target hue reached / all five other factors preserved vs the unedited generation, {args.edits} seeds",
        ["part", "row", "A", "B", "reference"], rows)
    import comfy.model_management as mm
    print(f"\n{time.time() - t0:.0f} s, ComfyUI on {mm.get_torch_device_name(mm.get_torch_device())}")


if __name__ == "__main__":
    main()
