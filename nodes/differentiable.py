"""Differentiable views of the host's models, and activation recomputation, for gradients through them.

ComfyUI runs nodes under inference mode and loads weights as inference tensors, which autograd
cannot save for backward. A deep copy made outside inference mode works but doubles the weights'
memory (SD1.5's UNet: 1.6 GiB, SDXL's: 4.8 GiB). :func:`differentiable_view` makes the copy share
the weights' memory instead: each weight becomes an ordinary tensor on the same storage. The
host's module is left as it is.

:func:`recompute_in_backward` trades compute for memory: chosen blocks keep only their inputs for
backward and run their forward again there (``torch.utils.checkpoint``, non-reentrant), so at most one
block's activations are alive during backward. Plain torch; the block names below are ComfyUI's.
"""
from __future__ import annotations

import copy
from typing import Callable, Iterable, Optional

import torch
from torch.utils.checkpoint import checkpoint

VAE_DECODER_BLOCKS = ("ResnetBlock", "AttnBlock", "Upsample")
"""Blocks of ComfyUI's KL-VAE decoder (comfy/ldm/modules/diffusionmodules/model.py)."""
UNET_BLOCKS = ("ResBlock", "SpatialTransformer")
"""Blocks of ComfyUI's SD1/SD2/SDXL UNet (comfy/ldm/modules/diffusionmodules/openaimodel.py)."""


def shared_tensor(t: torch.Tensor, device: Optional[torch.device] = None) -> torch.Tensor:
    """``t`` as an ordinary (non-inference) tensor on the same memory; a copy only if it must move to
    ``device`` or is a tensor subclass (quantised weights), which cannot be aliased this way."""
    with torch.inference_mode(False):
        if device is not None and t.device != torch.device(device):
            return t.detach().to(device, copy=True)
        if not t.is_inference():
            return t.detach()
        if type(t) not in (torch.Tensor, torch.nn.Parameter):
            return t.detach().clone()
        alias = torch.empty(0, dtype=t.dtype, device=t.device)
        return alias.set_(t.untyped_storage(), t.storage_offset(), t.size(), t.stride())


def _host_callables(module: torch.nn.Module) -> Iterable[object]:
    """Per-weight functions that ComfyUI attaches to modules it loads partially (LoRA patches applied at
    cast time): shared with the view rather than deep-copied with the patch tensors they hold."""
    for m in module.modules():
        yield from getattr(m, "weight_function", ()) or ()
        yield from getattr(m, "bias_function", ()) or ()


def differentiable_view(module: torch.nn.Module, device: Optional[torch.device] = None) -> torch.nn.Module:
    """A frozen copy of ``module`` in eval mode whose parameters and buffers share the original's memory
    (moved to ``device`` if given and elsewhere); autograd can save them, and nothing is duplicated."""
    with torch.inference_mode(False):
        memo: dict[int, object] = {}
        for p in module.parameters():
            memo[id(p)] = torch.nn.Parameter(shared_tensor(p, device), requires_grad=False)
        for b in module.buffers():
            memo[id(b)] = shared_tensor(b, device)
        for fn in _host_callables(module):
            memo[id(fn)] = fn
        view = copy.deepcopy(module, memo)
    view.requires_grad_(False)
    return view.eval()


def _snapshot(value):
    """Dict arguments (ComfyUI's transformer_options) as they were at forward time: the host mutates
    them between blocks, and the recomputation in backward must see what the forward saw."""
    return dict(value) if isinstance(value, dict) else value


def _recomputed_forward(module: torch.nn.Module) -> Callable:
    forward = type(module).forward

    def run(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(module, *args, **kwargs)
        args = tuple(_snapshot(a) for a in args)
        kwargs = {k: _snapshot(v) for k, v in kwargs.items()}
        return checkpoint(forward, module, *args, use_reentrant=False, preserve_rng_state=False, **kwargs)

    return run


def recompute_in_backward(module: torch.nn.Module, block_names: Iterable[str] = (),
                          where: Optional[Callable[[str, torch.nn.Module], bool]] = None) -> int:
    """Make the blocks of ``module`` whose class name is in ``block_names`` (or for which
    ``where(name, block)`` holds) keep only their inputs for backward and recompute their forward
    there. Nested matches inside a chosen block are left alone. Returns how many blocks were wrapped."""
    names = set(block_names)
    chosen: list[tuple[str, torch.nn.Module]] = []
    for name, m in module.named_modules():
        if m is module or any(name.startswith(parent + ".") for parent, _ in chosen):
            continue
        if type(m).__name__ in names or (where is not None and where(name, m)):
            chosen.append((name, m))
    for _, m in chosen:
        m.forward = _recomputed_forward(m)
    return len(chosen)
