"""What a Gaussian diffusion's model predicts, how its variance is set, and what it is trained on."""

from __future__ import annotations

import enum


class ModelMeanType(enum.Enum):
    EPSILON = "epsilon"  # the model predicts the noise
    START_X = "start_x"  # the model predicts x_0


class ModelVarType(enum.Enum):
    FIXED_SMALL = "fixed_small"  # posterior variance beta~_t
    FIXED_LARGE = "fixed_large"  # beta_t (beta~_1 at t=0)
    LEARNED = "learned"  # the model outputs log-variance
    LEARNED_RANGE = "learned_range"  # the model outputs v in [-1, 1]: interpolation in log space


class LossType(enum.Enum):
    MSE = "mse"  # MSE on the mean target, plus the VB term when the variance is learned
    RESCALED_MSE = "rescaled_mse"  # same, VB term scaled by T/1000
    KL = "kl"  # the variational bound
    RESCALED_KL = "rescaled_kl"  # the bound times T
