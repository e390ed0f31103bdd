"""The pack's nodes inside real ComfyUI (COMFYUI_PATH), on tiny random-weight models built from
ComfyUI's own classes. Skipped loudly without COMFYUI_PATH."""
from __future__ import annotations

import json
import math
import os

import pytest
import torch

from comfyui_disentangle import harness
from comfyui_disentangle.harness.reconstruction import (call, encode, image_latent, latent_psnr, reconstruct,
                                                      stock_flip_sigmas_inversion, tame)

pytestmark = pytest.mark.usefixtures("host")


def lambda_schedule():
    """The pack's λ-schedule module as ComfyUI loaded it (same class identities as the nodes)."""
    return harness.pack_module("core.lambda_schedule")


# --------------------------------------------------------------------------------------------
# DDIM inversion
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", harness.KINDS)
def test_inversion_then_stock_ksampler_advanced_reconstructs(kind):
    """Invert, then stock KSamplerAdvanced (add_noise off, ddim, ddim_uniform, same steps/cond)
    gives back the latent. At one UNet call per step ours matches the stock FlipSigmas + euler
    route (both are first-order); two refine iterations make the inversion exact."""
    model, clip, vae = harness.tiny_models(kind)
    model = tame(model)
    positive, negative = encode(clip, "a photo"), encode(clip, "")
    latent = image_latent(vae)
    steps = 25
    noised, trajectory = call("DisentangleDDIMInversion", model=model, positive=positive, latent=latent,
                              steps=steps, cfg=1.0, scheduler="ddim_uniform", refine_iterations=0)
    assert trajectory.latents.shape[0] == steps + 1
    assert torch.allclose(trajectory.latents[-1], latent["samples"])
    assert torch.equal(trajectory.latents[0], noised["samples"])
    ours = latent_psnr(reconstruct(model, positive, negative, noised, steps, 1.0)["samples"], latent["samples"])
    refined, _ = call("DisentangleDDIMInversion", model=model, positive=positive, latent=latent,
                      steps=steps, cfg=1.0, scheduler="ddim_uniform", refine_iterations=2)
    ours_r2 = latent_psnr(reconstruct(model, positive, negative, refined, steps, 1.0)["samples"], latent["samples"])
    stock = latent_psnr(reconstruct(model, positive, negative, stock_flip_sigmas_inversion(
        model, positive, negative, latent, steps, 1.0), steps, 1.0)["samples"], latent["samples"])
    print(f"\n[{kind}] latent PSNR, invert → KSamplerAdvanced, {steps} steps: ours {ours:.1f} dB, "
          f"ours refine 2 {ours_r2:.1f} dB, FlipSigmas route {stock:.1f} dB")
    assert ours > 30.0
    assert ours > stock - 1.0
    assert ours_r2 > 60.0 and ours_r2 > stock + 20.0


def test_refinement_tightens_inversion_at_high_cfg_and_few_steps():
    model, clip, vae = harness.tiny_models("sd1")
    model = tame(model)
    positive, negative = encode(clip, "a photo of a cat"), encode(clip, "blurry")
    latent = image_latent(vae, seed=1)
    psnr = {}
    for r in (0, 4):
        noised, _ = call("DisentangleDDIMInversion", model=model, positive=positive, latent=latent, steps=10,
                         cfg=4.0, scheduler="ddim_uniform", refine_iterations=r, negative=negative)
        psnr[r] = latent_psnr(reconstruct(model, positive, negative, noised, 10, 4.0)["samples"], latent["samples"])
    print(f"\n[sd1] cfg 4, 10 steps: latent PSNR {psnr[0]:.1f} dB plain, {psnr[4]:.1f} dB with 4 refine iterations")
    assert psnr[4] > psnr[0] + 10.0
    assert psnr[4] > 35.0


def test_trajectory_step_resumes_stock_sampler():
    """Latent k of the trajectory + KSamplerAdvanced(start_at_step=k) also reconstructs."""
    model, clip, vae = harness.tiny_models("sd1")
    model = tame(model)
    positive, negative = encode(clip, "a photo"), encode(clip, "")
    latent = image_latent(vae, seed=2)
    _, trajectory = call("DisentangleDDIMInversion", model=model, positive=positive, latent=latent, steps=20,
                         cfg=1.0, scheduler="ddim_uniform", refine_iterations=2)
    mid = call("DisentangleTrajectoryLatent", trajectory=trajectory, step=12, expected_steps=20)[0]
    rec = reconstruct(model, positive, negative, mid, 20, 1.0, start_at_step=12)
    assert latent_psnr(rec["samples"], latent["samples"]) > 40.0


@pytest.mark.parametrize("bad, match", [
    (dict(latent={"samples": torch.zeros(1, 3, 8, 8)}), "latent has 3 channels but the model expects 4"),
    (dict(positive=[]), "positive: the CONDITIONING is empty"),
    (dict(steps=0), "steps must be at least 1"),
    (dict(cfg=3.0), "negative: cfg is 3.0"),
    (dict(latent={"samples": torch.full((1, 4, 8, 8), float("nan"))}), "latent contains NaN"),
])
def test_inversion_bad_input_names_the_input(bad, match):
    model, clip, _ = harness.tiny_models("sd1")
    inputs = dict(model=model, positive=encode(clip, "a"), latent={"samples": torch.zeros(1, 4, 8, 8)}, steps=5,
                  cfg=1.0, scheduler="ddim_uniform", refine_iterations=0)
    inputs.update(bad)
    with pytest.raises(ValueError, match=match):
        call("DisentangleDDIMInversion", **inputs)


def test_trajectory_from_other_step_count_is_rejected():
    model, clip, vae = harness.tiny_models("sd1")
    _, trajectory = call("DisentangleDDIMInversion", model=model, positive=encode(clip, "a"),
                         latent=image_latent(vae), steps=5, cfg=1.0, scheduler="ddim_uniform", refine_iterations=0)
    with pytest.raises(ValueError, match="made with 5 steps but 10"):
        call("DisentangleTrajectoryLatent", trajectory=trajectory, step=0, expected_steps=10)
    with pytest.raises(ValueError, match=r"step must lie in \[0, 5\]"):
        call("DisentangleTrajectoryLatent", trajectory=trajectory, step=6, expected_steps=0)


# --------------------------------------------------------------------------------------------
# Mixed conditioning: what the UNet really receives at each step
# --------------------------------------------------------------------------------------------

def record_unet_calls(model):
    """A clone of ``model`` whose UNet calls are recorded: (σ, cond_or_uncond, c dict)."""
    calls = []
    patched = model.clone()

    def wrapper(apply_model, args):
        calls.append((float(args["timestep"][0]), list(args["cond_or_uncond"]),
                      {k: v.clone() for k, v in args["c"].items() if torch.is_tensor(v)}))
        return apply_model(args["input"], args["timestep"], **args["c"])

    patched.set_model_unet_function_wrapper(wrapper)
    return patched, calls


def ksampler(model, positive, negative, steps, cfg, scheduler, seed=3):
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    return call("KSampler", model=model, seed=seed, steps=steps, cfg=cfg, sampler_name="ddim", scheduler=scheduler,
                positive=positive, negative=negative, latent_image=latent, denoise=1.0)[0]


def cond_rows(c, cond_or_uncond, key):
    """The rows of a batched UNet input that belong to the positive prompt."""
    per = c[key].shape[0] // len(cond_or_uncond)
    return torch.cat([c[key][i * per:(i + 1) * per] for i, k in enumerate(cond_or_uncond) if k == 0])


@pytest.mark.parametrize("kind, scheduler, steps", [
    ("sd1", "ddim_uniform", 20), ("sd1", "karras", 13), ("sd1", "normal", 9),
    ("sd1_v", "ddim_uniform", 10), ("sdxl", "ddim_uniform", 10), ("sdxl", "simple", 7),
])
def test_mixed_conditioning_feeds_the_unet_the_expected_context_at_each_step(kind, scheduler, steps):
    ls = lambda_schedule()
    model, clip, _ = harness.tiny_models(kind)
    c0, c1, negative = encode(clip, "a photo of a house"), encode(clip, "a photo of a house, snowy"), encode(clip, "")
    values = [round(math.sin(1.3 * k) * 0.8 + 0.3, 3) for k in range(20)]  # 20 knots, distinct values
    schedule = ls.from_step_values(values)
    mixed = call("DisentangleMixConditioning", neutral=c0, styled=c1, schedule=schedule)[0]

    sampling = model.get_model_object("model_sampling")
    import comfy.samplers
    sigmas = comfy.samplers.calculate_sigmas(sampling, scheduler, steps)[:-1].tolist()
    expected = schedule.values_for_sigmas(sigmas, sampling.percent_to_sigma)
    if scheduler == "ddim_uniform" and steps == 20:
        assert expected == values  # the knots' own step count gives back every value

    patched, calls = record_unet_calls(model)
    ksampler(patched, mixed, negative, steps, 2.5, scheduler)
    assert len(calls) == len(sigmas)

    # the reference: stock ConditioningAverage at each step's λ, recorded the same way
    for i, (sigma, cu, c) in enumerate(calls):
        assert sigma == pytest.approx(sigmas[i], rel=1e-5)
        reference = call("ConditioningAverage", conditioning_to=c1, conditioning_from=c0,
                         conditioning_to_strength=expected[i])[0]
        want = reference[0][0] * 1  # λ·c1 + (1 − λ)·c0
        got = cond_rows(c, cu, "c_crossattn")
        assert torch.allclose(got, want.to(got), atol=1e-6), f"step {i}: context differs"
        if "y" in c:  # SDXL: the ADM vector from the mixed pooled output and the size conds
            ref_model, ref_calls = record_unet_calls(model)
            ksampler(ref_model, reference, negative, 1, 2.5, scheduler)
            assert torch.allclose(cond_rows(c, cu, "y"), cond_rows(ref_calls[0][2], ref_calls[0][1], "y"), atol=1e-6)


def test_mixed_conditioning_handles_token_length_and_existing_ranges():
    ls = lambda_schedule()
    _, clip, _ = harness.tiny_models("sd1")
    c0 = encode(clip, "a photo")
    long_text = ", ".join(["a very detailed photo of a house in a snowy field"] * 12)
    c1 = encode(clip, long_text)
    assert c1[0][0].shape[1] > c0[0][0].shape[1]
    mixed = call("DisentangleMixConditioning", neutral=c0, styled=c1, schedule=ls.constant(0.5))[0]
    assert mixed[0][0].shape == c1[0][0].shape
    ranged = [[c1[0][0], dict(c1[0][1], start_percent=0.5, end_percent=1.0)]]
    out = call("DisentangleMixConditioning", neutral=c0, styled=ranged, schedule=ls.switch_at_step(10, 3))[0]
    assert [(e[1]["start_percent"], e[1]["end_percent"]) for e in out] == [(0.5, 1.0)]
    with pytest.raises(ValueError, match="neutral: the CONDITIONING is empty"):
        call("DisentangleMixConditioning", neutral=[], styled=c1, schedule=ls.constant(1.0))


def test_mixed_sampling_with_constant_schedule_equals_stock_average():
    """End to end: a constant λ gives the same latent as stock ConditioningAverage."""
    ls = lambda_schedule()
    model, clip, _ = harness.tiny_models("sd1")
    c0, c1, negative = encode(clip, "a cat"), encode(clip, "a cat, watercolor"), encode(clip, "")
    mixed = call("DisentangleMixConditioning", neutral=c0, styled=c1, schedule=ls.constant(0.3))[0]
    avg = call("ConditioningAverage", conditioning_to=c1, conditioning_from=c0, conditioning_to_strength=0.3)[0]
    a = ksampler(model, mixed, negative, 8, 3.0, "karras")["samples"]
    b = ksampler(model, avg, negative, 8, 3.0, "karras")["samples"]
    assert torch.allclose(a, b, atol=1e-5)


# --------------------------------------------------------------------------------------------
# Schedule nodes
# --------------------------------------------------------------------------------------------

def test_schedule_save_load_round_trip_and_bad_files(tmp_path):
    import folder_paths
    ls = lambda_schedule()
    schedule = ls.from_step_values([0.0, 0.25, 1.0, 1.1])
    folder = str(tmp_path)
    folder_paths.add_model_folder_path("lambda_schedules", folder, is_default=True)
    assert folder_paths.get_folder_paths("lambda_schedules")[0] == folder
    for fmt in ("json", "safetensors"):
        call("DisentangleLambdaSave", schedule=schedule, filename_prefix=f"rt_{fmt}", format=fmt)
        names = [n for n in folder_paths.get_filename_list("lambda_schedules") if n.startswith(f"rt_{fmt}")]
        assert names, f"no {fmt} file saved"
        assert call("DisentangleLambdaLoad", schedule_name=sorted(names)[-1])[0] == schedule
    call("DisentangleLambdaSave", schedule=schedule, filename_prefix="rt_json", format="json")
    assert len([n for n in os.listdir(folder) if n.startswith("rt_json")]) == 2  # never overwrites
    with open(os.path.join(folder, "broken.json"), "w") as f:
        json.dump({"values": []}, f)
    with pytest.raises(ValueError, match="schedule_name: broken.json is not a readable"):
        call("DisentangleLambdaLoad", schedule_name="broken.json")


def test_schedule_plot_and_text():
    ls = lambda_schedule()
    model, _, _ = harness.tiny_models("sd1")
    schedule = ls.switch_at_step(50, 20)
    image = call("DisentangleLambdaPlot", schedule=schedule, steps=50, scheduler="ddim_uniform", width=320, height=160)[0]
    assert image.shape == (1, 160, 320, 3) and 0 <= float(image.min()) and float(image.max()) <= 1
    with_model = call("DisentangleLambdaPlot", schedule=schedule, steps=25, scheduler="karras", width=320,
                      height=160, model=model)[0]
    assert not torch.equal(image, with_model)
    text = call("DisentangleLambdaToText", schedule=schedule, model=model, steps=50, scheduler="ddim_uniform")[0]
    assert text == ", ".join(["0"] * 20 + ["1"] * 30)


@pytest.mark.parametrize("name, inputs, match", [
    ("DisentangleLambdaFromList", {"values": ""}, "empty"),
    ("DisentangleLambdaFromList", {"values": "0, nan"}, "finite"),
    ("DisentangleLambdaSwitch", {"steps": 10, "switch_step": 12, "value_before": 0.0, "value_after": 1.0}, "switch_step"),
])
def test_schedule_nodes_reject_bad_input(name, inputs, match):
    with pytest.raises(ValueError, match=match):
        call(name, **inputs)


def test_inversion_honours_cancel():
    """ComfyUI's Cancel sets the interrupt flag; the inversion stops at the next step."""
    import comfy.model_management as mm
    model, clip, vae = harness.tiny_models("sd1")
    inputs = dict(model=model, positive=encode(clip, "a"), latent=image_latent(vae), steps=5, cfg=1.0,
                  scheduler="ddim_uniform", refine_iterations=0)
    mm.interrupt_current_processing(True)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            call("DisentangleDDIMInversion", **inputs)
    finally:
        mm.interrupt_current_processing(False)
    noised, _ = call("DisentangleDDIMInversion", **inputs)  # and runs again afterwards
    assert torch.isfinite(noised["samples"]).all()
