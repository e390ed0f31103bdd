"""Is the GPU replay gap of a learned λ schedule the dtype, or a real difference? (issue 12)

    DISENTANGLE_HOST_GPU=1 COMFYUI_PATH=/path/to/ComfyUI python bench/lambda_replay_gap.py [--steps 10] [--iterations 4]

On the H200 the GPU suite found the stock replay of a learned schedule (Mix Conditioning by λ Schedule →
KSampler) 0.23 % of the latent's largest value away from Optimize λ Schedule's own edit, and the
real-image path 0.42 % away from the image (tests/test_lambda_optim_node.py). This script learns a
schedule on the toy world as that test does, then samples it four ways: the optimiser's sampling (the
node's LambdaEdit: core.lambda_optim.sample_mixed through the node's UNet denoiser) and the stock replay,
each with the MODEL as loaded (fp16 on a GPU) and with an fp32 copy of it; and the real-image path
(DDIM Inversion → the corrected path with styled = neutral) against the image's latent, in both dtypes.

Each row: the largest difference, relative to the reference's largest value, and in units of the
dtype's machine ε. The fp32 rows run with TF32 off: PyTorch lets cuDNN run float32 convolutions in TF32
by default (10-bit mantissa, the ε of fp16), so one more row shows the fp32 copy under that default. Reading it: when optimiser vs replay in fp32 is at the CPU suite's level (≲ 1e-5)
while in fp16 it is a few ε16, of the size of fp16 vs fp32 of one route alone, the gap is rounding of the
fp16 MODEL: the replay gives the edit the optimiser saw, to the precision the MODEL runs in. A gap that
stays large in fp32 would be a real difference between the two samplings.
"""
from __future__ import annotations

import argparse
import contextlib

import _pack_alias  # noqa: E402,F401  (registers comfyui_disentangle: harness/alias.py)
from common import print_table  # noqa: E402
from comfyui_disentangle import harness  # noqa: E402
from comfyui_disentangle.harness import call, device_name  # noqa: E402

NEUTRAL = "a large red cube on a green floor in front of a blue wall"
STYLED = "a large yellow cube on a green floor in front of a blue wall"


@contextlib.contextmanager
def tf32(enabled: bool):
    """float32 matmuls and convolutions in TF32 (PyTorch's default for cuDNN convolutions) or in full fp32."""
    import torch
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def encode(clip, text):
    return call("CLIPTextEncode", clip=clip, text=text)[0]


def learn(model, clip, vae, loss_model, steps, cfg, seed, iterations):
    """(schedule, the node's edited LATENT) from Optimize λ Schedule."""
    import nodes
    import torch
    node = nodes.NODE_CLASS_MAPPINGS["DisentangleOptimizeLambda"]()
    with torch.inference_mode():
        out = node.optimize(model=model, vae=vae, clip=clip, clip_loss_model=loss_model, neutral_text=NEUTRAL,
                            styled_text=STYLED, negative_text="", seed=seed, steps=steps, cfg=cfg, iterations=iterations,
                            learning_rate=0.1, beta=0.05, neutral_steps=steps // 3, styled_weight=1.0, width=128,
                            height=128)
    schedule, edited = out["result"][:2]
    return schedule, edited["samples"]


def optimiser_sampling(model, clip, vae, loss_model, values, steps, cfg, seed=None, trajectory=None, styled=STYLED):
    """X0(λ) exactly as Optimize λ Schedule samples it (its LambdaEdit), as a LATENT's samples."""
    import comfy.model_management as mm
    import torch
    lam_node = harness.pack_module("nodes.lambda_optim")
    boundary = harness.pack_module("nodes.comfy_boundary")
    (c0, _), (c1, _) = boundary.encode_text(clip, NEUTRAL, "neutral_text"), boundary.encode_text(clip, styled, "styled_text")
    uncond, _ = boundary.encode_text(clip, "", "negative_text")
    sigmas = boundary.sampling_sigmas(model, steps, "ddim", "ddim_uniform").tolist()
    with torch.inference_mode():  # loaded as Optimize λ Schedule loads it: on the H200 the stock sampling after
        mm.load_models_gpu([model])  # a load outside inference mode failed ("Inference tensors do not track version counter")
    with torch.inference_mode(False), torch.no_grad():
        objective = lam_node.LambdaObjective(model, vae, loss_model, 0.05)
        if trajectory is None:
            start = lam_node.initial_noise(model, torch.zeros(1, 4, 16, 16), seed, sigmas[0])
        else:
            start = trajectory
        edit = lam_node.LambdaEdit(objective, sigmas, cfg, (c0, c1, uncond), (None, None, None), start,
                                   rediffusion_steps=0)
        x0 = edit.sample(torch.tensor(values, dtype=torch.float32))
    return model.model.process_latent_out(x0.detach()).cpu()


def stock_replay(model, clip, schedule, steps, cfg, seed):
    mixed = call("DisentangleMixConditioning", neutral=encode(clip, NEUTRAL), styled=encode(clip, STYLED),
                 schedule=schedule)[0]
    latent = call("EmptyLatentImage", width=128, height=128, batch_size=1)[0]
    return call("KSampler", model=model, seed=seed, steps=steps, cfg=cfg, sampler_name="ddim", scheduler="ddim_uniform",
                positive=mixed, negative=encode(clip, ""), latent_image=latent, denoise=1.0)[0]["samples"].cpu()


def real_image(model, clip, vae, loss_model, steps, cfg):
    """(the corrected path's X0 with styled = neutral and λ = 1.1 after t*, the image's latent)."""
    image, _ = call("DisentangleFactorWorldScene", floor_hue="green", wall_hue="blue", object_hue="red", scale="large",
                    shape="cube", orientation="facing front", size=128)
    latent = call("VAEEncode", pixels=image, vae=vae)[0]
    _, trajectory = call("DisentangleDDIMInversion", model=model, positive=encode(clip, NEUTRAL), latent=latent,
                         steps=steps, cfg=1.0, scheduler="ddim_uniform", refine_iterations=2)
    values = [0.0] * (steps // 5) + [1.1] * (steps - steps // 5)
    x0 = optimiser_sampling(model, clip, vae, loss_model, values, steps, cfg, trajectory=trajectory, styled=NEUTRAL)
    return x0, latent["samples"].cpu()


def gap(a, b, dtype) -> list:
    import torch
    diff = float((a.double() - b.double()).abs().max())
    scale = float(b.double().abs().max())
    return [f"{diff:.3g}", f"{scale:.3g}", f"{diff / scale:.3g}", f"{diff / scale / torch.finfo(dtype).eps:.3g}"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--cfg", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--iterations", type=int, default=4)
    args = parser.parse_args()

    import torch
    harness.start_host()
    model, clip, vae = call("DisentangleLoadToyWorld", checkpoint="toy_world")
    loss_model = call("DisentangleLoadToyClipLoss", clip_name="toy_world_clip.safetensors")[0]
    model32 = harness.fp32_copy(model)
    dtype = harness.compute_dtype(model)
    steps, cfg, seed = args.steps, args.cfg, args.seed
    print(f"device: {device_name()}; MODEL computes in {dtype}; toy world, {steps} ddim steps, cfg {cfg}, seed {seed}")

    schedule, node_edit = learn(model, clip, vae, loss_model, steps, cfg, seed, args.iterations)
    values = list(schedule.values)
    print("learned λ: " + ", ".join(f"{v:.3f}" for v in values))
    runs = {"model": (model, None), "fp32": (model32, False), "tf32": (model32, True)}
    ours, replay, real = {}, {}, {}
    for key, (m, allow_tf32) in runs.items():
        with tf32(allow_tf32) if allow_tf32 is not None else contextlib.nullcontext():
            ours[key] = optimiser_sampling(m, clip, vae, loss_model, values, steps, cfg, seed)
            replay[key] = stock_replay(m, clip, schedule, steps, cfg, seed)
            real[key] = real_image(m, clip, vae, loss_model, steps, cfg)

    name = str(dtype).replace("torch.", "")
    rows = [
        ["node's edit vs its LambdaEdit re-run (sanity: 0)", name, *gap(node_edit.cpu(), ours["model"], dtype)],
        ["optimiser vs stock replay, MODEL as loaded", name, *gap(ours["model"], replay["model"], dtype)],
        ["optimiser vs stock replay, fp32 copy", "float32", *gap(ours["fp32"], replay["fp32"], torch.float32)],
        ["optimiser: MODEL dtype vs fp32", name, *gap(ours["model"], ours["fp32"], dtype)],
        ["stock replay: MODEL dtype vs fp32", name, *gap(replay["model"], replay["fp32"], dtype)],
        ["real image: corrected path vs image latent, MODEL as loaded", name, *gap(*real["model"], dtype)],
        ["real image: corrected path vs image latent, fp32 copy", "float32", *gap(*real["fp32"], torch.float32)],
        ["optimiser vs stock replay, fp32 copy, TF32 allowed (PyTorch default)", "float32",
         *gap(ours["tf32"], replay["tf32"], torch.float32)],
        ["real image, fp32 copy, TF32 allowed", "float32", *gap(*real["tf32"], torch.float32)],
    ]
    print_table("λ replay gap (max |a − b|, relative to max |b|, and in units of the dtype's ε)",
                ["comparison", "dtype", "max |a−b|", "max |b|", "relative", "in ε"], rows)
    fp32_gap = float((ours["fp32"] - replay["fp32"]).abs().max() / replay["fp32"].abs().max())
    half_gap = float((ours["model"] - replay["model"]).abs().max() / replay["model"].abs().max())
    dtype_effect = float((replay["model"] - replay["fp32"]).abs().max() / replay["fp32"].abs().max())
    if dtype == torch.float32:
        verdict = "the MODEL already runs in float32 here: run this on a GPU (DISENTANGLE_HOST_GPU=1) to see the fp16 case"
    elif fp32_gap < 1e-4 and half_gap <= 4 * max(dtype_effect, torch.finfo(dtype).eps):
        verdict = (f"dtype: in fp32 the replay matches the optimiser to {fp32_gap:.2g}; the {name} gap ({half_gap:.2g}) is "
                   f"of the size of the {name} rounding of one route alone ({dtype_effect:.2g})")
    else:
        verdict = (f"NOT only dtype: fp32 gap {fp32_gap:.2g} (CPU suite: < 1e-4), {name} gap {half_gap:.2g} vs {name} "
                   f"rounding {dtype_effect:.2g}: look for a difference between the two samplings")
    print(f"\nverdict: {verdict}")


if __name__ == "__main__":
    main()
