"""Diffusion processes for the MNIST models: DDPM for PixArt-alpha, rectified flow for FLUX.

Both share one contract with the network: ``model(x_t, t, cond)`` returns a tensor with x_t's shape
(or twice its channels for a DDPM model that also predicts its variance, "learned sigma"), and
``model.encode_prompts(list[str])`` builds ``cond``. Time follows each model's convention:

  DDPM            t = step index as float in [0, 1000); x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps;
                  the network predicts eps (the first C channels; or, with prediction="v", the
                  velocity sqrt(abar_t) eps - sqrt(1 - abar_t) x0) and, optionally, a variance
                  interpolation in [-1, 1] (the next C channels, Improved DDPM).
  rectified flow  t in [0, 1] is the noise level; x_t = (1 - t) x0 + t eps; the network predicts the
                  velocity eps - x0, and sampling integrates dx/dt from t = 1 to 0 with Euler steps.

Classifier-free guidance: cond and uncond go through the network as one doubled batch, and
``pred = uncond + guidance * (cond - uncond)``; guidance 1 is the plain conditional model.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor

Denoiser = Callable[[Tensor, Tensor], Tensor]


def cfg_predict(model, x: Tensor, t: Tensor, cond_uncond: Any, guidance: float) -> Tensor:
    """One batched call for cond and uncond, combined with classifier-free guidance.

    ``cond_uncond`` must encode ``prompts + [""] * len(prompts)`` (conditional half first). Only the
    first C output channels (eps or velocity) are guided; a learned-variance half comes from the
    conditional prediction, as in DiT and PixArt-alpha.

    >>> import torch
    >>> class Toy(torch.nn.Module):
    ...     def encode_prompts(self, prompts): return torch.tensor([float(p != "") for p in prompts])
    ...     def forward(self, x, t, cond): return x * (1 + cond.view(-1, 1, 1, 1))
    >>> m, x = Toy(), torch.ones(2, 1, 4, 4)
    >>> cfg_predict(m, x, torch.zeros(2), m.encode_prompts(["1", "2", "", ""]), 3.0)[0, 0, 0, 0].item()
    4.0
    """
    n, c = x.shape[0], x.shape[1]
    out = model(torch.cat([x, x]), torch.cat([t, t]), cond_uncond)
    cond_out, uncond_out = out[:n], out[n:]
    guided = uncond_out[:, :c] + guidance * (cond_out[:, :c] - uncond_out[:, :c])
    return torch.cat([guided, cond_out[:, c:]], dim=1) if out.shape[1] > c else guided


def make_denoiser(model, prompts: list[str], guidance: float) -> Denoiser:
    """``f(x, t)`` for a sampler: the guided prediction for ``prompts``, prompts encoded once.

    Guidance 1 needs no unconditional pass, so it runs the conditional batch alone (half the work);
    so does a batch whose every prompt is empty, where cond and uncond are the same prediction.
    """
    if guidance == 1.0 or all(p == "" for p in prompts):
        cond = model.encode_prompts(list(prompts))
        return lambda x, t: model(x, t, cond)
    cond_uncond = model.encode_prompts(list(prompts) + [""] * len(prompts))
    return lambda x, t: cfg_predict(model, x, t, cond_uncond, guidance)


def _randn(shape, generator: torch.Generator | None, device, dtype=torch.float32) -> Tensor:
    return torch.randn(shape, generator=generator, device=device, dtype=dtype)


def _expand(v: Tensor, x: Tensor) -> Tensor:
    return v.reshape(-1, *([1] * (x.dim() - 1))).to(x.dtype)


# --------------------------------------------------------------------------------------------------
# DDPM (PixArt-alpha)
# --------------------------------------------------------------------------------------------------

def _normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _discretized_gaussian_log_likelihood(x: Tensor, mean: Tensor, log_scale: Tensor) -> Tensor:
    """log p(x) of 8-bit data x in [-1, 1] under a Gaussian integrated over each pixel's bin (DDPM's decoder)."""
    def cdf(v):  # standard normal CDF
        return 0.5 * (1.0 + torch.erf(v / math.sqrt(2.0)))
    centered, inv_std = x - mean, torch.exp(-log_scale)
    cdf_plus, cdf_min = cdf(inv_std * (centered + 1.0 / 255.0)), cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


class DDPM:
    """DDPM with a linear beta schedule, eps- (or v-) prediction, and two samplers.

    ``prediction`` is what the network's first C channels estimate:

    - ``"eps"``: the noise (DDPM, PixArt-alpha). The image estimate is
      x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar), so an eps error is multiplied by 1 / sqrt(SNR):
      x157 at the noisiest step (abar = 4e-5). A network must reproduce x_t to about 1e-3 there before
      its x0 is of any use, which small models trained briefly do not reach (README, "How the small
      recipe was tuned").
    - ``"v"``: v = sqrt(abar) eps - sqrt(1 - abar) x0 (Salimans & Ho 2022). Then
      x0 = sqrt(abar) x_t - sqrt(1 - abar) v and eps = sqrt(1 - abar) x_t + sqrt(abar) v: neither
      amplifies the network's error. Same schedule, same samplers, same optimum.

    Samplers:

    - ``"ddpm"``: ancestral sampling (the posterior variance, or the learned one), on all 1000 steps
      or on a respaced subset (Improved DDPM's respacing) when ``steps`` < 1000.
    - ``"ddim"``: deterministic DDIM (eta 0), the fast sampler: 25-50 steps are enough here.

    >>> import torch
    >>> ddpm = DDPM()
    >>> net = lambda x, t: torch.zeros_like(x)             # predicts eps = 0
    >>> ddpm.sample(net, (2, 1, 8, 8), steps=10, generator=torch.Generator().manual_seed(0)).shape
    torch.Size([2, 1, 8, 8])
    """

    time_kind = "index"
    SAMPLERS = ("ddim", "ddpm")  # the first is the default
    LOSS_WEIGHTINGS = ("simple", "min_snr", "trunc_snr")
    PREDICTIONS = ("eps", "v")

    def __init__(self, num_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02,
                 loss_weighting: str = "simple", snr_gamma: float = 5.0, prediction: str = "eps"):
        if loss_weighting not in self.LOSS_WEIGHTINGS:
            raise ValueError(f"loss_weighting must be one of {self.LOSS_WEIGHTINGS}, got {loss_weighting!r}")
        if prediction not in self.PREDICTIONS:
            raise ValueError(f"prediction must be one of {self.PREDICTIONS}, got {prediction!r}")
        self.num_steps, self.prediction = num_steps, prediction
        # float64 for the schedule: 1 - prod(1 - beta) over 1000 steps loses digits in fp32.
        self.betas = torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float64)
        self.alphas_cumprod = torch.cumprod(1.0 - self.betas, dim=0)
        self.loss_weighting, self.snr_gamma = loss_weighting, float(snr_gamma)
        snr = self.alphas_cumprod / (1 - self.alphas_cumprod)
        # Per-step weights on the MSE of the prediction. None moves its optimum (E[target | x_t] at
        # every step); they only move the training effort between noise levels (stated for eps):
        #   simple     1: DDPM's L_simple.
        #   min_snr    min(1, gamma / SNR): Min-SNR-gamma (Hang et al. 2023), damps the easy low-noise steps.
        #   trunc_snr  clamp(1 / SNR, 1, gamma): the x0 loss where 1 < 1/SNR < gamma (Salimans & Ho's
        #              truncated-SNR weighting), capped at gamma. L_simple weights an x0 error at SNR s
        #              by s, so it barely trains the noisy steps (SNR 0.01-0.2, t ~ 400-700 here) where
        #              a sample's class is decided; uncapped, the x0 loss at t -> 999 (1/SNR ~ 25,000)
        #              demands an eps exact to 1e-3 and swamps every other step.
        # Under v-prediction the same weights multiply the v MSE, which is the x0 MSE times 1 + SNR; so
        # min_snr caps that x0 weight at about 1 + gamma (not Min-SNR's own v form, min(SNR, gamma) / (1 + SNR)).
        self.loss_weights = {"simple": torch.ones_like(snr), "min_snr": (self.snr_gamma / snr).clamp(max=1.0),
                             "trunc_snr": (1.0 / snr).clamp(min=1.0, max=self.snr_gamma)}[loss_weighting].float()

    def config(self) -> dict:
        return {"kind": "ddpm", "num_steps": self.num_steps, "beta_start": float(self.betas[0]),
                "beta_end": float(self.betas[-1]), "prediction": self.prediction,
                "loss_weighting": self.loss_weighting, "snr_gamma": self.snr_gamma}

    def _abar(self, t: Tensor) -> Tensor:
        """abar at integer steps t; t = -1 means "before the first step" (abar = 1)."""
        table = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod]).to(t.device)
        return table[t + 1]

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        abar = self._abar(t).float()
        return _expand(abar.sqrt(), x0) * x0 + _expand((1 - abar).sqrt(), x0) * noise

    def target(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """What the network learns to predict at step t: eps, or v = sqrt(abar) eps - sqrt(1 - abar) x0."""
        if self.prediction == "eps":
            return noise
        abar = self._abar(t).float()
        return _expand(abar.sqrt(), x0) * noise - _expand((1 - abar).sqrt(), x0) * x0

    def split(self, pred: Tensor, xt: Tensor, abar: Tensor) -> tuple[Tensor, Tensor]:
        """(eps, x0) implied by the network's prediction at x_t (abar per sample, float)."""
        a, s = _expand(abar.sqrt(), xt), _expand((1 - abar).sqrt(), xt)
        if self.prediction == "eps":
            return pred, (xt - s * pred) / a
        return s * xt + a * pred, a * xt - s * pred

    def training_loss(self, model, x0: Tensor, cond: Any, generator: torch.Generator | None = None) -> Tensor:
        """MSE on the prediction (eps or v) at a uniform random step (weighted per step, see __init__);
        plus Improved DDPM's variational bound term for the variance channels when the network
        predicts its variance (its mean is detached there, so the bound trains only the variance, as in DiT)."""
        B, C = x0.shape[:2]
        t = torch.randint(0, self.num_steps, (B,), generator=generator, device=x0.device)
        noise = _randn(x0.shape, generator, x0.device, x0.dtype)
        xt = self.q_sample(x0, t, noise)
        out = model(xt, t.float(), cond).float()
        per_sample = (out[:, :C] - self.target(x0, t, noise)).pow(2).flatten(1).mean(1)
        loss = (per_sample * self.loss_weights.to(x0.device)[t]).mean()
        if out.shape[1] == 2 * C:
            eps = self.split(out[:, :C].detach(), xt, self._abar(t).float())[0]
            loss = loss + self._vb_term(eps, out[:, C:], x0, xt, t).mean()
        elif out.shape[1] != C:
            raise ValueError(f"model output must have {C} or {2 * C} channels, got {tuple(out.shape)}")
        return loss

    def _posterior(self, abar_t: Tensor, abar_prev: Tensor, x0: Tensor, xt: Tensor):
        """Mean, log variance and beta of q(x_prev | x_t, x0) for a possibly respaced chain t -> prev.

        At prev = -1 (the last step) the variance is 0; its log is floored here, and callers replace
        it (Improved DDPM uses step 1's value in training; sampling adds no noise at that step)."""
        beta = 1 - abar_t / abar_prev
        var = beta * (1 - abar_prev) / (1 - abar_t)
        coef_x0 = beta * abar_prev.sqrt() / (1 - abar_t)
        coef_xt = (1 - abar_prev) * (1 - beta).sqrt() / (1 - abar_t)
        mean = _expand(coef_x0, x0) * x0 + _expand(coef_xt, xt) * xt
        return mean, var.clamp(min=1e-20).log(), beta

    def _model_logvar(self, v: Tensor, beta: Tensor, post_logvar: Tensor) -> Tensor:
        frac = (v.float().clamp(-1, 1) + 1) / 2
        return frac * _expand(beta.log(), v) + (1 - frac) * _expand(post_logvar, v)

    def _vb_term(self, eps: Tensor, v: Tensor, x0: Tensor, xt: Tensor, t: Tensor) -> Tensor:
        abar_t, abar_prev = self._abar(t), self._abar(t - 1)
        true_mean, true_logvar, beta = self._posterior(abar_t, abar_prev, x0, xt)
        pred_x0 = (xt - _expand((1 - abar_t).sqrt(), xt) * eps) / _expand(abar_t.sqrt(), xt)
        model_mean, _, _ = self._posterior(abar_t, abar_prev, pred_x0, xt)
        # Improved DDPM clips the posterior log-variance at t = 0 to that of t = 1.
        post_logvar = torch.where(t == 0, self._posterior_logvar_at1(t.device), true_logvar)
        model_logvar = self._model_logvar(v, beta, post_logvar)
        kl = _normal_kl(true_mean, _expand(post_logvar, xt).expand_as(xt), model_mean, model_logvar)
        nll = -_discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_logvar)
        per_sample = torch.where(_expand(t == 0, xt).bool(), nll, kl).flatten(1).mean(1) / math.log(2.0)
        return per_sample

    def _posterior_logvar_at1(self, device) -> Tensor:
        a1, a0 = self.alphas_cumprod[1], self.alphas_cumprod[0]
        return torch.log(self.betas[1] * (1 - a0) / (1 - a1)).to(device)

    def timesteps(self, steps: int) -> list[int]:
        """``steps`` indices from 999 down, evenly spaced ("trailing" spacing, so sampling starts at
        the last, noisiest step even with few steps)."""
        if not 1 <= steps <= self.num_steps:
            raise ValueError(f"sampling steps must be in [1, {self.num_steps}], got {steps}")
        ts = torch.linspace(self.num_steps, 0, steps + 1, dtype=torch.float64)[:-1].round().long() - 1
        return ts.tolist()

    @torch.no_grad()
    def sample(self, denoiser: Denoiser, shape, steps: int = 50, sampler: str = "ddim",
               generator: torch.Generator | None = None, device=None, clip_x0: bool = True) -> Tensor:
        """Images in [-1, 1] from Gaussian noise; ``denoiser(x, t)`` is e.g. ``make_denoiser(...)``."""
        if sampler not in self.SAMPLERS:
            raise ValueError(f"DDPM sampler must be one of {self.SAMPLERS}, got {sampler!r}")
        x = _randn(shape, generator, device)
        ts = self.timesteps(steps)
        C = shape[1]
        for i, t_cur in enumerate(ts):
            t_prev = ts[i + 1] if i + 1 < len(ts) else -1
            t_vec = torch.full((shape[0],), t_cur, device=x.device, dtype=torch.long)
            abar_t = self._abar(t_vec).float()
            abar_prev = self._abar(torch.full_like(t_vec, t_prev)).float()
            out = denoiser(x, t_vec.float()).float()
            eps, x0 = self.split(out[:, :C], x, abar_t)
            if clip_x0:
                # Clip the predicted image to the data range, then re-derive eps from it (as DiT's DDIM).
                x0 = x0.clamp(-1, 1)
                eps = (x - _expand(abar_t.sqrt(), x) * x0) / _expand((1 - abar_t).sqrt(), x)
            if sampler == "ddim":
                x = _expand(abar_prev.sqrt(), x) * x0 + _expand((1 - abar_prev).sqrt(), x) * eps
                continue
            mean, post_logvar, beta = self._posterior(abar_t, abar_prev, x0, x)
            if t_prev < 0:
                x = mean
                break
            if out.shape[1] == 2 * C:
                logvar = self._model_logvar(out[:, C:], beta, post_logvar)
            else:
                logvar = _expand(post_logvar, x).expand_as(x)
            x = mean + torch.exp(0.5 * logvar) * _randn(x.shape, generator, x.device)
        return x.clamp(-1, 1)


# --------------------------------------------------------------------------------------------------
# Rectified flow (FLUX)
# --------------------------------------------------------------------------------------------------

def flux_time_shift_mu(image_seq_len: int, base_shift: float = 0.5, max_shift: float = 1.15,
                       base_seq_len: int = 256, max_seq_len: int = 4096) -> float:
    """FLUX's resolution-dependent shift: mu grows linearly with the number of image tokens
    (0.5 at 256 tokens, 1.15 at 4096), so larger images spend more steps at high noise."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return base_shift + slope * (image_seq_len - base_seq_len)


def flux_schedule(steps: int, image_seq_len: int, shift: bool = True, **shift_kwargs) -> Tensor:
    """``steps + 1`` noise levels from 1 to 0, bent by FLUX's time shift t' = e^mu / (e^mu + 1/t - 1)."""
    if steps < 1:
        raise ValueError(f"sampling steps must be >= 1, got {steps}")
    t = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    if shift:
        mu = flux_time_shift_mu(image_seq_len, **shift_kwargs)
        with torch.no_grad():
            t = math.exp(mu) / (math.exp(mu) + (1.0 / t - 1.0))  # 1/0 = inf makes t = 0 map to 0
    return t


class RectifiedFlow:
    """Rectified flow: x_t = (1 - t) x0 + t eps, velocity target eps - x0, logit-normal t in training
    (SD3 / FLUX), Euler sampling on FLUX's shifted schedule.

    ``image_seq_len`` (image tokens the transformer sees) sets the time shift.

    >>> import torch
    >>> rf = RectifiedFlow(image_seq_len=16)
    >>> rf.sample(lambda x, t: torch.zeros_like(x), (2, 1, 8, 8), steps=4).shape
    torch.Size([2, 1, 8, 8])
    """

    time_kind = "noise_level"
    SAMPLERS = ("euler",)

    def __init__(self, image_seq_len: int, logit_mean: float = 0.0, logit_std: float = 1.0, shift: bool = True):
        self.image_seq_len = int(image_seq_len)
        self.logit_mean, self.logit_std, self.shift = float(logit_mean), float(logit_std), bool(shift)

    def config(self) -> dict:
        return {"kind": "rectified_flow", "image_seq_len": self.image_seq_len, "logit_mean": self.logit_mean,
                "logit_std": self.logit_std, "shift": self.shift}

    def training_loss(self, model, x0: Tensor, cond: Any, generator: torch.Generator | None = None) -> Tensor:
        B = x0.shape[0]
        t = torch.sigmoid(self.logit_mean + self.logit_std * _randn((B,), generator, x0.device))
        noise = _randn(x0.shape, generator, x0.device, x0.dtype)
        xt = (1 - _expand(t, x0)) * x0 + _expand(t, x0) * noise
        out = model(xt, t, cond).float()
        if out.shape != x0.shape:
            raise ValueError(f"rectified-flow model output must have x's shape {tuple(x0.shape)}, got {tuple(out.shape)}")
        return F.mse_loss(out, noise - x0)

    @torch.no_grad()
    def sample(self, denoiser: Denoiser, shape, steps: int = 50, sampler: str = "euler",
               generator: torch.Generator | None = None, device=None) -> Tensor:
        if sampler not in self.SAMPLERS:
            raise ValueError(f"rectified-flow sampler must be one of {self.SAMPLERS}, got {sampler!r}")
        x = _randn(shape, generator, device)
        ts = flux_schedule(steps, self.image_seq_len, self.shift).tolist()
        for t_cur, t_next in zip(ts[:-1], ts[1:]):
            v = denoiser(x, torch.full((shape[0],), t_cur, device=x.device)).float()
            x = x + (t_next - t_cur) * v
        return x.clamp(-1, 1)
