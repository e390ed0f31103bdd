"""core/disdiff.py on CPU with a pure-torch stand-in for the frozen UNet: loss maths against direct
re-computation, gradient routing (the detach), eq. 6 in ε and σ form, training on one image,
checkpoints (round trip, resume, corrupt / foreign / mismatched files)."""
from __future__ import annotations

import json
import os
import math

import pytest
import torch
import torch.nn.functional as F

from comfyui_disentangle.core import disdiff as dd
from comfyui_disentangle.core import disdiff_train as dtrain
from comfyui_disentangle.tests.core_helpers import C, H, TinyFrozen, disdiff_schedule as schedule


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


def test_x0_reconstruction_weighting_is_the_error_on_predicted_x0():
    """recon_weighting "x0": w_t·|Δε| (mean over t of w = 1) is the L1 error of the predicted x̂0 (eq. 7)
    up to that one normalising constant; "eps" is the paper's unweighted error."""
    ab, _ = schedule()
    g = torch.Generator().manual_seed(3)
    t = torch.tensor([0, 40, 300, 700, 999])
    x0, noise, eps, gsum = (torch.randn(5, C, H, H, generator=g) for _ in range(4))
    coef = dd.reconstruction_coefficient(ab, t)
    w = dd.reconstruction_weights(ab, "l1", "x0")
    assert w.shape == ab.shape and float(w.mean()) == pytest.approx(1.0, rel=1e-5)
    assert bool((w[1:] > w[:-1]).all())                 # later steps weigh more
    torch.testing.assert_close(dd.reconstruction_weights(ab, "l1", "eps"), torch.ones_like(ab))
    weighted = dd.reconstruction_loss(noise, eps, gsum, coef, "l1", w[t])
    a = ab[t].view(-1, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
    pred_eps = eps - coef.view(-1, 1, 1, 1) * gsum
    x0_error = (dd.predicted_x0(x_t, pred_eps, a) - x0).abs().flatten(1).mean(1)
    raw = ((1 - ab.double()) / ab.double()).sqrt()
    torch.testing.assert_close(weighted.double() * raw.mean(), x0_error.double(), rtol=1e-4, atol=1e-6)
    w2 = dd.reconstruction_weights(ab, "l2", "x0")
    torch.testing.assert_close(w2 * (raw ** 2).mean().float(), (raw ** 2).float(), rtol=1e-4, atol=0)
    with pytest.raises(ValueError, match="recon_weighting"):
        dd.reconstruction_weights(ab, "l1", "v")


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
    model, history = dtrain.train_disdiff(x0, frozen, ab, model=model, steps=40, batch_size=8, lr=3e-3, warmup=1,
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
    full, _ = dtrain.train_disdiff(latents, frozen, ab, steps=6, **kw)
    path = str(tmp_path / "dd.safetensors")
    seen = []
    dtrain.train_disdiff(latents, frozen, ab, steps=3, checkpoint_path=path, **kw)
    loaded = dd.load_checkpoint(path)
    assert loaded.step == 3 and loaded.optimizer_state is not None and loaded.model.config == config
    resumed, _ = dtrain.train_disdiff(latents, frozen, ab, steps=6, checkpoint_path=path, resume=True,
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
        dtrain.train_disdiff(latents, frozen, ab, steps=8, checkpoint_path=path, resume=True, **{**kw, "config": other})


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
        dtrain.train_disdiff(latents, frozen, ab, config=config, steps=10, batch_size=2, log_every=2,
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


def test_fixed_degree_matrix_exponential_matches_torch():
    g = torch.Generator().manual_seed(0)
    for scale in (0.01, 1.0, 30.0):
        a = torch.randn(24, 24, generator=g, dtype=torch.float64) * scale
        m = a - a.t()
        e = dd.expm_skew(m)
        torch.testing.assert_close(e, torch.linalg.matrix_exp(m), rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(e @ e.t(), torch.eye(24, dtype=torch.float64), rtol=0, atol=1e-9)
    # the decoder's embeddings are exp(A − Aᵀ) of its parameter, and differentiable
    model = dd.DisDiff(dd.make_config(torch.randn(1, C, H, H), TinyFrozen(), num_factors=3, code_dim=4, encoder_width=16))
    a = model.decoder.part_latents.detach().double()
    torch.testing.assert_close(model.decoder.positional_embeddings(), torch.linalg.matrix_exp(a - a.t()).float())
    model.decoder.positional_embeddings()[0].sum().backward()
    assert model.decoder.part_latents.grad.abs().sum() > 0


def test_weighting_and_logit_options():
    g = torch.Generator().manual_seed(0)
    x0u, x0c = torch.randn(6, C, H, H, generator=g), torch.randn(6, C, H, H, generator=g)
    mse = (x0u - x0c).pow(2).flatten(1).mean(1)
    torch.testing.assert_close(dd.disentangle_weight(x0u, x0c, 0.05), 0.05 * mse)
    normalized = dd.disentangle_weight(x0u, x0c, 0.1, "normalized")
    torch.testing.assert_close(normalized.mean(), torch.tensor(0.1))
    torch.testing.assert_close(normalized / normalized[0], mse / mse[0])   # the time profile of eq. 13 stays
    torch.testing.assert_close(dd.disentangle_weight(x0u, x0c, 0.3, "constant"), torch.full((6,), 0.3))
    with pytest.raises(ValueError, match="weighting"):
        dd.disentangle_weight(x0u, x0c, 0.3, "other")
    # scale-free logits: the loss does not change when the encoder scales all codes
    zu, zc, zt = (torch.randn(6, 3, 4, generator=g) for _ in range(3))
    c = torch.tensor([0, 1, 2, 0, 1, 2])
    for k in (0.01, 100.0):
        torch.testing.assert_close(dd.invariant_loss(zu * k, zc * k, c, zt * k, "scale_free"),
                                   dd.invariant_loss(zu, zc, c, zt, "scale_free"))
        torch.testing.assert_close(dd.variant_loss(zu * k, zc * k, zt * k, c, "scale_free"),
                                   dd.variant_loss(zu, zc, zt, c, "scale_free"))
    assert not torch.allclose(dd.invariant_loss(zu * 100, zc * 100, c), dd.invariant_loss(zu, zc, c))


def test_per_step_hook_and_gradient_shares(setup):
    frozen, latents, model = setup
    ab, _ = schedule()
    ticks = []
    dtrain.train_disdiff(latents, frozen, ab, model=model, steps=5, batch_size=4, log_every=5,
                         on_step=lambda s, n: ticks.append((s, n)))
    assert ticks == [(s, 5) for s in range(1, 6)]
    shares = dtrain.gradient_shares(model, frozen, latents, ab, batch_size=8, dis_weight=1.0)
    for part in ("G", "E"):
        assert shares[f"grad_{part}_recon"] > 0 and shares[f"grad_{part}_invariant"] > 0
        assert shares[f"share_{part}"] == pytest.approx(
            (shares[f"grad_{part}_invariant"] + shares[f"grad_{part}_variant"]) / shares[f"grad_{part}_recon"])
    # with the codes cut from the disentangling loss, it no longer reaches E
    cut = dtrain.gradient_shares(model, frozen, latents, ab, batch_size=8, dis_weight=1.0, detach_codes=True)
    assert cut["grad_E_invariant"] == 0 and cut["grad_E_variant"] == 0 and cut["grad_G_invariant"] > 0
    # the gradient norms are those of the terms themselves (a direct recomputation for L_r on G)
    gen = torch.Generator().manual_seed(0)
    b = dtrain.draw_batch(gen, latents.shape[0], 8, ab.shape[0], model.config.num_factors, tuple(latents.shape[1:]), "cpu")
    terms = dd.disdiff_losses(model, frozen, latents[b.index], b.t, b.noise, b.c, ab, dis_weight=1.0)
    model.zero_grad()
    terms.recon.backward()
    direct = sum(p.grad.pow(2).sum() for p in model.decoder.parameters() if p.grad is not None) ** 0.5
    assert shares["grad_G_recon"] == pytest.approx(float(direct), rel=1e-5)


def test_batch_is_split_across_ranks():
    full = dtrain.draw_batch(torch.Generator().manual_seed(4), 50, 8, 1000, 6, (C, H, H), "cpu")
    parts = [dtrain.draw_batch(torch.Generator().manual_seed(4), 50, 8, 1000, 6, (C, H, H), "cpu", dtrain.Ranks(r, 2))
             for r in range(2)]
    for whole, *halves in zip(full, *parts):
        torch.testing.assert_close(torch.cat(halves), whole)
    with pytest.raises(ValueError, match="multiple of the number of processes"):
        import unittest.mock as um
        with um.patch.object(dtrain, "current_ranks", lambda: dtrain.Ranks(0, 3)):
            dtrain.train_disdiff(torch.randn(4, C, H, H), TinyFrozen(), schedule()[0], steps=1, batch_size=4)


def test_two_gloo_processes_stay_in_sync_with_one(tmp_path):
    """torchrun with 2 CPU processes (gloo), batch 4 = 2 + 2, trained 3 steps, then resumed to 6,
    gives the model of one process trained 6 steps on batch 4 (same data, same losses). float64, so
    that Adam's normalised update of near-zero gradients cannot turn summation-order rounding into
    a visible difference."""
    import subprocess
    import sys
    worker = os.path.join(os.path.dirname(os.path.abspath(__file__)), "disdiff_ddp_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single, ddp = str(tmp_path / "single.safetensors"), str(tmp_path / "ddp.safetensors")
    subprocess.run([sys.executable, worker, single, "6"], check=True, env=env, timeout=300)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", worker, ddp]
    subprocess.run(torchrun + ["3"], check=True, env=env, timeout=300)
    first = open(ddp + ".losses").read().split()
    subprocess.run(torchrun + ["6", "--resume"], check=True, env=env, timeout=300)
    losses_ddp = [float(v) for v in first + open(ddp + ".losses").read().split()]
    losses_single = [float(v) for v in open(single + ".losses").read().split()]
    assert len(losses_ddp) == len(losses_single) == 6
    assert losses_ddp == pytest.approx(losses_single, rel=1e-6)   # the logged sums are float32
    a, b = dd.load_checkpoint(single), dd.load_checkpoint(ddp)
    assert a.step == b.step == 6
    for (k, x), y in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-9, msg=k)
    # and a desynchronised pair would be told apart: one step fewer differs
    other = str(tmp_path / "other.safetensors")
    subprocess.run([sys.executable, worker, other, "5"], check=True, env=env, timeout=300)
    differs = [not torch.allclose(x, y, rtol=1e-6, atol=1e-9)
               for x, y in zip(a.model.state_dict().values(), dd.load_checkpoint(other).model.state_dict().values())]
    assert any(differs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the graphed step exists only there)")
def test_cuda_graphed_training_equals_eager_training():
    """The captured step (fused capturable AdamW, device-side lr) trains the same model as eager steps.
    float64, so that kernel-order rounding (cuDNN's atomics, the fused optimizer's op order) is not
    amplified by Adam's normalised update of near-zero gradients into a visible difference."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        _graphed_equals_eager()
    finally:
        torch.set_default_dtype(previous)


def _graphed_equals_eager():
    torch.manual_seed(0)
    frozen = TinyFrozen().cuda()
    ab, _ = schedule()
    latents = torch.randn(32, C, H, H, generator=torch.Generator().manual_seed(2)).cuda()
    config = dd.make_config(latents, frozen, num_factors=3, code_dim=8, encoder_width=16)
    runs = {}
    for graphed in (False, True):
        torch.manual_seed(0)
        model = dd.DisDiff(config)
        with torch.no_grad():
            for p in model.decoder.parameters():
                if p.ndim > 1 and p.abs().max() == 0:
                    p.normal_(0, 0.05)
        # lr 2^-10, warm-up 4: every scheduled rate (k·2^-12) is exact in the float32 tensor the fused
        # kernel reads (1e-3 is not: a 3e-8 relative error per update, visible at rtol 1e-7 on the weights)
        runs[graphed] = dtrain.train_disdiff(latents, frozen, ab, model=model, steps=12, batch_size=8, lr=2 ** -10,
                                             warmup=4, seed=1, log_every=4, cuda_graph=graphed)
    (eager, h_eager), (graph, h_graph) = runs[False], runs[True]
    assert all(h["cuda_graph"] for h in h_graph[1:] if "step" in h), h_graph   # replayed after the warm-up
    assert not any("note" in h for h in h_graph)
    torch.testing.assert_close([h["loss"] for h in h_graph], [h["loss"] for h in h_eager], rtol=1e-6, atol=1e-9)
    for (k, a), b in zip(eager.state_dict().items(), graph.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-10, msg=k)


def test_channels_last_layout_computes_the_same_fields(setup):
    frozen, latents, model = setup
    out = frozen(latents[:3], torch.tensor([5, 500, 990]))
    z = model.encode(latents[:3])
    want = model.gradients(out, z, [0, 1, 2])
    got = model.use_channels_last().gradients(out, z, [0, 1, 2])
    assert model.decoder.out[-1].weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    model.use_channels_last(False)
    assert model.decoder.out[-1].weight.is_contiguous()


def test_field_diagnosis_tells_one_shared_field_from_factor_fields_and_reads_the_bias():
    """core.disdiff.field_diagnosis against fields built to a known answer."""
    torch.manual_seed(0)
    frozen = TinyFrozen()
    ab, _ = schedule()
    x0 = torch.randn(8, C, H, H, generator=torch.Generator().manual_seed(5))
    noise = torch.randn(8, C, H, H, generator=torch.Generator().manual_seed(6))
    model = dd.DisDiff(dd.make_config(x0, frozen, num_factors=3, code_dim=4, encoder_width=16))
    t = 500
    # G = 0 (the zero-initialised output layer): nothing removed, no code use
    d0 = dd.field_diagnosis(model, frozen, x0, t, ab, noise)
    assert d0["error_removed"] == pytest.approx(0.0, abs=1e-6) and d0["code_use"] == 0.0
    ab_t = ab[t]
    x_t = ab_t.sqrt() * x0 + (1 - ab_t).sqrt() * noise
    tt = torch.full((8,), t, dtype=torch.long)
    residual = x0 - dd.predicted_x0(x_t, frozen(x_t, tt).eps.float(), ab_t)
    # the bias share is one constant correction's: 1 − ‖r − mean r‖ / ‖r‖, averaged per scene
    norms = residual.flatten(1).norm(dim=1)
    expected = 1 - (residual - residual.mean(0, keepdim=True)).flatten(1).norm(dim=1).mean() / norms.mean()
    assert d0["bias_removed"] == pytest.approx(float(expected), rel=1e-5)

    # every factor's field = the exact residual / N, independent of the code: perfect reconstruction,
    # one field split N ways, codes unused
    coef = (1 - ab_t).sqrt() * (1 - ab_t).sqrt() / ab_t.sqrt()          # Δx̂0 = √(1−ᾱ)·√(1−ᾱ)/√ᾱ·ΣG
    exact = residual / coef

    def shared(features, emb, codes, factor_index, positional=None):
        return exact.repeat_interleave(3, 0)[: codes.shape[0]] / 3
    model.decoder.forward = shared
    d1 = dd.field_diagnosis(model, frozen, x0, t, ab, noise)
    assert d1["error_removed"] == pytest.approx(1.0, abs=1e-4)
    assert d1["field_cosine"] == pytest.approx(1.0, abs=1e-6) and d1["code_use"] == pytest.approx(0.0, abs=1e-6)
    assert d1["field_shares"] == pytest.approx([1 / 3] * 3, rel=1e-5)

    # fields that differ per factor and follow the code: cosine below 1, codes used
    def distinct(features, emb, codes, factor_index, positional=None):
        base = torch.randn(3, C, H, H, generator=torch.Generator().manual_seed(9))[factor_index]
        return base * (1 + codes.sum(1)).view(-1, 1, 1, 1)
    model.decoder.forward = distinct
    d2 = dd.field_diagnosis(model, frozen, x0, t, ab, noise)
    assert d2["field_cosine"] < 0.5 and d2["code_use"] > 0.01


# --------------------------------------------------------------------------------------------
# encoder_input "image": E reads x0 decoded by a frozen first-stage decoder (the reference's way)
# --------------------------------------------------------------------------------------------

class TinyImageDecoder(torch.nn.Module):
    """A frozen random conv 'first-stage decoder': latent [B, C, 8, 8] → RGB [B, 3, 16, 16] in (−1, 1).
    ``record``: keep each input (with its gradient retained) to see what passes through it."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.conv = torch.nn.Conv2d(C, 12, 3, padding=1)
        for p in self.parameters():
            p.data = torch.randn(p.shape, generator=g) * 0.3
        self.requires_grad_(False)
        self.record, self.inputs = False, []

    def forward(self, x):
        if self.record:
            if x.requires_grad:
                x.retain_grad()
            self.inputs.append(x)
        return torch.tanh(F.pixel_shuffle(self.conv(x), 2))


def image_setup(side=8):
    torch.manual_seed(0)
    frozen, decoder = TinyFrozen(), TinyImageDecoder()
    latents = torch.randn(16, C, H, H)
    config = dd.make_config(latents, frozen, num_factors=3, code_dim=8, encoder_width=16,
                            encoder_input="image", image_side=side)
    model = dd.DisDiff(config, decoder)
    with torch.no_grad():  # non-zero zero-initialised layers, so that every path carries gradient
        for p in model.decoder.parameters():
            if p.ndim > 1 and p.abs().max() == 0:
                p.normal_(0, 0.05)
    return frozen, decoder, latents, model


def test_image_encoder_reads_the_decoded_image_and_G_learns_through_the_decoder():
    frozen, decoder, latents, model = image_setup()
    ab, _ = schedule()
    assert model.encoder.body[0].weight.shape == (16, 3, 3, 3)          # a conv encoder for RGB images
    assert not any(p is q for p in model.parameters() for q in decoder.parameters())   # not trained, not saved
    x = latents[:4]
    want = model.encoder(F.interpolate(decoder(x), size=(8, 8), mode="area"))
    torch.testing.assert_close(model.encode(x), want, rtol=0, atol=0)
    t, noise, c = torch.tensor([100, 300, 500, 700]), torch.randn(4, C, H, H), torch.tensor([0, 1, 2, 0])
    dec = list(model.decoder.parameters())
    decoder.record = True
    terms = dd.disdiff_losses(model, frozen, x, t, noise, c, ab, dis_weight=10.0)
    decoder.record = False
    assert len(decoder.inputs) == 3                                     # x0, x̂0, x̂0^c all decoded
    x0_hat_c = [v for v in decoder.inputs if v.requires_grad]
    assert len(x0_hat_c) == 1                                           # only x̂0^c carries G's gradient
    (terms.total - terms.recon).backward()
    assert x0_hat_c[0].grad.abs().max() > 0                             # the gradient went through the decoder
    assert any(p.grad is not None and p.grad.abs().max() > 0 for p in dec)
    assert all(p.grad is None for p in decoder.parameters())
    # with the codes cut, the decoder is G's only way into the disentangling loss
    model.zero_grad()
    cut = dd.disdiff_losses(model, frozen, x, t, noise, c, ab, dis_weight=10.0, detach_codes=True)
    grads = torch.autograd.grad(cut.total - cut.recon, dec, allow_unused=True, retain_graph=True)
    assert any(g is not None and g.abs().max() > 0 for g in grads)
    assert any(g.abs().max() > 0 for g in torch.autograd.grad(cut.recon, list(model.encoder.parameters())))


def test_image_encoder_trains_and_the_decoder_stays_frozen():
    frozen, decoder, latents, model = image_setup()
    ab, _ = schedule()
    frozen_weights = {k: v.clone() for k, v in decoder.state_dict().items()}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trained, history = dtrain.train_disdiff(latents, frozen, ab, model=model, image_decoder=decoder, steps=4,
                                            batch_size=4, lr=1e-2, warmup=1, log_every=2, dis_weight=1.0)
    assert trained.image_decoder is decoder
    for k, v in decoder.state_dict().items():
        assert torch.equal(v, frozen_weights[k]), k
    changed = {k.split(".")[0] for k, v in trained.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {"encoder", "decoder"}
    assert all(math.isfinite(h["loss"]) for h in history if "loss" in h)
    with pytest.raises(ValueError, match="image_decoder"):
        dtrain.train_disdiff(latents, frozen, ab, config=model.config, steps=1, batch_size=4)
    with pytest.raises(ValueError, match="frozen"):
        dd.DisDiff(model.config, TinyImageDecoder().requires_grad_(True))


def test_image_encoder_checkpoint_records_the_option_and_needs_the_decoder(tmp_path):
    from safetensors import safe_open
    frozen, decoder, latents, model = image_setup(side=4)
    path = str(tmp_path / "img.safetensors")
    dd.save_checkpoint(path, model, step=2)
    with safe_open(path, "pt") as f:
        stored = json.loads(f.metadata()["config"])
        keys = list(f.keys())
    assert stored["encoder_input"] == "image" and stored["image_side"] == 4
    assert sorted(k for k in keys if k.startswith("model.")) == sorted(f"model.{k}" for k in model.state_dict())
    assert not any("image_decoder" in k for k in keys)                 # the decoder's weights are not in the file
    loaded = dd.load_checkpoint(path, image_decoder=decoder)
    assert loaded.model.config == model.config and loaded.model.image_decoder is decoder
    torch.testing.assert_close(loaded.model.encode(latents[:3]), model.encode(latents[:3]), rtol=0, atol=0)
    with pytest.raises(ValueError, match="encoder_input 'image'.*image_decoder"):
        dd.load_checkpoint(path)
    bare = dd.load_checkpoint(path, require_decoder=False).model      # G alone; E needs a decoder
    assert bare.image_decoder is None
    with pytest.raises(ValueError, match="encoder_input 'image'"):
        bare.encode(latents[:1])
    torch.testing.assert_close(bare.encode(latents[:1], decoder), model.encode(latents[:1]), rtol=0, atol=0)
    with pytest.raises(dd.CheckpointError, match="encoder_input 'image'"):   # resuming without it
        dtrain.train_disdiff(latents, frozen, schedule()[0], steps=3, batch_size=4, checkpoint_path=path, resume=True)


def test_latent_input_default_is_unchanged(setup):
    """Configs without the new fields (every checkpoint written before) are the latent default; a latent
    config's JSON is the one before the option; the latent path computes bit for bit what E(x0) did."""
    frozen, latents, model = setup
    cfg = model.config
    data = json.loads(cfg.to_json())
    assert "encoder_input" not in data and "image_side" not in data
    explicit = dd.DisDiffConfig(**{**data, "encoder_input": "latent"})
    assert explicit == cfg and explicit.to_json() == cfg.to_json() and cfg.encoder_input == "latent"
    assert model.encoder.body[0].weight.shape == (32, C, 3, 3)
    x = latents[:4]
    assert model.encoder_view(x) is x and torch.equal(model.encode(x), model.encoder(x))
    ab, _ = schedule()
    args = (frozen, x, torch.tensor([100, 300, 500, 700]), torch.randn(4, C, H, H), torch.tensor([0, 1, 2, 0]), ab)
    torch.manual_seed(0)
    twin = dd.DisDiff(explicit)
    twin.load_state_dict(model.state_dict())
    a, b = dd.disdiff_losses(model, *args, dis_weight=1.0), dd.disdiff_losses(twin, *args, dis_weight=1.0)
    assert all(torch.equal(u, v) for u, v in zip(a[:6], b[:6]))
    shipped = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "weights",
                           "toy_world_disdiff.safetensors")
    if os.path.exists(shipped):   # a checkpoint written before the option loads as a latent model
        assert dd.load_checkpoint(shipped).model.config.encoder_input == "latent"
