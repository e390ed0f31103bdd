"""nodes/comfy_boundary.py against ComfyUI itself: the σ schedule every node uses is the one
ComfyUI's KSampler samples (KSamplerAdvanced resumes on it), for plain samplers and for those whose
penultimate σ KSampler drops."""
from __future__ import annotations

import pytest
import torch

from comfyui_disentangle import harness

pytestmark = pytest.mark.usefixtures("host")


def discard_penultimate_samplers() -> list[str]:
    import comfy.samplers
    return sorted(comfy.samplers.KSampler.DISCARD_PENULTIMATE_SIGMA_SAMPLERS)


@pytest.mark.parametrize("sampler", ["ddim", "euler", "dpmpp_2m", "dpm_2", "uni_pc"])
@pytest.mark.parametrize("scheduler", ["ddim_uniform", "normal", "karras"])
@pytest.mark.parametrize("kind", ["sd1", "sd1_v"])
def test_sampling_sigmas_equal_ksamplers_own(kind, sampler, scheduler):
    import comfy.samplers
    boundary = harness.pack_module("nodes.comfy_boundary")
    model = harness.tiny_models(kind)[0]
    steps = 12
    ours = boundary.sampling_sigmas(model, steps, sampler, scheduler)
    ks = comfy.samplers.KSampler(model, steps=steps, device="cpu", sampler=sampler, scheduler=scheduler, denoise=1.0,
                                 model_options=model.model_options)
    assert ours.dtype == torch.float32 and ours.device.type == "cpu"
    assert torch.equal(ours, ks.sigmas.float().cpu())
    assert ours.ndim == 1 and float(ours[-1]) == 0.0 and bool((ours[:-1] > ours[1:]).all())
    plain = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), scheduler, steps)
    if sampler in discard_penultimate_samplers():  # the case the test is there for: not the scheduler's own σs
        assert not torch.equal(ours, plain.float())
    else:
        assert torch.equal(ours, plain.float())
    assert torch.equal(boundary.sampling_sigmas(model, steps, None, scheduler), plain.float())


def test_the_discarding_samplers_are_tested():
    assert {"dpm_2", "uni_pc"} <= set(discard_penultimate_samplers())


def test_alphas_cumprod_is_the_models_own_schedule():
    boundary = harness.pack_module("nodes.comfy_boundary")
    model = harness.tiny_models("sd1")[0]
    sampling = model.get_model_object("model_sampling")
    ab = boundary.alphas_cumprod(model)
    assert ab.shape == sampling.sigmas.shape
    assert ab.dtype == torch.float32 and bool((ab[1:] < ab[:-1]).all())  # ᾱ falls as σ rises
    sigma = sampling.sigmas.double().cpu()
    assert torch.allclose(ab.double(), 1 / (1 + sigma**2), rtol=1e-6)
    assert torch.allclose(((1 - ab.double()) / ab.double()).sqrt(), sigma, rtol=1e-3)  # ᾱ near 1: float32 1 − ᾱ
