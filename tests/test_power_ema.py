"""EDM2's power-function EMA (--ema_std), against the paper's closed forms (Karras et al. 2024, eqs. 123-127), written
here independently: the exponent of a relative std, the published pairs (sigma_rel 0.05 <-> gamma 16.97, 0.10 <->
6.94), and the weights the running average puts on each step's weights."""

import math

import pytest
import torch

from opendit.training.ema import EMA, MAX_EMA_STD, ema_decay_at, power_ema_exponent


def std_of(gamma: float) -> float:
    """The relative std of the profile p(t) ~ t^gamma on [0, 1] (eq. 123): mean (g+1)/(g+2), E[t^2] (g+1)/(g+3)."""
    mean, second = (gamma + 1) / (gamma + 2), (gamma + 1) / (gamma + 3)
    return math.sqrt(second - mean ** 2)


@pytest.mark.parametrize("gamma", [0.0, 0.5, 6.94, 16.97, 100.0])
def test_the_exponent_inverts_the_profile_std(gamma):
    assert power_ema_exponent(std_of(gamma)) == pytest.approx(gamma, rel=1e-9, abs=1e-9)


def test_the_published_pairs():
    assert power_ema_exponent(0.05) == pytest.approx(16.97, abs=0.01)
    assert power_ema_exponent(0.10) == pytest.approx(6.94, abs=0.01)
    assert MAX_EMA_STD == pytest.approx(std_of(0.0))  # the widest profile: the uniform average
    for bad in (0.0, -0.1, 0.3):
        with pytest.raises(ValueError):
            power_ema_exponent(bad)


def test_the_running_average_puts_the_power_profile_on_the_steps():
    """After k updates with decay (1 - 1/i)^(g+1) at update i, the average is sum_i w_i theta_i with
    w_i = (i/k)^(g+1) - ((i-1)/k)^(g+1) (the products of the decays telescope): a discretised i^g profile."""
    std, k = 0.1, 40
    gamma = power_ema_exponent(std)
    param = torch.nn.Parameter(torch.zeros(3))
    module = torch.nn.Module()
    module.w = param
    ema = EMA(module)
    g = torch.Generator().manual_seed(0)
    history = []
    for i in range(1, k + 1):
        with torch.no_grad():
            param.copy_(torch.randn(3, generator=g))
        history.append(param.detach().double().clone())
        ema.update(ema_decay_at(i, 0.9999, std))
    w = [(i / k) ** (gamma + 1) - ((i - 1) / k) ** (gamma + 1) for i in range(1, k + 1)]
    expected = sum(wi * h for wi, h in zip(w, history))
    # the EMA is kept in fp32: agreement to fp32 rounding
    torch.testing.assert_close(ema.shadow[0].double(), expected, rtol=1e-6, atol=1e-6)
    assert ema_decay_at(1, 0.9999, std) == 0.0  # the first step's weights replace the starting point
    assert ema_decay_at(7, 0.995) == 0.995  # without --ema_std: the constant


def test_the_trainer_averages_with_the_profile(tmp_path):
    """--ema_std through the training program: after step 1 the EMA is the model; after step 2 it is
    w theta_1 + (1 - w) theta_2 with w = (1/2)^(gamma+1) (the first decay is taken at step 1, not 0)."""
    from helpers import TINY, only_run_dir, run_train

    from opendit.checkpoint import list_checkpoints, load_checkpoint

    r = run_train(*TINY, "--batch_size", "16", "--max_steps", "2", "--ckpt_every", "1", "--ema_std", "0.1",
                  "--outputs", str(tmp_path))
    assert r.returncode == 0, r.stderr
    first, second = (load_checkpoint(c) for c in list_checkpoints(only_run_dir(tmp_path)))
    w = 0.5 ** (power_ema_exponent(0.1) + 1)
    for name, ema1 in first["ema"].items():
        torch.testing.assert_close(ema1, first["model"][name].float(), rtol=0, atol=0)
        expected = w * first["model"][name].double() + (1 - w) * second["model"][name].double()
        torch.testing.assert_close(second["ema"][name].double(), expected, rtol=1e-6, atol=1e-7)
