"""Noise schedules of the variance-preserving diffusion over plans.

A noisy plan is z_t = alpha_t * x + sigma_t * eps with alpha^2 + sigma^2 = 1, and the whole
schedule is described by the log signal-to-noise ratio lambda = log(alpha^2 / sigma^2):

    alpha^2 = sigmoid(lambda),   sigma^2 = sigmoid(-lambda).

The cosine schedule has alpha_t = cos(pi t / 2), i.e. lambda(t) = -2 log tan(pi t / 2).
"Shifting" it by s adds s to lambda at every t (Hoogeboom et al. 2023): the sampler uses
s = 2 ln 3 (scale 3), i.e. less noise at each t than training's unshifted schedule.
The schedule is truncated to lambda in [logsnr_min, logsnr_max] by mapping t in [0, 1] onto the
matching sub-interval [t_min, t_max] of the untruncated schedule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SAMPLER_SHIFT = 2 * math.log(3.0)


def alpha_sigma(logsnr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha, sigma) for a log-SNR: alpha^2 = sigmoid(lambda), sigma^2 = sigmoid(-lambda)."""
    return torch.sigmoid(logsnr).sqrt(), torch.sigmoid(-logsnr).sqrt()


def logsnr_from_alpha2(alpha2: float | torch.Tensor) -> torch.Tensor:
    """lambda = log(alpha^2 / (1 - alpha^2))."""
    alpha2 = torch.as_tensor(alpha2, dtype=torch.float32)
    return torch.log(alpha2) - torch.log1p(-alpha2)


@dataclass(frozen=True)
class CosineSchedule:
    """Truncated, optionally shifted cosine log-SNR schedule, t in [0, 1] (0 = clean, 1 = noise)."""

    logsnr_min: float = -15.0
    logsnr_max: float = 15.0
    shift: float = 0.0

    def _t_of_logsnr(self, logsnr: float) -> float:
        # Inverse of lambda(t) = -2 log tan(pi t / 2) + shift.
        return 2.0 / math.pi * math.atan(math.exp(-(logsnr - self.shift) / 2.0))

    @property
    def t_min(self) -> float:
        return self._t_of_logsnr(self.logsnr_max)

    @property
    def t_max(self) -> float:
        return self._t_of_logsnr(self.logsnr_min)

    def logsnr(self, t: torch.Tensor) -> torch.Tensor:
        """lambda(t) for t in [0, 1]; monotonically decreasing from logsnr_max to logsnr_min."""
        t = torch.as_tensor(t, dtype=torch.float32)
        u = self.t_min + (self.t_max - self.t_min) * t
        return (-2.0 * torch.log(torch.tan(u * math.pi / 2.0)) + self.shift).clamp(
            self.logsnr_min, self.logsnr_max
        )

    def t(self, logsnr: torch.Tensor) -> torch.Tensor:
        """Inverse of `logsnr`: the t in [0, 1] at which the schedule reaches lambda."""
        logsnr = torch.as_tensor(logsnr, dtype=torch.float32)
        u = 2.0 / math.pi * torch.atan(torch.exp(-(logsnr - self.shift) / 2.0))
        return ((u - self.t_min) / (self.t_max - self.t_min)).clamp(0.0, 1.0)

    def density(self, logsnr: torch.Tensor) -> torch.Tensor:
        """Probability density of lambda when t ~ U[0, 1].

        dt/dlambda of the untruncated schedule is sech((lambda - shift) / 2) / (2 pi); the
        truncation rescales it by 1 / (t_max - t_min).
        """
        logsnr = torch.as_tensor(logsnr, dtype=torch.float32)
        sech = 1.0 / torch.cosh((logsnr - self.shift) / 2.0)
        return sech / (2.0 * math.pi) / (self.t_max - self.t_min)

    def sample_logsnr(self, n: int, generator: torch.Generator | None = None,
                      device: torch.device | str = "cpu") -> torch.Tensor:
        """n training noise levels: t ~ U[0, 1] -> lambda(t)."""
        t = torch.rand(n, generator=generator, device="cpu").to(device)
        return self.logsnr(t)


TRAIN_SCHEDULE = CosineSchedule()
SAMPLER_SCHEDULE = CosineSchedule(shift=SAMPLER_SHIFT)


def sigmoid_v_weight(logsnr: torch.Tensor, bias: float = 0.0) -> torch.Tensor:
    """ELBO-style sigmoid weighting (Kingma & Gao 2023) expressed for a v-prediction loss.

    On the epsilon loss the weight is w_eps = sigmoid(bias - lambda). Since
    eps - eps_hat = alpha (v - v_hat), the same objective on v has w_v = w_eps * alpha^2
    = sigmoid(bias - lambda) * sigmoid(lambda). It is normalised so its maximum over lambda
    (reached at lambda = bias / 2) is 1.
    """
    w = torch.sigmoid(bias - logsnr) * torch.sigmoid(logsnr)
    peak = torch.sigmoid(torch.tensor(bias / 2.0)) ** 2
    return w / peak
