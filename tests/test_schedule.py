"""The sigma schedule helper against the stock FlowMatchEulerDiscreteScheduler (known shift pitfalls)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from sdxs.pipeline import flow_sigmas, shift_sigmas, sigma_to_timestep


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("steps", [1, 4, 40])
def test_scheduler_applies_the_shift_exactly_once(shift, steps):
    sched = FlowMatchEulerDiscreteScheduler(shift=shift)
    sched.set_timesteps(sigmas=flow_sigmas(steps))
    expected = shift_sigmas(np.linspace(1, 0, steps + 1)[:-1], shift)
    np.testing.assert_allclose(sched.sigmas[:-1].numpy(), expected, rtol=1e-5, atol=1e-6)
    assert sched.sigmas[0] == 1.0 and sched.sigmas[-1] == 0.0  # starts at pure noise, ends at the image
    torch.testing.assert_close(sched.timesteps, sigma_to_timestep(sched.sigmas[:-1]))


def test_shift_pushes_sigmas_towards_noise():
    s = np.linspace(0.05, 0.95, 10)
    assert (shift_sigmas(s, 3.0) > s).all() and np.allclose(shift_sigmas(s, 1.0), s)


def test_euler_with_the_true_velocity_recovers_x0():
    """x_s = (1 - s) x0 + s e and v = e - x0: the pipeline's Euler loop lands exactly on x0."""
    g = torch.Generator().manual_seed(0)
    x0, e = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(sigmas=flow_sigmas(5))
    x = e.clone()  # sigma 1: pure noise
    for t in sched.timesteps:
        x = sched.step(e - x0, t, x, return_dict=False)[0]
    torch.testing.assert_close(x, x0, atol=1e-5, rtol=1e-5)
