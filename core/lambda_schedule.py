"""λ schedules: the per-step weight of the styled prompt in c_t = λ_t·c1 + (1 − λ_t)·c0.

Wu et al. (2023) mix a neutral embedding c0 and a styled embedding c1 at every denoising step.
A :class:`LambdaSchedule` stores λ over the diffusion-time axis so that one schedule serves every
step count and scheduler.

Axis: *progress* p ∈ [0, 1], ComfyUI's ``start_percent``/``end_percent`` axis: p = 0 at the most
noisy timestep, p = 1 at the clean end; p = 1 − t/(T−1) for a discrete model with T timesteps.

Values are piecewise constant: knot j (position p_j, value λ_j) holds on the interval between the
midpoints to its neighbours. A schedule written for N DDIM steps puts its knots at the N DDIM
timesteps, so sampling it with the same N uniform steps gives back each value exactly, and any
other step count or scheduler reads the value of the knot nearest in diffusion time.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

NUM_TRAIN_TIMESTEPS = 1000
FORMAT_NAME = "comfyui-disentangle/lambda-schedule"
FORMAT_VERSION = 1
MAX_KNOTS = NUM_TRAIN_TIMESTEPS        # one knot per timestep of the model is the finest a schedule can be
MAX_STEP_VALUES = NUM_TRAIN_TIMESTEPS - 1
"""Most values a per-step schedule can hold: DDIM uniform spacing of N steps puts distinct knots on the
T = 1000 training timesteps only for N ≤ T − 1 (from N = T on, the two noisiest steps share t = T − 1)."""


@dataclass(frozen=True)
class Segment:
    """λ = ``value`` for progress in [``start``, ``end``] (ComfyUI range semantics)."""

    start: float
    end: float
    value: float


@dataclass(frozen=True)
class LambdaSchedule:
    progress: tuple[float, ...]
    values: tuple[float, ...]

    def __post_init__(self):
        p, v = tuple(float(x) for x in self.progress), tuple(float(x) for x in self.values)
        if len(v) == 0:
            raise ValueError("LAMBDA_SCHEDULE is empty: it needs at least one value")
        if len(v) > MAX_KNOTS:
            raise ValueError(f"LAMBDA_SCHEDULE has {len(v)} values; at most {MAX_KNOTS} (one per model timestep)")
        if len(p) != len(v):
            raise ValueError(f"LAMBDA_SCHEDULE has {len(p)} positions but {len(v)} values")
        if not all(math.isfinite(x) for x in v):
            raise ValueError(f"LAMBDA_SCHEDULE values must be finite numbers, got {list(v)}")
        if not all(math.isfinite(x) and 0.0 <= x <= 1.0 for x in p):
            raise ValueError("LAMBDA_SCHEDULE positions must lie in [0, 1]")
        if any(b <= a for a, b in zip(p, p[1:])):
            raise ValueError("LAMBDA_SCHEDULE positions must be strictly increasing")
        object.__setattr__(self, "progress", p)
        object.__setattr__(self, "values", v)

    def __len__(self) -> int:
        return len(self.values)

    # ----------------------------------------------------------------------------------------
    # Reading the schedule
    # ----------------------------------------------------------------------------------------

    def boundaries(self) -> list[float]:
        """Interval edges in progress: 0, the midpoints between knots, 1."""
        p = self.progress
        return [0.0] + [(a + b) / 2 for a, b in zip(p, p[1:])] + [1.0]

    def segments(self) -> list[Segment]:
        """Maximal runs of equal value, as closed progress intervals that share their edges."""
        edges = self.boundaries()
        out: list[Segment] = []
        for j, value in enumerate(self.values):
            if out and out[-1].value == value:
                out[-1] = Segment(out[-1].start, edges[j + 1], value)
            else:
                out.append(Segment(edges[j], edges[j + 1], value))
        return out

    def value_at(self, progress: float) -> float:
        """λ(p): the value of the interval containing p (a shared edge goes to the later knot)."""
        edges = self.boundaries()
        for j in range(len(self.values) - 1, -1, -1):
            if progress >= edges[j]:
                return self.values[j]
        return self.values[0]

    def values_for_sigmas(self, sigmas: Sequence[float], percent_to_sigma: Callable[[float], float]) -> list[float]:
        """λ at each σ at which a sampler evaluates the model, resolved as the host resolves ranges.

        ``percent_to_sigma`` is the model's own map (ComfyUI: ``model_sampling.percent_to_sigma``).
        An interval [p_a, p_b] covers σ_end ≤ σ ≤ σ_start with σ_start = percent_to_sigma(p_a),
        σ_end = percent_to_sigma(p_b); comparing σ directly (not a rounded timestep) gives the
        same answer as the host's range test, step for step.
        """
        segs = self.segments()
        starts = [percent_to_sigma(s.start) for s in segs]
        out = []
        for sigma in sigmas:
            sigma = float(sigma)
            value = segs[0].value
            for seg, sigma_start in zip(segs, starts):
                if sigma <= sigma_start:
                    value = seg.value
            out.append(value)
        return out

    # ----------------------------------------------------------------------------------------
    # Serialisation (JSON and safetensors; never pickle)
    # ----------------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        return {"format": FORMAT_NAME, "version": FORMAT_VERSION, "progress": list(self.progress), "values": list(self.values)}

    @classmethod
    def from_dict(cls, data: dict) -> "LambdaSchedule":
        if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
            raise ValueError(f"not a λ schedule file (expected format {FORMAT_NAME!r})")
        version = data.get("version", FORMAT_VERSION)
        if isinstance(version, bool) or not isinstance(version, int):
            raise ValueError(f"'version' must be a whole number, got {type(version).__name__}")
        if version > FORMAT_VERSION:
            raise ValueError(f"λ schedule file version {version} is newer than this pack supports ({FORMAT_VERSION})")
        return cls(_number_list(data, "progress"), _number_list(data, "values"))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_json(cls, text: str) -> "LambdaSchedule":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"λ schedule file is not valid JSON: {e}") from e
        except RecursionError:
            raise ValueError("λ schedule file is not valid JSON: nested too deeply") from None
        return cls.from_dict(data)

    def to_tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """Tensors and metadata for ``safetensors.torch.save_file``."""
        tensors = {
            "progress": torch.tensor(self.progress, dtype=torch.float64),
            "values": torch.tensor(self.values, dtype=torch.float64),
        }
        return tensors, {"format": FORMAT_NAME, "version": str(FORMAT_VERSION)}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None) -> "LambdaSchedule":
        if (metadata or {}).get("format") != FORMAT_NAME or not {"progress", "values"} <= set(tensors):
            raise ValueError(f"not a λ schedule file (expected format {FORMAT_NAME!r} with 'progress' and 'values')")
        for key in ("progress", "values"):
            t = tensors[key]
            if t.ndim != 1 or not t.is_floating_point() or t.numel() > MAX_KNOTS:
                raise ValueError(f"'{key}' must be a 1-D float tensor of at most {MAX_KNOTS} values, got "
                                 f"{t.dtype} {list(t.shape)}")
        return cls(tuple(tensors["progress"].double().tolist()), tuple(tensors["values"].double().tolist()))


def _number_list(data: dict, key: str) -> tuple[float, ...]:
    """``data[key]`` as numbers: a JSON list of at most MAX_KNOTS numbers (no null, no nesting, no bool)."""
    value = data.get(key)
    if not isinstance(value, list):
        raise ValueError(f"'{key}' must be a list of numbers, got {type(value).__name__}")
    if len(value) > MAX_KNOTS:
        raise ValueError(f"'{key}' has {len(value)} entries; at most {MAX_KNOTS} (one per model timestep)")
    if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in value):
        raise ValueError(f"'{key}' must hold numbers only (no null, lists or text)")
    return tuple(value)


# --------------------------------------------------------------------------------------------
# Constructors
# --------------------------------------------------------------------------------------------

def step_progress(steps: int, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> list[float]:
    """Progress of the N steps of DDIM uniform spacing, first (most noisy) step first.

    t_k = 1 + (N−1−k)·T/N and p_k = 1 − t_k/(T−1). When N divides T these are exactly the
    timesteps of ComfyUI's ``ddim_uniform`` scheduler.
    """
    if steps < 1:
        raise ValueError(f"steps must be ≥ 1, got {steps}")
    last = num_train_timesteps - 1
    return [min(max(1.0 - (1.0 + (steps - 1 - k) * num_train_timesteps / steps) / last, 0.0), 1.0) for k in range(steps)]


def from_step_values(values: Sequence[float]) -> LambdaSchedule:
    """One value per DDIM step (the paper's ~50 learnable λ)."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("LAMBDA_SCHEDULE is empty: it needs at least one value")
    if len(values) > MAX_STEP_VALUES:
        raise ValueError(f"at most {MAX_STEP_VALUES} steps (DDIM steps on the model's {NUM_TRAIN_TIMESTEPS} "
                         f"timesteps stay distinct up to {MAX_STEP_VALUES}), got {len(values)}")
    return LambdaSchedule(tuple(step_progress(len(values))), tuple(values))


def constant(value: float) -> LambdaSchedule:
    """λ_t = value at every step."""
    return LambdaSchedule((0.5,), (float(value),))


def switch_at_step(steps: int, switch_step: int, before: float = 0.0, after: float = 1.0) -> LambdaSchedule:
    """``before`` for the first ``switch_step`` of ``steps`` steps, ``after`` from then on.

    Wu et al. Sec. 3.2: the neutral prompt (λ = 0) for the first steps fixes the layout; the styled
    prompt (λ = 1) afterwards sets the attribute.
    """
    if not 0 <= switch_step <= steps:
        raise ValueError(f"switch_step must lie in [0, steps={steps}], got {switch_step}")
    return from_step_values([before] * switch_step + [after] * (steps - switch_step))


def linear_ramp(steps: int, start_value: float, end_value: float, start_step: int = 0, end_step: int | None = None) -> LambdaSchedule:
    """``start_value`` up to ``start_step``, linear to ``end_value`` at ``end_step``, constant after."""
    end_step = steps - 1 if end_step is None else end_step
    if not 0 <= start_step <= steps - 1:
        raise ValueError(f"start_step must lie in [0, steps − 1] = [0, {steps - 1}], got {start_step}")
    if not start_step <= end_step <= steps - 1:
        raise ValueError(f"end_step must lie in [start_step, steps − 1] = [{start_step}, {steps - 1}], got {end_step}")
    span = max(end_step - start_step, 1)
    values = [start_value + (end_value - start_value) * min(max((k - start_step) / span, 0.0), 1.0) for k in range(steps)]
    if end_step == start_step:
        values = [start_value if k < start_step else end_value for k in range(steps)]
    return from_step_values(values)


def parse_value_list(text: str) -> LambdaSchedule:
    """A schedule from a comma (or whitespace) separated list of per-step values."""
    tokens = [t for t in text.replace(",", " ").split() if t]
    if not tokens:
        raise ValueError("values: the list is empty; write one number per step, e.g. '0, 0, 1, 1'")
    if len(tokens) > MAX_STEP_VALUES:
        raise ValueError(f"values: at most {MAX_STEP_VALUES} values, one per step (DDIM steps on the model's "
                         f"{NUM_TRAIN_TIMESTEPS} timesteps stay distinct up to {MAX_STEP_VALUES}), got {len(tokens)}")
    try:
        values = [float(t) for t in tokens]
    except ValueError as e:
        raise ValueError(f"values: could not read a number in {text[:80]!r} ({e})") from e
    if not all(math.isfinite(v) for v in values):
        raise ValueError("values: every value must be a finite number (no nan or inf)")
    return from_step_values(values)
