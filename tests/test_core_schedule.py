"""CPU tests of core/lambda_schedule.py and core/conditioning.py."""
import math

import pytest
import torch

from comfyui_disentangle.core import conditioning as cond
from comfyui_disentangle.core import ddim
from comfyui_disentangle.core import lambda_schedule as ls

from comfyui_disentangle.tests.core_helpers import SIGMAS, percent_to_sigma


def test_step_values_round_trip_through_ddim_uniform_steps():
    """A schedule of N per-step values, sampled with N ddim_uniform steps, gives back each value."""
    for n in (10, 25, 50):
        values = [math.sin(k) for k in range(n)]
        sched = ls.from_step_values(values)
        sig = ddim.ddim_uniform_sigmas(SIGMAS, n)[:-1]
        assert sched.values_for_sigmas(sig.tolist(), percent_to_sigma) == values


def test_step_progress_is_ddim_uniform_timesteps():
    assert ls.step_progress(50) == pytest.approx([1 - t / 999 for t in ddim.ddim_uniform_timesteps(50)])


def test_resample_to_other_step_counts_keeps_switch_in_diffusion_time():
    sched = ls.switch_at_step(50, 20)  # neutral for 20 of 50 steps: switch at t ≈ 600
    for n in (10, 25, 100):
        sig = ddim.ddim_uniform_sigmas(SIGMAS, n)[:-1]
        values = sched.values_for_sigmas(sig.tolist(), percent_to_sigma)
        ts = ddim.ddim_uniform_timesteps(n)
        assert values == [0.0 if t > 600 else 1.0 for t in ts]


def test_value_at_matches_values_for_sigmas():
    sched = ls.from_step_values([0.1 * k for k in range(12)])
    for t in range(1, 1000, 7):
        p = 1 - t / 999
        assert sched.value_at(p) == sched.values_for_sigmas([float(SIGMAS[t])], percent_to_sigma)[0]


def test_segments_merge_runs_and_tile_progress():
    sched = ls.switch_at_step(10, 4, before=0.0, after=1.1)
    segs = sched.segments()
    assert [s.value for s in segs] == [0.0, 1.1]
    assert segs[0].start == 0.0 and segs[-1].end == 1.0 and segs[0].end == segs[1].start
    p = ls.step_progress(10)
    assert segs[0].end == pytest.approx((p[3] + p[4]) / 2)


def test_constructors():
    assert ls.constant(0.7).values == (0.7,)
    ramp = ls.linear_ramp(5, 0.0, 1.0)
    assert ramp.values == pytest.approx((0.0, 0.25, 0.5, 0.75, 1.0))
    ramp = ls.linear_ramp(6, 0.0, 1.0, start_step=2, end_step=4)
    assert ramp.values == pytest.approx((0.0, 0.0, 0.0, 0.5, 1.0, 1.0))
    assert ls.parse_value_list("0, 0,1 1.5").values == (0.0, 0.0, 1.0, 1.5)


@pytest.mark.parametrize("make, match", [
    (lambda: ls.parse_value_list(" , "), "empty"),
    (lambda: ls.parse_value_list("0, x"), "could not read"),
    (lambda: ls.from_step_values([]), "empty"),
    (lambda: ls.from_step_values([0.0, float("inf")]), "finite"),
    (lambda: ls.LambdaSchedule((0.5, 0.5), (0.0, 1.0)), "strictly increasing"),
    (lambda: ls.switch_at_step(10, 11), "switch_step"),
    (lambda: ls.step_progress(0), "steps must be"),
])
def test_bad_schedules_are_rejected(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_json_and_tensor_round_trip():
    sched = ls.from_step_values([0.0, 0.3, 1.0, 1.1])
    assert ls.LambdaSchedule.from_json(sched.to_json()) == sched
    tensors, meta = sched.to_tensors()
    assert ls.LambdaSchedule.from_tensors(tensors, meta) == sched
    with pytest.raises(ValueError, match="not a λ schedule"):
        ls.LambdaSchedule.from_json('{"values": [1]}')
    with pytest.raises(ValueError, match="not valid JSON"):
        ls.LambdaSchedule.from_json("{")
    with pytest.raises(ValueError, match="not a λ schedule"):
        ls.LambdaSchedule.from_tensors(tensors, {})


def test_mix_embeddings_is_the_convex_combination_with_comfy_token_matching():
    c0 = torch.randn(1, 77, 8)
    c1 = torch.randn(1, 154, 8)
    mixed = cond.mix_embeddings(c0, c1, 0.25)
    assert mixed.shape == c1.shape
    assert torch.allclose(mixed[:, :77], 0.25 * c1[:, :77] + 0.75 * c0)
    assert torch.allclose(mixed[:, 77:], 0.25 * c1[:, 77:])  # c0 padded with zeros
    assert torch.allclose(cond.mix_embeddings(c1, c0, 0.5), 0.5 * c0 + 0.5 * c1[:, :77])  # truncated
    with pytest.raises(ValueError, match="different text encoders"):
        cond.mix_embeddings(torch.zeros(1, 77, 8), torch.zeros(1, 77, 16), 0.5)


def test_mix_pooled():
    p0, p1 = torch.randn(1, 4), torch.randn(1, 4)
    assert torch.allclose(cond.mix_pooled(p0, p1, 0.3), 0.3 * p1 + 0.7 * p0)
    assert cond.mix_pooled(None, p1, 0.3) is p1 and cond.mix_pooled(p0, None, 0.3) is p0
