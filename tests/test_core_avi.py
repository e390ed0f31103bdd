"""core/avi.py: Algorithm 1 of Wang et al. 2024 against a direct NumPy re-computation, identities,
training, save/load and input checks (CPU, no ComfyUI)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from comfyui_disentangle.core import avi


def numpy_svd_fixed(m):
    """NumPy thin SVD of one matrix with the documented sign convention (largest |u| entry positive)."""
    u, s, vh = np.linalg.svd(m, full_matrices=False)
    for i in range(u.shape[1]):
        if u[np.argmax(np.abs(u[:, i])), i] < 0:
            u[:, i] *= -1
            vh[i, :] *= -1
    return u, s, vh


def numpy_algorithm1(x, z, s, ds, k, rho):
    """Algorithm 1 written out per channel with NumPy, literally (column/row reversal by [::-1])."""
    y_hat, y_tilde = np.zeros_like(x), np.zeros_like(x)
    for c in range(x.shape[0]):
        ux, _, vx = numpy_svd_fixed(x[c])
        uz, _, vz = numpy_svd_fixed(z[c])
        r = ux.shape[1]
        uz_rev, vz_rev = uz[:, ::-1], vz[::-1, :]
        u_hat = np.concatenate([ux[:, :k], (1 - rho) * ux[:, k:] + rho * uz_rev[:, : r - k]], axis=1)
        v_hat = np.concatenate([vx[:k, :], (1 - rho) * vx[k:, :] + rho * vz_rev[: r - k, :]], axis=0)
        y_hat[c] = u_hat @ np.diag(s[c]) @ v_hat
        y_tilde[c] = u_hat[:, ::-1] @ np.diag(s[c] + ds[c]) @ v_hat[::-1, :]
    return y_hat, y_tilde


@pytest.mark.parametrize("shape,k", [((4, 8, 8), 4), ((4, 6, 10), 3), ((4, 10, 6), 3), ((3, 8, 8), 2), ((2, 9, 9), 5)])
@pytest.mark.parametrize("rho", [0.0, 0.3, 1.0])
def test_matches_numpy_algorithm1(shape, k, rho):
    g = torch.Generator().manual_seed(hash((shape, k)) % 1000)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    z = torch.randn(shape, generator=g, dtype=torch.float64)
    r = min(shape[-2:])
    s = torch.rand(shape[0], r, generator=g, dtype=torch.float64) * 5
    ds = torch.randn(shape[0], r, generator=g, dtype=torch.float64)
    out = avi.attribute_vector_integration(x, z, s, ds, k, rho)
    ref_hat, ref_tilde = numpy_algorithm1(x.numpy(), z.numpy(), s.numpy(), ds.numpy(), k, rho)
    np.testing.assert_allclose(out.y_hat.numpy(), ref_hat, atol=1e-10)
    np.testing.assert_allclose(out.y_tilde.numpy(), ref_tilde, atol=1e-10)
    assert not np.allclose(ref_hat, x.numpy())  # a real edit, not an identity


def test_fp16_latents_are_decomposed_in_fp32_and_batched():
    g = torch.Generator().manual_seed(1)
    x, z = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    full = avi.integrate(x, z, 4, 0.5, "z")
    half = avi.integrate(x.half(), z.half(), 4, 0.5, "z")
    assert half.dtype == torch.float16
    # fp16 inputs lose only the input rounding (relative 1e-3), not the SVD (fp16 SVD would be far worse)
    assert (half.float() - full).abs().max() < 2e-2 * full.abs().max()
    one = avi.integrate(x[1:2], z[1:2], 4, 0.5, "z")
    torch.testing.assert_close(full[1:2], one, atol=1e-5, rtol=1e-5)


def test_result_does_not_depend_on_svd_signs():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 8, 8, generator=g, dtype=torch.float64)
    u, s, vh = torch.linalg.svd(x)
    flip = torch.tensor([1.0, -1.0] * 4, dtype=torch.float64)
    x2 = (u * flip * s.unsqueeze(-2)) @ (vh * flip.unsqueeze(-1))   # the same matrix, other signs
    a, b = avi.channel_svd(x), avi.channel_svd(x2)
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("shape", [(2, 4, 16, 16), (1, 4, 12, 20), (1, 4, 20, 12)])
def test_rho_zero_with_own_singular_values_returns_x(shape):
    g = torch.Generator().manual_seed(3)
    x, z = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    r = min(shape[-2:])
    for k in (1, r // 2, r - 1):
        y = avi.integrate(x, z, k, 0.0, "x")
        torch.testing.assert_close(y, x, atol=2e-5, rtol=1e-5)
    # and ρ > 0 moves away from x, monotonically towards the ρ = 1 result's distance
    dists = [float((avi.integrate(x, z, r // 2, rho, "x") - x).norm()) for rho in (0.25, 0.5, 1.0)]
    assert 0 < dists[0] < dists[1] < dists[2]


def test_net_shapes_and_size_error():
    net = avi.AVINet(16, 12)
    assert net.rank == 12 and net.k == 6 and net.hidden == 192
    s, ds = net(torch.randn(2, 4, 16, 12))
    assert s.shape == ds.shape == (2, 4, 12)
    with pytest.raises(ValueError, match="trained for 16×12 latents"):
        net(torch.randn(1, 4, 16, 16))
    assert avi.default_hidden(64, 64) == 4096 and avi.default_hidden(128, 128) == 4096 and avi.default_hidden(16, 16) == 256


def pairs(n=1, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, size, size, generator=g)
    z = 0.7 * torch.randn(n, 4, size, size, generator=g) + 0.3 * x
    return x, z


def least_squares_optimum(x, z, k, lambdas=avi.PAPER_LAMBDAS):
    """The lowest loss any Φ can reach on one pair: S and T = S + Δs solved per channel as ridge problems."""
    ux, sx, vhx = avi.channel_svd(x.double())
    uz, sz, vhz = avi.channel_svd(z.double())
    uh, vh = avi.integrate_vectors(ux, vhx, uz, vhz, k, 1.0)
    total = 0.0
    for c in range(x.shape[1]):
        for u, v, target, s_ref, la, lb in ((uh[0, c], vh[0, c], z[0, c], sz[0, c], lambdas[0], lambdas[2]),
                                            (uh[0, c].flip(-1), vh[0, c].flip(-2), x[0, c], sx[0, c], lambdas[1], lambdas[3])):
            a = torch.stack([torch.outer(u[:, i], v[i]).flatten() for i in range(u.shape[1])], 1)
            t = target.double().flatten()
            s = torch.linalg.solve(la * a.T @ a + lb * torch.eye(a.shape[1], dtype=a.dtype), la * a.T @ t + lb * s_ref)
            total += float(la * ((a @ s - t) ** 2).sum() + lb * ((s - s_ref) ** 2).sum())
    return total / x.shape[1]


def test_training_lowers_the_loss_to_the_least_squares_optimum():
    """One pair, the paper's setting (N = 5000, batch 256, 5 epochs = 100 Adam steps) at 8×8."""
    x, z = pairs(n=1)
    calls = []
    net, losses = avi.train_avi(x, z, epochs=5, batch_size=256, seed=0,
                                callback=lambda step, loss: calls.append((step, loss)))
    assert len(losses) == 5 * 20 == len(calls) and calls[-1][0] == len(losses) - 1
    best = least_squares_optimum(x, z, net.k)
    print(f"\nloss {losses[0]:.1f} → {losses[-1]:.1f}; least-squares optimum {best:.1f}")
    assert losses[-1] < 0.5 * losses[0]
    assert best <= losses[-1] < 1.05 * best
    with torch.no_grad():   # the returned Φ is the trained one
        s, ds = net(x)
        total, _ = avi.avi_loss(avi.attribute_vector_integration(x, z, s, ds, net.k, 1.0), x, z)
    assert best <= float(total) < 1.05 * best


def test_training_on_many_pairs_and_default_samples():
    assert avi.samples_per_pair_for(1) == 5000 and avi.samples_per_pair_for(2) == 2500
    assert avi.samples_per_pair_for(10) == 500 and avi.samples_per_pair_for(50) == 500
    x, z = pairs(n=6, size=8, seed=1)
    net, losses = avi.train_avi(x, z, samples_per_pair=64, epochs=4, batch_size=32, seed=1)
    assert len(losses) == 4 * 6 * 64 // 32
    assert np.mean(losses[-4:]) < 0.5 * np.mean(losses[:4])


def test_cancel_from_the_callback():
    x, z = pairs()

    def cb(step, loss):
        if step == 2:
            raise InterruptedError("cancel")

    with pytest.raises(InterruptedError):
        avi.train_avi(x, z, samples_per_pair=256, epochs=2, batch_size=32, callback=cb)


def test_save_load_round_trip(tmp_path):
    x, z = pairs(size=10)
    net, _ = avi.train_avi(x, z, k=3, hidden=40, samples_per_pair=64, epochs=1, batch_size=32)
    path = str(tmp_path / "phi.safetensors")
    avi.save_avi_net(net, path, {"prompts": "a → b"})
    loaded, info = avi.load_avi_net(path)
    assert loaded.config() == net.config() == {"height": 10, "width": 10, "k": 3, "hidden": 40, "rank": 10}
    assert info == {"prompts": "a → b"}
    for a, b in zip(net.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(a, b)
    torch.testing.assert_close(avi.integrate_with_net(loaded, x, z, 0.5), avi.integrate_with_net(net, x, z, 0.5))
    bad = str(tmp_path / "other.safetensors")
    import safetensors.torch
    safetensors.torch.save_file({"w": torch.zeros(2)}, bad)
    with pytest.raises(ValueError, match="not an AVI model"):
        avi.load_avi_net(bad)


def test_bad_inputs_give_clear_errors():
    x, z = pairs()
    with pytest.raises(ValueError, match="same shape"):
        avi.integrate(x, z[..., :6], 4, 0.5)
    with pytest.raises(ValueError, match="k must be between 1 and r − 1 = 7"):
        avi.integrate(x, z, 8, 0.5)
    with pytest.raises(ValueError, match="k must be between"):
        avi.integrate(x, z, 0, 0.5)
    for rho in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"must lie in \[0, 1\]"):
            avi.integrate(x, z, 4, rho)
    for bad in (float("nan"), float("inf")):
        x2 = x.clone()
        x2[0, 1, 2, 3] = bad
        with pytest.raises(ValueError, match="x contains NaN or infinite"):
            avi.integrate(x2, z, 4, 0.5)
        with pytest.raises(ValueError, match="z contains NaN or infinite"):
            avi.train_avi(x, x2, samples_per_pair=8, epochs=1)
    with pytest.raises(ValueError, match="do not fit"):
        avi.integrate(x, z, 4, 0.5, torch.ones(1, 4, 5))
    with pytest.raises(ValueError, match="trained for 8×8"):
        avi.integrate_with_net(avi.AVINet(8, 8), torch.randn(1, 4, 8, 12), torch.randn(1, 4, 8, 12), 0.5)


def test_weighted_distinct_batch_equals_the_batch_with_repeats():
    """train_avi runs Φ once per distinct pair of a batch, weighted by its count: same loss, same gradient."""
    x, z = pairs(n=3, seed=4)
    net = avi.AVINet(8, 8, hidden=16)
    idx = torch.tensor([0, 2, 2, 1, 2, 0, 2])
    uniq, counts = torch.unique(idx, return_counts=True)

    def loss_and_grad(ids, w):
        net.zero_grad()
        s, ds = net(x[ids])
        loss, _ = avi.avi_loss(avi.attribute_vector_integration(x[ids], z[ids], s, ds, 4, 1.0), x[ids], z[ids], weights=w)
        loss.backward()
        return float(loss.detach()), [p.grad.clone() for p in net.parameters()]

    full, g_full = loss_and_grad(idx, None)
    dedup, g_dedup = loss_and_grad(uniq, counts.float() / counts.sum())
    assert abs(full - dedup) < 1e-4 * full
    for a, b in zip(g_full, g_dedup):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


# --------------------------------------------------------------------------------------------
# Issue 14: the premise measurements and the new integrations, against NumPy / SciPy
# --------------------------------------------------------------------------------------------

def random_orthonormal(rng, n, p):
    return np.linalg.qr(rng.standard_normal((n, p)))[0]


@pytest.mark.parametrize("n,p,q", [(16, 4, 4), (10, 3, 5), (8, 2, 2)])
def test_principal_angles_and_grassmann_distance_match_scipy(n, p, q):
    import scipy.linalg
    rng = np.random.default_rng(n * 10 + p)
    a, b = random_orthonormal(rng, n, p), random_orthonormal(rng, n, q)
    theta = np.sort(scipy.linalg.subspace_angles(a, b))
    got = avi.principal_angles(torch.from_numpy(a), torch.from_numpy(b)).numpy()
    np.testing.assert_allclose(got, theta, atol=1e-7)
    d = float(avi.grassmann_distance(torch.from_numpy(a), torch.from_numpy(b)))
    assert d == pytest.approx(float(np.sqrt((theta ** 2).sum())), abs=1e-7)
    # the same subspace in another basis is at distance 0; orthogonal subspaces at sqrt(p)·π/2
    rot = random_orthonormal(rng, p, p)
    assert float(avi.grassmann_distance(torch.from_numpy(a), torch.from_numpy(a @ rot))) < 1e-6
    e = np.eye(n)
    assert float(avi.grassmann_distance(torch.from_numpy(e[:, :2]), torch.from_numpy(e[:, 2:4]))) == pytest.approx(
        np.sqrt(2) * np.pi / 2, abs=1e-7)


def test_spectrum_coefficients_and_component_alignment_match_numpy():
    rng = np.random.default_rng(3)
    m, d = rng.standard_normal((2, 3, 7, 9)), rng.standard_normal((2, 3, 7, 9))
    m2 = rng.standard_normal((2, 3, 7, 9))
    u, s, vh = avi.channel_svd(torch.from_numpy(m))
    u2, _, vh2 = avi.channel_svd(torch.from_numpy(m2))
    c = avi.spectrum_coefficients(torch.from_numpy(d), u, vh).numpy()
    al = avi.component_alignment(u, vh, u2, vh2).numpy()
    un, vn, un2, vn2 = u.numpy(), vh.numpy(), u2.numpy(), vh2.numpy()
    for i in range(2):
        for ch in range(3):
            np.testing.assert_allclose(c[i, ch], np.diag(un[i, ch].T @ d[i, ch] @ vn[i, ch].T), atol=1e-10)
            for a in range(7):
                for b_ in range(7):
                    ref = np.sum(np.outer(un[i, ch][:, a], vn[i, ch][a]) * np.outer(un2[i, ch][:, b_], vn2[i, ch][b_]))
                    assert al[i, ch, a, b_] == pytest.approx(ref, abs=1e-10)
    # a matrix's coefficients on its own SVD are its singular values
    np.testing.assert_allclose(avi.spectrum_coefficients(torch.from_numpy(m), u, vh).numpy(), s.numpy(), atol=1e-10)


def numpy_strongest(x, z, s, k, rho):
    y = np.zeros_like(x)
    for c in range(x.shape[0]):
        ux, _, vx = numpy_svd_fixed(x[c])
        uz, _, vz = numpy_svd_fixed(z[c])
        u_hat = np.concatenate([(1 - rho) * ux[:, :k] + rho * uz[:, :k], ux[:, k:]], axis=1)
        v_hat = np.concatenate([(1 - rho) * vx[:k] + rho * vz[:k], vx[k:]], axis=0)
        y[c] = u_hat @ np.diag(s[c]) @ v_hat
    return y


def numpy_difference(x, z, k, rho, gain):
    y = np.zeros_like(x)
    for c in range(x.shape[0]):
        a, d, bh = np.linalg.svd(z[c] - x[c], full_matrices=False)
        y[c] = x[c] + gain * rho * (a[:, :k] * d[:k]) @ bh[:k]
    return y


@pytest.mark.parametrize("shape,k", [((4, 8, 8), 3), ((3, 6, 10), 2), ((2, 9, 7), 5)])
@pytest.mark.parametrize("rho", [0.0, 0.4, 1.0])
def test_strongest_integration_matches_numpy(shape, k, rho):
    rng = np.random.default_rng(k + 7)
    x, z = rng.standard_normal(shape), rng.standard_normal(shape)
    sz = np.stack([np.linalg.svd(z[c], compute_uv=False) for c in range(shape[0])])
    got = avi.integrate(torch.from_numpy(x), torch.from_numpy(z), k, rho, "z", integration="strongest").numpy()
    np.testing.assert_allclose(got, numpy_strongest(x, z, sz, k, rho), atol=1e-10)


@pytest.mark.parametrize("shape,k", [((4, 8, 8), 1), ((3, 6, 10), 2), ((2, 9, 7), 7)])
@pytest.mark.parametrize("rho,gain", [(0.0, 2.0), (0.5, 1.0), (1.0, 2.5)])
def test_difference_integration_matches_numpy(shape, k, rho, gain):
    rng = np.random.default_rng(k + 11)
    x, z = rng.standard_normal(shape), rng.standard_normal(shape)
    got = avi.integrate(torch.from_numpy(x), torch.from_numpy(z), k, rho, integration="difference", gain=gain).numpy()
    np.testing.assert_allclose(got, numpy_difference(x, z, k, rho, gain), atol=1e-10)
    if rho == 0.0:
        np.testing.assert_array_equal(got, x)     # ρ = 0 is the original, whatever γ


def test_difference_integration_limits():
    g = torch.Generator().manual_seed(5)
    x, z = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64), torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
    # all r directions at ρ = 1, γ = 1 is z itself; a rank-one change is recovered exactly by k = 1
    torch.testing.assert_close(avi.integrate(x, z, 8, 1.0, integration="difference"), z)
    change = torch.randn(2, 4, 8, 1, generator=g, dtype=torch.float64) @ torch.randn(2, 4, 1, 8, generator=g, dtype=torch.float64)
    torch.testing.assert_close(avi.integrate(x, x + change, 1, 1.0, integration="difference"), x + change)
    # γ extrapolates any integration along its own change: ŷ_γ − x = γ·(ŷ_1 − x)
    for mode in avi.INTEGRATIONS:
        y1 = avi.integrate(x, z, 3, 0.7, "z", integration=mode)
        y3 = avi.integrate(x, z, 3, 0.7, "z", integration=mode, gain=3.0)
        torch.testing.assert_close(y3 - x, 3.0 * (y1 - x))
    with pytest.raises(ValueError, match=r"k must be between 1 and r = min\(H, W\) = 8 for the difference"):
        avi.integrate(x, z, 9, 1.0, integration="difference")
    with pytest.raises(ValueError, match="integration must be one of"):
        avi.integrate(x, z, 2, 1.0, integration="reversed")
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="gain"):
            avi.integrate(x, z, 2, 1.0, integration="difference", gain=bad)
