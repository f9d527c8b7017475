"""The training / sampling / evaluation math against independent oracles.

- Samplers step by step against diffusers' DDIMScheduler, DDPMScheduler and
  FlowMatchEulerDiscreteScheduler, fed the same fixed fake "network" and the same noise draws.
- Training losses against diffusers' add_noise / get_velocity / compute_snr and closed forms, and one
  exact denoiser that must both have zero training loss and carry every sampler to the data point
  (the training and sampling timestep conventions agree).
- Improved DDPM's variational-bound term against closed-form Gaussian KLs and the discretized decoder
  likelihood (scipy.stats.norm).
- The feature FID against a scipy.linalg.sqrtm implementation (pytorch-fid's formula) and a closed
  form; the classifier's features on real (uint8) and generated (float) images.
- Guidance endpoints and batch-order equivariance of the guided denoiser; seeded, chunked generation.
- The loop's EMA and learning-rate warmup in a real two-step run, against the hand EMA formula and
  torch's LinearLR, with the learning rate read back from the AdamW update itself.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from models import build_model
from training.classifier import DigitClassifier, features, frechet_distance
from training.data import to_model_range
from training.diffusion import DDPM, RectifiedFlow, flux_schedule, flux_time_shift_mu, make_denoiser

diffusers = pytest.importorskip("diffusers")
scipy_linalg = pytest.importorskip("scipy.linalg")
scipy_stats = pytest.importorskip("scipy.stats")

SHAPE = (3, 1, 8, 8)
_W = torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(123))


def fake_net(x, t):
    """A fixed, nonlinear, t-dependent stand-in for a network (t as the sampler passes it). Its x0
    estimates leave [-1, 1] at high noise, so the samplers' clipping is exercised."""
    tt = t.view(-1, 1, 1, 1).float()
    return 0.7 * torch.tanh(x) + torch.sin(tt / 150.0) * _W + 0.05 * x * (tt / 1000.0)


def fake_flow_net(x, t):
    tt = t.view(-1, 1, 1, 1).float()
    return 0.7 * torch.tanh(x) + torch.sin(3.0 * tt) * _W


def reference_alphas_cumprod() -> torch.Tensor:
    """prod_{s<=t} (1 - beta_s) for DDPM's linear betas 1e-4..0.02, in float64 (diffusers' own table is
    float32, whose cumulative product drifts by ~2.5e-7; the step comparisons below use this one)."""
    betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
    return torch.from_numpy(np.cumprod(1.0 - betas))


def _ddim_scheduler(prediction: str, clip: bool):
    sch = diffusers.DDIMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                                  clip_sample=clip, clip_sample_range=1.0, set_alpha_to_one=True, steps_offset=0,
                                  prediction_type={"eps": "epsilon", "v": "v_prediction"}[prediction],
                                  timestep_spacing="trailing")
    sch.alphas_cumprod = reference_alphas_cumprod()
    return sch


def _ddpm_scheduler(prediction: str, learned: bool):
    sch = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                                  clip_sample=True, clip_sample_range=1.0,
                                  prediction_type={"eps": "epsilon", "v": "v_prediction"}[prediction],
                                  variance_type="learned_range" if learned else "fixed_small",
                                  timestep_spacing="trailing")
    sch.alphas_cumprod = reference_alphas_cumprod()
    return sch


# --------------------------------------------------------------------------------------------------
# The DDPM schedule and samplers
# --------------------------------------------------------------------------------------------------

def test_alphas_cumprod_matches_diffusers_and_closed_form_endpoints():
    ours = DDPM().alphas_cumprod
    theirs = diffusers.DDPMScheduler(beta_start=1e-4, beta_end=0.02, beta_schedule="linear").alphas_cumprod.double()
    # diffusers' table is float32 and cumulated in float32: ~2.5e-7 off (observed); 1e-6 holds, a wrong beta
    # range or an off-by-one shift in the table is >= 2e-5 away.
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)
    assert ours[0].item() == pytest.approx(1 - 1e-4, abs=1e-15)
    assert ours[-1].item() == pytest.approx(math.prod(1 - (1e-4 + i * (0.02 - 1e-4) / 999) for i in range(1000)),
                                            rel=1e-12)
    assert ours[-1].item() == pytest.approx(4.036e-5, rel=1e-3)  # DDPM's terminal abar (SNR ~ 4e-5)
    # The "before the first step" convention: abar(-1) = 1, abar(t) = alphas_cumprod[t].
    t = torch.tensor([-1, 0, 998, 999])
    torch.testing.assert_close(DDPM()._abar(t), torch.cat([torch.ones(1, dtype=torch.float64), ours[[0, 998, 999]]]))


@pytest.mark.parametrize("prediction,steps,clip", [("eps", 10, True), ("eps", 50, True), ("v", 25, True),
                                                   ("eps", 20, False), ("v", 10, False)])
def test_ddim_matches_diffusers_ddim_scheduler(prediction, steps, clip):
    sch = _ddim_scheduler(prediction, clip)
    sch.set_timesteps(steps)
    ddpm = DDPM(prediction=prediction)
    assert ddpm.timesteps(steps) == sch.timesteps.tolist()  # trailing spacing: 999, ..., 1000/steps - 1
    ours = ddpm.sample(fake_net, SHAPE, steps=steps, sampler="ddim", generator=torch.Generator().manual_seed(1),
                       clip_x0=clip)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    for t in sch.timesteps:
        out = fake_net(x, torch.full((SHAPE[0],), float(t)))
        x = sch.step(out, t, x, eta=0.0, use_clipped_model_output=True).prev_sample
    # Both float32 over the same float64 schedule, differently ordered: <= 1e-6 observed over 50 steps.
    torch.testing.assert_close(ours, x.clamp(-1, 1), atol=1e-5, rtol=0)


def test_ddim_clipping_is_active_in_the_comparison_above():
    """The fake network's x0 leaves [-1, 1], so the clip_x0 branch of the DDIM test is not vacuous."""
    ddpm = DDPM()
    a = ddpm.sample(fake_net, SHAPE, steps=10, generator=torch.Generator().manual_seed(1), clip_x0=True)
    b = ddpm.sample(fake_net, SHAPE, steps=10, generator=torch.Generator().manual_seed(1), clip_x0=False)
    assert (a - b).abs().max() > 1e-2


@pytest.mark.parametrize("prediction,steps,learned", [("eps", 10, False), ("v", 10, False), ("eps", 1000, False),
                                                      ("eps", 10, True), ("v", 25, True)])
def test_ancestral_matches_diffusers_ddpm_scheduler(prediction, steps, learned):
    """Posterior mean and variance on a respaced chain (or the learned interpolation between the
    posterior variance and beta, Improved DDPM), the same noise draws in the same order."""
    sch = _ddpm_scheduler(prediction, learned)
    sch.set_timesteps(steps)
    ddpm = DDPM(prediction=prediction)
    assert ddpm.timesteps(steps) == sch.timesteps.tolist()

    def net(x, t):
        return torch.cat([fake_net(x, t), torch.tanh(3 * x)], 1) if learned else fake_net(x, t)

    g = torch.Generator().manual_seed(2)
    ours = ddpm.sample(net, SHAPE, steps=steps, sampler="ddpm", generator=g)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(SHAPE, generator=g)
    for i, t in enumerate(sch.timesteps):
        out = net(x, torch.full((SHAPE[0],), float(t)))
        if learned and i == len(sch.timesteps) - 1:
            # The last step (to "t = -1") adds no noise (Improved DDPM / DiT: nonzero_mask on the respaced
            # index). diffusers adds learned_range noise whenever the original t > 0, here t = 1000/steps - 1;
            # a variance channel of -1 gives it the (clamped, 1e-20) posterior variance: no noise either.
            out = torch.cat([out[:, :1], -torch.ones_like(out[:, 1:])], 1)
        x = sch.step(out, t, x, generator=g).prev_sample
    # float32: ~5e-7 observed on 10-25 steps, 3.5e-5 over 1000 (accumulated rounding of x_t ~ N(0, 1)).
    torch.testing.assert_close(ours, x.clamp(-1, 1), atol=1e-4 if steps == 1000 else 1e-5, rtol=0)


# --------------------------------------------------------------------------------------------------
# Rectified flow: FLUX's shifted schedule and the Euler sampler
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seq,steps,shift", [(16, 10, True), (64, 7, True), (4096, 20, True), (64, 8, False)])
def test_euler_matches_diffusers_flow_match_scheduler(seq, steps, shift):
    # BFL's get_lin_function(x1=256, y1=0.5, x2=4096, y2=1.15) (diffusers' calculate_shift, not imported:
    # the FLUX pipeline module pulls in transformers, seconds of import for two lines of arithmetic).
    m = (1.15 - 0.5) / (4096 - 256)
    mu = seq * m + (0.5 - m * 256)
    assert flux_time_shift_mu(seq) == pytest.approx(mu, abs=1e-12)
    sch = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, use_dynamic_shifting=shift,
                                                    base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                                    max_image_seq_len=4096, shift=1.0)
    sigmas = np.linspace(1.0, 1.0 / steps, steps)  # FluxPipeline's sigmas; the scheduler appends the final 0
    sch.set_timesteps(sigmas=sigmas, mu=mu) if shift else sch.set_timesteps(sigmas=sigmas)
    # diffusers keeps its sigmas in float32: 6e-8 observed.
    torch.testing.assert_close(flux_schedule(steps, seq, shift), sch.sigmas.double(), atol=2e-7, rtol=0)
    ours = RectifiedFlow(seq, shift=shift).sample(fake_flow_net, SHAPE, steps=steps,
                                                  generator=torch.Generator().manual_seed(3))
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    for t in sch.timesteps:  # diffusers' timestep is 1000 * sigma; FLUX here takes the noise level itself
        x = sch.step(fake_flow_net(x, torch.full((SHAPE[0],), float(t) / 1000.0)), t, x).prev_sample
    torch.testing.assert_close(ours, x.clamp(-1, 1), atol=1e-5, rtol=0)  # 3e-7 observed


# --------------------------------------------------------------------------------------------------
# Training losses
# --------------------------------------------------------------------------------------------------

class Recorder(torch.nn.Module):
    """A 'network' that records what the loss feeds it and answers with fake_net."""

    def __init__(self, out_channels_factor: int = 1):
        super().__init__()
        self.seen, self.factor = [], out_channels_factor

    def forward(self, x, t, cond):
        self.seen.append((x.clone(), t.clone()))
        out = fake_net(x, t)
        return torch.cat([out] * self.factor, 1)


@pytest.mark.parametrize("weighting", ["simple", "min_snr", "trunc_snr"])
@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_ddpm_training_loss_matches_diffusers_noising_and_snr_weights(prediction, weighting):
    from diffusers.training_utils import compute_snr
    gamma = 5.0
    ddpm = DDPM(prediction=prediction, loss_weighting=weighting, snr_gamma=gamma)
    B = 64
    x0 = torch.rand(B, 1, 8, 8, generator=torch.Generator().manual_seed(4)) * 2 - 1
    net = Recorder()
    loss = ddpm.training_loss(net, x0, None, torch.Generator().manual_seed(5))
    # Replay the documented draws: t ~ U{0..999}, then the noise, from the same generator.
    g = torch.Generator().manual_seed(5)
    t = torch.randint(0, 1000, (B,), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    sch = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")
    sch.alphas_cumprod = reference_alphas_cumprod()
    xt_seen, t_seen = net.seen[0]
    # The network sees the step index itself (0..999, as sampling passes it), not t + 1 or t / 1000.
    torch.testing.assert_close(t_seen, t.float(), atol=0, rtol=0)
    torch.testing.assert_close(xt_seen, sch.add_noise(x0, noise, t), atol=1e-6, rtol=0)  # float32 rounding
    target = noise if prediction == "eps" else sch.get_velocity(x0, noise, t)
    snr = compute_snr(sch, t).double()
    # Min-SNR-gamma's eps weight min(SNR, gamma) / SNR (diffusers' train_text_to_image); this project
    # applies the same weight to the v MSE (documented in DDPM.__init__), so the oracle does too.
    weight = {"simple": torch.ones_like(snr), "min_snr": torch.minimum(snr, torch.full_like(snr, gamma)) / snr,
              "trunc_snr": (1 / snr).clamp(1.0, gamma)}[weighting]
    per_sample = (fake_net(xt_seen, t_seen).double() - target.double()).pow(2).flatten(1).mean(1)
    expected = (weight * per_sample).mean()
    assert weighting == "simple" or not torch.allclose(weight, torch.ones_like(weight))  # the weight matters
    # float32 loss of O(1) terms: ~1e-7 relative.
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_rectified_flow_training_loss_matches_closed_form():
    rf = RectifiedFlow(image_seq_len=16, logit_mean=0.3, logit_std=1.2)
    B = 64
    x0 = torch.rand(B, 1, 8, 8, generator=torch.Generator().manual_seed(6)) * 2 - 1
    net = Recorder()
    loss = rf.training_loss(net, x0, None, torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    t = torch.sigmoid(0.3 + 1.2 * torch.randn(B, generator=g))  # logit-normal (SD3 / FLUX)
    noise = torch.randn(x0.shape, generator=g)
    xt_seen, t_seen = net.seen[0]
    torch.testing.assert_close(t_seen, t, atol=0, rtol=0)
    tb = t.view(-1, 1, 1, 1)
    # t is the noise level (t = 1 pure noise, the sampler's starting point), velocity eps - x0.
    torch.testing.assert_close(xt_seen, (1 - tb) * x0 + tb * noise, atol=1e-6, rtol=0)
    expected = (fake_net(xt_seen, t_seen) - (noise - x0)).double().pow(2).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def _exact_ddpm_denoiser(x_star, prediction):
    """The exact eps / v for data that is always x_star, written from the docstring's convention:
    t is the step index, x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, v = sqrt(abar) eps - sqrt(1 - abar) x0."""
    abar_table = reference_alphas_cumprod()

    def net(x, t, cond=None):
        abar = abar_table[t.long()].view(-1, 1, 1, 1)
        eps = (x.double() - abar.sqrt() * x_star) / (1 - abar).sqrt()
        out = eps if prediction == "eps" else abar.sqrt() * eps - (1 - abar).sqrt() * x_star
        return out.float()
    return net


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_one_exact_denoiser_has_zero_ddpm_loss_and_samples_the_point(prediction):
    """Training and sampling agree on the timestep convention: the denoiser that the training loss
    scores as perfect is the one that carries DDIM and ancestral sampling to the data."""
    x_star = (torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(8)) * 1.6 - 0.8).double()
    net = _exact_ddpm_denoiser(x_star, prediction)
    ddpm = DDPM(prediction=prediction)
    loss = ddpm.training_loss(net, x_star.float().expand(256, -1, -1, -1), None, torch.Generator().manual_seed(9))
    # float32 x_t: eps error <= ~6e-8 / sqrt(1 - abar_0) = 6e-6, squared ~4e-11. A one-step shift of t in
    # either place gives MSEs of ~1e-3 and more.
    assert loss.item() < 1e-8
    for sampler in ("ddim", "ddpm"):
        x = ddpm.sample(lambda x, t: net(x, t), (2, 1, 8, 8), steps=20, sampler=sampler,
                        generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(x, x_star.float().expand(2, -1, -1, -1), atol=1e-4, rtol=0)


def test_one_exact_velocity_has_zero_flow_loss_and_samples_the_point():
    x_star = torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(10)) * 1.6 - 0.8

    def net(x, t, cond=None):  # x = (1 - t) x* + t eps  =>  eps - x* = (x - x*) / t
        return (x - x_star) / t.view(-1, 1, 1, 1)
    rf = RectifiedFlow(image_seq_len=16)
    loss = rf.training_loss(net, x_star.expand(256, -1, -1, -1), None, torch.Generator().manual_seed(11))
    assert loss.item() < 1e-8  # fp32 division by t >= ~0.01: errors ~1e-5, squared ~1e-10
    x = rf.sample(lambda x, t: net(x, t), (2, 1, 8, 8), steps=6, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(x, x_star.expand(2, -1, -1, -1), atol=1e-4, rtol=0)


def test_variational_bound_term_matches_closed_forms():
    """Improved DDPM's L_vb with an exact mean: the Gaussian KL depends only on the two variances
    (0 when the model's equals the posterior's), and at t = 0 the discretized decoder's NLL is
    -log(Phi(d / s) - Phi(-d / s)), d = 1/255, s the model's std (one-sided at -1 and 1); in bits."""
    ddpm = DDPM()
    abar = reference_alphas_cumprod()
    betas = torch.from_numpy(np.linspace(1e-4, 0.02, 1000, dtype=np.float64))
    g = torch.Generator().manual_seed(12)
    levels = torch.randint(0, 256, (4, 1, 8, 8), generator=g)
    levels[0, 0, 0, :2] = torch.tensor([0, 255])  # the one-sided end bins
    x0 = levels.double() / 127.5 - 1
    t = torch.tensor([0, 1, 500, 999])
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    a = abar[t].view(-1, 1, 1, 1)
    xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
    post_var = betas[t] * (1 - torch.cat([torch.ones(1, dtype=torch.float64), abar])[t]) / (1 - abar[t])
    post_var[0] = betas[1] * (1 - abar[0]) / (1 - abar[1])  # Improved DDPM clips t = 0's to t = 1's
    d = 1 / 255
    for v, model_var in ((-1.0, post_var), (1.0, betas[t])):
        vb = ddpm._vb_term(noise.float(), torch.full(x0.shape, v), x0.float(), xt.float(), t)
        kl = 0.5 * (-1 + torch.log(model_var / post_var) + post_var / model_var)  # equal means
        s = model_var[0].sqrt().item()
        inner = scipy_stats.norm.cdf(d / s) - scipy_stats.norm.cdf(-d / s)
        edge = scipy_stats.norm.cdf(d / s)
        x00 = x0[0].numpy()
        nll = np.where((x00 < -0.999) | (x00 > 0.999), -np.log(edge), -np.log(inner)).mean()
        expected = torch.cat([torch.tensor([nll]), kl[1:]]) / math.log(2)
        if v == -1.0:
            assert expected[1:].abs().max() == 0
        # float32 inputs: the KL of equal variances is ~1e-7 (log(1+e) - e), the NLL's std 0.0074 vs mean
        # errors ~1e-7 moves it by < 1e-5 bits.
        torch.testing.assert_close(vb.double(), expected, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------------
# Feature FID and the classifier's features
# --------------------------------------------------------------------------------------------------

def _fid_reference(a: np.ndarray, b: np.ndarray) -> float:
    """pytorch-fid's calculate_frechet_distance: sqrtm of the product of the covariances."""
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy_linalg.sqrtm(s1.dot(s2))
    covmean = covmean.real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def test_frechet_distance_matches_scipy_reference_on_full_rank_128d_features():
    g = torch.Generator().manual_seed(13)
    mix_a, mix_b = torch.randn(128, 128, generator=g) / 12, torch.randn(128, 128, generator=g) / 12
    a = torch.relu(torch.randn(900, 128, generator=g) @ mix_a + 0.5)  # ReLU features, like the classifier's
    b = torch.relu(torch.randn(600, 128, generator=g) @ mix_b + 0.3)  # another size: per-set covariances
    assert torch.linalg.matrix_rank(torch.cov(a.double().T)) == 128 == torch.linalg.matrix_rank(torch.cov(b.double().T))
    ref = _fid_reference(a.double().numpy(), b.double().numpy())
    # Both float64; sqrtm's Schur route and the eigh route agree to ~1e-12 relative on well-conditioned input.
    assert frechet_distance(a, b) == pytest.approx(ref, rel=1e-8)
    assert frechet_distance(b, a) == pytest.approx(ref, rel=1e-8)  # symmetric


def test_frechet_distance_closed_form_for_a_scaled_copy():
    """b = s a: mu_b = s mu_a, S_b = s^2 S_a, so FID = (1 - s)^2 (|mu_a|^2 + Tr S_a) exactly."""
    g = torch.Generator().manual_seed(14)
    a = torch.randn(500, 16, generator=g).double() @ torch.randn(16, 16, generator=g).double() + 1.0
    s = 1.7
    expected = (1 - s) ** 2 * (float((a.mean(0) ** 2).sum()) + float(torch.cov(a.T).trace()))
    assert frechet_distance(a, s * a) == pytest.approx(expected, rel=1e-9)


def test_classifier_features_see_real_and_generated_images_in_one_range_and_batch_free():
    """evaluate() feeds real held-out digits as uint8 and generated ones as float in [-1, 1]: the same
    image must give the same features either way, and the 500-image batches must not matter."""
    torch.manual_seed(0)
    net = DigitClassifier(1, 10, 32).eval()
    g = torch.Generator().manual_seed(15)
    real = torch.randint(0, 256, (503, 1, 32, 32), generator=g, dtype=torch.uint8)  # crosses a batch boundary
    as_uint8 = features(net, real)
    as_float = features(net, to_model_range(real))
    torch.testing.assert_close(as_uint8, as_float, atol=0, rtol=0)
    with torch.no_grad():
        one_batch = net.features(real.float() / 127.5 - 1)  # the [0, 255] -> [-1, 1] map written out
    torch.testing.assert_close(as_uint8, one_batch, atol=1e-5, rtol=1e-5)  # conv summation order only
    assert as_uint8.abs().max() > 0.01


# --------------------------------------------------------------------------------------------------
# Guidance, batch order and seeded generation with the real networks
# --------------------------------------------------------------------------------------------------

TINY = {
    "pixart": dict(hidden_size=32, depth=1, num_heads=2, text_dim=16, text_depth=1, text_heads=2),
    "flux": dict(hidden_size=32, depth_double=1, depth_single=1, num_heads=2, text_dim=16, text_depth=1,
                 text_heads=2),
}


def _random_model(name):
    model = build_model(name, "small", "layernorm", **TINY[name])
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval()


@pytest.mark.parametrize("name", ["pixart", "flux"])
def test_guided_denoiser_is_batch_order_equivariant_with_exact_guidance_endpoints(name):
    model = _random_model(name)
    g = torch.Generator().manual_seed(16)
    x = torch.randn(4, 1, 32, 32, generator=g)
    t = torch.tensor([5.0, 300.0, 700.0, 999.0]) if name == "pixart" else torch.tensor([0.05, 0.3, 0.7, 1.0])
    prompts = ["3", "seven", "0", "a handwritten 9"]
    perm = torch.tensor([2, 0, 3, 1])
    with torch.no_grad():
        guided = make_denoiser(model, prompts, 4.0)(x, t)
        permuted = make_denoiser(model, [prompts[i] for i in perm], 4.0)(x[perm], t[perm])
        uncond = model(x, t, model.encode_prompts([""] * 4))
        cond = model(x, t, model.encode_prompts(prompts))
        at_zero = make_denoiser(model, prompts, 0.0)(x, t)
    assert (cond - uncond).abs().max() > 1e-2  # the condition matters, so the checks below mean something
    # Per-sample results do not depend on the batch's order (attention over tokens, never across samples).
    torch.testing.assert_close(permuted, guided[perm], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(at_zero, uncond, atol=1e-5, rtol=1e-5)  # guidance 0: the unconditional model
    torch.testing.assert_close(guided, uncond + 4.0 * (cond - uncond), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name,sampler", [("pixart", "ddim"), ("flux", "euler")])
def test_generate_is_seeded_and_its_chunking_does_not_change_deterministic_samples(name, sampler):
    from training.recipes import make_diffusion
    from training.sampling import generate
    model = _random_model(name)
    diffusion = make_diffusion(name, model, 32, prediction="v")
    kw = dict(guidance=3.0, steps=3, sampler=sampler, in_channels=1, image_size=32, device=torch.device("cpu"))
    prompts = ["1", "two", "3", "", "five", "6"]
    whole = generate(model, diffusion, prompts, seed=7, **kw)
    again = generate(model, diffusion, prompts, seed=7, **kw)
    chunked = generate(model, diffusion, prompts, seed=7, batch=2, **kw)
    other = generate(model, diffusion, prompts, seed=8, **kw)
    torch.testing.assert_close(again, whole, atol=0, rtol=0)
    # DDIM and Euler draw only the starting noise; in chunks of 2 x 1024 values the generator's stream is
    # the same, so each image must be the same image (up to batched-matmul rounding).
    torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=1e-5)
    assert (other - whole).abs().max() > 0.1


# --------------------------------------------------------------------------------------------------
# The loop: data shards, EMA and the learning-rate warmup in a real run
# --------------------------------------------------------------------------------------------------

def test_step_batches_shard_each_epoch_without_overlap_and_ranks_draw_their_own_noise():
    """Under DDP the global batch is the union of the ranks' local batches: within an epoch no example
    is seen twice (on one rank or across ranks), every step's local batches are disjoint, and each
    rank's step seed (its noise, timesteps and prompt dropout) differs from the others'."""
    from training.data import StepBatches
    from training.runtime import step_seed
    n, global_batch, world = 50, 8, 2
    shards = [StepBatches(n, global_batch, world, r, seed=3) for r in range(world)]
    steps_per_epoch = shards[0].steps_per_epoch
    assert steps_per_epoch == (n // world) // (global_batch // world)
    for epoch in range(2):
        seen = []
        for i in range(steps_per_epoch):
            step = epoch * steps_per_epoch + i
            local = [s.indices(step).tolist() for s in shards]
            assert all(len(b) == global_batch // world for b in local)
            assert not set(local[0]) & set(local[1])
            seen += local[0] + local[1]
            assert step_seed(3, step, 0) != step_seed(3, step, 1)
        assert len(seen) == len(set(seen)) == steps_per_epoch * global_batch
        assert all(0 <= i < n for i in seen)
    # A new epoch reshuffles (DistributedSampler's seed + epoch).
    assert shards[0].indices(0).tolist() != shards[0].indices(steps_per_epoch).tolist()


@pytest.fixture(scope="module")
def noise_folder(tmp_path_factory):
    """40 random grey 32x32 images labelled 0-9 (the loop's arithmetic does not care what they show)."""
    from PIL import Image
    folder = tmp_path_factory.mktemp("noise")
    g = torch.Generator().manual_seed(17)
    lines = ["filename,label"]
    for i in range(40):
        pixels = torch.randint(0, 256, (32, 32), generator=g, dtype=torch.uint8).numpy()
        Image.fromarray(pixels, "L").save(folder / f"{i}.png")
        lines.append(f"{i}.png,{i % 10}")
    (folder / "labels.txt").write_text("\n".join(lines) + "\n")
    return str(folder)


def test_ema_and_warmup_follow_their_formulas_in_a_two_step_run(tmp_path, noise_folder):
    """One step, a checkpoint, a resumed second step: EMA after step 1 is the model (AveragedModel's first
    update copies), after step 2 it is d * ema_1 + (1 - d) * model_2; the learning rate the second AdamW
    update applied, solved from the update and the stored moments, is LinearLR's (start 1/w, w - 1 steps)."""
    pytest.importorskip("tqdm")
    pytest.importorskip("matplotlib")
    import train_mnist
    from training.checkpoint import load_checkpoint
    decay, lr, warmup = 0.9, 1e-3, 4
    flags = [f for k, v in TINY["flux"].items() for f in ("--model-override", f"{k}={v}")]
    common = ["--data", noise_folder, "--data-dir", str(tmp_path / "cache"), "--eval-samples", "0", "--no-progress",
              "--sampling-steps", "1"]
    train_mnist.run_command(["--model", "flux", "--norm", "dyt", "--out", str(tmp_path / "out"), "--batch-size", "8",
                             "--lr", str(lr), "--warmup-steps", str(warmup), "--ema-decay", str(decay),
                             "--weight-decay", "0", "--sample-every", "0", "--checkpoint-every", "0", "--steps", "1",
                             *flags, *common])
    ckpt = str(tmp_path / "out" / "checkpoint.pt")
    s1 = load_checkpoint(ckpt)
    train_mnist.run_command(["--resume", ckpt, "--steps", "2", *common])
    s2 = load_checkpoint(ckpt)

    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    linear = torch.optim.lr_scheduler.LinearLR(opt, start_factor=1 / warmup, end_factor=1.0, total_iters=warmup - 1)
    oracle = []
    for _ in range(warmup + 2):
        oracle.append(opt.param_groups[0]["lr"])
        opt.step()
        linear.step()
    # The scheduler's lr for the next step, as checkpointed.
    assert s1["scheduler"]["_last_lr"][0] == pytest.approx(oracle[1], rel=1e-12)
    assert s2["scheduler"]["_last_lr"][0] == pytest.approx(oracle[2], rel=1e-12)

    m1, m2 = s1["model"], s2["model"]
    state = s2["optimizer"]["state"]
    assert len(state) == len(m1)  # one AdamW state per parameter, in state_dict order (no buffers here)
    b1, b2 = s2["optimizer"]["param_groups"][0]["betas"]
    eps = s2["optimizer"]["param_groups"][0]["eps"]
    ratios = []
    for i, name in enumerate(m1):
        st = state[i]
        k = float(st["step"])
        assert k == 2
        direction = (st["exp_avg"] / (1 - b1 ** k)) / (st["exp_avg_sq"].sqrt() / math.sqrt(1 - b2 ** k) + eps)
        big = direction.abs() > 0.05
        ratios.append((m1[name] - m2[name])[big] / direction[big])
    used = torch.cat(ratios)
    assert used.numel() > 1000
    # fp32 parameter differences of ~1e-3-sized steps: 1e-3 relative per element (observed 1.1e-3 worst),
    # the median to 1e-4; the neighbouring schedule values are 50% away.
    assert used.median().item() == pytest.approx(oracle[1], rel=1e-4)
    assert ((used / oracle[1] - 1).abs() < 5e-3).all()

    e1, e2 = s1["ema"], s2["ema"]
    assert int(e1["n_averaged"]) == 1 and int(e2["n_averaged"]) == 2
    for name in m1:
        torch.testing.assert_close(e1["module." + name], m1[name], atol=0, rtol=0)
        # fp32 lerp: a few ulps of the O(1) weights.
        torch.testing.assert_close(e2["module." + name], decay * e1["module." + name] + (1 - decay) * m2[name],
                                   atol=1e-6, rtol=1e-6)
    assert max((m2[n] - m1[n]).abs().max().item() for n in m1) > 1e-4  # the model moved, so the EMA check bites
