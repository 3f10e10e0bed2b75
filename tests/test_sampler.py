"""Tests of starctl.sampler: DPM-Solver++(2M) against diffusers, DDIM, and closed-form Gaussians."""

from __future__ import annotations

import math
import threading

import pytest
import torch

from starctl.errors import StarctlError
from starctl.sampler import ADAPTIVE_MIN_LOGSNR, SamplerTrace, sample_dpmpp_2m, timesteps
from starctl.schedule import SAMPLER_SCHEDULE, alpha_sigma

F64 = torch.float64


def gaussian_denoiser(mu: torch.Tensor, s: torch.Tensor):
    """Exact v-prediction for data x ~ N(mu, diag(s^2)).

    z = alpha x + sigma eps ~ N(alpha mu, var = alpha^2 s^2 + sigma^2) per coordinate; by Gaussian
    conditioning E[x|z] = mu + alpha s^2 (z - alpha mu) / var and
    E[eps|z] = sigma (z - alpha mu) / var, so v = alpha E[eps|z] - sigma E[x|z].
    """

    def denoise(z: torch.Tensor, logsnr: torch.Tensor) -> torch.Tensor:
        alpha, sigma = (a[:, None] for a in alpha_sigma(logsnr))                      # (B, 1) each
        var = alpha**2 * s**2 + sigma**2                                              # (B, D)
        x0 = mu + alpha * s**2 * (z - alpha * mu) / var                               # (B, D)
        eps = sigma * (z - alpha * mu) / var                                          # (B, D)
        return alpha * eps - sigma * x0

    return denoise


def mlp_denoiser(dim: int, seed: int = 0, hidden: int = 32):
    """A fixed random MLP v(z, logsnr): nonlinear in z and in the noise level."""
    g = torch.Generator().manual_seed(seed)
    w1 = torch.randn(dim + 1, hidden, generator=g, dtype=F64) / math.sqrt(dim + 1)
    b1 = torch.randn(hidden, generator=g, dtype=F64)
    w2 = torch.randn(hidden, dim, generator=g, dtype=F64) / math.sqrt(hidden)

    def denoise(z: torch.Tensor, logsnr: torch.Tensor) -> torch.Tensor:
        h = torch.cat([z, (logsnr / 10)[:, None].to(z.dtype)], dim=1)                 # (B, D+1)
        return torch.tanh(h @ w1.to(z.dtype) + b1.to(z.dtype)) @ w2.to(z.dtype)       # (B, D)

    return denoise


def randn(*shape, seed=0, dtype=F64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# --- 1. diffusers cross-check ---------------------------------------------------------------

def matched_diffusers_scheduler():
    """diffusers' DPM-Solver++(2M) on a 1000-step discretisation of the sampler's shifted cosine."""
    diffusers = pytest.importorskip("diffusers")
    t = torch.arange(1, 1001, dtype=F64) / 1000                                       # (1000,)
    alphas_cumprod = torch.sigmoid(SAMPLER_SCHEDULE.logsnr(t).to(F64))                # (1000,)
    betas = 1 - alphas_cumprod / torch.cat([torch.ones(1, dtype=F64), alphas_cumprod[:-1]])
    return diffusers.DPMSolverMultistepScheduler(
        num_train_timesteps=1000, trained_betas=betas.numpy(), algorithm_type="dpmsolver++",
        solver_order=2, solver_type="midpoint", prediction_type="v_prediction",
        lower_order_final=True, final_sigmas_type="zero", timestep_spacing="linspace",
    )


@pytest.mark.parametrize("steps", [1, 2, 3, 10, 25])
@pytest.mark.parametrize("kind", ["gaussian", "mlp"])
def test_matches_diffusers(steps, kind):
    dim, batch = 4, 64
    if kind == "gaussian":
        denoiser = gaussian_denoiser(torch.tensor([1.0, -2.0, 0.5, 0.0], dtype=F64),
                                     torch.tensor([0.5, 2.0, 1.0, 0.1], dtype=F64))
    else:
        denoiser = mlp_denoiser(dim)
    noise = randn(batch, dim, seed=steps)

    sched = matched_diffusers_scheduler()        # stateful: one instance per run
    sched.set_timesteps(steps)
    # diffusers' sigma is sqrt((1 - alphabar) / alphabar) = exp(-logsnr / 2); final sigma 0 -> +inf.
    logsnrs = -2 * torch.log(sched.sigmas.to(F64))                                    # (steps+1,)
    assert logsnrs[-1] == math.inf
    # The discretisation really is the sampler's schedule at diffusers' integer timesteps.
    t = (sched.timesteps.to(F64) + 1) / 1000
    torch.testing.assert_close(logsnrs[:-1], SAMPLER_SCHEDULE.logsnr(t).to(F64), atol=1e-3, rtol=0)

    z = noise.clone()
    for i, step_t in enumerate(sched.timesteps):
        v = denoiser(z, logsnrs[i].repeat(batch))
        z = sched.step(v, step_t, z).prev_sample
    ours = sample_dpmpp_2m(denoiser, noise, logsnrs=logsnrs)

    diff = (ours - z).abs().max().item()
    print(f"max |ours - diffusers| ({kind}, steps={steps}; diffusers steps in float32): "
          f"{diff:.3e}")
    assert ours.dtype == F64
    # diffusers keeps its sigmas in float32 and upcasts z to float32 inside step(), so agreement is
    # at float32 rounding level, not float64.
    assert diff < 2e-5


# --- 2. first order == DDIM -----------------------------------------------------------------

def ddim(denoiser, z, logsnrs):
    """DDIM (eta = 0), written independently: x0 and eps from v, re-noised at the next level."""
    for s, t in zip(logsnrs[:-1], logsnrs[1:]):
        a_s, s_s = torch.sigmoid(s).sqrt(), torch.sigmoid(-s).sqrt()
        a_t, s_t = torch.sigmoid(t).sqrt(), torch.sigmoid(-t).sqrt()
        v = denoiser(z, s.repeat(z.shape[0]))
        x0 = a_s * z - s_s * v
        eps = s_s * z + a_s * v
        z = a_t * x0 + s_t * eps
    return z


def test_first_order_is_ddim():
    denoiser = mlp_denoiser(3, seed=1)
    grid = timesteps(8)  # (9,), ends in +inf
    noise = randn(16, 3, seed=1)
    # A call over two log-SNR points is a single step, first order (first and last): chaining such
    # calls gives the fully first-order solver.
    z = noise
    for s, t in zip(grid[:-1], grid[1:]):
        z = sample_dpmpp_2m(denoiser, z, logsnrs=torch.stack([s, t]))
    torch.testing.assert_close(z, ddim(denoiser, noise, grid), atol=1e-10, rtol=0)
    # ...and a single step between two finite levels.
    pair = torch.tensor([-3.0, 1.5], dtype=F64)
    torch.testing.assert_close(sample_dpmpp_2m(denoiser, noise, logsnrs=pair),
                               ddim(denoiser, noise, pair), atol=1e-12, rtol=0)
    # The multistep solver is not DDIM.
    assert (sample_dpmpp_2m(denoiser, noise, steps=8) - z).abs().max() > 1e-4


# --- 3. closed-form Gaussian ----------------------------------------------------------------

def test_gaussian_data_statistics():
    mu = torch.tensor([1.0, -2.0, 0.5], dtype=F64)
    s = torch.tensor([0.5, 2.0, 0.05], dtype=F64)
    n = 4096
    noise = randn(n, 3, seed=3)
    x = sample_dpmpp_2m(gaussian_denoiser(mu, s), noise, steps=20)
    assert torch.isfinite(x).all()
    mean, std = x.mean(0), x.std(0)
    print(f"mean {mean.tolist()} (want {mu.tolist()}), std {std.tolist()} (want {s.tolist()})")
    assert ((mean - mu).abs() < 4 * s / math.sqrt(n) + 0.01 * s).all()
    # Sampling error of a std is ~1/sqrt(2n) = 1.1% here; on top of it, 20 steps uniform in log-SNR
    # over [-15, 15] inflate the std by ~3% (discretisation, see the convergence check below).
    assert ((std / s - 1).abs() < 4 / math.sqrt(2 * n) + 0.04).all()

    # With the exact denoiser the sampler is an affine map per coordinate, so the gain
    # std(x) / (s std(noise)) isolates the discretisation error from sampling error: it tends to 1
    # at second order (doubling the steps divides the error by ~4).
    def gain_error(steps):
        out = sample_dpmpp_2m(gaussian_denoiser(mu, s), noise, steps=steps)
        return (out.std(0) / (s * noise.std(0)) - 1).abs().max().item()

    e20, e40, e80 = gain_error(20), gain_error(40), gain_error(80)
    print(f"gain error: 20 steps {e20:.2e}, 40 steps {e40:.2e}, 80 steps {e80:.2e}")
    assert e20 < 0.04 and e40 < e20 / 3 and e80 < e40 / 3


def test_float32_runs_and_agrees():
    denoiser = gaussian_denoiser(torch.tensor([1.0, -2.0]), torch.tensor([0.5, 2.0]))
    noise = randn(32, 2, seed=4, dtype=torch.float32)
    x32 = sample_dpmpp_2m(denoiser, noise, steps=20)
    x64 = sample_dpmpp_2m(gaussian_denoiser(torch.tensor([1.0, -2.0], dtype=F64),
                                            torch.tensor([0.5, 2.0], dtype=F64)),
                          noise.to(F64), steps=20)
    assert x32.dtype == torch.float32
    torch.testing.assert_close(x32.to(F64), x64, atol=1e-4, rtol=0)


# --- 4. guidance ----------------------------------------------------------------------------

def pull_toward(target: torch.Tensor, weight: float):
    """Classifier-style guidance through a differentiable head: for unit data the head predicts
    x from z as alpha z, log p(y|z) = -w/2 |alpha z - target|^2, and
    eps_tilde = eps - sigma grad_z log p (which moves x0 by w sigma^2 (target - alpha z))."""

    def guide(z, logsnr, eps):
        alpha, sigma = (a[:, None] for a in alpha_sigma(logsnr))                      # (B, 1) each
        with torch.enable_grad():
            zz = z.detach().clone().requires_grad_(True)
            log_p = -0.5 * weight * ((alpha * zz - target) ** 2).sum()
            (grad,) = torch.autograd.grad(log_p, zz)
        return eps - sigma * grad

    return guide


def test_guidance_pulls_toward_target_under_no_grad():
    denoiser = gaussian_denoiser(torch.zeros(2, dtype=F64), torch.ones(2, dtype=F64))
    target = torch.tensor([2.0, -2.0], dtype=F64)
    noise = randn(512, 2, seed=5)
    free = sample_dpmpp_2m(denoiser, noise, steps=10)
    with torch.no_grad():
        guided = sample_dpmpp_2m(denoiser, noise, steps=10, guidance=[pull_toward(target, 1.0)])
    # Also with grad enabled at the caller: same result, nothing left requiring grad.
    guided_grad_on = sample_dpmpp_2m(denoiser, noise, steps=10, guidance=[pull_toward(target, 1.0)])
    assert not guided_grad_on.requires_grad
    torch.testing.assert_close(guided, guided_grad_on, atol=0, rtol=0)
    assert torch.isfinite(guided).all()
    d_free = (free.mean(0) - target).norm().item()
    d_guided = (guided.mean(0) - target).norm().item()
    print(f"distance of mean to target: unguided {d_free:.3f}, guided {d_guided:.3f}")
    assert d_guided < 0.5 * d_free


def test_guidance_maths_and_order():
    denoiser = mlp_denoiser(3, seed=6)
    noise = randn(8, 3, seed=6)
    grid = torch.tensor([-1.0, math.inf], dtype=F64)   # one step to sigma = 0: the result is x0
    # The identity guidance changes nothing.
    identity = sample_dpmpp_2m(denoiser, noise, logsnrs=grid, guidance=[lambda z, l, e: e])
    torch.testing.assert_close(identity, sample_dpmpp_2m(denoiser, noise, logsnrs=grid),
                               atol=0, rtol=0)
    # Guidances compose in order, and x0 = (z - sigma eps_tilde) / alpha.
    calls = []

    def add(c):
        def guide(z, logsnr, eps):
            calls.append(c)
            return eps + c
        return guide

    def double(z, logsnr, eps):
        calls.append("x2")
        return 2 * eps

    out = sample_dpmpp_2m(denoiser, noise, logsnrs=grid, guidance=[add(0.3), double])
    assert calls == [0.3, "x2"]
    alpha, sigma = alpha_sigma(grid[0])
    v = denoiser(noise, grid[0].repeat(8))
    eps = 2 * (sigma * noise + alpha * v + 0.3)
    torch.testing.assert_close(out, (noise - sigma * eps) / alpha, atol=1e-12, rtol=0)


# --- 5. arguments and timesteps --------------------------------------------------------------

def test_bad_arguments():
    denoiser = mlp_denoiser(2)
    noise = randn(4, 2)
    with pytest.raises(StarctlError, match="steps must be >= 1, got 0"):
        sample_dpmpp_2m(denoiser, noise, steps=0)
    with pytest.raises(StarctlError, match="steps must be >= 1, got -3"):
        timesteps(-3)
    with pytest.raises(StarctlError, match="logsnr.*time"):
        sample_dpmpp_2m(denoiser, noise, spacing="karras")
    inf, nan = math.inf, math.nan
    for bad in ([0.0], [1.0, 0.0], [0.0, 0.0], [nan, 1.0], [-inf, 1.0], [0.0, inf, 5.0]):
        with pytest.raises(StarctlError, match="logsnrs"):
            sample_dpmpp_2m(denoiser, noise, logsnrs=torch.tensor(bad))


@pytest.mark.parametrize("spacing", ["logsnr", "time"])
@pytest.mark.parametrize("steps", [1, 2, 7, 20])
def test_timesteps_shape(spacing, steps):
    ts = timesteps(steps, spacing=spacing)
    assert ts.shape == (steps + 1,)
    assert ts[-1] == math.inf
    assert (ts[1:] > ts[:-1]).all()
    assert ts[0].item() == pytest.approx(SAMPLER_SCHEDULE.logsnr(torch.tensor(1.0)).item())
    if steps > 1:
        cleanest = SAMPLER_SCHEDULE.logsnr(torch.tensor(0.0)).item()
        assert ts[-2].item() == pytest.approx(cleanest, abs=1e-4)


def test_spacings_differ():
    by_logsnr, by_time = timesteps(7, spacing="logsnr"), timesteps(7, spacing="time")
    assert (by_logsnr[1:-2] - by_time[1:-2]).abs().max() > 0.1
    gaps = by_logsnr[1:-1] - by_logsnr[:-2]          # finite part: uniform in log-SNR
    torch.testing.assert_close(gaps, gaps[:1].expand(6), atol=1e-9, rtol=0)
    t = SAMPLER_SCHEDULE.t(by_time[:-1].float()).to(F64)   # 'time': uniform in t from 1 to 0
    torch.testing.assert_close(t, torch.linspace(1, 0, 7, dtype=F64), atol=1e-4, rtol=0)


# --- 6. tolerance (adaptive thinking) --------------------------------------------------------

def latent_like_gaussian(dim: int = 64, seed: int = 11):
    """Gaussian data shaped like normalised plans: per-coordinate means ~0.3, stds spread around 1."""
    g = torch.Generator().manual_seed(seed)
    mu = 0.3 * torch.randn(dim, generator=g, dtype=F64)
    s = 0.8 * torch.exp(0.7 * torch.randn(dim, generator=g, dtype=F64))
    return mu, s


def relative_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest over the batch of |x - ref| / |ref| (norms over the plan's coordinates)."""
    return ((x - ref).norm(dim=1) / ref.norm(dim=1)).max().item()


@pytest.mark.parametrize("spacing", ["logsnr", "time"])
def test_tolerance_saves_steps_at_small_error(spacing):
    mu, s = latent_like_gaussian()
    denoiser = gaussian_denoiser(mu, s)
    noise = randn(32, mu.numel(), seed=7)
    full_trace = SamplerTrace()
    full = sample_dpmpp_2m(denoiser, noise, steps=20, spacing=spacing, trace=full_trace)
    assert full_trace.steps_used == 20 and len(full_trace.x0_deltas) == len(full_trace.rel_rates) == 19

    for tol in (3e-2, 1e-2):
        early = SamplerTrace()
        x = sample_dpmpp_2m(denoiser, noise, steps=20, spacing=spacing, tolerance=tol, trace=early)
        k = early.steps_used
        err = relative_error(x, full)
        print(f"{spacing} tolerance {tol}: {k} of 20 evaluations, relative error vs 20 steps {err:.1e}")
        assert 2 < k < 20                    # stops, but neither at once nor at the end
        assert err < 4 * tol                 # the tolerance is roughly the relative error accepted
        assert len(early.rel_rates) == len(early.x0_deltas) == k - 1
        assert early.rel_rates == full_trace.rel_rates[: k - 1]
        assert early.rel_rates[-1] < tol
        # The result is the k-th evaluation's x0: running the first k levels, then jumping to sigma = 0.
        grid = timesteps(20, spacing=spacing)
        assert grid[k - 1] >= ADAPTIVE_MIN_LOGSNR
        truncated = torch.cat([grid[:k], grid[-1:]])
        torch.testing.assert_close(x, sample_dpmpp_2m(denoiser, noise, logsnrs=truncated), atol=0, rtol=0)
    # A tighter tolerance costs more steps and buys a smaller error.
    loose, tight = SamplerTrace(), SamplerTrace()
    x_loose = sample_dpmpp_2m(denoiser, noise, steps=20, spacing=spacing, tolerance=3e-2, trace=loose)
    x_tight = sample_dpmpp_2m(denoiser, noise, steps=20, spacing=spacing, tolerance=3e-3, trace=tight)
    assert tight.steps_used > loose.steps_used
    assert relative_error(x_tight, full) < relative_error(x_loose, full)


def test_tolerance_never_stops_at_the_noisiest_levels():
    """x0 barely moves at the noisiest levels: even a huge tolerance waits for the deltas to peak
    and for logsnr >= 0 (the old raw-delta rule stopped after 2 evaluations here)."""
    mu, s = latent_like_gaussian()
    denoiser = gaussian_denoiser(mu, s)
    noise = randn(16, mu.numel(), seed=8)
    trace = SamplerTrace()
    sample_dpmpp_2m(denoiser, noise, steps=20, tolerance=1e9, trace=trace)
    grid = timesteps(20)
    k = trace.steps_used
    assert k > 2 and grid[k - 1] >= ADAPTIVE_MIN_LOGSNR > grid[k - 2]
    # the deltas grew over the noisiest levels, then peaked before the stop
    assert trace.x0_deltas[0] < trace.x0_deltas[1] < trace.x0_deltas[2]
    assert max(trace.rel_rates) > trace.rel_rates[-1]
    # With very small plans (data std 0.05) nothing has formed by logsnr 0: the peak comes later.
    small = gaussian_denoiser(mu, torch.full_like(s, 0.05))
    late = SamplerTrace()
    sample_dpmpp_2m(small, noise, steps=20, tolerance=1e9, trace=late)
    assert late.steps_used > k


def test_tolerance_is_per_sample():
    """A batch stops when its slowest sample has converged, not when the batch-average has."""
    mu = torch.zeros(2, 8, dtype=F64)
    s = torch.stack([torch.full((8,), 3.0, dtype=F64), torch.full((8,), 0.1, dtype=F64)])  # (2, 8)
    noise = randn(2, 8, seed=9)
    used = []
    for rows in ([0], [1], [0, 1]):
        trace = SamplerTrace()
        sample_dpmpp_2m(gaussian_denoiser(mu[rows], s[rows]), noise[rows], steps=20, tolerance=1e-2, trace=trace)
        used.append(trace.steps_used)
    fast, slow, both = used
    print(f"evaluations: wide sample {fast}, narrow sample {slow}, both {both}")
    assert fast < slow == both


def test_tolerance_edge_cases():
    denoiser = gaussian_denoiser(torch.tensor([1.0, -1.0], dtype=F64), torch.tensor([0.3, 0.3], dtype=F64))
    noise = randn(64, 2, seed=7)
    trace = SamplerTrace()
    # A tolerance never reached uses every step, and the trace is reset on reuse.
    sample_dpmpp_2m(denoiser, noise, steps=20, tolerance=1e9, trace=trace)
    assert trace.steps_used < 20
    sample_dpmpp_2m(denoiser, noise, steps=5, tolerance=1e-12, trace=trace)
    assert trace.steps_used == 5 and len(trace.x0_deltas) == len(trace.rel_rates) == 4
    # One step: nothing to compare, the result is DDIM's.
    assert torch.equal(sample_dpmpp_2m(denoiser, noise, steps=1, tolerance=1.0),
                       sample_dpmpp_2m(denoiser, noise, steps=1))
    for bad in (0.0, -1e-3):
        with pytest.raises(StarctlError, match="tolerance must be > 0"):
            sample_dpmpp_2m(denoiser, noise, steps=5, tolerance=bad)


# --- 7. statelessness -------------------------------------------------------------------------

def test_interleaved_threads_match_sequential():
    barrier = threading.Barrier(2, timeout=10)

    def lockstep(denoiser):
        # Each evaluation waits for the other thread's, so the two calls interleave step by step.
        def denoise(z, logsnr):
            barrier.wait()
            return denoiser(z, logsnr)
        return denoise

    jobs = [
        (mlp_denoiser(3, seed=8), randn(16, 3, seed=8), SamplerTrace()),
        (gaussian_denoiser(torch.ones(3, dtype=F64), 2 * torch.ones(3, dtype=F64)),
         randn(16, 3, seed=9), SamplerTrace()),
    ]
    results = [None, None]
    errors = []

    def run(j):
        try:
            den, noise, trace = jobs[j]
            results[j] = sample_dpmpp_2m(lockstep(den), noise, steps=6, trace=trace)
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(j,)) for j in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    for (den, noise, trace), got in zip(jobs, results):
        alone = SamplerTrace()
        torch.testing.assert_close(got, sample_dpmpp_2m(den, noise, steps=6, trace=alone),
                                   atol=0, rtol=0)
        assert trace == alone
