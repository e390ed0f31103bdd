"""DisDiff nodes inside real headless ComfyUI (CPU): training on the toy world, the partial-condition
patch through stock KSampler (exact no-op for S = ∅, eq. 6 for ε and v models, with cfg), encode and
swap, checkpoints and errors. Skipped loudly without COMFYUI_PATH."""
from __future__ import annotations

import os

import pytest
import torch

from comfyui_disentangle import harness
from comfyui_disentangle.harness import call

pytestmark = pytest.mark.usefixtures("host")


@pytest.fixture(scope="module")
def disdiff_dir(tmp_path_factory):
    import folder_paths
    path = str(tmp_path_factory.mktemp("disdiff"))
    folder_paths.add_model_folder_path("disdiff", path, is_default=True)
    return path


@pytest.fixture(scope="module")
def toy(host):
    model, clip, vae = call("DisentangleLoadToyWorld", checkpoint="toy_world")
    empty = call("CLIPTextEncode", clip=clip, text="")[0]
    return model, clip, vae, empty


@pytest.fixture(scope="module")
def scene():
    fw = harness.pack_module("toy_world.factor_world")
    factors = torch.tensor([[4, 6, 0, 5, 0, 7], [1, 2, 8, 2, 2, 3]])
    return fw.render_at(factors, 128).movedim(1, -1).contiguous()


_LOSS_PLOT = {}


@pytest.fixture(scope="module")
def trained(toy, scene, disdiff_dir):
    """Train DisDiff (the node) for a few steps on one toy-world image."""
    model, _, vae, empty = toy
    import nodes
    node = nodes.NODE_CLASS_MAPPINGS["DisentangleTrainDisDiff"]()
    with torch.inference_mode():
        out = node.train(model=model, vae=vae, positive=empty, image_folder="", size=128, num_factors=3, code_dim=8,
                         steps=30, batch_size=8, learning_rate=3e-3, seed=0, save_name="one_image",
                         checkpoint_every=10, resume=False, images=scene[:1])
    assert len(out["result"]) == 2
    _LOSS_PLOT["trained"] = out["result"][1]
    return out["result"][0], out["ui"]["text"][0]


def sample(model, positive, latent, seed=5, steps=4, cfg=1.0, denoise=1.0, negative=None):
    return call("KSampler", model=model, seed=seed, steps=steps, cfg=cfg, sampler_name="ddim", scheduler="ddim_uniform",
                positive=positive, negative=negative if negative is not None else positive, latent_image=latent,
                denoise=denoise)[0]["samples"]


def test_train_node_writes_a_checkpoint_that_loads(trained, disdiff_dir, toy, scene):
    disdiff, summary = trained
    assert "one_image.safetensors" in summary and "step 30" in summary
    plot = _LOSS_PLOT["trained"]   # the loss_plot IMAGE: a drawn curve, not a blank
    assert plot.ndim == 4 and plot.shape[0] == 1 and plot.shape[-1] == 3 and plot.std() > 0.01
    assert os.path.isfile(os.path.join(disdiff_dir, "one_image.safetensors"))
    loaded = call("DisentangleLoadDisDiff", disdiff_name="one_image.safetensors")[0]
    assert loaded.step == 30 and loaded.config == disdiff.config
    _, _, vae, _ = toy
    a = call("DisentangleDisDiffEncode", disdiff=disdiff, image=scene, vae=vae)[0]["codes"]
    b = call("DisentangleDisDiffEncode", disdiff=loaded, image=scene, vae=vae)[0]["codes"]
    assert a.shape == (2, 3, 8)
    torch.testing.assert_close(a, b)
    latent = call("VAEEncode", pixels=scene, vae=vae)[0]
    torch.testing.assert_close(call("DisentangleDisDiffEncode", disdiff=loaded, latent=latent)[0]["codes"], b)


def test_resume_continues_from_the_checkpoint(toy, scene, disdiff_dir):
    model, _, vae, empty = toy
    import nodes
    node = nodes.NODE_CLASS_MAPPINGS["DisentangleTrainDisDiff"]()
    kw = dict(model=model, vae=vae, positive=empty, image_folder="", size=128, num_factors=2, code_dim=4, batch_size=2,
              learning_rate=1e-3, seed=1, save_name="resume_me", checkpoint_every=0, images=scene[:1])
    with torch.inference_mode():
        node.train(steps=2, resume=False, **kw)
        out = node.train(steps=4, resume=True, **kw)
    assert "step 4" in out["ui"]["text"][0]
    assert call("DisentangleLoadDisDiff", disdiff_name="resume_me.safetensors")[0].step == 4


def test_empty_subset_is_an_exact_no_op_and_the_model_stays_unpatched(trained, toy, scene):
    disdiff, _ = trained
    model, _, vae, empty = toy
    factors = call("DisentangleDisDiffEncode", disdiff=disdiff, image=scene[:1], vae=vae)[0]
    latent = call("EmptyLatentImage", width=128, height=128, batch_size=2)[0]
    plain = sample(model, empty, latent, cfg=3.0, negative=call("CLIPTextEncode", clip=toy[1], text="red")[0])
    none = call("DisentangleDisDiffPartialCondition", model=model, disdiff=disdiff, factors=factors, condition_on="",
                strengths="1.0")[0]
    assert torch.equal(sample(none, empty, latent, cfg=3.0, negative=call("CLIPTextEncode", clip=toy[1], text="red")[0]),
                       plain)
    zero = call("DisentangleDisDiffPartialCondition", model=model, disdiff=disdiff, factors=factors, condition_on="all",
                strengths="0")[0]
    assert torch.equal(sample(zero, empty, latent), sample(model, empty, latent))
    allf = call("DisentangleDisDiffPartialCondition", model=model, disdiff=disdiff, factors=factors, condition_on="all",
                strengths="1.0")[0]
    assert "model_function_wrapper" not in model.model_options
    assert not torch.equal(sample(allf, empty, latent), sample(model, empty, latent))
    assert "model_function_wrapper" not in model.model_options


def test_all_factors_reconstruct_better_than_the_unconditional_model(trained, toy, scene):
    """G trained for a few steps on one image: from a partly noised version of it, stock KSampler
    with all factors lands nearer the image than the unpatched model."""
    disdiff, _ = trained
    model, _, vae, empty = toy
    latent = call("VAEEncode", pixels=scene[:1], vae=vae)[0]
    factors = call("DisentangleDisDiffEncode", disdiff=disdiff, latent=latent)[0]
    patched = call("DisentangleDisDiffPartialCondition", model=model, disdiff=disdiff, factors=factors,
                   condition_on="all", strengths="1.0")[0]
    errs = {}
    for name, m in (("plain", model), ("all", patched)):
        errs[name] = sum(float((sample(m, empty, latent, seed=s, steps=8, denoise=0.8) - latent["samples"]).pow(2).mean())
                         for s in range(2))
    print(f"\nlatent MSE to the training image: {errs}")
    assert errs["all"] < errs["plain"]


def _random_disdiff(model, cond, seed=0):
    return harness.random_disdiff(model, cond, (4, 8, 8), seed=seed)


def _fields(disdiff, out, codes, factors):
    """G as the wrapper computes it: under autocast in the UNet's half dtype on a GPU (so that the
    comparison is of the same arithmetic on any device)."""
    half = out.features[0].dtype in (torch.float16, torch.bfloat16) and out.emb.device.type == "cuda"
    model = disdiff.on(out.emb.device)
    with torch.autocast(out.emb.device.type, dtype=out.features[0].dtype, enabled=half):
        return model.gradients(out, codes, factors).float()


@pytest.mark.parametrize("kind", ["sd1", "sd1_v"])
def test_patch_is_eq6_for_eps_and_v_models_with_cfg_batches(kind):
    model, clip, _ = harness.tiny_models(kind)
    node = harness.pack_module("nodes.disdiff")
    dd = harness.pack_module("core.disdiff")
    cond = call("CLIPTextEncode", clip=clip, text="a photo")[0]
    uncond = call("CLIPTextEncode", clip=clip, text="")[0]
    disdiff = _random_disdiff(model, uncond)
    g = torch.Generator().manual_seed(1)
    codes = torch.randn(2, 3, 4, generator=g)
    wrapper = node.PartialConditionWrapper(disdiff, codes, [0, 2], [1.0, 0.5])
    base = model.model
    device = model.load_device   # the CPU in CI, the GPU with DISENTANGLE_HOST_GPU=1
    codes = codes.to(device)
    with torch.inference_mode():
        x = (torch.randn(4, 4, 8, 8, generator=g) * 3.0).to(device)
        sigma = torch.tensor([2.5, 2.5, 2.5, 2.5], device=device)
        ctx = torch.cat([cond[0][0], cond[0][0], uncond[0][0], uncond[0][0]]).to(device)
        c = {"c_crossattn": ctx, "transformer_options": {}}
        got = wrapper(base.apply_model, {"input": x, "timestep": sigma, "c": c, "cond_or_uncond": [0, 1]})
        den = base.apply_model(x, sigma, c_crossattn=ctx, transformer_options={})
        eps = (x - den) / 2.5
        # G from the unconditional half's features (rows 2, 3: the prompt DisDiff was trained with),
        # the same shift on both halves
        capture = node.FeatureCapture()
        base.apply_model(x[2:], sigma[2:], c_crossattn=ctx[2:], transformer_options=capture.attach({}))
        G = _fields(disdiff, capture.output(), codes, [0, 2]).repeat(2, 1, 1, 1, 1)
        ab = torch.tensor(1 / (1 + 2.5 ** 2), device=device)
        eps_psi = dd.partial_condition_eps(eps, G, ab, [1.0, 0.5])
        torch.testing.assert_close(got, x - 2.5 * eps_psi, rtol=1e-4, atol=1e-4)
        assert (got - den).abs().max() > 1e-3
        # so cfg guidance u + w·(c − u) is shifted by exactly eq. 6's term, for any w
        shift = got - den
        torch.testing.assert_close(shift[:2], shift[2:])
        # a call with only the conditional chunk (cfg 1) uses its own features
        only = wrapper(base.apply_model, {"input": x[:2], "timestep": sigma[:2],
                                          "c": {"c_crossattn": ctx[:2], "transformer_options": {}}, "cond_or_uncond": [0]})
        capture = node.FeatureCapture()
        den_c = base.apply_model(x[:2], sigma[:2], c_crossattn=ctx[:2], transformer_options=capture.attach({}))
        G_c = _fields(disdiff, capture.output(), codes, [0, 2])
        torch.testing.assert_close(only, x[:2] - 2.5 * dd.partial_condition_eps((x[:2] - den_c) / 2.5, G_c, ab, [1.0, 0.5]),
                                   rtol=1e-4, atol=1e-4)
        # and through stock KSampler with cfg (both halves patched), finite output
        patched = node.patch_model(model, disdiff, codes[:1].cpu(), [1], [1.0])
        latent = call("EmptyLatentImage", width=64, height=64, batch_size=2)[0]
        out = call("KSampler", model=patched, seed=0, steps=3, cfg=4.0, sampler_name="euler", scheduler="normal",
                   positive=cond, negative=uncond, latent_image=latent, denoise=1.0)[0]["samples"]
        assert torch.isfinite(out).all()


def test_swap_factors_and_toggles(trained, toy, scene):
    disdiff, _ = trained
    _, _, vae, _ = toy
    a = call("DisentangleDisDiffEncode", disdiff=disdiff, image=scene[:1], vae=vae)[0]
    b = call("DisentangleDisDiffEncode", disdiff=disdiff, image=scene[1:], vae=vae)[0]
    sel = call("DisentangleDisDiffFactorToggles", **{f"factor_{k}": k in (0, 2) for k in range(10)})[0]
    assert sel == "0,2"
    s = call("DisentangleDisDiffSwapFactors", factors=a, other=b, swap=sel)[0]["codes"]
    torch.testing.assert_close(s[:, [0, 2]], b["codes"][:, [0, 2]])
    torch.testing.assert_close(s[:, 1], a["codes"][:, 1])
    node = harness.pack_module("nodes.common")
    with pytest.raises(node.InputError, match="indices must lie"):
        call("DisentangleDisDiffSwapFactors", factors=a, other=b, swap="5")
    with pytest.raises(node.InputError, match="one value or one per selected factor"):
        call("DisentangleDisDiffPartialCondition", model=toy[0], disdiff=disdiff, factors=a, condition_on="0,1",
             strengths="1,2,3")


def test_wrong_model_and_bad_checkpoints_give_clear_errors(trained, toy, scene, disdiff_dir):
    disdiff, _ = trained
    _, _, vae, _ = toy
    common = harness.pack_module("nodes.common")
    factors = call("DisentangleDisDiffEncode", disdiff=disdiff, image=scene[:1], vae=vae)[0]
    tiny, clip, _ = harness.tiny_models("sd1")
    patched = call("DisentangleDisDiffPartialCondition", model=tiny, disdiff=disdiff, factors=factors,
                   condition_on="all", strengths="1")[0]
    empty = call("CLIPTextEncode", clip=clip, text="")[0]
    latent = call("EmptyLatentImage", width=64, height=64, batch_size=1)[0]
    with pytest.raises(common.InputError, match="do not match the DisDiff model"):
        sample(patched, empty, latent, steps=2)
    with open(os.path.join(disdiff_dir, "one_image.safetensors"), "rb") as f:
        data = f.read()
    with open(os.path.join(disdiff_dir, "broken.safetensors"), "wb") as f:
        f.write(data[: len(data) // 3])
    with pytest.raises(common.InputError, match="not a readable safetensors file"):
        call("DisentangleLoadDisDiff", disdiff_name="broken.safetensors")
