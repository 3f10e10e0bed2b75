"""DPM-Solver++(2M) over a plain v-prediction denoiser (Lu et al. 2022, "DPM-Solver++").

Conventions (those of `starctl.schedule`): a noisy plan is z = alpha x + sigma eps with
alpha^2 + sigma^2 = 1, and a noise level is named by its log-SNR

    logsnr = log(alpha^2 / sigma^2),   alpha^2 = sigmoid(logsnr),   sigma^2 = sigmoid(-logsnr).

DPM-Solver's time variable is the *half* log-SNR, lambda = log(alpha / sigma) = logsnr / 2; every
step size h below is a difference of lambdas, never of logsnrs.

The denoiser predicts v = alpha eps - sigma x, from which

    x0  = alpha z - sigma v        (data prediction)
    eps = sigma z + alpha v        (noise prediction).

In lambda, the probability-flow ODE of a data-prediction model x0(z, lambda) has the exact solution
from lambda_s to lambda_t (h = lambda_t - lambda_s):

    z_t = (sigma_t / sigma_s) z_s + sigma_t * integral_{lambda_s}^{lambda_t} e^lambda x0 dlambda,

x0 = x0(z_lambda, lambda) being evaluated along the trajectory.

DPM-Solver++(2M) approximates x0 along a step by a line in lambda through the current and the
previous evaluation (a multistep method: one denoiser call per step), or by a constant on the first
and last steps. No state survives between calls (the only thing written is the caller's optional
`SamplerTrace`), so concurrent calls, e.g. from threads, are safe.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from starctl.errors import StarctlError
from starctl.schedule import SAMPLER_SCHEDULE, CosineSchedule, alpha_sigma

ADAPTIVE_MIN_LOGSNR = 0.0
"""Adaptive thinking never stops before this log-SNR (alpha^2 = 1/2 at 0); see sample_dpmpp_2m."""

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""denoiser(z_t (B, D), logsnr (B,)) -> v-prediction (B, D)."""

Guidance = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""guidance(z_t (B, D), logsnr (B,), eps_hat (B, D)) -> modified eps (B, D).

Called with gradients disabled (the sampler runs under torch.no_grad()); a guidance function that
differentiates a head must do so inside `with torch.enable_grad():` on a detached clone of z_t.
"""

SPACINGS = ("logsnr", "time")


def timesteps(steps: int, schedule: CosineSchedule = SAMPLER_SCHEDULE,
              spacing: str = "logsnr") -> torch.Tensor:
    """The steps+1 log-SNR values visited, from the noisiest (t=1) to the cleanest.

    The first `steps` values are where the denoiser is evaluated: 'logsnr' spaces them uniformly in
    log-SNR from schedule.logsnr(1) to schedule.logsnr(0), 'time' uniformly in t from 1 to 0. The
    last value is +inf (sigma = 0): the final step returns the data prediction of the last
    evaluation. Returns a float64 tensor of shape (steps + 1,).
    """
    if steps < 1:
        raise StarctlError(f"steps must be >= 1, got {steps}")
    if spacing == "logsnr":
        lo = float(schedule.logsnr(torch.tensor(1.0)))
        hi = float(schedule.logsnr(torch.tensor(0.0)))
        visited = torch.linspace(lo, hi, steps, dtype=torch.float64)                  # (steps,)
    elif spacing == "time":
        t = torch.linspace(1.0, 0.0, steps, dtype=torch.float64)                      # (steps,)
        visited = schedule.logsnr(t).to(torch.float64)                                # (steps,)
    else:
        raise StarctlError(f"unknown spacing {spacing!r}; valid values: {', '.join(SPACINGS)}")
    inf = torch.tensor([math.inf], dtype=torch.float64)
    return torch.cat([visited, inf])                                                  # (steps+1,)


@dataclass
class SamplerTrace:
    """Per-call diagnostics, filled by `sample_dpmpp_2m` only when one is passed in."""

    steps_used: int = 0
    # RMS (over the whole batch) change of the predicted clean plan x0 between consecutive
    # denoiser evaluations; steps_used - 1 entries.
    x0_deltas: list[float] = field(default_factory=list)
    # The adaptive rule's measure (see `tolerance`): the largest over the batch of the per-sample
    # relative change of x0 per unit log-SNR; steps_used - 1 entries.
    rel_rates: list[float] = field(default_factory=list)


def _check_logsnrs(logsnrs: torch.Tensor) -> None:
    if logsnrs.ndim != 1 or logsnrs.numel() < 2:
        raise StarctlError(f"logsnrs must be a 1-D sequence of at least 2 values, got shape "
                           f"{tuple(logsnrs.shape)}")
    last = logsnrs[-1]
    if not torch.isfinite(logsnrs[:-1]).all() or torch.isnan(last) or last == -math.inf:
        raise StarctlError("logsnrs must be finite, except the last value, which may be +inf")
    if not (logsnrs[1:] > logsnrs[:-1]).all():
        raise StarctlError("logsnrs must be strictly increasing (noisiest first)")


def sample_dpmpp_2m(denoiser: Denoiser, noise: torch.Tensor, steps: int = 20,
                    schedule: CosineSchedule = SAMPLER_SCHEDULE, spacing: str = "logsnr",
                    guidance: Sequence[Guidance] = (), tolerance: float | None = None,
                    trace: SamplerTrace | None = None, *,
                    logsnrs: torch.Tensor | None = None) -> torch.Tensor:
    """Integrate the probability-flow ODE from `noise` to a clean plan with DPM-Solver++(2M).

    noise: (B, D), the initial z at the noisiest level, used as is (no rescaling by alpha, which
        is tiny there but not zero: the solver starts exactly from z at lambda_0).
    steps: number of denoiser evaluations, at `timesteps(steps, schedule, spacing)`.
    guidance: applied in order to the noise prediction at every evaluation, each receiving the
        previous one's output; x0 is then re-derived from the guided eps.
    tolerance: adaptive thinking (None = always run every step). After each evaluation k >= 2 the
        sampler measures, PER SAMPLE, the relative rate of change of the predicted clean plan per
        unit of log-SNR,
            rate_k = |x0_k - x0_{k-1}| / (|x0_k| (logsnr_k - logsnr_{k-1}))       (norms over D),
        and stops once, for EVERY sample of the batch: (1) its rate has passed its peak (it is
        below the largest rate that sample has shown so far), (2) logsnr_k >= ADAPTIVE_MIN_LOGSNR
        (0: alpha^2 >= 1/2) and (3) rate_k < tolerance. It then returns the latest x0, i.e. jumps
        straight to sigma = 0 as the final step would.
        Why this rule: at the noisiest levels x0 is close to the data mean whatever z, so it barely
        moves there (a raw-delta rule stops after 2 evaluations, at noise); the deltas first grow,
        peak where the plan commits, then decay. Far enough along, x0's distance to its limit
        decays like exp(-logsnr) (exactly so for Gaussian data), so the rate per unit log-SNR
        estimates the relative change still to come: the tolerance is roughly the relative plan
        error accepted (e.g. 0.01 ~ 1%), whatever the spacing or the number of steps. Dividing
        by the step in log-SNR makes the rule independent of the step size; guards (1) and (2)
        keep it from firing before the plan has formed. With normalised (unit-variance) latents
        nothing can have converged before logsnr 0, where the prior mean still weighs half.
    trace: if given, its steps_used (denoiser evaluations made), x0_deltas and rel_rates are
        overwritten.
    logsnrs: keyword-only; an explicit increasing sequence of log-SNRs (noisiest first) replacing
        `steps`, `schedule` and `spacing`: the denoiser is evaluated at all but the last, which is
        the target. All must be finite except the last, which may be +inf; if the last is finite
        the result is the noisy z there rather than a clean plan.

    The first step is first order (no previous evaluation yet) and so is the last one
    (lower_order_final; towards sigma = 0 it returns x0 exactly). With one step from s to t the
    solver is DDIM (eta = 0).

    Runs under torch.no_grad(): no graph is kept across steps. Guidance functions that need
    gradients enable them themselves (see `Guidance`); this works whatever the caller's grad mode.
    Returns the final plan, (B, D), in noise's dtype and device.
    """
    if tolerance is not None and not tolerance > 0:
        raise StarctlError(f"tolerance must be > 0 (or None to run every step), got {tolerance}")
    if logsnrs is None:
        logsnrs = timesteps(steps, schedule, spacing)
    else:
        logsnrs = torch.as_tensor(logsnrs, dtype=torch.float64)
        _check_logsnrs(logsnrs)
    levels = logsnrs.tolist()                        # host copy: no device sync in the stop test
    logsnrs = logsnrs.to(device=noise.device, dtype=noise.dtype)                      # (N+1,)
    alphas, sigmas = alpha_sigma(logsnrs)                                             # (N+1,) each
    lambdas = logsnrs / 2                            # DPM-Solver's lambda = log(alpha / sigma)
    n_steps = logsnrs.numel() - 1
    batch = noise.shape[0]
    measure = tolerance is not None or trace is not None
    if trace is not None:
        trace.steps_used, trace.x0_deltas, trace.rel_rates = 0, [], []
    peak_rate = None                                 # (B,) largest rate seen so far per sample

    with torch.no_grad():
        z = noise                                                                     # (B, D)
        x0_prev = None                                                                # (B, D)
        for i in range(n_steps):
            alpha_s, sigma_s = alphas[i], sigmas[i]                                   # () each
            alpha_t, sigma_t = alphas[i + 1], sigmas[i + 1]                           # () each
            logsnr_b = logsnrs[i].repeat(batch)                                       # (B,)
            v = denoiser(z, logsnr_b)                                                 # (B, D)
            x0 = alpha_s * z - sigma_s * v                                            # (B, D)
            if guidance:
                eps_hat = sigma_s * z + alpha_s * v                                   # (B, D)
                eps = eps_hat
                for g in guidance:
                    eps = g(z, logsnr_b, eps)                                         # (B, D)
                # x0 = (z - sigma eps) / alpha. Written as the unguided x0 plus the guidance's
                # correction, so z is never divided by the tiny alpha of the noisiest levels
                # (exactly the same value in exact arithmetic).
                x0 = x0 - (sigma_s / alpha_s) * (eps - eps_hat)                       # (B, D)

            if trace is not None:
                trace.steps_used = i + 1
            if measure and x0_prev is not None:
                diff = x0 - x0_prev                                                   # (B, D)
                step = logsnrs[i] - logsnrs[i - 1]                                    # () > 0, finite
                rate = diff.norm(dim=1) / (x0.norm(dim=1).clamp_min(1e-12) * step)   # (B,)
                if peak_rate is None:                 # the first rate: no peak passed yet
                    passed_peak, peak_rate = torch.zeros_like(rate, dtype=torch.bool), rate
                else:
                    passed_peak, peak_rate = rate < peak_rate, torch.maximum(peak_rate, rate)
                if trace is not None:
                    trace.x0_deltas.append(diff.pow(2).mean().sqrt().item())
                    trace.rel_rates.append(rate.max().item())
                if (tolerance is not None and levels[i] >= ADAPTIVE_MIN_LOGSNR
                        and bool((passed_peak & (rate < tolerance)).all())):
                    return x0

            # Step from lambda_s to lambda_t, h > 0 (towards less noise).
            # e^{-h} = (sigma_t alpha_s) / (alpha_t sigma_s); with x0 held constant over the step,
            # the integral in the module docstring gives the first-order update
            #   z_t = (sigma_t / sigma_s) z_s - alpha_t (e^{-h} - 1) x0_s,
            # which is DDIM. At lambda_t = +inf (sigma_t = 0, alpha_t = 1, e^{-h} = 0) it is
            # exactly z_t = x0_s, with no inf * 0 anywhere.
            h = lambdas[i + 1] - lambdas[i]
            if x0_prev is None or i == n_steps - 1:
                d = x0
            else:
                # Second order (2M): x0 linear in lambda through (lambda_prev, x0_prev) and
                # (lambda_s, x0_s); with r = h_prev / h the midpoint form of the integral is
                #   D = (1 + 1/(2r)) x0_s - 1/(2r) x0_prev.
                # Never reached on the last step, where h may be infinite.
                r = (lambdas[i] - lambdas[i - 1]) / h
                d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * x0_prev                  # (B, D)
            z = (sigma_t / sigma_s) * z - alpha_t * torch.expm1(-h) * d               # (B, D)
            x0_prev = x0
    return z
