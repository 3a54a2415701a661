"""Specification tests for the TARFlow forward flow (BIFLOW.md §2-3).

Every test uses a tiny flow whose output projections are randomised (see conftest.make_flow):
with the default zero initialisation an untrained flow is the identity and most properties
would hold vacuously.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import multivariate_normal, norm

from biflow.config import FORWARD_SIZES
from biflow.models.forward_flow import ForwardFlow
from biflow.models.layers import patchify
from biflow.objectives.nll import PIXEL_BIN_LOG, bits_per_dim, nll_loss, uniform_dequantize
from biflow.sampling.exact import sample_exact, tweedie_denoise
from biflow.training.forward import evaluate_bpd, evaluate_noisy_bpd

TOL = {torch.float32: 1e-4, torch.float64: 1e-10}


pytestmark = pytest.mark.usefixtures("single_thread")  # tiny models: one torch thread (conftest)


def rand_images(flow: ForwardFlow, n: int = 3, seed: int = 1, dtype=torch.float32) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn((n, *flow.image_shape()), generator=gen, dtype=torch.float64).to(dtype)


def rand_labels(flow: ForwardFlow, n: int = 3) -> torch.Tensor | None:
    return torch.arange(n) % flow.cfg.num_classes if flow.cfg.num_classes else None


def to_block_order(block, tokens: torch.Tensor) -> torch.Tensor:
    """Independent of FlowBlock._order: odd blocks read the token sequence reversed."""
    return tokens.flip(1) if block.flip else tokens


# ============================================================== exact invertibility
ROUND_TRIP_CASES = {
    "labelled": dict(flow=dict(), labels="class"),
    "unconditional": dict(flow=dict(num_classes=0), labels="none"),
    "null-label": dict(flow=dict(), labels="none"),
    "no-norm-control": dict(flow=dict(clip=None), labels="class"),
    "clip-4": dict(flow=dict(clip=4.0), labels="class"),
    "clip-shift": dict(flow=dict(clip=4.0, clip_shift=True), labels="class"),
    "patch-1-two-channels": dict(flow=dict(patch_size=1, in_channels=2), labels="class"),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("case", list(ROUND_TRIP_CASES))
def test_inverse_of_forward_recovers_input(make_flow, case, dtype):
    """inverse(forward(x)) == x up to 1e-4 (float32) / 1e-10 (float64)."""
    spec = ROUND_TRIP_CASES[case]
    flow = make_flow(dtype=dtype, **spec["flow"])
    x = rand_images(flow, dtype=dtype)
    y = rand_labels(flow) if spec["labels"] == "class" else None
    z, _, _ = flow(x, y)
    assert not torch.allclose(z, x, atol=1e-2), "the test flow must not be the identity"
    x_rec = flow.inverse(z, y)
    assert x_rec.dtype == dtype
    assert (x_rec - x).abs().max().item() <= TOL[dtype]


def test_guided_inverse_is_deterministic_and_differs_from_unguided(tiny_flow):
    """Guidance g > 0 changes the decoded sample, and repeating the call gives the same result."""
    z = rand_images(tiny_flow, seed=2)
    y = rand_labels(tiny_flow)
    guided = tiny_flow.inverse(z, y, guidance=2.0)
    assert torch.equal(guided, tiny_flow.inverse(z, y, guidance=2.0))
    assert (guided - tiny_flow.inverse(z, y)).abs().max() > 1e-3


def test_zero_guidance_matches_unguided_inverse(tiny_flow):
    """guidance=0 is exactly the plain inverse."""
    z = rand_images(tiny_flow, seed=2)
    y = rand_labels(tiny_flow)
    assert torch.equal(tiny_flow.inverse(z, y, guidance=0.0), tiny_flow.inverse(z, y))


def test_guidance_with_null_label_has_no_effect(tiny_flow):
    """With the null label the conditional and unconditional passes agree, so guidance is a no-op (float64)."""
    flow = tiny_flow.double()
    z = rand_images(flow, seed=2, dtype=torch.float64)
    torch.testing.assert_close(flow.inverse(z, None, guidance=3.0), flow.inverse(z, None), rtol=0, atol=1e-10)


def test_guidance_is_ignored_by_unconditional_flow(make_flow):
    """An unconditional flow (num_classes=0) has nothing to guide: guidance leaves the inverse unchanged."""
    flow = make_flow(num_classes=0)
    z = rand_images(flow, seed=2)
    assert torch.equal(flow.inverse(z, guidance=3.0), flow.inverse(z))


# ============================================================== output contract
def test_forward_returns_image_z_trajectory_and_logdet(make_flow):
    """z is (N,C,H,W); trajectory is (B+1,N,T,D) from patchified x to patchified z; logdet is (N,)."""
    flow = make_flow(in_channels=2, num_blocks=3)
    x = rand_images(flow, n=5)
    z, traj, logdet = flow(x, rand_labels(flow, 5))
    n, c, h, w = x.shape
    cfg = flow.cfg
    assert z.shape == (n, c, h, w)
    assert traj.shape == (cfg.num_blocks + 1, n, cfg.num_tokens, cfg.token_dim)
    assert torch.equal(traj[0], patchify(x, cfg.patch_size))
    assert torch.equal(traj[-1], patchify(z, cfg.patch_size))
    assert logdet.shape == (n,)


def test_trajectory_states_are_the_block_outputs_in_canonical_order(tiny_flow):
    """trajectory[i+1] == block_i(trajectory[i]): every state is in canonical (un-permuted) token order."""
    x = rand_images(tiny_flow)
    y = rand_labels(tiny_flow)
    _, traj, _ = tiny_flow(x, y)
    for i, block in enumerate(tiny_flow.blocks):
        torch.testing.assert_close(block(traj[i], y)[0], traj[i + 1], rtol=0, atol=1e-6)


# ============================================================== density
JACOBIAN_CASES = {
    "patch-2-1ch-16dims": dict(),
    "patch-1-2ch-32dims": dict(patch_size=1, in_channels=2),
    "no-norm-control": dict(clip=None),
    "clip-shift": dict(clip_shift=True),
    "three-blocks": dict(num_blocks=3),
}


@pytest.mark.parametrize("case", list(JACOBIAN_CASES))
def test_logdet_equals_slogdet_of_autograd_jacobian(make_flow, case):
    """The returned log-det equals log|det dF/dx| of the full autograd Jacobian (float64, rel 1e-4)."""
    flow = make_flow(dtype=torch.float64, **JACOBIAN_CASES[case])
    assert flow.dims <= 32
    x = rand_images(flow, n=1, dtype=torch.float64)
    y = rand_labels(flow, 1)
    jac = torch.autograd.functional.jacobian(lambda v: flow(v, y)[0].flatten(), x).reshape(flow.dims, flow.dims)
    sign, logabsdet = torch.linalg.slogdet(jac)
    logdet = flow(x, y)[2][0]
    assert sign.item() > 0  # triangular with positive diagonal exp(-a)
    assert abs(logdet.item()) > 0.1, "non-trivial flow expected"
    assert logdet.item() == pytest.approx(logabsdet.item(), rel=1e-4, abs=1e-8)


def test_log_prob_is_change_of_variables(tiny_flow):
    """log p(x) = sum log N(z; 0, 1) + logdet, computed by hand from forward's outputs."""
    flow = tiny_flow.double()
    x = rand_images(flow, dtype=torch.float64)
    y = rand_labels(flow)
    z, _, logdet = flow(x, y)
    by_hand = torch.as_tensor(norm.logpdf(z.detach().flatten(1).numpy()).sum(1)) + logdet
    torch.testing.assert_close(flow.log_prob(x, y), by_hand, rtol=1e-12, atol=1e-10)


def test_untrained_flow_log_prob_is_standard_normal(make_flow):
    """Zero-initialised output projections make the flow the identity: log p(x) = sum log N(x; 0, 1)."""
    flow = make_flow(dtype=torch.float64, randomize=False)
    x = rand_images(flow, n=4, dtype=torch.float64)
    z, _, logdet = flow(x, rand_labels(flow, 4))
    assert torch.equal(z, x) and torch.equal(logdet, torch.zeros(4, dtype=torch.float64))
    expected = torch.as_tensor(norm.logpdf(x.flatten(1).numpy()).sum(1))
    torch.testing.assert_close(flow.log_prob(x, rand_labels(flow, 4)), expected, rtol=1e-12, atol=1e-12)


def test_log_prob_of_nontrivial_flow_integrates_to_one(make_flow):
    """Monte-Carlo check on a 4-dim flow (T=4 tokens, D=1): E_q[p(x) / q(x)] = 1.

    The proposal q is a Gaussian fitted to the flow's own samples and widened 1.5x, so it covers p.
    """
    flow = make_flow(image_size=2, patch_size=1, std=0.1)
    n = 20_000
    y = torch.zeros(n, dtype=torch.long)
    with torch.no_grad():
        samples = flow.inverse(torch.randn(n, *flow.image_shape(), generator=torch.Generator().manual_seed(0)), y)
    samples = samples.flatten(1).double().numpy()
    proposal = multivariate_normal(samples.mean(0), np.cov(samples.T) * 1.5**2)
    xq = proposal.rvs(n, random_state=1)
    with torch.no_grad():
        log_p = flow.log_prob(torch.as_tensor(xq, dtype=torch.float32).reshape(n, *flow.image_shape()), y)
    weights = np.exp(log_p.double().numpy() - proposal.logpdf(xq))
    assert weights.mean() == pytest.approx(1.0, abs=0.05)


# ============================================================== causality
@pytest.mark.parametrize("block_index", [0, 1])
def test_affine_params_at_position_t_depend_only_on_earlier_tokens(make_flow, block_index):
    """In block order, perturbing token t changes (a, b) at positions > t and nowhere else."""
    flow = make_flow(dtype=torch.float64, clip_shift=True)
    block = flow.blocks[block_index]
    length = flow.cfg.num_tokens
    y = rand_labels(flow, 2)
    xb = torch.randn(2, length, flow.cfg.token_dim, dtype=torch.float64)
    a0, b0 = block.affine_params(xb, y)
    assert torch.equal(a0[:, 0], torch.zeros_like(a0[:, 0])) and torch.equal(b0[:, 0], torch.zeros_like(b0[:, 0]))
    for t in range(length):
        xp = xb.clone()
        xp[:, t] += 1.0
        a1, b1 = block.affine_params(xp, y)
        for p in range(length):
            changed_a = (a1[:, p] - a0[:, p]).abs().max().item()
            changed_b = (b1[:, p] - b0[:, p]).abs().max().item()
            if p <= t:
                assert changed_a == 0 and changed_b == 0, f"token {t} leaked into params of position {p}"
            else:
                assert changed_a > 1e-8 and changed_b > 1e-8, f"params at {p} ignore token {t}"


@pytest.mark.parametrize("block_index", [0, 1])
def test_block_output_at_position_t_depends_only_on_tokens_up_to_t(make_flow, block_index):
    """block.forward on canonical tokens: a canonical perturbation, mapped to block order position t,
    changes z only at block-order positions >= t (odd blocks read the sequence reversed)."""
    flow = make_flow(dtype=torch.float64)
    block = flow.blocks[block_index]
    assert block.flip == (block_index % 2 == 1)
    length = flow.cfg.num_tokens
    y = rand_labels(flow, 2)
    x = torch.randn(2, length, flow.cfg.token_dim, dtype=torch.float64)
    z0 = to_block_order(block, block(x, y)[0])
    for c in range(length):
        t = length - 1 - c if block.flip else c  # canonical index c -> block-order position t
        xp = x.clone()
        xp[:, c] += 1.0
        z1 = to_block_order(block, block(xp, y)[0])
        diff = (z1 - z0).abs().amax(dim=(0, 2))  # per block-order position
        assert torch.all(diff[:t] == 0), f"canonical token {c} (block position {t}) changed earlier outputs"
        assert torch.all(diff[t:] > 1e-8), f"outputs at positions >= {t} ignore block position {t}"


# ============================================================== KV-cache decoding
def naive_block_inverse(block, z: torch.Tensor, y, y_null, guidance: float) -> torch.Tensor:
    """Reference decoder: one token at a time, recomputing the full causal pass at every step.

    Guided rule: a <- a + g_t (a - a_u), b <- b + g_t (b - b_u), g_t = g * t / (T - 1) for the
    token at block-order position t, with (a_u, b_u) from the null label.
    """
    zb = to_block_order(block, z)
    length = zb.shape[1]
    x = torch.zeros_like(zb)
    x[:, 0] = zb[:, 0]
    for t in range(1, length):
        a, b = block.affine_params(x, y)
        if guidance > 0:
            a_u, b_u = block.affine_params(x, y_null)
            g = guidance * t / (length - 1)
            a, b = a + g * (a - a_u), b + g * (b - b_u)
        x[:, t] = zb[:, t] * torch.exp(a[:, t]) + b[:, t]
    return to_block_order(block, x)


KV_TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-10, atol=1e-10)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("guidance", [0.0, 1.5], ids=["unguided", "guided"])
@pytest.mark.parametrize("block_index", [0, 1])
def test_kv_cache_decoding_matches_naive_recompute(make_flow, block_index, guidance, dtype):
    """FlowBlock.inverse (preallocated KV cache) equals the full-recompute decoder (1e-5 fp32, 1e-10 fp64)."""
    flow = make_flow(patch_size=1, dtype=dtype)  # T = 16 tokens: a longer sequence exercises the cache more
    block = flow.blocks[block_index]
    n = 3
    z = torch.randn(n, flow.cfg.num_tokens, flow.cfg.token_dim, generator=torch.Generator().manual_seed(3), dtype=dtype)
    y = rand_labels(flow, n)
    y_null = torch.full((n,), flow.cfg.num_classes)
    with torch.no_grad():
        expected = naive_block_inverse(block, z, y, y_null, guidance)
    got = block.inverse(z, y, y_null, guidance)
    torch.testing.assert_close(got, expected, **KV_TOL[dtype])


@pytest.mark.parametrize("guidance", [0.0, 1.5], ids=["unguided", "guided"])
def test_flow_inverse_matches_naive_recompute_through_all_blocks(make_flow, guidance):
    """ForwardFlow.inverse = naive decoding of the blocks in reverse order, on images."""
    flow = make_flow(num_blocks=3)
    z = rand_images(flow, seed=4)
    y = rand_labels(flow)
    y_null = torch.full((z.shape[0],), flow.cfg.num_classes)
    h = flow.to_tokens(z)
    with torch.no_grad():
        for block in reversed(flow.blocks):
            h = naive_block_inverse(block, h, y, y_null, guidance)
    torch.testing.assert_close(flow.inverse(z, y, guidance), flow.to_image(h), **KV_TOL[torch.float32])


# ============================================================== no hidden state
def _module_attributes(flow: ForwardFlow) -> dict[str, set[str]]:
    return {name: set(vars(m)) | set(m._buffers) | set(m._modules) for name, m in flow.named_modules()}


def test_inverse_does_not_mutate_z(tiny_flow):
    """The caller's z is left untouched by inverse (guided and unguided)."""
    z = rand_images(tiny_flow, seed=5)
    before = z.clone()
    tiny_flow.inverse(z, rand_labels(tiny_flow))
    tiny_flow.inverse(z, rand_labels(tiny_flow), guidance=1.0)
    assert torch.equal(z, before)


def test_inverse_leaves_modules_without_new_state(tiny_flow):
    """No attribute, buffer or parameter value is added or changed by inverse (the KV cache is call-local)."""
    attrs = _module_attributes(tiny_flow)
    state = {k: v.clone() for k, v in tiny_flow.state_dict().items()}
    tiny_flow.inverse(rand_images(tiny_flow), rand_labels(tiny_flow), guidance=1.0)
    assert _module_attributes(tiny_flow) == attrs
    after = tiny_flow.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], state[k]) for k in state)


def test_successive_inverse_calls_with_different_batch_sizes(tiny_flow):
    """Decoding a batch of 5 and then a batch of 2 both round-trip (no stale cache of the wrong size)."""
    for n in (5, 2, 7):
        x = rand_images(tiny_flow, n=n, seed=n)
        y = rand_labels(tiny_flow, n)
        z, _, _ = tiny_flow(x, y)
        assert (tiny_flow.inverse(z, y) - x).abs().max() <= 1e-4
        assert tiny_flow.inverse(z, y, guidance=1.0).shape == x.shape


# ============================================================== objective
def test_bits_per_dim_of_identity_flow_has_closed_form(make_flow):
    """Identity flow: bpd = (0.5 mean(x^2) + 0.5 log 2pi + log 127.5) / log 2 per sample."""
    flow = make_flow(dtype=torch.float64, randomize=False)
    x = rand_images(flow, n=4, dtype=torch.float64)
    bpd = bits_per_dim(flow.log_prob(x), flow.dims)
    mean_sq = x.flatten(1).pow(2).mean(1)
    expected = (0.5 * mean_sq + 0.5 * math.log(2 * math.pi) + math.log(127.5)) / math.log(2)
    torch.testing.assert_close(bpd, expected, rtol=1e-12, atol=1e-12)
    assert PIXEL_BIN_LOG == pytest.approx(math.log(127.5))


def test_uniform_dequantisation_spreads_each_pixel_over_its_own_bin():
    """x = u/127.5 - 1 moves by at most half a bin (1/255), uniformly: it rounds back to u, and over many draws the
    offsets fill the bin (mean ~ 0, extremes near +-1/255)."""
    u = torch.arange(256, dtype=torch.float64).repeat(200)
    x = u / 127.5 - 1
    xd = uniform_dequantize(x, torch.Generator().manual_seed(0))
    offset = (xd - x) * 127.5  # in units of one bin
    assert offset.abs().max() <= 0.5 and torch.equal(torch.round((xd + 1) * 127.5), u)
    assert abs(offset.mean().item()) < 0.01 and offset.min() < -0.49 and offset.max() > 0.49


def test_standard_bits_per_dim_is_the_bound_on_uniformly_dequantised_pixels(make_flow):
    """evaluate_bpd = mean over images of (-log p(x + (v - 1/2)/127.5)/dims + log 127.5)/log 2, v ~ U[0,1) drawn from
    the seed: written out for the identity flow, where -log p is the standard Gaussian's."""
    flow = make_flow(dtype=torch.float64, randomize=False)
    u = torch.randint(0, 256, (6, *flow.image_shape()), generator=torch.Generator().manual_seed(3))
    x = (u / 127.5 - 1).double()
    xd = uniform_dequantize(x, torch.Generator().manual_seed(7))
    expected = ((0.5 * xd.flatten(1).pow(2).mean(1) + 0.5 * math.log(2 * math.pi) + math.log(127.5)) / math.log(2)).mean()
    assert evaluate_bpd(flow, x, None, batch_size=4, seed=7) == pytest.approx(expected.item(), rel=1e-12)
    noisy = evaluate_noisy_bpd(flow, x, None, seed=7)  # the Gaussian-noised number is a different quantity
    assert noisy != pytest.approx(expected.item(), rel=1e-6)


def test_bits_per_dim_without_pixel_term_drops_dequantisation(make_flow):
    """pixels=False: bpd = -log p(x) / dims / log 2 (continuous data)."""
    flow = make_flow(dtype=torch.float64)
    x = rand_images(flow, dtype=torch.float64)
    log_p = flow.log_prob(x)
    torch.testing.assert_close(bits_per_dim(log_p, flow.dims, pixels=False), -log_p / flow.dims / math.log(2))


def test_nll_loss_is_per_dim_nll_without_gaussian_constant(tiny_flow):
    """nll_loss(z, logdet) = mean(-log p(x) / dims) - 0.5 log 2pi."""
    x = rand_images(tiny_flow, n=4)
    y = rand_labels(tiny_flow, 4)
    z, _, logdet = tiny_flow(x, y)
    expected = (-tiny_flow.log_prob(x, y) / tiny_flow.dims).mean() - 0.5 * math.log(2 * math.pi)
    assert nll_loss(z, logdet).item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-6)


def test_nll_loss_keeps_float64_precision(make_flow):
    """With a float64 flow, nll_loss agrees with log_prob to float64 precision."""
    flow = make_flow(dtype=torch.float64)
    x = rand_images(flow, n=4, dtype=torch.float64)
    z, _, logdet = flow(x)
    expected = (-flow.log_prob(x) / flow.dims).mean() - 0.5 * math.log(2 * math.pi)
    assert nll_loss(z, logdet).item() == pytest.approx(expected.item(), rel=1e-12, abs=1e-12)


# ============================================================== exact sampling
@pytest.mark.parametrize("labels", [None, 2, "tensor"], ids=["null", "int", "tensor"])
def test_sample_exact_returns_images(tiny_flow, labels):
    """sample_exact gives (num, C, H, W) finite samples for null, int and tensor labels."""
    if labels == "tensor":
        labels = torch.tensor([0, 1, 2, 0])
    out = sample_exact(tiny_flow, 4, labels=labels, guidance=1.0)
    assert out.shape == (4, *tiny_flow.image_shape())
    assert torch.isfinite(out).all()


def test_sample_exact_is_reproducible_with_a_generator(tiny_flow):
    """The same generator seed gives the same samples; a different seed gives different ones."""
    def draw(seed):
        return sample_exact(tiny_flow, 3, labels=1, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(draw(7), draw(7))
    assert not torch.allclose(draw(7), draw(8))


def _score(flow: ForwardFlow, x: torch.Tensor, y) -> torch.Tensor:
    """grad_x log p(x | y), with log p written out from forward's z and logdet."""
    x = x.detach().requires_grad_(True)
    z, _, logdet = flow(x, y)
    log_p = -0.5 * z.flatten(1).pow(2).sum(1) + logdet
    return torch.autograd.grad(log_p.sum(), x)[0]


def test_denoised_sample_differs_by_sigma_squared_times_score(tiny_flow):
    """sample_exact(denoise=True) = sample_exact(denoise=False) + sigma^2 * grad log p (Tweedie)."""
    y = torch.tensor([0, 1, 2])
    raw = sample_exact(tiny_flow, 3, labels=y, denoise=False, generator=torch.Generator().manual_seed(1))
    den = sample_exact(tiny_flow, 3, labels=y, denoise=True, generator=torch.Generator().manual_seed(1))
    sigma = tiny_flow.cfg.noise_std
    assert sigma > 0
    step = sigma**2 * _score(tiny_flow, raw, y)
    assert step.abs().max() > 1e-4, "the denoising step must be non-trivial"
    torch.testing.assert_close(den - raw, step, rtol=1e-4, atol=1e-6)


def test_tweedie_denoise_uses_given_sigma_and_zero_sigma_is_identity(tiny_flow):
    """tweedie_denoise(x, sigma=s) = x + s^2 * score; sigma=0 returns x unchanged."""
    x = rand_images(tiny_flow)
    y = rand_labels(tiny_flow)
    torch.testing.assert_close(tweedie_denoise(tiny_flow, x, y, sigma=0.3), x + 0.09 * _score(tiny_flow, x, y))
    assert torch.equal(tweedie_denoise(tiny_flow, x, y, sigma=0.0), x)


def test_sample_exact_follows_model_dtype(make_flow):
    """A float64 flow samples in float64."""
    flow = make_flow(dtype=torch.float64)
    assert sample_exact(flow, 2, labels=0).dtype == torch.float64


# ============================================================== size registry
def _count(flow: ForwardFlow) -> int:
    return sum(p.numel() for p in flow.parameters())


@pytest.mark.parametrize("name", list(FORWARD_SIZES))
def test_every_registered_size_builds(name):
    """Each named size builds at tiny geometry (B and XL on the meta device: counting only)."""
    cfg = FORWARD_SIZES[name]
    geometry = dict(image_size=4, patch_size=2, in_channels=1, num_classes=3)
    if cfg["width"] >= 512:
        with torch.device("meta"):
            flow = ForwardFlow(name, **geometry)
    else:
        flow = ForwardFlow(name, **geometry)
        x = torch.randn(2, *flow.image_shape())
        z, traj, _ = flow(x, torch.tensor([0, 1]))
        assert z.shape == x.shape and traj.shape[0] == cfg["num_blocks"] + 1
    assert len(flow.blocks) == cfg["num_blocks"]
    assert flow.cfg.width == cfg["width"] and flow.cfg.heads == cfg["heads"]
    assert all(len(b.layers) == cfg["layers_per_block"] for b in flow.blocks)
    print(f"\n[params] {name:>9} @ 4x4x1/p2, 3 classes: {_count(flow):,}")


def test_size_B_at_paper_geometry_has_about_120M_parameters():
    """iTARFlow-B/2 on a 32x32x4 latent, patch 2, 1000 classes: ~120M parameters (paper: 120M)."""
    with torch.device("meta"):
        flow = ForwardFlow("B", image_size=32, in_channels=4, patch_size=2, num_classes=1000)
    count = _count(flow)
    print(f"\n[params] B @ 32x32x4/p2, 1000 classes: {count:,}")
    assert flow.cfg.num_tokens == 256 and flow.cfg.token_dim == 16
    assert 100e6 <= count <= 140e6
