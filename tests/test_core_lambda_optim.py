"""CPU tests of core/lambda_optim.py on a tiny context-conditioned denoiser (float64)."""
import pytest
import torch

from comfyui_disentangle.core import ddim, lambda_optim as lo
from comfyui_disentangle.tests.core_helpers import SIGMAS


class TinyContextDenoiser(torch.nn.Module):
    """D(x, σ, c) = x − σ·ε with ε from a conv net whose features are shifted by a projection of the
    mean context token: smooth, nonlinear in x and in the context."""

    def __init__(self, channels=4, ctx_dim=8, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.conv1 = torch.nn.Conv2d(channels, 8, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(8, channels, 3, padding=1)
        self.ctx = torch.nn.Linear(ctx_dim, 8)
        self.adm = torch.nn.Linear(3, 8)  # an SDXL-like per-prompt vector y
        for p in self.parameters():
            p.data = torch.randn(p.shape, generator=g) * 0.2
        self.double()

    def forward(self, x, sigma, context, y=None):
        s = sigma.view(-1, 1, 1, 1)
        shift = self.ctx(context.mean(1)) + (0 if y is None else self.adm(y))
        h = torch.tanh(self.conv1(x / (1 + s**2).sqrt()) + shift[:, :, None, None])
        return x - s * (0.5 * self.conv2(h))


def setup(steps=5, seed=0):  # 5 divides 1000: ddim_uniform gives exactly 5 steps
    g = torch.Generator().manual_seed(seed)
    net = TinyContextDenoiser()
    c0 = torch.randn(1, 5, 8, generator=g, dtype=torch.float64)
    c1 = torch.randn(1, 7, 8, generator=g, dtype=torch.float64)  # another token length
    uncond = torch.randn(1, 5, 8, generator=g, dtype=torch.float64)
    sigmas = ddim.ddim_uniform_sigmas(SIGMAS, steps).tolist()
    x_T = torch.randn(1, 4, 6, 6, generator=g, dtype=torch.float64) * sigmas[0]
    return net, c0, c1, uncond, sigmas, x_T


def five_point_derivative(f, x: torch.Tensor, h: float) -> torch.Tensor:
    """∂f/∂x_i for every i by the fourth-order central stencil (−f(x+2h) + 8f(x+h) − 8f(x−h) + f(x−2h)) / 12h:
    truncation O(h⁴·f⁽⁵⁾), rounding O(ε·|f|/h)."""
    out = []
    for i in range(x.numel()):
        e = torch.zeros_like(x)
        e[i] = h
        out.append((-f(x + 2 * e) + 8 * f(x + e) - 8 * f(x - e) + f(x - 2 * e)) / (12 * h))
    return torch.stack(out)


@pytest.mark.parametrize("use_checkpoint", [False, True])
def test_gradient_matches_finite_differences(use_checkpoint):
    """The adjoint (and plain autograd) gradient of L(λ) equals the numerical derivative to 1e-6 relative,
    per component, in float64. The loss is ~48 and the smallest gradient component ~3.6e-4, so a central
    difference with h = 1e-6 has a rounding error of ε·|L|/h ≈ 5e-9, 1.5e-5 of that component: above the
    old 1e-5 tolerance on some machines. The fourth-order stencil at h = 1e-3 has rounding ≈ 5e-12 and
    truncation ≈ h⁴ ≈ 1e-12, ~1e-8 of the smallest component: 100× inside the (tighter) tolerance."""
    net, c0, c1, uncond, sigmas, x_T = setup()
    target = torch.randn(1, 4, 6, 6, generator=torch.Generator().manual_seed(9), dtype=torch.float64)

    def loss_of(lam):
        x0 = lo.sample_mixed(net, x_T, sigmas, c0, c1, lam, uncond, cfg=3.0, use_checkpoint=use_checkpoint)
        return ((x0 - target) ** 2).mean()

    lam = torch.tensor([0.0, 0.3, 0.6, 1.0, 1.1], dtype=torch.float64, requires_grad=True)
    loss_of(lam).backward()
    with torch.no_grad():
        fd = five_point_derivative(loss_of, lam.detach(), 1e-3)
    assert lam.grad.dtype == fd.dtype == torch.float64
    assert torch.allclose(lam.grad, fd, rtol=1e-6, atol=1e-12), (lam.grad, fd)
    # the check can fail: a gradient off by 1e-5 of its smallest component is caught
    assert not torch.allclose(lam.grad + 1e-5 * lam.grad.abs().min(), fd, rtol=1e-6, atol=1e-12)


def test_checkpointed_and_plain_paths_agree():
    net, c0, c1, uncond, sigmas, x_T = setup()
    grads = []
    for use_checkpoint in (False, True):
        lam = torch.linspace(0, 1, 5, dtype=torch.float64).requires_grad_(True)
        x0 = lo.sample_mixed(net, x_T, sigmas, c0, c1, lam, uncond, cfg=2.0, use_checkpoint=use_checkpoint)
        x0.square().sum().backward()
        grads.append((x0.detach(), lam.grad))
    assert torch.equal(grads[0][0], grads[1][0])
    assert torch.allclose(grads[0][1], grads[1][1], rtol=1e-12, atol=0)


def test_lambda_zero_and_one_are_the_plain_prompts():
    net, c0, c1, uncond, sigmas, x_T = setup()
    c0_long = torch.nn.functional.pad(c0, (0, 0, 0, 2))  # ConditioningAverage: c0 zero-padded to c1's length
    with torch.no_grad():
        neutral = ddim.sample_ddim(lambda x, s: lo.guided_denoise(net, x, s, c0_long, uncond, 2.0), x_T, sigmas)
        styled = ddim.sample_ddim(lambda x, s: lo.guided_denoise(net, x, s, c1, uncond, 2.0), x_T, sigmas)
        zeros = lo.sample_mixed(net, x_T, sigmas, c0, c1, torch.zeros(5, dtype=torch.float64), uncond, 2.0)
        ones = lo.sample_mixed(net, x_T, sigmas, c0, c1, torch.ones(5, dtype=torch.float64), uncond, 2.0)
    assert torch.allclose(zeros, neutral, atol=1e-12) and torch.allclose(ones, styled, atol=1e-12)


def test_corrections_make_the_neutral_path_pass_through_the_trajectory():
    net, c0, _, uncond, sigmas, _ = setup()
    g = torch.Generator().manual_seed(4)
    image = torch.randn(1, 4, 6, 6, generator=g, dtype=torch.float64)
    with torch.no_grad():
        inv = ddim.invert_ddim(lambda x, s: lo.guided_denoise(net, x, s, c0, uncond, 3.0), image,
                               list(reversed(sigmas)))  # plain inversion: not exact at cfg 3
        corrections = lo.trajectory_corrections(net, inv.trajectory, sigmas, c0, uncond, 3.0)
        seen = []
        x0 = lo.sample_mixed(net, inv.latent, sigmas, c0, c0, torch.zeros(5, dtype=torch.float64), uncond, 3.0,
                             corrections=corrections, callback=lambda i, x: seen.append(x))
        uncorrected = lo.sample_mixed(net, inv.latent, sigmas, c0, c0, torch.zeros(5, dtype=torch.float64), uncond, 3.0)
    assert torch.allclose(x0, image, atol=1e-12)
    assert all(torch.allclose(a, b, atol=1e-12) for a, b in zip(seen, inv.trajectory[1:]))
    assert not torch.allclose(uncorrected, image, atol=1e-6)

    free = lo.trajectory_corrections(net, inv.trajectory, sigmas, c0, uncond, 3.0, rediffusion_steps=2)
    assert free[-2:] == [None, None] and all(c is not None for c in free[:-2])
    with pytest.raises(ValueError, match="rediffusion_steps"):
        lo.trajectory_corrections(net, inv.trajectory, sigmas, c0, uncond, 3.0, rediffusion_steps=6)
    with pytest.raises(ValueError, match="trajectory has 5 latents"):
        lo.trajectory_corrections(net, inv.trajectory[:-1], sigmas, c0, uncond, 3.0)


def test_directional_loss():
    a, b = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 0.0]])
    assert float(lo.directional_loss(a, b, torch.tensor([[2.0, 0.0]]))) == pytest.approx(0.0)
    assert float(lo.directional_loss(a, b, torch.tensor([[-1.0, 0.0]]))) == pytest.approx(2.0)
    assert float(lo.directional_loss(a, b, torch.tensor([[0.0, 3.0]]))) == pytest.approx(1.0)


def test_optimisation_lowers_the_loss_and_returns_the_best_lambda():
    net, c0, c1, uncond, sigmas, x_T = setup()
    with torch.no_grad():
        target = lo.sample_mixed(net, x_T, sigmas, c0, c1, torch.full((5,), 0.8, dtype=torch.float64), uncond, 2.0)

    def loss_of(lam):
        return ((lo.sample_mixed(net, x_T, sigmas, c0, c1, lam, uncond, 2.0) - target) ** 2).mean()

    best, history = lo.optimize_lambdas(loss_of, lo.paper_init(5, 2).double(), iterations=8, lr=0.1)
    assert history[-1] < history[0] / 2
    with torch.no_grad():
        assert float(loss_of(best)) == pytest.approx(min(history))
    with pytest.raises(ValueError, match="iterations must be at least 1"):
        lo.optimize_lambdas(loss_of, best, iterations=0)


def test_paper_init_and_length_check():
    assert lo.paper_init(5, 2, 1.1).tolist() == pytest.approx([0, 0, 1.1, 1.1, 1.1])
    net, c0, c1, uncond, sigmas, x_T = setup()
    with pytest.raises(ValueError, match=r"need shape \[5\] or \[5, 1\]"):
        lo.sample_mixed(net, x_T, sigmas, c0, c1, torch.zeros(3, dtype=torch.float64))


def test_per_prompt_vector_is_mixed_and_differentiable():
    """SDXL-style y: λ = 0 / 1 give the plain prompts' (context, y); gradients match finite differences."""
    net, c0, c1, uncond, sigmas, x_T = setup()
    g = torch.Generator().manual_seed(12)
    y0, y1, yu = (torch.randn(1, 3, generator=g, dtype=torch.float64) for _ in range(3))
    c0_long = torch.nn.functional.pad(c0, (0, 0, 0, 2))
    with torch.no_grad():
        plain = ddim.sample_ddim(lambda x, s: lo.guided_denoise(net, x, s, c1, uncond, 2.0, y1, yu), x_T, sigmas)
        ones = lo.sample_mixed(net, x_T, sigmas, c0, c1, torch.ones(5, dtype=torch.float64), uncond, 2.0,
                               y0=y0, y1=y1, y_uncond=yu)
        neutral = ddim.sample_ddim(lambda x, s: lo.guided_denoise(net, x, s, c0_long, uncond, 2.0, y0, yu), x_T, sigmas)
        zeros = lo.sample_mixed(net, x_T, sigmas, c0, c1, torch.zeros(5, dtype=torch.float64), uncond, 2.0,
                                y0=y0, y1=y1, y_uncond=yu)
        without_y = lo.sample_mixed(net, x_T, sigmas, c0, c1, torch.ones(5, dtype=torch.float64), uncond, 2.0)
    assert torch.allclose(ones, plain, atol=1e-12) and torch.allclose(zeros, neutral, atol=1e-12)
    assert not torch.allclose(ones, without_y)

    def loss_of(lam):
        return lo.sample_mixed(net, x_T, sigmas, c0, c1, lam, uncond, 2.0, y0=y0, y1=y1, y_uncond=yu).square().mean()

    lam = torch.tensor([0.1, 0.4, 0.6, 0.9, 1.0], dtype=torch.float64, requires_grad=True)
    loss_of(lam).backward()
    with torch.no_grad():
        fd = torch.stack([(loss_of(lam + e) - loss_of(lam - e)) / 2e-6 for e in torch.eye(5, dtype=torch.float64) * 1e-6])
    assert torch.allclose(lam.grad, fd, rtol=1e-5, atol=1e-9)


def batch_setup(items=3, seed=5):
    net, _, _, uncond, sigmas, _ = setup()
    g = torch.Generator().manual_seed(seed)
    c0 = torch.randn(items, 5, 8, generator=g, dtype=torch.float64)
    c1 = torch.randn(items, 5, 8, generator=g, dtype=torch.float64)
    y0, y1, yu = (torch.randn(items, 3, generator=g, dtype=torch.float64) for _ in range(3))
    x_T = torch.randn(items, 4, 6, 6, generator=g, dtype=torch.float64) * sigmas[0]
    targets = torch.randn(items, 4, 6, 6, generator=g, dtype=torch.float64)
    return net, c0, c1, uncond, sigmas, x_T, (y0, y1, yu), targets


def test_one_schedule_per_item_equals_separate_runs():
    """λ of shape [N, B]: item b of the batch is sampled exactly as alone with schedule λ[:, b]."""
    net, c0, c1, uncond, sigmas, x_T, (y0, y1, yu), _ = batch_setup()
    lam = torch.rand(5, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 1.2
    with torch.no_grad():
        batched = lo.sample_mixed(net, x_T, sigmas, c0, c1, lam, uncond, 2.0, y0=y0, y1=y1, y_uncond=yu[:1])
        alone = [lo.sample_mixed(net, x_T[b:b + 1], sigmas, c0[b:b + 1], c1[b:b + 1], lam[:, b], uncond, 2.0,
                                 y0=y0[b:b + 1], y1=y1[b:b + 1], y_uncond=yu[:1]) for b in range(3)]
    assert torch.allclose(batched, torch.cat(alone), atol=1e-12)
    with pytest.raises(ValueError, match=r"need shape \[5\] or \[5, 3\]"):
        lo.sample_mixed(net, x_T, sigmas, c0, c1, lam[:, :2], uncond, 2.0)


def test_per_item_optimisation_equals_separate_optimisations():
    """Summed per-item losses under Adam = each item optimised alone; the best λ is kept per item."""
    net, c0, c1, uncond, sigmas, x_T, _, targets = batch_setup()

    def loss_of(lam, idx=slice(None)):
        x0 = lo.sample_mixed(net, x_T[idx], sigmas, c0[idx], c1[idx], lam, uncond, 2.0)
        return ((x0 - targets[idx]) ** 2).flatten(1).mean(1)

    init = lo.paper_init(5, 2).double()
    best, history = lo.optimize_lambdas(loss_of, init[:, None].repeat(1, 3), iterations=4, lr=0.1)
    for b in range(3):
        alone, alone_history = lo.optimize_lambdas(lambda lam: loss_of(lam, slice(b, b + 1))[0], init, 4, 0.1)
        assert torch.allclose(best[:, b], alone, atol=1e-9)
    assert len(history) == 4
    with pytest.raises(ValueError, match="one loss per column"):
        lo.optimize_lambdas(lambda lam: loss_of(lam)[:2], init[:, None].repeat(1, 3), 1, 0.1)


def test_adjoint_runner_vjp_matches_autograd_and_graphed_runner_falls_back_on_cpu():
    """MixedStepRunner.vjp equals autograd through one step; GraphedStepRunner gives the same
    sampling and gradients through its eager fallback off CUDA, and says why."""
    net, c0, c1, uncond, sigmas, x_T = setup()
    runner = lo.MixedStepRunner(net, sigmas, c0, c1, uncond, 2.0)
    x, lam = x_T.clone().requires_grad_(True), torch.tensor(0.4, dtype=torch.float64, requires_grad=True)
    out = runner.step(x, *runner.sigma_pair(1, x), lam)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    expected = torch.autograd.grad(out, (x, lam), g)
    got = runner.vjp(1, x_T, torch.tensor(0.4, dtype=torch.float64), g)
    assert all(torch.allclose(a, b, rtol=1e-12, atol=0) for a, b in zip(got, expected))

    graphed = lo.GraphedStepRunner(net, sigmas, c0, c1, uncond, 2.0)
    lam = torch.linspace(0, 1, 5, dtype=torch.float64)
    grads = []
    for r in (runner, graphed):
        lam_ = lam.clone().requires_grad_(True)
        x0 = r.sample(x_T, lam_)
        x0.square().sum().backward()
        grads.append((x0.detach(), lam_.grad))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])
    assert graphed.fallback_reason == "tensors on cpu, not CUDA"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the GPU machine)")
def test_cuda_graphed_runner_matches_eager_steps_on_gpu():
    """On a GPU, the CUDA-graph replays give the eager steps' sampling and λ-gradient (float64)."""
    net, c0, c1, uncond, sigmas, x_T = setup()
    net, c0, c1, uncond, x_T = (t.cuda() for t in (net, c0, c1, uncond, x_T))
    results = []
    for cls in (lo.MixedStepRunner, lo.GraphedStepRunner):
        runner = cls(net, sigmas, c0, c1, uncond, 2.0)
        for _ in range(2):  # the second call replays graphs captured by the first
            lam = torch.linspace(0, 1, 5, dtype=torch.float64, device="cuda").requires_grad_(True)
            x0 = runner.sample(x_T, lam)
            x0.square().sum().backward()
        results.append((x0.detach(), lam.grad))
        assert getattr(runner, "fallback_reason", None) is None
    assert torch.allclose(results[0][0], results[1][0], rtol=1e-10, atol=1e-12)
    assert torch.allclose(results[0][1], results[1][1], rtol=1e-10, atol=1e-12)


class Stop(Exception):
    pass


def test_on_step_reports_every_forward_and_backward_step_and_stops_the_pass():
    """on_step(done, total): 1..N while sampling and N+1..2N during backward() through the adjoint pass, N
    for a pass without gradients, N − r for the trajectory corrections; an exception raised from it stops
    the pass right after that step (what Cancel needs), in the backward pass too."""
    net, c0, c1, uncond, sigmas, x_T = setup()
    n = len(sigmas) - 1
    seen = []
    lam = torch.linspace(0, 1, n, dtype=torch.float64).requires_grad_(True)
    x0 = lo.sample_mixed(net, x_T, sigmas, c0, c1, lam, uncond, 2.0, on_step=lambda d, t: seen.append((d, t)))
    assert seen == [(k, 2 * n) for k in range(1, n + 1)]
    x0.square().sum().backward()
    assert seen == [(k, 2 * n) for k in range(1, 2 * n + 1)]
    seen.clear()
    with torch.no_grad():
        lo.sample_mixed(net, x_T, sigmas, c0, c1, lam, uncond, 2.0, on_step=lambda d, t: seen.append((d, t)))
    assert seen == [(k, n) for k in range(1, n + 1)]
    seen.clear()
    path = [x_T] + [x_T * (1 - (k + 1) / (n + 1)) for k in range(n)]
    lo.trajectory_corrections(net, path, sigmas, c0, uncond, 2.0, rediffusion_steps=2, on_step=lambda d, t: seen.append((d, t)))
    assert seen == [(k, n - 2) for k in range(1, n - 1)]

    class CountingRunner(lo.MixedStepRunner):
        vjps = 0

        def vjp(self, *args):
            CountingRunner.vjps += 1
            return super().vjp(*args)

    def stop_at(k):
        def on_step(done, total):
            if done == k:
                raise Stop
        return on_step

    runner = CountingRunner(net, sigmas, c0, c1, uncond, 2.0)
    x0 = runner.sample(x_T, lam, on_step=stop_at(n + 2))
    with pytest.raises(Stop):
        x0.square().sum().backward()
    assert CountingRunner.vjps == 2  # stopped after the second backward step, not at the end of the pass
    with pytest.raises(Stop):
        runner.sample(x_T, lam, on_step=stop_at(2))


# --------------------------------------------------------------------------------------------
# The objective L(λ) = L_dir + β·L_perc and the edit that owns the step runner, on tiny callables
# --------------------------------------------------------------------------------------------

class TinyTowers:
    """Stand-ins for the host's models (float64): ``decode`` X0 [B, 4, 6, 6] → images [B, 3, 3, 3] in [0, 1]
    (2×2 mean pool, three channels, a sigmoid), ``encode_images`` a fixed projection to unit vectors,
    ``encode_texts`` a fixed unit vector per prompt, ``perceptual`` the mean squared pixel difference."""

    def __init__(self, seed=7, dim=5):
        g = torch.Generator().manual_seed(seed)
        self.projection = torch.randn(27, dim, generator=g, dtype=torch.float64)
        self.words = {}
        self.g, self.dim = g, dim

    def decode(self, x0):
        pooled = torch.nn.functional.avg_pool2d(x0, 2)[:, :3]
        return torch.sigmoid(pooled).movedim(1, -1)

    def encode_images(self, images):
        return torch.nn.functional.normalize(images.flatten(1) @ self.projection, dim=-1)

    def encode_texts(self, texts):
        for t in texts:
            self.words.setdefault(t, torch.nn.functional.normalize(
                torch.randn(self.dim, generator=self.g, dtype=torch.float64), dim=0))
        return torch.stack([self.words[t] for t in texts])

    @staticmethod
    def perceptual(images, reference):
        return (images - reference).square().flatten(1).mean(1)


def cosine_by_hand(a, b):
    return (a * b).sum(-1) / ((a * a).sum(-1).sqrt() * (b * b).sum(-1).sqrt())


def objective_by_hand(towers, x0, neutral_x0, neutral_texts, styled_texts, beta, perceptual):
    """L(λ) per item from its definition: 1 − cos(E_I(x0) − E_I(x0_ref), E_T(c1) − E_T(c0)) + β·content, with
    content = the perceptual distance or 1 − cos(E_I(x0), E_I(x0_ref)); cosines written out."""
    image, reference = towers.decode(x0), towers.decode(neutral_x0)
    e, e0 = towers.encode_images(image), towers.encode_images(reference)
    direction = towers.encode_texts(styled_texts) - towers.encode_texts(neutral_texts)
    content = towers.perceptual(image, reference) if perceptual else 1 - cosine_by_hand(e, e0)
    return 1 - cosine_by_hand(e - e0, direction) + beta * content


NEUTRAL_TEXTS, STYLED_TEXTS = ["a red cube", "a red ball", "a blue cube"], ["a yellow cube", "a red box", "a blue cone"]


@pytest.mark.parametrize("perceptual", [False, True])
def test_objective_is_the_directional_loss_plus_beta_times_the_content_term(perceptual):
    towers = TinyTowers()
    g = torch.Generator().manual_seed(21)
    neutral_x0, x0 = (torch.randn(3, 4, 6, 6, generator=g, dtype=torch.float64) for _ in range(2))
    objective = lo.LambdaObjective(towers.decode, towers.encode_images, towers.encode_texts, 0.3,
                                   towers.perceptual if perceptual else None)
    objective.set_reference(neutral_x0, NEUTRAL_TEXTS, STYLED_TEXTS)
    expected = objective_by_hand(towers, x0, neutral_x0, NEUTRAL_TEXTS, STYLED_TEXTS, 0.3, perceptual)
    per_item = objective.loss(x0, per_item=True)
    assert per_item.shape == (3,) and torch.allclose(per_item, expected, rtol=1e-12, atol=0)
    assert torch.allclose(objective.loss(x0), expected.mean(), rtol=1e-12, atol=0)
    assert torch.equal(objective.last_image, towers.decode(x0))
    # the oracle tells the terms apart: the reversed text direction, and β = 0, give other values
    reversed_direction = objective_by_hand(towers, x0, neutral_x0, STYLED_TEXTS, NEUTRAL_TEXTS, 0.3, perceptual)
    assert not torch.allclose(per_item, reversed_direction, rtol=1e-3)
    assert not torch.allclose(per_item, objective_by_hand(towers, x0, neutral_x0, NEUTRAL_TEXTS, STYLED_TEXTS, 0.0,
                                                          perceptual), rtol=1e-3)


def tiny_edit(towers, start, cfg=2.0, conds=None, **options):
    net, c0, c1, uncond, sigmas, _ = setup()
    objective = lo.LambdaObjective(towers.decode, towers.encode_images, towers.encode_texts, 0.3, towers.perceptual)
    edit = lo.LambdaEdit(objective, net, sigmas, cfg, conds or (c0, c1, uncond), (None, None, None), start, **options)
    return edit, net, sigmas


def test_edit_samples_once_configured_and_its_gradient_is_the_objectives():
    """The edit's runner samples X0(λ) as sample_mixed does from the same values; set_reference takes X0(0); L(λ)
    is the objective at X0(λ) and its adjoint λ-gradient matches finite differences of the hand-written L."""
    towers = TinyTowers()
    net, c0, c1, uncond, sigmas, x_T = setup()
    edit, _, _ = tiny_edit(towers, x_T, cuda_graphs=False)
    assert edit.sigmas == sigmas and edit.steps == 5 and torch.equal(edit.x_T, x_T) and edit.x_T is not x_T
    neutral = edit.set_reference(NEUTRAL_TEXTS[:1], STYLED_TEXTS[:1])
    with torch.no_grad():
        assert torch.equal(neutral, lo.sample_mixed(net, x_T, sigmas, c0, c1, torch.zeros(5, dtype=torch.float64),
                                                    uncond, 2.0))

    def loss_by_hand(lam):
        x0 = lo.sample_mixed(net, x_T, sigmas, c0, c1, lam, uncond, 2.0)
        return objective_by_hand(towers, x0, neutral, NEUTRAL_TEXTS[:1], STYLED_TEXTS[:1], 0.3, True).mean()

    lam = torch.tensor([0.0, 0.2, 0.7, 1.0, 1.1], dtype=torch.float64, requires_grad=True)
    loss = edit.loss(lam)
    loss.backward()
    with torch.no_grad():
        assert torch.allclose(loss, loss_by_hand(lam), rtol=1e-12, atol=0)
        fd = five_point_derivative(loss_by_hand, lam.detach(), 1e-3)
    assert torch.allclose(lam.grad, fd, rtol=1e-5, atol=1e-10), (lam.grad, fd)
    assert not torch.allclose(lam.grad, -fd, rtol=1e-5, atol=1e-10)
    # off CUDA the graphed runner falls back to the same eager steps
    graphed, _, _ = tiny_edit(towers, x_T)
    with torch.no_grad():
        assert torch.equal(graphed.sample(lam.detach()), edit.sample(lam.detach()))
    assert graphed.runner.fallback_reason == "tensors on cpu, not CUDA"


def test_edit_of_a_batch_gives_one_loss_per_item():
    towers = TinyTowers()
    net, c0, c1, uncond, sigmas, x_T, _, _ = batch_setup()
    edit, _, _ = tiny_edit(towers, x_T, conds=(c0, c1, uncond), per_item=True, cuda_graphs=False)
    neutral = edit.set_reference(NEUTRAL_TEXTS, STYLED_TEXTS)
    lam = torch.rand(5, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    with torch.no_grad():
        x0 = lo.sample_mixed(net, x_T, sigmas, c0, c1, lam, uncond, 2.0)
        expected = objective_by_hand(towers, x0, neutral, NEUTRAL_TEXTS, STYLED_TEXTS, 0.3, True)
        assert torch.allclose(edit.loss(lam), expected, rtol=1e-12, atol=0)


def test_real_image_edit_passes_through_its_trajectory():
    """A trajectory as start: X0(0) is the image itself, λ = 0 sampling lands on it through the corrections,
    the last r steps re-diffuse (no correction), and r is checked against the schedule."""
    towers = TinyTowers()
    net, c0, _, uncond, sigmas, _ = setup()
    image = torch.randn(1, 4, 6, 6, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    with torch.no_grad():
        inv = ddim.invert_ddim(lambda x, s: lo.guided_denoise(net, x, s, c0, uncond, 3.0), image, list(reversed(sigmas)))
    edit, _, _ = tiny_edit(towers, inv.trajectory, cfg=3.0, conds=(c0, c0, uncond), rediffusion_steps=0,
                           cuda_graphs=False)
    assert edit.x_T is edit.path[0] and edit.path[0] is not inv.trajectory[0]
    assert torch.equal(edit.set_reference(NEUTRAL_TEXTS[:1], STYLED_TEXTS[:1]), image)
    with torch.no_grad():
        assert torch.allclose(edit.sample(torch.zeros(5, dtype=torch.float64)), image, atol=1e-12)
    free, _, _ = tiny_edit(towers, inv.trajectory, cfg=3.0, conds=(c0, c0, uncond), rediffusion_steps=2)
    assert free.corrections[-2:] == [None, None] and all(c is not None for c in free.corrections[:-2])
    with pytest.raises(ValueError, match=r"rediffusion_steps must lie in \[0, 5\], got 6"):
        tiny_edit(towers, inv.trajectory, cfg=3.0, conds=(c0, c0, uncond), rediffusion_steps=6)
