"""core/disdiff.py on CPU with a pure-torch stand-in for the frozen UNet: loss maths against direct
re-computation, gradient routing (the detach), eq. 6 in ε and σ form, training on one image,
checkpoints (round trip, resume, corrupt / foreign / mismatched files)."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from comfyui_disentangle.core import disdiff as dd

C, H = 4, 8


def timestep_features(t, dim=16):
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([args.cos(), args.sin()], 1)


class TinyFrozen(nn.Module):
    """A two-level conv 'UNet': input-block features at 8×8 and 4×4, a time embedding, an ε head."""

    def __init__(self, emb=32):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.time = nn.Sequential(nn.Linear(16, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.conv_in = nn.Conv2d(C, 16, 3, padding=1)
        self.down = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.tproj = nn.Linear(emb, 32)
        self.head = nn.Conv2d(32 + 16, C, 3, padding=1)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        self.requires_grad_(False)

    def forward(self, x, t):
        emb = self.time(timestep_features(t))
        h1 = self.conv_in(x)
        h2 = F.silu(self.down(h1)) + self.tproj(emb)[..., None, None]
        eps = self.head(torch.cat([F.interpolate(h2, scale_factor=2), h1], 1))
        return dd.FrozenOutput(eps, [h1, h2], emb)


def schedule(T=1000):
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, T, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0).float(), betas


@pytest.fixture
def setup():
    torch.manual_seed(0)
    frozen = TinyFrozen()
    latents = torch.randn(16, C, H, H)
    config = dd.make_config(latents, frozen, num_factors=3, code_dim=8, encoder_width=32)
    model = dd.DisDiff(config)
    with torch.no_grad():  # non-zero zero-initialised layers, so that every path carries gradient
        for p in model.decoder.parameters():
            if p.ndim > 1 and p.abs().max() == 0:
                p.normal_(0, 0.05)
    return frozen, latents, model


def test_config_from_probe_and_shapes(setup):
    frozen, latents, model = setup
    cfg = model.config
    assert cfg.feature_channels == (16, 32) and cfg.feature_sizes == ((8, 8), (4, 4)) and cfg.emb_dim == 32
    z = model.encode(latents[:5])
    assert z.shape == (5, 3, 8)
    out = frozen(latents[:5], torch.tensor([0, 10, 100, 500, 999]))
    g = model.gradients(out, z, [0, 2])
    assert g.shape == (5, 2, C, H, H)
    # one batched pass equals per-factor passes
    for k, c in enumerate([0, 2]):
        single = model.decoder(out.features, out.emb, z[:, c], torch.full((5,), c))
        torch.testing.assert_close(g[:, k], single, rtol=1e-5, atol=1e-6)
    # broadcast of a single code row
    g1 = model.gradients(out, z[:1], [1])
    torch.testing.assert_close(g1[:, 0], model.decoder(out.features, out.emb, z[:1, 1].expand(5, -1), torch.full((5,), 1)))
    assert dd.DisDiffConfig.from_json(cfg.to_json()) == cfg


def test_orthogonal_positional_embeddings(setup):
    _, _, model = setup
    p = model.decoder.positional_embeddings()
    torch.testing.assert_close(p @ p.t(), torch.eye(p.shape[0]), atol=1e-5, rtol=0)


def test_zero_initialised_head_makes_G_zero():
    frozen = TinyFrozen()
    latents = torch.randn(2, C, H, H)
    model = dd.DisDiff(dd.make_config(latents, frozen, num_factors=2, code_dim=4, encoder_width=16))
    out = frozen(latents, torch.tensor([3, 700]))
    assert model.gradients(out, model.encode(latents), [0, 1]).abs().max() == 0


def test_coefficients_against_the_ddpm_formulas():
    ab, betas = schedule()
    t = torch.tensor([0, 1, 10, 500, 999])
    k = dd.reconstruction_coefficient(ab, t)
    alphas = 1 - betas
    abd = torch.cumprod(alphas, 0)
    for i, ti in enumerate(t.tolist()):
        prev = 1.0 if ti == 0 else float(abd[ti - 1])
        posterior_var = float(betas[ti]) * (1 - prev) / (1 - float(abd[ti]))
        expected = math.sqrt(float(alphas[ti])) * math.sqrt(1 - float(abd[ti])) / float(betas[ti]) * posterior_var
        assert float(k[i]) == pytest.approx(expected, rel=1e-4, abs=1e-7)  # ᾱ is float32
    assert float(k[0]) == 0.0
    torch.testing.assert_close(dd.sampling_coefficient(ab[t]), (1 - ab[t]).sqrt())


def test_each_loss_against_direct_recomputation():
    g = torch.Generator().manual_seed(1)
    B, N, D = 6, 4, 5
    noise, eps, gsum = (torch.randn(B, C, H, H, generator=g) for _ in range(3))
    coef = torch.rand(B, generator=g)
    rec = dd.reconstruction_loss(noise, eps, gsum, coef, "l1")
    for i in range(B):
        direct = (noise[i] - eps[i] + coef[i] * gsum[i]).abs().mean()
        assert float(rec[i]) == pytest.approx(float(direct), rel=1e-5)
    rec2 = dd.reconstruction_loss(noise, eps, gsum, coef, "l2")
    assert float(rec2[2]) == pytest.approx(float((noise[2] - eps[2] + coef[2] * gsum[2]).pow(2).mean()), rel=1e-5)

    zu, zc, zt = (torch.randn(B, N, D, generator=g) for _ in range(3))
    c = torch.randint(N, (B,), generator=g)
    l_in, l_va = dd.invariant_loss(zu, zc, c), dd.variant_loss(zu, zc, zt, c)
    for i in range(B):
        d = torch.tensor([float(torch.linalg.vector_norm(zu[i, k] - zc[i, k])) for k in range(N)])
        assert float(l_in[i]) == pytest.approx(float(-torch.log_softmax(d, 0)[c[i]]), rel=1e-5)
        dn = torch.tensor([float(torch.linalg.vector_norm(zu[i, k] - zt[i, k])) for k in range(N)])
        dp = torch.tensor([float(torch.linalg.vector_norm(zc[i, k] - zt[i, k])) for k in range(N)])
        assert float(l_va[i]) == pytest.approx(float(-torch.log_softmax(dn - dp, 0)[c[i]]), rel=1e-5)

    a, b = torch.randn(B, C, H, H, generator=g), torch.randn(B, C, H, H, generator=g)
    a.requires_grad_(True)
    w = dd.disentangle_weight(a, b, 0.05)
    assert not w.requires_grad  # stop-gradient (eq. 13)
    torch.testing.assert_close(w, 0.05 * (a.detach() - b).pow(2).mean((1, 2, 3)))


def test_total_loss_composition_and_tweedie(setup):
    frozen, latents, model = setup
    ab, _ = schedule()
    g = torch.Generator().manual_seed(3)
    x0 = latents[:4]
    t = torch.tensor([5, 200, 600, 990])
    noise = torch.randn(x0.shape, generator=g)
    c = torch.tensor([0, 1, 2, 1])
    terms = dd.disdiff_losses(model, frozen, x0, t, noise, c, ab, dis_weight=0.05)
    # direct recomputation
    a = ab[t].view(-1, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
    out = frozen(x_t, t)
    z = model.encode(x0)
    G = torch.stack([model.decoder(out.features, out.emb, z[:, k], torch.full((4,), k)) for k in range(3)], 1)
    k8 = dd.reconstruction_coefficient(ab, t).view(-1, 1, 1, 1)
    recon = (noise - (out.eps - k8 * G.sum(1))).abs().mean((1, 2, 3))
    x0_hat = (x_t - (1 - a).sqrt() * out.eps) / a.sqrt()
    torch.testing.assert_close(x0_hat, dd.predicted_x0(x_t, out.eps, a))
    eps_c = out.eps - (1 - a).sqrt() * G[torch.arange(4), c]
    x0_c = (x_t - (1 - a).sqrt() * eps_c) / a.sqrt()
    zu, zc = model.encode(x0_hat), model.encode(x0_c)
    l_in = F.cross_entropy((zu - zc).norm(dim=-1), c, reduction="none")
    l_va = F.cross_entropy((zu - z).norm(dim=-1) - (zc - z).norm(dim=-1), c, reduction="none")
    gamma = 0.05 * (x0_hat - x0_c).pow(2).mean((1, 2, 3))
    total = recon.mean() + (gamma * (l_in + l_va)).mean()
    torch.testing.assert_close(terms.recon, recon.mean(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(terms.total, total, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(terms.invariant, l_in.mean(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(terms.variant, l_va.mean(), rtol=1e-5, atol=1e-6)


def test_disentangling_loss_detach(setup):
    """The detach of the paper's ablation: the encoder that reads the predictions gets no gradient.
    The disentangling loss reaches E only through the codes that condition G (as in the reference),
    and not at all with detach_codes; L_r reaches E."""
    frozen, latents, model = setup
    ab, _ = schedule()
    x0, t, noise, c = latents[:4], torch.tensor([100, 300, 500, 700]), torch.randn(4, C, H, H), torch.tensor([0, 1, 2, 0])
    enc, dec = list(model.encoder.parameters()), list(model.decoder.parameters())
    terms = dd.disdiff_losses(model, frozen, x0, t, noise, c, ab, dis_weight=10.0)
    dis = terms.total - terms.recon
    g_enc = torch.autograd.grad(dis, enc, retain_graph=True)
    g_dec = torch.autograd.grad(dis, dec, retain_graph=True, allow_unused=True)
    g_z = torch.autograd.grad(dis, terms.codes, retain_graph=True)[0]
    via_codes = torch.autograd.grad(terms.codes, enc, grad_outputs=g_z, retain_graph=True)
    assert any(g.abs().max() > 0 for g in g_enc)
    for a, b in zip(g_enc, via_codes):  # all of E's gradient comes through the codes
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    assert any(g is not None and g.abs().max() > 0 for g in g_dec)
    assert any(g.abs().max() > 0 for g in torch.autograd.grad(terms.recon, enc))

    cut = dd.disdiff_losses(model, frozen, x0, t, noise, c, ab, dis_weight=10.0, detach_codes=True)
    torch.testing.assert_close(cut.total, terms.total, rtol=1e-5, atol=1e-6)
    grads = torch.autograd.grad(cut.total - cut.recon, enc + dec, allow_unused=True)
    assert all(g is None or g.abs().max() == 0 for g in grads[:len(enc)])
    assert any(g is not None and g.abs().max() > 0 for g in grads[len(enc):])


def test_partial_condition_sigma_form_equals_eq6():
    g = torch.Generator().manual_seed(4)
    B = 3
    x0, eps = torch.randn(B, C, H, H, generator=g), torch.randn(B, C, H, H, generator=g)
    G = torch.randn(B, 2, C, H, H, generator=g)
    sigma = torch.tensor([0.3, 2.0, 14.0])
    w = [1.0, 0.5]
    ab = (1 / (1 + sigma ** 2)).view(-1, 1, 1, 1)
    x_sigma = x0 + sigma.view(-1, 1, 1, 1) * eps
    eps_psi = dd.partial_condition_eps(eps, G, ab, w)
    torch.testing.assert_close(eps_psi, eps - (1 - ab).sqrt() * (G[:, 0] + 0.5 * G[:, 1]))
    den = dd.partial_condition_denoised(x0, sigma, G, w)
    torch.testing.assert_close(den, x_sigma - sigma.view(-1, 1, 1, 1) * eps_psi, rtol=1e-5, atol=1e-5)
    # the empty subset changes nothing
    assert torch.equal(dd.partial_condition_denoised(x0, sigma, G[:, :0], []), x0)


def one_step_error(frozen, model, x0, ab, factors):
    """Mean ‖x̂0 − x0‖² of eq. 7 over fixed (t, ε), with the factors in `factors` imposed (eq. 6)."""
    g = torch.Generator().manual_seed(7)
    t = torch.tensor([100, 250, 400, 550, 700, 850] * 2)
    noise = torch.randn(len(t), *x0.shape[1:], generator=g)
    a = ab[t].view(-1, 1, 1, 1)
    x0b = x0.expand(len(t), -1, -1, -1)
    x_t = a.sqrt() * x0b + (1 - a).sqrt() * noise
    with torch.no_grad():
        out = frozen(x_t, t)
        eps = out.eps
        if factors:
            z = model.encode(x0b)
            eps = dd.partial_condition_eps(eps, model.gradients(out, z, factors), a, [1.0] * len(factors))
        return float((dd.predicted_x0(x_t, eps, a) - x0b).pow(2).mean())


def test_training_on_one_image_improves_reconstruction():
    torch.manual_seed(0)
    frozen = TinyFrozen()
    ab, _ = schedule()
    x0 = torch.randn(1, C, H, H)
    config = dd.make_config(x0, frozen, num_factors=3, code_dim=8, encoder_width=16)
    model = dd.DisDiff(config)
    assert one_step_error(frozen, model, x0, ab, [0, 1, 2]) == pytest.approx(one_step_error(frozen, model, x0, ab, []))
    before = one_step_error(frozen, model, x0, ab, [])
    model, history = dd.train_disdiff(x0, frozen, ab, model=model, steps=40, batch_size=8, lr=3e-3, warmup=1,
                                      loss_type="l2", log_every=10, seed=0)
    after = one_step_error(frozen, model, x0, ab, [0, 1, 2])
    assert after < 0.7 * before, (before, after)
    assert len(history) == 4 and history[-1]["recon"] < history[0]["recon"]
    assert all(h["images_per_s"] > 0 for h in history)


def test_checkpoint_round_trip_and_resume(tmp_path):
    torch.manual_seed(0)
    frozen = TinyFrozen()
    ab, _ = schedule()
    latents = torch.randn(8, C, H, H)
    config = dd.make_config(latents, frozen, num_factors=2, code_dim=4, encoder_width=16)
    kw = dict(config=config, batch_size=2, lr=1e-3, warmup=2, seed=5, log_every=2)
    full, _ = dd.train_disdiff(latents, frozen, ab, steps=6, **kw)
    path = str(tmp_path / "dd.safetensors")
    seen = []
    dd.train_disdiff(latents, frozen, ab, steps=3, checkpoint_path=path, **kw)
    loaded = dd.load_checkpoint(path)
    assert loaded.step == 3 and loaded.optimizer_state is not None and loaded.model.config == config
    resumed, _ = dd.train_disdiff(latents, frozen, ab, steps=6, checkpoint_path=path, resume=True,
                                  callback=lambda s, n, logs: seen.append(s), **kw)
    assert seen == [4, 6]
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=k)
    # round trip: same codes and fields
    again = dd.load_checkpoint(path).model
    x = latents[:2]
    out = frozen(x, torch.tensor([10, 900]))
    torch.testing.assert_close(again.encode(x), resumed.encode(x))
    torch.testing.assert_close(again.gradients(out, again.encode(x), [0, 1]), resumed.gradients(out, resumed.encode(x), [0, 1]))
    # resume with another configuration is refused
    other = dd.make_config(latents, frozen, num_factors=2, code_dim=6, encoder_width=16)
    with pytest.raises(dd.CheckpointError, match="another configuration"):
        dd.train_disdiff(latents, frozen, ab, steps=8, checkpoint_path=path, resume=True, **{**kw, "config": other})


def test_cancel_keeps_the_last_periodic_checkpoint(tmp_path):
    frozen = TinyFrozen()
    ab, _ = schedule()
    latents = torch.randn(4, C, H, H)
    config = dd.make_config(latents, frozen, num_factors=2, code_dim=4, encoder_width=16)
    path = str(tmp_path / "c.safetensors")

    def cancel(step, steps, logs):
        if step == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        dd.train_disdiff(latents, frozen, ab, config=config, steps=10, batch_size=2, log_every=2,
                         checkpoint_path=path, checkpoint_every=2, callback=cancel)
    assert dd.load_checkpoint(path).step == 2


def test_bad_checkpoints_give_clear_errors(tmp_path):
    from safetensors.torch import load_file, save_file
    frozen = TinyFrozen()
    latents = torch.randn(2, C, H, H)
    model = dd.DisDiff(dd.make_config(latents, frozen, num_factors=2, code_dim=4, encoder_width=16))
    good = tmp_path / "good.safetensors"
    dd.save_checkpoint(str(good), model, step=1)
    data = good.read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(dd.CheckpointError, match="not a readable safetensors file"):
        dd.load_checkpoint(str(tmp_path / "trunc.safetensors"))
    save_file({"w": torch.zeros(2)}, str(tmp_path / "foreign.safetensors"), metadata={"format": "other"})
    with pytest.raises(dd.CheckpointError, match="not a DisDiff checkpoint"):
        dd.load_checkpoint(str(tmp_path / "foreign.safetensors"))
    # tensors of one config under the metadata of another
    from safetensors import safe_open
    with safe_open(str(good), "pt") as f:
        meta = dict(f.metadata())
    cfg = json.loads(meta["config"])
    cfg["code_dim"] = 7
    meta["config"] = json.dumps(cfg)
    save_file(load_file(str(good)), str(tmp_path / "mismatch.safetensors"), metadata=meta)
    with pytest.raises(dd.CheckpointError, match="do not match its config"):
        dd.load_checkpoint(str(tmp_path / "mismatch.safetensors"))
    with pytest.raises(dd.CheckpointError, match="not a readable"):
        dd.load_checkpoint(str(tmp_path / "missing.safetensors"))


def test_feature_mismatch_is_reported(setup):
    frozen, latents, model = setup
    other = TinyFrozen(emb=16)
    with pytest.raises(ValueError, match="do not match the DisDiff model"):
        dd.check_features(model.config, other(latents[:1], torch.zeros(1, dtype=torch.long)))
