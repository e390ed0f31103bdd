"""AVI nodes inside real ComfyUI (COMFYUI_PATH) on tiny random-weight models and the toy world.
Skipped loudly without COMFYUI_PATH."""
from __future__ import annotations

import os

import pytest
import torch

from comfyui_disentangle import harness as comfy_host
from comfyui_disentangle.harness import call

pytestmark = pytest.mark.usefixtures("host")

STEPS = 20
PAPER = "Algorithm 1 (paper): x's top k + z's weakest k, reversed"


def encode(clip, text):
    return call("CLIPTextEncode", clip=clip, text=text)[0]


def prompts(kind):
    model, clip, vae = comfy_host.tiny_models(kind)
    return model, encode(clip, "a photo of a house"), encode(clip, "a photo of a snowy house"), encode(clip, "")


def capture(model, pos, target, neg, size=64, batch=1, seed=5, sampler="ddim", scheduler="ddim_uniform",
            z_source="seed (paper)", steps=STEPS, t_x=0.8, delta_tau=-0.3, width=None):
    latent = call("EmptyLatentImage", width=width or size, height=size, batch_size=batch)[0]
    return call("DisentangleAVICapture", model=model, positive=pos, target=target, negative=neg, latent_image=latent,
                seed=seed, steps=steps, cfg=4.0, sampler_name=sampler, scheduler=scheduler, t_x=t_x,
                delta_tau=delta_tau, z_source=z_source)


def stock(model, pos, neg, size=64, batch=1, seed=5, sampler="ddim", scheduler="ddim_uniform", width=None):
    latent = call("EmptyLatentImage", width=width or size, height=size, batch_size=batch)[0]
    return call("KSampler", model=model, seed=seed, steps=STEPS, cfg=4.0, sampler_name=sampler, scheduler=scheduler,
                positive=pos, negative=neg, latent_image=latent, denoise=1.0)[0]["samples"]


def resume(model, pos, neg, latent, start, sampler="ddim", scheduler="ddim_uniform"):
    return call("KSamplerAdvanced", model=model, add_noise="disable", noise_seed=0, steps=STEPS, cfg=4.0,
                sampler_name=sampler, scheduler=scheduler, positive=pos, negative=neg, latent_image=latent,
                start_at_step=start, end_at_step=10000, return_with_leftover_noise="disable")[0]["samples"]


@pytest.mark.parametrize("kind,sampler,scheduler,width", [
    ("sd1", "ddim", "ddim_uniform", None), ("sd1", "dpmpp_2m", "karras", 96), ("sd1_v", "euler", "normal", None),
    ("sdxl", "ddim", "ddim_uniform", None)])
def test_rho_zero_with_own_singular_values_resumes_to_the_plain_sampling(kind, sampler, scheduler, width):
    """capture → integrate(ρ = 0, S = x's own) → stock KSamplerAdvanced = the plain stock KSampler run (for
    one-step samplers; a multistep sampler such as dpmpp_2m restarts its history at any KSamplerAdvanced split,
    so there the reference is the stock split: KSamplerAdvanced to the resume step, then from it)."""
    model, pos, target, neg = prompts(kind)
    if kind == "sdxl":
        pos, target, neg = (comfy_host.sdxl_conditioning(s, width=64, height=64) for s in (1, 2, 3))
    x, z, start = capture(model, pos, target, neg, sampler=sampler, scheduler=scheduler, width=width)
    assert 1 <= start < STEPS and x["samples"].shape == z["samples"].shape
    y = call("DisentangleAVIIntegrate", x=x, z=z, rho=0.0, k=0, singular_values="x's own (no Φ)", integration=PAPER,
             gain=1.0)[0]
    # ρ = 0 with x's own S rebuilds x from its float32 SVD (core/avi: SVD maths in float32 on every device):
    # exact up to the SVD's normwise backward error, c·r·ε32·‖x‖₂ per channel (LAPACK on the CPU: c·r ≤ 6,
    # cuSOLVER rounds differently), so the bound is 8·r·ε32·‖x‖₂, not an elementwise tolerance
    spectral = torch.linalg.matrix_norm(x["samples"].double(), ord=2).max()
    bound = 8 * min(x["samples"].shape[-2:]) * torch.finfo(torch.float32).eps * float(spectral)
    assert float((y["samples"] - x["samples"]).abs().max()) < bound
    edited = resume(model, pos, neg, y, start, sampler, scheduler)
    if sampler in ("ddim", "euler"):
        plain = stock(model, pos, neg, sampler=sampler, scheduler=scheduler, width=width)
    else:
        empty = call("EmptyLatentImage", width=width or 64, height=64, batch_size=1)[0]
        first = call("KSamplerAdvanced", model=model, add_noise="enable", noise_seed=5, steps=STEPS, cfg=4.0,
                     sampler_name=sampler, scheduler=scheduler, positive=pos, negative=neg, latent_image=empty,
                     start_at_step=0, end_at_step=start, return_with_leftover_noise="enable")[0]
        plain = resume(model, pos, neg, first, start, sampler, scheduler)
    scale = plain.abs().max()
    # the resume of y starts from x plus the SVD's rounding (above); a MODEL computing in half precision (a GPU)
    # rounds each step's output to its ε, so that tiny start difference comes back as a few ε of the dtype
    # (the H200: 0.25 % = 2.5 ε16 for sd1_v/euler): 1e-3 in float32, 8 ε of the compute dtype otherwise
    tolerance = max(1e-3, 8 * torch.finfo(comfy_host.compute_dtype(model)).eps)
    assert (edited - plain).abs().max() < tolerance * scale
    if sampler in ("ddim", "euler"):  # x itself (no SVD) resumes to the plain run at the float32 bound on any device
        assert (resume(model, pos, neg, x, start, sampler, scheduler) - plain).abs().max() < 1e-3 * scale
    # a real integration (ρ = 1) changes the result
    y1 = call("DisentangleAVIIntegrate", x=x, z=z, rho=1.0, k=0, singular_values="x's own (no Φ)", integration=PAPER,
              gain=1.0)[0]
    assert (resume(model, pos, neg, y1, start, sampler, scheduler) - plain).abs().max() > 1e-2 * scale


def test_capture_steps_noise_levels_and_z_sources():
    model, pos, target, neg = prompts("sd1")
    (x, z, start), = [capture(model, pos, target, neg)]
    mx, mz = x["avi_capture"], z["avi_capture"]
    # ddim_uniform, 20 steps: timesteps 951, 901, ...: T_x = 0.8 → step 3 (t 801), T_x − 0.3 → step 9 (t 501)
    assert (start, mx["step"], mz["step"]) == (3, 3, 9)
    assert mx["sigma"] > mz["sigma"] > 0
    # x is exactly KSamplerAdvanced's leftover-noise latent at the resume step
    empty = call("EmptyLatentImage", width=64, height=64, batch_size=1)[0]
    adv = call("KSamplerAdvanced", model=model, add_noise="enable", noise_seed=5, steps=STEPS, cfg=4.0,
               sampler_name="ddim", scheduler="ddim_uniform", positive=pos, negative=neg, latent_image=empty,
               start_at_step=0, end_at_step=start, return_with_leftover_noise="enable")[0]["samples"]
    torch.testing.assert_close(x["samples"], adv)
    adv_z = call("KSamplerAdvanced", model=model, add_noise="enable", noise_seed=5, steps=STEPS, cfg=4.0,
                 sampler_name="ddim", scheduler="ddim_uniform", positive=target, negative=neg, latent_image=empty,
                 start_at_step=0, end_at_step=mz["step"], return_with_leftover_noise="enable")[0]["samples"]
    torch.testing.assert_close(z["samples"], adv_z)
    # paper space of an ε model = VP-normalised process_latent_in: a = scale_factor / √(1 + σ²)
    sf = model.model.latent_format.scale_factor
    torch.testing.assert_close(mx["a"].flatten(), torch.full((4,), sf / (1 + mx["sigma"] ** 2) ** 0.5))
    # "continue from x": z continues x with the target prompt
    _, z2, _ = capture(model, pos, target, neg, z_source="continue from x")
    cont = call("KSamplerAdvanced", model=model, add_noise="disable", noise_seed=0, steps=STEPS, cfg=4.0,
                sampler_name="ddim", scheduler="ddim_uniform", positive=target, negative=neg,
                latent_image={"samples": x["samples"]}, start_at_step=start, end_at_step=mz["step"],
                return_with_leftover_noise="enable")[0]["samples"]
    torch.testing.assert_close(z2["samples"], cont)
    assert not torch.allclose(z2["samples"], z["samples"])
    # "one step from x (fast)": z is one stock SamplerCustom step σ(s_x) → σ(s_z) with the target prompt
    _, z3, _ = capture(model, pos, target, neg, z_source="one step from x (fast)")
    assert z3["avi_capture"]["step"] == mz["step"]
    sampler = call("KSamplerSelect", sampler_name="ddim")[0]
    sigmas = torch.tensor([mx["sigma"], mz["sigma"]])
    jump = call("SamplerCustom", model=model, add_noise=False, noise_seed=0, cfg=4.0, positive=target, negative=neg,
                sampler=sampler, sigmas=sigmas, latent_image={"samples": x["samples"]})[0]["samples"]
    torch.testing.assert_close(z3["samples"], jump)
    assert not torch.allclose(z3["samples"], z2["samples"])
    # with z one step after x, the fast z and the continued z are the same step
    _, z4, s4 = capture(model, pos, target, neg, z_source="one step from x (fast)", delta_tau=-0.05)
    _, z5, _ = capture(model, pos, target, neg, z_source="continue from x", delta_tau=-0.05)
    assert z4["avi_capture"]["step"] == s4 + 1
    torch.testing.assert_close(z4["samples"], z5["samples"])


def test_train_integrate_save_load_on_a_batch_of_pairs(tmp_path):
    import folder_paths
    folder_paths.add_model_folder_path("avi", str(tmp_path), is_default=True)
    model, pos, target, neg = prompts("sd1")
    x, z, start = capture(model, pos, target, neg, batch=3)
    out = call("DisentangleAVITrain", x=x, z=z, k=0, hidden=32, samples_per_pair=64, epochs=3, batch_size=32,
               learning_rate=1e-3, lambda_1=3.0, lambda_2=10.0, lambda_3=10.0, lambda_4=10.0, seed=0)
    avi_model = out[0]
    assert avi_model.info["steps"] == 3 * 6 and avi_model.info["final_loss"] < avi_model.info["first_loss"]
    assert avi_model.net.config() == {"height": 8, "width": 8, "k": 4, "hidden": 32, "rank": 8}
    y = call("DisentangleAVIIntegrate", x=x, z=z, rho=0.5, k=0, singular_values="Φ: S (paper)", avi_model=avi_model,
             integration=PAPER, gain=1.0)[0]
    assert y["samples"].shape == x["samples"].shape and torch.isfinite(y["samples"]).all()
    # the edit moves away from x as ρ grows
    d = [float((call("DisentangleAVIIntegrate", x=x, z=z, rho=r, k=0, singular_values="x's own (no Φ)",
                     integration=PAPER)[0]["samples"]
                - x["samples"]).norm()) for r in (0.0, 0.5, 1.0)]
    assert d[0] < 1e-3 * float(x["samples"].norm()) < d[1] < d[2]
    call("DisentangleAVISave", avi_model=avi_model, filename_prefix="avi_test")
    saved = [f for f in os.listdir(tmp_path) if f.startswith("avi_test")]
    assert saved
    loaded = call("DisentangleAVILoad", avi_name=saved[0])[0]
    y2 = call("DisentangleAVIIntegrate", x=x, z=z, rho=0.5, k=0, singular_values="Φ: S (paper)", avi_model=loaded,
              integration=PAPER, gain=1.0)[0]
    torch.testing.assert_close(y2["samples"], y["samples"])
    assert loaded.info["pairs"] == 3
    edited = resume(model, pos, neg, y, start)
    assert torch.isfinite(edited).all()


def test_node_errors_are_clear():
    from comfyui_disentangle.harness import pack_module
    InputError = pack_module("nodes.common").InputError
    model, pos, target, neg = prompts("sd1")
    x, z, _ = capture(model, pos, target, neg)
    xb, zb, _ = capture(model, pos, target, neg, size=96)
    with pytest.raises(InputError, match="same shape"):
        call("DisentangleAVIIntegrate", x=x, z=zb, rho=0.5, k=0, singular_values="x's own (no Φ)")
    with pytest.raises(InputError, match="k must be between 1 and r − 1 = 7"):
        call("DisentangleAVIIntegrate", x=x, z=z, rho=0.5, k=8, singular_values="x's own (no Φ)", integration=PAPER)
    with pytest.raises(InputError, match="k must be between 1 and r = min.H, W. = 8 for the difference"):
        call("DisentangleAVIIntegrate", x=x, z=z, rho=0.5, k=9, singular_values="x's own (no Φ)")
    with pytest.raises(InputError, match="integration must be one of"):
        call("DisentangleAVIIntegrate", x=x, z=z, rho=0.5, k=0, singular_values="x's own (no Φ)", integration="reversed")
    with pytest.raises(InputError, match="gain"):
        call("DisentangleAVIIntegrate", x=x, z=z, rho=0.5, k=0, singular_values="x's own (no Φ)", gain=-1.0)
    with pytest.raises(InputError, match=r"rho must lie in \[0, 1\]"):
        call("DisentangleAVIIntegrate", x=x, z=z, rho=1.5, k=0, singular_values="x's own (no Φ)")
    with pytest.raises(InputError, match="connect its x output"):
        call("DisentangleAVIIntegrate", x=z, z=x, rho=0.5, k=0, singular_values="x's own (no Φ)")
    with pytest.raises(InputError, match="does not come from AVI Capture"):
        call("DisentangleAVIIntegrate", x={"samples": x["samples"]}, z=z, rho=0.5, k=0, singular_values="x's own (no Φ)")
    bad = dict(x, samples=x["samples"].clone())
    bad["samples"][0, 0, 0, 0] = float("nan")
    with pytest.raises(InputError, match="NaN or infinite"):
        call("DisentangleAVIIntegrate", x=bad, z=z, rho=0.5, k=0, singular_values="x's own (no Φ)")
    with pytest.raises(InputError, match="connect AVI Train"):
        call("DisentangleAVIIntegrate", x=x, z=z, rho=0.5, k=0, singular_values="Φ: S (paper)", integration=PAPER)
    avi_model = call("DisentangleAVITrain", x=x, z=z, k=0, hidden=16, samples_per_pair=8, epochs=1, batch_size=8,
                     learning_rate=1e-3, lambda_1=3.0, lambda_2=10.0, lambda_3=10.0, lambda_4=10.0, seed=0)[0]
    with pytest.raises(InputError, match="trained for 8×8 latents.*12×12"):
        call("DisentangleAVIIntegrate", x=xb, z=zb, rho=0.5, k=0, singular_values="Φ: S (paper)", avi_model=avi_model,
             integration=PAPER)


def test_training_ticks_every_adam_step_and_plots_the_loss():
    import comfy.utils
    model, pos, target, neg = prompts("sd1")
    x, z, _ = capture(model, pos, target, neg, batch=2)
    seen = []
    previous = comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, **kw: seen.append((value, total)))
    try:
        avi_model, plot = call("DisentangleAVITrain", x=x, z=z, k=0, hidden=16, samples_per_pair=40, epochs=2, batch_size=16,
                               learning_rate=1e-3, lambda_1=3.0, lambda_2=10.0, lambda_3=10.0, lambda_4=10.0, seed=0)
    finally:
        comfy.utils.set_progress_bar_global_hook(previous)
    steps = 2 * 5  # epochs × ⌈2 pairs × 40 samples / batch 16⌉
    assert avi_model.info["steps"] == steps
    assert seen == [(k, steps) for k in range(1, steps + 1)]
    assert plot.shape == (1, 256, 512, 3)
    curve = torch.tensor([90, 170, 255]) / 255.0  # nodes/plot.py's CURVE colour
    assert ((plot[0] - curve).abs().max(dim=-1).values < 0.02).sum() > 200


@pytest.mark.parametrize("kind,sampler", [("sd1", "ddim"), ("sd1_v", "euler")])
def test_target_x0_at_x_against_stock_ksampler_advanced(kind, sampler):
    """z_source "target's x̂0 at x": z = x + (x̂0_T − x̂0_O) (ε and v models, σ space), both predicted at x's last
    sampler state. Oracle from stock nodes only: one Euler/DDIM step from that state with each prompt gives
    x_T − x_O = (1 − σ_s/σ_{s−1})·(x̂0_T − x̂0_O), so z = x + (x_T − x_O) / (1 − σ_s/σ_{s−1})."""
    model, pos, target, neg = prompts(kind)
    x, z, start = capture(model, pos, target, neg, sampler=sampler, scheduler="normal",
                          z_source="target's x̂0 at x (fast)", delta_tau=-0.3)
    assert z["avi_capture"]["step"] == start and z["avi_capture"]["sigma"] == x["avi_capture"]["sigma"]
    empty = call("EmptyLatentImage", width=64, height=64, batch_size=1)[0]

    def advanced(cond, latent, first, last, add):
        return call("KSamplerAdvanced", model=model, add_noise="enable" if add else "disable", noise_seed=5, steps=STEPS,
                    cfg=4.0, sampler_name=sampler, scheduler="normal", positive=cond, negative=neg, latent_image=latent,
                    start_at_step=first, end_at_step=last, return_with_leftover_noise="enable")[0]

    previous = advanced(pos, empty, 0, start - 1, True)
    x_o = advanced(pos, previous, start - 1, start, False)["samples"]
    x_t = advanced(target, previous, start - 1, start, False)["samples"]
    torch.testing.assert_close(x_o, x["samples"], atol=1e-4, rtol=1e-4)   # a split run rounds differently
    sig = call("BasicScheduler", model=model, scheduler="normal", steps=STEPS, denoise=1.0)[0]
    ratio = 1 - float(sig[start]) / float(sig[start - 1])
    expected = x["samples"] + (x_t - x_o) / ratio
    assert (z["samples"] - expected).abs().max() < 1e-3 * expected.abs().max()
    assert (z["samples"] - x["samples"]).abs().max() > 1e-2 * x["samples"].abs().max()


def test_integration_options_map_labels_to_the_core_and_keep_old_labels():
    avi_nodes, core = comfy_host.pack_module("nodes.avi"), comfy_host.pack_module("core.avi")
    # labels that saved workflows hold stay; new ones are appended
    assert avi_nodes.Z_SOURCES[:3] == ("seed (paper)", "continue from x", "one step from x (fast)")
    assert avi_nodes.SINGULAR_VALUES == ("Φ: S (paper)", "Φ: S + Δs", "x's own (no Φ)", "z's own (no Φ)")
    assert set(avi_nodes.INTEGRATION_KEYS.values()) == set(core.INTEGRATIONS)
    assert avi_nodes.DEFAULT_INTEGRATION in avi_nodes.INTEGRATIONS and avi_nodes.DEFAULT_Z_SOURCE in avi_nodes.Z_SOURCES
    model, pos, target, neg = prompts("sd1")
    x, z, _ = capture(model, pos, target, neg, batch=2)
    device = comfy_host.pack_module("nodes.avi").mm.get_torch_device()
    a, b = x["avi_capture"]["a"], x["avi_capture"]["b"]
    xp = x["samples"] * a + b
    zp = z["samples"] * z["avi_capture"]["a"] + z["avi_capture"]["b"]
    for label, key in avi_nodes.INTEGRATION_KEYS.items():
        for gain in (1.0, 2.5):
            y = call("DisentangleAVIIntegrate", x=x, z=z, rho=0.6, k=2, singular_values="z's own (no Φ)",
                     integration=label, gain=gain)[0]["samples"] * a + b
            # on the device the node computes on (cuSOLVER and LAPACK round the SVDs differently); the default
            # support weights the difference integration only
            support = avi_nodes.DEFAULT_SUPPORT if key == "difference" else 0.0
            ref = core.integrate(xp.to(device), zp.to(device), 2, 0.6, "z", integration=key, gain=gain,
                                 support=support).cpu()
            torch.testing.assert_close(y, ref, atol=1e-4, rtol=1e-4)
    # a prompt from before these inputs existed (HTTP API) gets the defaults; the default needs no Φ
    old = call("DisentangleAVIIntegrate", x=x, z=z, rho=0.6, k=0, singular_values="Φ: S (paper)")[0]["samples"]
    new = call("DisentangleAVIIntegrate", x=x, z=z, rho=0.6, k=avi_nodes.DIFFERENCE_K, singular_values="x's own (no Φ)",
               integration=avi_nodes.DEFAULT_INTEGRATION, gain=avi_nodes.DEFAULT_GAIN)[0]["samples"]
    torch.testing.assert_close(old, new)
    # ρ = 0 is the original whatever the integration and γ
    for label in avi_nodes.INTEGRATIONS:
        y0 = call("DisentangleAVIIntegrate", x=x, z=z, rho=0.0, k=0, singular_values="x's own (no Φ)",
                  integration=label, gain=3.0)[0]["samples"]
        # x rebuilt from its float32 SVD: exact up to the SVD's normwise backward error (see the ρ = 0 test)
        spectral = torch.linalg.matrix_norm(x["samples"].double(), ord=2).max()
        bound = 8 * min(x["samples"].shape[-2:]) * torch.finfo(torch.float32).eps * float(spectral)
        assert float((y0 - x["samples"]).abs().max()) < max(bound, 1e-4), label


def test_support_reaches_the_core_and_only_the_difference_integration():
    avi_nodes, core = comfy_host.pack_module("nodes.avi"), comfy_host.pack_module("core.avi")
    model, pos, target, neg = prompts("sd1")
    x, z, _ = capture(model, pos, target, neg, batch=2)
    device = avi_nodes.mm.get_torch_device()
    a, b = x["avi_capture"]["a"], x["avi_capture"]["b"]
    xp, zp = x["samples"] * a + b, z["samples"] * z["avi_capture"]["a"] + z["avi_capture"]["b"]
    args = dict(x=x, z=z, rho=0.8, k=1, singular_values="x's own (no Φ)", gain=2.0)
    plain = call("DisentangleAVIIntegrate", **args, integration=avi_nodes.DEFAULT_INTEGRATION, support=0.0)[0]["samples"]
    local = call("DisentangleAVIIntegrate", **args, integration=avi_nodes.DEFAULT_INTEGRATION, support=0.5)[0]["samples"]
    ref = core.integrate(xp.to(device), zp.to(device), 1, 0.8, "x", "difference", 2.0, 0.5).cpu()
    torch.testing.assert_close(local * a + b, ref, atol=1e-4, rtol=1e-4)
    assert float((local - plain).abs().max()) > 1e-3      # the weights change the edit
    # Algorithm 1 ignores it (the paper's method as written)
    paper = dict(args, integration=PAPER, k=0)
    torch.testing.assert_close(call("DisentangleAVIIntegrate", **paper, support=0.5)[0]["samples"],
                               call("DisentangleAVIIntegrate", **paper, support=0.0)[0]["samples"])
    with pytest.raises(comfy_host.pack_module("nodes.common").InputError, match="support"):
        call("DisentangleAVIIntegrate", **args, support=1.5)
