"""The INVERSION_TRAJECTORY object: the latent at every step of a DDIM inversion."""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass
class InversionTrajectory:
    """Latents along a sampling schedule, most noisy first.

    ``latents[k]`` ([B, C, H, W]) is the latent that a sampler resumes from at step k of
    ``sigmas`` (``latents[0]`` = x_T, ``latents[-1]`` = the inverted image), in the host's LATENT
    convention. ``steps`` is the step count that was asked for: a scheduler may make more
    (ComfyUI's ``ddim_uniform`` makes 31 for 30), ``num_steps`` is the count actually taken.
    """

    latents: Tensor
    sigmas: Tensor
    steps: int
    scheduler: str
    cfg: float
    refine_iterations: int

    def __post_init__(self):
        if self.latents.ndim != 5 or self.latents.shape[0] != self.sigmas.numel():
            raise ValueError(
                f"trajectory needs one latent per sigma: {tuple(self.latents.shape)} latents, {self.sigmas.numel()} sigmas"
            )

    @property
    def num_steps(self) -> int:
        return self.sigmas.numel() - 1

    def check_steps(self, steps: int, scheduler: str | None = None) -> None:
        """Raise if this trajectory was made with another step count (or scheduler)."""
        if int(steps) != self.steps:
            raise ValueError(
                f"trajectory was made with {self.steps} steps but {steps} are asked for: "
                "invert again with the same steps"
            )
        if scheduler is not None and scheduler != self.scheduler:
            raise ValueError(f"trajectory was made with scheduler {self.scheduler!r}, not {scheduler!r}")

    def latent_at(self, step: int) -> Tensor:
        if not 0 <= step <= self.num_steps:
            raise ValueError(f"step must lie in [0, {self.num_steps}] for this trajectory, got {step}")
        return self.latents[step]

    def __repr__(self) -> str:
        b, c, h, w = self.latents.shape[1:]
        return f"InversionTrajectory({self.num_steps} steps, {self.scheduler}, latents {b}x{c}x{h}x{w})"
