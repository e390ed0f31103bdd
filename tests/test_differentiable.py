"""nodes/comfy_boundary.py's differentiable views: views that share the host's (inference-mode) weights, and recomputation in
backward, checked against deep copies and plain autograd; then LambdaObjective's memory options on the
toy world's real ComfyUI models (same loss, same gradient). Needs COMFYUI_PATH (the nodes package)."""
from __future__ import annotations

import copy

import pytest
import torch


@pytest.fixture(scope="module")
def diff(host):
    from comfyui_disentangle.nodes import comfy_boundary
    return comfy_boundary


class Block(torch.nn.Module):
    def __init__(self, width=6):
        super().__init__()
        self.conv = torch.nn.Conv2d(width, width, 3, padding=1)
        self.norm = torch.nn.GroupNorm(2, width)
        self.register_buffer("scale", torch.full((1, width, 1, 1), 0.5))

    def forward(self, x, options=None):
        h = torch.nn.functional.silu(self.norm(self.conv(x))) * self.scale
        if options is not None and options.get("double"):  # behaviour read from a dict the caller mutates
            h = 2 * h
        return x + h


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 6, 3, padding=1)
        self.blocks = torch.nn.ModuleList([Block(), Block()])
        self.head = torch.nn.Conv2d(6, 3, 1)

    def forward(self, x, options=None):
        h = self.stem(x)
        for b in self.blocks:
            h = b(h, options)
        return self.head(h)


def loaded_like_comfyui(seed=0) -> Net:
    """A network whose weights are inference tensors, as ComfyUI's loaders leave them."""
    torch.manual_seed(seed)
    with torch.inference_mode():
        net = Net()
        for p in net.parameters():
            p.data = p.data.clone() + 0.01  # parameters re-created under inference mode
        net.blocks[0].scale = net.blocks[0].scale.clone()
    assert all(p.is_inference() for p in net.parameters())
    return net


def input_gradient(net, x, options=None):
    x = x.clone().requires_grad_(True)
    net(x, options).square().sum().backward()
    return x.grad


def test_view_shares_the_weights_and_gives_the_deep_copys_gradient(diff):
    net = loaded_like_comfyui()
    x = torch.randn(2, 3, 8, 8)
    view = diff.differentiable_view(net)
    for (name, p), q in zip(net.named_parameters(), view.parameters()):
        assert q.data_ptr() == p.data_ptr(), f"{name} was copied"
        assert not q.is_inference() and not q.requires_grad
    assert view.blocks[0].scale.data_ptr() == net.blocks[0].scale.data_ptr()
    with torch.inference_mode(False):
        reference = copy.deepcopy(net)  # a deep copy outside inference mode: ordinary tensors
        assert torch.equal(input_gradient(view, x), input_gradient(reference, x))
    assert all(p.is_inference() for p in net.parameters()), "the host's module was changed"
    with pytest.raises(RuntimeError, match="[Ii]nference tensors"):
        with torch.inference_mode(False):
            input_gradient(net, x)  # why the view exists: the host's own weights cannot be saved for backward


def test_view_moves_only_what_is_elsewhere(diff):
    net = loaded_like_comfyui()
    view = diff.differentiable_view(net, torch.device("cpu"))  # already there: shared
    assert view.head.weight.data_ptr() == net.head.weight.data_ptr()
    with torch.inference_mode():
        half = net.head.weight.to(torch.float16)
    moved = diff.shared_tensor(half, torch.device("meta"))  # another device: a copy, an ordinary tensor
    assert moved.device.type == "meta" and not moved.is_inference()


def saved_bytes(fn) -> int:
    """Bytes of the tensors autograd saves for backward while fn runs (views of one storage counted once)."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()), out


def test_recompute_keeps_only_block_inputs_and_gives_the_same_gradient(diff):
    net = loaded_like_comfyui()
    plain, recomputed = diff.differentiable_view(net), diff.differentiable_view(net)
    assert diff.recompute_in_backward(recomputed, ["Block"]) == 2
    x = torch.randn(2, 3, 16, 16)
    with torch.inference_mode(False):
        xs = [x.clone().requires_grad_(True) for _ in range(2)]
        bytes_plain, out_plain = saved_bytes(lambda: plain(xs[0]).square().sum())
        bytes_recomputed, out_recomputed = saved_bytes(lambda: recomputed(xs[1]).square().sum())
        out_plain.backward()
        out_recomputed.backward()
    assert torch.allclose(xs[0].grad, xs[1].grad, rtol=1e-6, atol=1e-7)
    assert bytes_recomputed < 0.6 * bytes_plain, (bytes_recomputed, bytes_plain)


def test_recompute_sees_the_options_as_the_forward_saw_them(diff):
    """The host mutates transformer_options between blocks; the recomputation must use the forward's values."""
    net = loaded_like_comfyui()
    plain, recomputed = diff.differentiable_view(net), diff.differentiable_view(net)
    diff.recompute_in_backward(recomputed, ["Block"])
    x = torch.randn(1, 3, 8, 8)
    grads = []
    with torch.inference_mode(False):
        for module in (plain, recomputed):
            options = {"double": True}
            xi = x.clone().requires_grad_(True)
            loss = module(xi, options).square().sum()
            options["double"] = False  # changed after the forward, before the backward
            loss.backward()
            grads.append(xi.grad)
    assert torch.allclose(grads[0], grads[1], rtol=1e-6, atol=1e-7)


def test_recompute_skips_blocks_nested_in_a_chosen_one(diff):
    net = diff.differentiable_view(loaded_like_comfyui())
    assert diff.recompute_in_backward(net, where=lambda name, m: name == "blocks") == 1
    assert "forward" not in vars(net.blocks[0])  # inside the chosen ModuleList: left alone


@pytest.fixture(scope="module")
def toy(host):
    from comfyui_disentangle.harness import call
    pytest.importorskip("open_clip", reason="open_clip_torch is not installed")
    pytest.importorskip("lpips", reason="lpips is not installed")
    import lpips
    model, clip, vae = call("DisentangleLoadToyWorld", checkpoint="toy_world")
    loss_model = call("DisentangleLoadToyClipLoss", clip_name="toy_world_clip.safetensors")[0]
    from comfyui_disentangle.nodes.perceptual import PerceptualModel
    torch.manual_seed(0)
    perceptual = PerceptualModel(lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False).eval())
    with torch.inference_mode():
        contexts = [clip.encode_from_tokens(clip.tokenize(t)) for t in ("a red cube", "a yellow cube", "")]
    return model, vae, loss_model, perceptual, contexts


def objective_gradient(toy, **options):
    """L at a fixed X0 and dL/dX0, through the decoder, CLIP and LPIPS, with the given memory options."""
    from comfyui_disentangle.nodes import lambda_optim
    import comfy.model_management as mm
    model, vae, loss_model, perceptual, _ = toy
    with torch.inference_mode():  # as the executor runs the node: weights moved to the GPU are inference tensors
        mm.load_models_gpu([model, vae.patcher])
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(1, 4, 16, 16, generator=g)
    with torch.inference_mode(False), torch.enable_grad():
        objective = lambda_optim.LambdaObjective(model, vae, loss_model, 0.05, perceptual, **options)
        objective.set_reference(torch.randn(1, 4, 16, 16, generator=g), ["a red cube"], ["a yellow cube"])
        x = x0.to(objective.device).requires_grad_(True)
        loss = objective.loss(x)
        loss.backward()
    return float(loss.detach()), x.grad.cpu(), objective


def test_objective_memory_options_give_the_same_loss_and_gradient(toy):
    """Views instead of copies, and the decoder's and LPIPS' blocks recomputed: the same L and dL/dX0."""
    loss_copy, grad_copy, _ = objective_gradient(toy, share_weights=False, recompute_decoder=False,
                                                 recompute_loss=False)
    loss_view, grad_view, objective = objective_gradient(toy)
    assert any("forward" in vars(m) for m in objective.decoder.modules()), "the decoder's blocks are not recomputed"
    assert any("forward" in vars(m) for m in objective.perceptual.net.modules()), "LPIPS' slices are not recomputed"
    assert loss_view == pytest.approx(loss_copy, rel=1e-6)
    assert torch.allclose(grad_view, grad_copy, rtol=1e-4, atol=1e-7 * float(grad_copy.abs().max()))
    assert float(grad_copy.abs().max()) > 0


def test_recomputed_unet_blocks_give_the_same_step_vjp(toy):
    """recompute_unet: a sampler step's VJP (dΦ/dx and dΦ/dλ with cfg) equals the stored-activations one."""
    from comfyui_disentangle.core import lambda_optim as lo
    results = []
    for recompute in (False, True):
        _, _, objective = objective_gradient(toy, recompute_unet=recompute)
        wrapped = [m for m in objective.unet.modules() if "forward" in vars(m)]
        assert bool(wrapped) == recompute, "recompute_unet did not (only) wrap the UNet's blocks"
        with torch.inference_mode(False):
            c0, c1, uncond = (c.clone().to(objective.device) for c in toy[4])
            runner = lo.MixedStepRunner(objective.denoise, [14.6, 3.0, 0.0], c0, c1, uncond, 5.0)
            x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(2)).to(objective.device) * 14.6
            grad = torch.ones_like(x)
            results.append(runner.vjp(0, x, torch.tensor(0.7, device=objective.device), grad))
    (gx0, gl0), (gx1, gl1) = results
    assert torch.allclose(gx0, gx1, rtol=1e-5, atol=1e-6) and torch.allclose(gl0, gl1, rtol=1e-5, atol=1e-6)
    assert float(gl0.abs()) > 0
